//! A guest disk as vmvault shows it: its partitions, each with the filesystem it holds, and
//! the paths that name them. A disk with several partitions has them as the root's folders,
//! `/p1`, `/p2`, ... (or by filesystem label: `/BOOT/...`); a disk with one partition (or a
//! filesystem on the whole disk) has that filesystem's root as `/`.

use std::sync::Arc;

use serde::Serialize;

use crate::disk::{Part, ReadAt};
use crate::error::{FilesError, Result};
use crate::fs::{self, Filesystem, FsType};
use crate::partition::{partitions, Partition};

pub struct Volume {
    pub partition: Partition,
    pub fs_type: Option<FsType>,
    pub fs: Option<Box<dyn Filesystem>>,
    /// Why the filesystem could not be opened.
    pub error: Option<String>,
}

/// A partition as `files ls /` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    /// `p1`, `p2`, ...: the folder that names it.
    pub name: String,
    #[serde(flatten)]
    pub partition: Partition,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Volume {
    pub fn name(&self) -> String {
        format!("p{}", self.partition.number)
    }

    pub fn label(&self) -> Option<String> {
        self.fs.as_ref().and_then(|f| f.label())
    }

    pub fn info(&self) -> VolumeInfo {
        VolumeInfo {
            name: self.name(),
            partition: self.partition.clone(),
            filesystem: self.fs.as_ref().map(|f| f.kind()),
            label: self.label(),
            error: self.error.clone(),
        }
    }
}

/// What a path names on a guest disk.
pub enum Target<'a> {
    /// The root of a disk with several partitions: its partitions.
    Volumes,
    /// A path within one partition's filesystem.
    In(Located<'a>),
}

pub struct Located<'a> {
    pub volume: &'a Volume,
    pub fs: &'a dyn Filesystem,
    /// Components within the filesystem.
    pub path: Vec<String>,
    /// How the disk names this filesystem's root: `/p2` (or `` for a disk's only one).
    pub prefix: String,
}

impl Located<'_> {
    /// The full path as the user sees it.
    pub fn display(&self) -> String {
        format!("{}{}", self.prefix, fs::display_path(&self.path))
    }
}

pub struct GuestDisk {
    disk: Arc<dyn ReadAt>,
    pub volumes: Vec<Volume>,
}

impl GuestDisk {
    /// Reads the partition table and opens every filesystem found; a partition whose
    /// filesystem is unknown or damaged is kept, with the reason.
    pub fn open(disk: Arc<dyn ReadAt>) -> Result<GuestDisk> {
        let parts = partitions(&disk).map_err(|e| Self::blame(&disk, e))?;
        let mut volumes = Vec::new();
        for partition in parts {
            let part = Part::new(disk.clone(), partition.start, partition.size);
            let fs_type = fs::probe(&part);
            let (fs, error) = match fs_type {
                None => (None, Some("no filesystem vmvault reads".to_string())),
                Some(t) => match fs::open(t, part) {
                    Ok(f) => (Some(f), None),
                    Err(e) => (None, Some(Self::blame(&disk, e).to_string())),
                },
            };
            volumes.push(Volume {
                partition,
                fs_type,
                fs,
                error,
            });
        }
        if volumes.is_empty() {
            let none = FilesError::Unsupported(
                "no partition table or filesystem that vmvault reads on this disk".into(),
            );
            return Err(Self::blame(&disk, none));
        }
        Ok(GuestDisk { disk, volumes })
    }

    /// An error as the disk explains it: a failed fetch from the vault beats whatever a
    /// filesystem made of the missing bytes.
    pub fn blame(disk: &Arc<dyn ReadAt>, e: FilesError) -> FilesError {
        match disk.take_error() {
            Some(msg) => FilesError::Disk(msg),
            None => e,
        }
    }

    pub fn check(&self, e: FilesError) -> FilesError {
        Self::blame(&self.disk, e)
    }

    /// Whether paths start with a partition's name.
    pub fn prefixed(&self) -> bool {
        self.volumes.len() > 1
    }

    /// Splits a path into components: `.` and empty ones dropped, `..` going up (never above
    /// the root).
    pub fn components(path: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                c => out.push(c.to_string()),
            }
        }
        out
    }

    /// The volume a partition name (`p2`) or a filesystem label names.
    pub fn volume(&self, name: &str) -> Option<&Volume> {
        let by_number = name
            .strip_prefix('p')
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|n| self.volumes.iter().find(|v| v.partition.number == n));
        by_number
            .or_else(|| {
                self.volumes
                    .iter()
                    .find(|v| v.label().as_deref() == Some(name))
            })
            .or_else(|| {
                self.volumes.iter().find(|v| {
                    v.label()
                        .is_some_and(|l| l.to_lowercase() == name.to_lowercase())
                })
            })
    }

    pub fn resolve(&self, path: &str) -> Result<Target<'_>> {
        let mut comps = Self::components(path);
        let (volume, prefix) = if self.prefixed() {
            if comps.is_empty() {
                return Ok(Target::Volumes);
            }
            let name = comps.remove(0);
            let v = self.volume(&name).ok_or_else(|| {
                FilesError::NotFound(format!(
                    "/{name} (this disk's partitions: {})",
                    self.volumes
                        .iter()
                        .map(|v| match v.label() {
                            Some(l) => format!("/{} or /{l}", v.name()),
                            None => format!("/{}", v.name()),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            (v, format!("/{}", v.name()))
        } else {
            (&self.volumes[0], String::new())
        };
        let fs = volume.fs.as_deref().ok_or_else(|| {
            let why = volume.error.clone().unwrap_or_default();
            FilesError::Unsupported(format!("partition {}: {why}", volume.name()))
        })?;
        Ok(Target::In(Located {
            volume,
            fs,
            path: comps,
            prefix,
        }))
    }
}
