//! A restore on this host (docs/design.md, "The relay data path"): the server sends the
//! point's manifest and then each chunk by disk and position, opened and checked on its side
//! (the agent has no vault key); the engine writes the images as any restore does. The agent
//! writes only under its restore roots, whatever the job says: a compromised server or a
//! stolen admin token cannot make it write over the host.

use std::path::{Component, Path, PathBuf};

use vmvault_api::agent::{
    frames, job_path, restore_chunk_path, restore_path, RestorePlan, RAW, ZERO, ZSTD,
};
use vmvault_engine::{
    ChunkFetcher, DiskChunks, EngineError, PointChunks, Progress, RestoreOptions,
};
use vmvault_format::{DiskIndex, DiskRecord, Manifest};

use crate::client::Client;
use crate::{AgentError, Result};

/// The job's point's chunks, through the server.
struct RelayChunks<'a> {
    client: &'a Client,
    job: i64,
    lease: &'a str,
    manifest: &'a Manifest,
}

struct RelayDisk<'a> {
    chunks: &'a RelayChunks<'a>,
    number: usize,
    layout: DiskIndex,
}

struct RelayFetcher<'a> {
    disk: &'a RelayDisk<'a>,
    buf: Vec<u8>,
    zstd: zstd::bulk::Decompressor<'static>,
}

fn engine(e: AgentError) -> EngineError {
    EngineError::Input(e.to_string())
}

impl PointChunks for RelayChunks<'_> {
    fn disk(&self, record: &DiskRecord) -> vmvault_engine::Result<Box<dyn DiskChunks + '_>> {
        let number = self
            .manifest
            .disks
            .iter()
            .position(|d| d.name == record.name)
            .ok_or_else(|| EngineError::Input(format!("the point has no disk {}", record.name)))?;
        Ok(Box::new(RelayDisk {
            chunks: self,
            number,
            layout: DiskIndex {
                disk_size: record.size,
                chunk_size: self.manifest.chunk_size,
                chunks: Vec::new(),
            },
        }))
    }
}

impl DiskChunks for RelayDisk<'_> {
    fn layout(&self) -> DiskIndex {
        self.layout.clone()
    }

    fn fetcher(&self) -> Box<dyn ChunkFetcher + '_> {
        Box::new(RelayFetcher {
            disk: self,
            buf: Vec::new(),
            zstd: zstd::bulk::Decompressor::new().expect("a zstd context"),
        })
    }
}

impl ChunkFetcher for RelayFetcher<'_> {
    fn fetch(&mut self, i: usize, len: usize) -> vmvault_engine::Result<Option<&[u8]>> {
        let c = self.disk.chunks;
        let path = restore_chunk_path(c.job, self.disk.number, i as u64);
        let body = c
            .client
            .get_raw(&path, Some(c.lease))
            .map_err(engine)?
            .unwrap_or_default();
        let bad = || {
            EngineError::Input(format!(
                "the server sent chunk {i} of disk {} malformed",
                self.disk.number
            ))
        };
        let frames = frames(&body).ok_or_else(bad)?;
        let [(pos, compression, plain, data)] = frames[..] else {
            return Err(bad());
        };
        if pos != i as u64 || plain as usize != len {
            return Err(bad());
        }
        self.buf.clear();
        match compression {
            ZERO if data.is_empty() => return Ok(None),
            RAW if data.len() == len => self.buf.extend_from_slice(data),
            ZSTD => {
                self.buf.resize(len, 0);
                let n = self
                    .zstd
                    .decompress_to_buffer(data, &mut self.buf[..])
                    .map_err(|_| bad())?;
                if n != len {
                    return Err(bad());
                }
            }
            _ => return Err(bad()),
        }
        Ok(Some(&self.buf))
    }
}

/// `target` if it lies under one of `roots` (after resolving its parent's symlinks), as the
/// path to write; a target that is itself a symlink is refused.
pub fn confine(roots: &[PathBuf], target: &str) -> Result<PathBuf> {
    let refuse = |why: &str| AgentError::Input(format!("restore target {target}: {why}"));
    let path = Path::new(target);
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refuse("give an absolute path without `..`"));
    }
    if roots.is_empty() {
        return Err(refuse(
            "this agent has no restore roots (restore_roots in its configuration)",
        ));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(refuse("not a file or folder name"));
    };
    let parent = parent
        .canonicalize()
        .map_err(|_| refuse("its folder does not exist on this host"))?;
    let inside = roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| parent.starts_with(&r));
    if !inside {
        return Err(refuse("not under this agent's restore roots"));
    }
    let resolved = parent.join(name);
    if std::fs::symlink_metadata(&resolved).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(refuse("it is a symbolic link"));
    }
    Ok(resolved)
}

/// Runs a restore job; returns the files written.
pub fn restore(
    client: &Client,
    job: i64,
    lease: &str,
    roots: &[PathBuf],
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let plan: RestorePlan = client
        .get(&restore_path(job), Some(lease))?
        .ok_or_else(|| AgentError::Server("the restore job has no plan".into()))?;
    let manifest: Manifest = serde_json::from_value(plan.manifest)
        .map_err(|e| AgentError::Server(format!("the point's manifest: {e}")))?;
    let target = confine(roots, &plan.target)?;
    let opts = RestoreOptions {
        overwrite: plan.overwrite,
        new_folder: !plan.overwrite,
        format: plan.format.clone(),
        ..RestoreOptions::default()
    };
    let chunks = RelayChunks {
        client,
        job,
        lease,
        manifest: &manifest,
    };
    let wrote = match &plan.disk {
        Some(name) => {
            let disk = vmvault_engine::select_disk(&manifest, name)?;
            vmvault_engine::restore_disk_from(&chunks, &manifest, disk, &target, &opts, progress)?;
            vec![target.display().to_string()]
        }
        None => vmvault_engine::restore_vm_from(&chunks, &manifest, &target, &opts, progress)?
            .into_iter()
            .map(|p| p.display().to_string())
            .collect(),
    };
    let _: () = client
        .tell(
            &job_path(job, "done"),
            Some(lease),
            &serde_json::json!({ "wrote": wrote }),
        )
        .map(|_| ())?;
    Ok(wrote)
}
