//! FAT12, FAT16 and FAT32 with long names, through the `fatfs` crate. FAT has no owners,
//! permissions, links or symlinks; its times are local times without a zone, taken as UTC.

use fatfs::{Dir, DirEntry, FileSystem, FsOptions};

use crate::disk::Part;
use crate::error::{FilesError, Result};
use crate::fs::{display_path, Entry, Filesystem, Kind, Opener, ReadSeek};

pub struct FatFs {
    fs: FileSystem<Part>,
    /// Every entry takes 32 bytes; a FAT folder holds at most 65,536 of them.
    limit: usize,
    capacity: u64,
}

const MAX_FAT_DIR: usize = 65_536;

fn damaged(path: &[String], e: impl std::fmt::Display) -> FilesError {
    FilesError::damaged("FAT filesystem", format!("{}: {e}", display_path(path)))
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn entry(e: &DirEntry<'_, Part>) -> Entry {
    let kind = if e.is_dir() { Kind::Dir } else { Kind::File };
    let size = if e.is_dir() { 0 } else { e.len() };
    let mut out = Entry::new(e.file_name(), kind, size);
    let t = e.modified();
    let (d, tm) = (t.date, t.time);
    if (1..=12).contains(&d.month) && (1..=31).contains(&d.day) {
        let days = days_from_civil(d.year.into(), d.month.into(), d.day.into());
        let secs = i64::from(tm.hour.min(23)) * 3600
            + i64::from(tm.min.min(59)) * 60
            + i64::from(tm.sec.min(59));
        out.mtime = Some(days * 86_400 + secs);
        out.mtime_nanos = u32::from(tm.millis.min(999)) * 1_000_000;
    }
    out
}

impl FatFs {
    pub fn open(part: Part) -> Result<FatFs> {
        let limit = crate::fs::entry_limit(part.len(), 32);
        let capacity = part.len();
        let fs = FileSystem::new(part, FsOptions::new())
            .map_err(|e| FilesError::damaged("FAT filesystem", e))?;
        Ok(FatFs {
            fs,
            limit,
            capacity,
        })
    }

    /// The entries of a folder, at most 65,536 and what the filesystem's size allows (a
    /// folder whose clusters loop would otherwise never end).
    fn entries<'a>(
        &'a self,
        dir: &Dir<'a, Part>,
        path: &[String],
    ) -> Result<Vec<DirEntry<'a, Part>>> {
        let mut out = Vec::new();
        for item in dir.iter() {
            let e = item.map_err(|e| damaged(path, e))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() >= self.limit.min(MAX_FAT_DIR) {
                return Err(FilesError::damaged(
                    "FAT filesystem",
                    format!(
                        "{}: more entries than a folder can hold (its clusters loop)",
                        display_path(path)
                    ),
                ));
            }
            out.push(e);
        }
        Ok(out)
    }

    /// The entry `path` names (not the root), matched exactly, else ignoring case as FAT does.
    /// The folder at `path` (the root for an empty one).
    fn dir(&self, path: &[String]) -> Result<Dir<'_, Part>> {
        if path.is_empty() {
            return Ok(self.fs.root_dir());
        }
        let e = self.find(path)?;
        if !e.is_dir() {
            return Err(FilesError::NotADirectory(display_path(path)));
        }
        Ok(e.to_dir())
    }

    fn find(&self, path: &[String]) -> Result<DirEntry<'_, Part>> {
        let mut dir = self.fs.root_dir();
        for (i, name) in path.iter().enumerate() {
            let here = &path[..i];
            let entries = self.entries(&dir, here)?;
            let found = entries
                .iter()
                .position(|e| e.file_name() == *name)
                .or_else(|| {
                    let lower = name.to_lowercase();
                    entries.iter().position(|e| {
                        e.file_name().to_lowercase() == lower
                            || e.short_file_name().to_lowercase() == lower
                    })
                });
            let Some(found) = found else {
                return Err(FilesError::NotFound(display_path(&path[..=i])));
            };
            let e = entries
                .into_iter()
                .nth(found)
                .expect("position is in range");
            if i + 1 == path.len() {
                return Ok(e);
            }
            if !e.is_dir() {
                return Err(FilesError::NotADirectory(display_path(&path[..=i])));
            }
            dir = e.to_dir();
        }
        Err(FilesError::BadPath("the root has no entry".into()))
    }
}

impl Filesystem for FatFs {
    fn kind(&self) -> &'static str {
        "fat"
    }

    fn label(&self) -> Option<String> {
        let from_root = self.fs.read_volume_label_from_root_dir().ok().flatten();
        let l = from_root.unwrap_or_else(|| self.fs.volume_label());
        let l = l.trim().to_string();
        (!l.is_empty() && l != "NO NAME").then_some(l)
    }

    fn stat(&self, path: &[String]) -> Result<Entry> {
        if path.is_empty() {
            return Ok(Entry::new("", Kind::Dir, 0));
        }
        Ok(entry(&self.find(path)?))
    }

    fn list(&self, path: &[String]) -> Result<Vec<Entry>> {
        let dir = self.dir(path)?;
        Ok(self.entries(&dir, path)?.iter().map(entry).collect())
    }

    fn max_entries(&self) -> usize {
        self.limit
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    /// One pass over the folder; each entry opens (or lists) from itself, not by a second
    /// scan of every folder on its path.
    fn list_with(
        &self,
        path: &[String],
        f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>,
    ) -> Result<()> {
        let dir = self.dir(path)?;
        list_dir(&dir, self.limit.min(MAX_FAT_DIR), &display_path(path), f)
    }

    fn read_link(&self, path: &[String]) -> Result<String> {
        Err(FilesError::BadPath(format!(
            "{}: FAT has no symlinks",
            display_path(path)
        )))
    }

    fn open(&self, path: &[String]) -> Result<Box<dyn ReadSeek + '_>> {
        let e = self.find(path)?;
        if !e.is_file() {
            return Err(FilesError::BadPath(format!(
                "{}: not a regular file",
                display_path(path)
            )));
        }
        Ok(Box::new(e.to_file()))
    }
}

fn list_dir<'a>(
    dir: &Dir<'a, Part>,
    limit: usize,
    here: &str,
    f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>,
) -> Result<()> {
    let damaged =
        |e: &dyn std::fmt::Display| FilesError::damaged("FAT filesystem", format!("{here}: {e}"));
    let mut n = 0;
    for item in dir.iter() {
        let e = item.map_err(|x| damaged(&x))?;
        let name = e.file_name();
        if name == "." || name == ".." {
            continue;
        }
        n += 1;
        if n > limit {
            return Err(damaged(
                &"more entries than a folder can hold (its clusters loop)",
            ));
        }
        let child = format!("{}/{name}", here.trim_end_matches('/'));
        f(
            &entry(&e),
            &FatOpener {
                e,
                limit,
                path: child,
            },
        )?;
    }
    Ok(())
}

struct FatOpener<'a> {
    e: DirEntry<'a, Part>,
    limit: usize,
    path: String,
}

impl Opener for FatOpener<'_> {
    fn open(&self) -> Result<Box<dyn ReadSeek + '_>> {
        if !self.e.is_file() {
            return Err(FilesError::BadPath(format!(
                "{}: not a regular file",
                self.path
            )));
        }
        Ok(Box::new(self.e.to_file()))
    }

    fn list_with(&self, f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>) -> Result<()> {
        if !self.e.is_dir() {
            return Err(FilesError::NotADirectory(self.path.clone()));
        }
        list_dir(&self.e.to_dir(), self.limit, &self.path, f)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_days() {
        assert_eq!(super::days_from_civil(1970, 1, 1), 0);
        assert_eq!(super::days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(super::days_from_civil(1980, 1, 1), 3_652);
    }
}
