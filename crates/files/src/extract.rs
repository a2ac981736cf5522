//! Extraction of a file or a folder tree, to a directory, a tar or a zip stream.
//!
//! Safety rules (a guest filesystem is untrusted): every name is checked (no empty name, `.`,
//! `..`, `/` or NUL: such entries are skipped and reported); into a directory, every file is
//! created new (`O_CREAT|O_EXCL|O_NOFOLLOW`), every folder by `mkdir`, and a folder is entered
//! only if this extraction just made it, so nothing is ever written through a symlink or
//! outside the target; symlinks are recreated as they are, never followed; set-id bits are
//! dropped. Archives hold relative names only.

use std::collections::HashMap;
use std::fs::{File, FileTimes, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::{FilesError, Result};
use crate::fs::{display_path, Entry, Filesystem, Kind, Opener};
use crate::walk::{Skipped, Visit, Visitor, Walk};

const BUF: usize = 1 << 20;

/// Where extracted files go.
pub enum Output<'a> {
    /// A directory: the file or folder lands in it under its own name.
    Dir(&'a Path),
    Tar(&'a mut dyn Write),
    Zip(&'a mut dyn Write),
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Extracted {
    pub files: u64,
    pub folders: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub bytes: u64,
    pub skipped: Vec<Skipped>,
}

/// Whether a name from a guest filesystem can be used as one path component.
pub fn safe_name(name: &str) -> bool {
    !(name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0'))
}

/// Extracts what `path` names in `fs` (a file, symlink or folder, recursively) as `name`.
pub fn extract(
    fs: &dyn Filesystem,
    path: &[String],
    name: &str,
    out: Output<'_>,
) -> Result<Extracted> {
    let top = fs.stat(path)?;
    if !safe_name(name) {
        return Err(FilesError::BadPath(format!(
            "{name:?} cannot be a file name"
        )));
    }
    let mut sink: Box<dyn Sink + '_> = match out {
        Output::Dir(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| FilesError::output(format!("creating {}", dir.display()), e))?;
            let target = dir.join(name);
            if target.symlink_metadata().is_ok() {
                return Err(FilesError::BadPath(format!(
                    "{} exists: vmvault does not overwrite",
                    target.display()
                )));
            }
            Box::new(DirSink {
                root: dir.to_path_buf(),
            })
        }
        Output::Tar(w) => Box::new(TarSink(tar::Builder::new(w))),
        Output::Zip(w) => Box::new(ZipSink(Some(zip::ZipWriter::new_stream(w)))),
    };
    let mut v = Extractor {
        fs,
        base: path.to_vec(),
        base_len: path.len(),
        sink: &mut *sink,
        links: HashMap::new(),
        done: Extracted::default(),
        skipped: Vec::new(),
    };
    let mut walk = Walk::new(fs);
    let mut rel = vec![name.to_string()];
    walk.run(path, &top, &mut rel, &mut v)?;
    let mut done = std::mem::take(&mut v.done);
    done.skipped = std::mem::take(&mut v.skipped);
    done.skipped.extend(walk.skipped);
    sink.finish()?;
    Ok(done)
}

struct Extractor<'a, 's> {
    fs: &'a dyn Filesystem,
    base: Vec<String>,
    base_len: usize,
    sink: &'s mut dyn Sink,
    /// File id → where its first name was extracted: later names become hard links.
    links: HashMap<u64, Vec<String>>,
    done: Extracted,
    skipped: Vec<Skipped>,
}

impl Extractor<'_, '_> {
    fn fs_path(&mut self, rel: &[String]) -> Vec<String> {
        self.base.truncate(self.base_len);
        self.base.extend_from_slice(&rel[1..]);
        self.base.clone()
    }

    fn skip(&mut self, rel: &[String], reason: impl Into<String>) -> Visit {
        self.skipped.push(Skipped {
            path: rel.join("/"),
            reason: reason.into(),
        });
        Visit::Skip
    }
}

impl Visitor for Extractor<'_, '_> {
    fn entry(&mut self, rel: &[String], e: &Entry, listed: Option<&dyn Opener>) -> Result<Visit> {
        if !safe_name(&e.name) && rel.len() > 1 {
            return Ok(self.skip(rel, format!("unsafe name {:?}", e.name)));
        }
        let path = self.fs_path(rel);
        let r = match e.kind {
            Kind::Dir => self.sink.dir(rel, e).map(|made| {
                self.done.folders += made as u64;
                if made {
                    Visit::Enter
                } else {
                    self.skip(rel, "exists")
                }
            }),
            Kind::File if e.size > self.fs.capacity() => Ok(self.skip(
                rel,
                format!(
                    "{} bytes, more than its filesystem holds (sparse or damaged): not extracted",
                    e.size
                ),
            )),
            Kind::File => {
                if let (Some(id), Some(links), true) = (e.id, e.links, self.sink.has_links()) {
                    if links > 1 {
                        if let Some(first) = self.links.get(&id).cloned() {
                            self.done.hard_links += 1;
                            return self.sink.hard_link(rel, e, &first).map(|()| Visit::Skip);
                        }
                        self.links.insert(id, rel.to_vec());
                    }
                }
                let opened = match listed {
                    Some(o) => o.open(),
                    None => self.fs.open(&path),
                };
                let mut content = match opened {
                    Ok(c) => c,
                    Err(err) if err.is_guest_damage() => return Ok(self.skip(rel, err.to_string())),
                    Err(err) => return Err(err),
                };
                let n = self.sink.file(rel, e, &mut content)?;
                self.done.files += 1;
                self.done.bytes += n;
                Ok(Visit::Skip)
            }
            Kind::Symlink => {
                let target = match &e.target {
                    Some(t) => t.clone(),
                    None => match self.fs.read_link(&path) {
                        Ok(t) => t,
                        Err(err) if err.is_guest_damage() => {
                            return Ok(self.skip(rel, err.to_string()))
                        }
                        Err(err) => return Err(err),
                    },
                };
                self.done.symlinks += 1;
                self.sink.symlink(rel, e, &target).map(|()| Visit::Skip)
            }
            Kind::Other => Ok(self.skip(rel, "not a file, folder or symlink")),
        };
        match r {
            Err(FilesError::Output { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                Ok(self.skip(rel, "a second entry of the same name"))
            }
            r => r,
        }
    }

    fn leave(&mut self, rel: &[String], e: &Entry) -> Result<()> {
        self.sink.dir_done(rel, e)
    }
}

trait Sink {
    /// Makes a folder; false if it cannot be made anew (then it is not entered).
    fn dir(&mut self, rel: &[String], e: &Entry) -> Result<bool>;
    fn dir_done(&mut self, _rel: &[String], _e: &Entry) -> Result<()> {
        Ok(())
    }
    fn file(&mut self, rel: &[String], e: &Entry, content: &mut dyn Read) -> Result<u64>;
    fn symlink(&mut self, rel: &[String], e: &Entry, target: &str) -> Result<()>;
    fn hard_link(&mut self, rel: &[String], e: &Entry, first: &[String]) -> Result<()>;
    /// Whether names of one file become links (else each gets the content).
    fn has_links(&self) -> bool {
        true
    }
    fn finish(&mut self) -> Result<()>;
}

fn mtime(e: &Entry) -> Option<SystemTime> {
    let secs = e.mtime?;
    let t = Duration::new(secs.unsigned_abs(), e.mtime_nanos.min(999_999_999));
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(t)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(t)
    }
}

/// Permission bits kept on extraction: no set-uid, set-gid or sticky bit.
fn mode(e: &Entry, default: u32) -> u32 {
    e.mode.map_or(default, |m| m & 0o777)
}

fn read_err(rel: &[String], e: io::Error) -> FilesError {
    FilesError::damaged(format!("file {}", rel.join("/")), e)
}

struct DirSink {
    root: PathBuf,
}

impl DirSink {
    fn path(&self, rel: &[String]) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(rel);
        p
    }

    fn set_meta(&self, f: &File, e: &Entry, default: u32, p: &Path) -> Result<()> {
        let err = |x| FilesError::output(format!("setting times of {}", p.display()), x);
        f.set_permissions(std::fs::Permissions::from_mode(mode(e, default)))
            .map_err(err)?;
        if let Some(t) = mtime(e) {
            f.set_times(FileTimes::new().set_modified(t)).map_err(err)?;
        }
        Ok(())
    }
}

impl Sink for DirSink {
    fn dir(&mut self, rel: &[String], _e: &Entry) -> Result<bool> {
        let p = self.path(rel);
        match std::fs::create_dir(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(FilesError::output(format!("creating {}", p.display()), e)),
        }
    }

    fn dir_done(&mut self, rel: &[String], e: &Entry) -> Result<()> {
        let p = self.path(rel);
        let f = File::open(&p)
            .map_err(|x| FilesError::output(format!("opening {}", p.display()), x))?;
        self.set_meta(&f, e, 0o755, &p)
    }

    fn file(&mut self, rel: &[String], e: &Entry, content: &mut dyn Read) -> Result<u64> {
        let p = self.path(rel);
        let err = |x| FilesError::output(format!("writing {}", p.display()), x);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&p)
            .map_err(err)?;
        let mut buf = vec![0u8; BUF];
        let mut total = 0u64;
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(x) if x.kind() == io::ErrorKind::Interrupted => continue,
                Err(x) => return Err(read_err(rel, x)),
            };
            // Runs of zeros stay holes, so a sparse file stays sparse.
            for block in buf[..n].chunks(4096) {
                if block.iter().all(|&b| b == 0) {
                    f.seek(SeekFrom::Current(block.len() as i64)).map_err(err)?;
                } else {
                    f.write_all(block).map_err(err)?;
                }
            }
            total += n as u64;
        }
        f.set_len(total).map_err(err)?;
        self.set_meta(&f, e, 0o644, &p)?;
        Ok(total)
    }

    fn symlink(&mut self, rel: &[String], _e: &Entry, target: &str) -> Result<()> {
        let p = self.path(rel);
        std::os::unix::fs::symlink(target, &p)
            .map_err(|x| FilesError::output(format!("creating symlink {}", p.display()), x))
    }

    fn hard_link(&mut self, rel: &[String], _e: &Entry, first: &[String]) -> Result<()> {
        let p = self.path(rel);
        std::fs::hard_link(self.path(first), &p)
            .map_err(|x| FilesError::output(format!("linking {}", p.display()), x))
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

fn tar_err(e: io::Error) -> FilesError {
    FilesError::output("writing the tar stream", e)
}

struct TarSink<'w>(tar::Builder<&'w mut dyn Write>);

fn tar_header(e: &Entry, ty: tar::EntryType, size: u64, default: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_size(size);
    h.set_mode(mode(e, default));
    h.set_uid(e.uid.unwrap_or(0).into());
    h.set_gid(e.gid.unwrap_or(0).into());
    h.set_mtime(e.mtime.unwrap_or(0).max(0) as u64);
    h
}

impl Sink for TarSink<'_> {
    fn dir(&mut self, rel: &[String], e: &Entry) -> Result<bool> {
        let mut h = tar_header(e, tar::EntryType::Directory, 0, 0o755);
        self.0
            .append_data(&mut h, format!("{}/", rel.join("/")), io::empty())
            .map_err(tar_err)?;
        Ok(true)
    }

    fn file(&mut self, rel: &[String], e: &Entry, content: &mut dyn Read) -> Result<u64> {
        let mut h = tar_header(e, tar::EntryType::Regular, e.size, 0o644);
        // The header says the size up front: the content must be exactly that long.
        let mut exact = Exact {
            inner: content,
            left: e.size,
            failed: None,
        };
        let r = self.0.append_data(&mut h, rel.join("/"), &mut exact);
        if let Some(x) = exact.failed {
            return Err(read_err(rel, x));
        }
        r.map_err(tar_err)?;
        Ok(e.size)
    }

    fn symlink(&mut self, rel: &[String], e: &Entry, target: &str) -> Result<()> {
        let mut h = tar_header(e, tar::EntryType::Symlink, 0, 0o777);
        self.0
            .append_link(&mut h, rel.join("/"), target)
            .map_err(tar_err)
    }

    fn hard_link(&mut self, rel: &[String], e: &Entry, first: &[String]) -> Result<()> {
        let mut h = tar_header(e, tar::EntryType::Link, 0, 0o644);
        self.0
            .append_link(&mut h, rel.join("/"), first.join("/"))
            .map_err(tar_err)
    }

    fn finish(&mut self) -> Result<()> {
        self.0.finish().map_err(tar_err)
    }
}

/// A reader that gives exactly `left` bytes: errors are kept for the caller, a short file is
/// an error too (its filesystem said it was longer).
struct Exact<'r> {
    inner: &'r mut dyn Read,
    left: u64,
    failed: Option<io::Error>,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let r = match self.inner.read(&mut buf[..want]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "shorter than its size",
            )),
            r => r,
        };
        match r {
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) => {
                let msg = e.to_string();
                self.failed = Some(e);
                Err(io::Error::other(msg))
            }
        }
    }
}

struct ZipSink<'w>(Option<zip::ZipWriter<zip::write::StreamWriter<&'w mut dyn Write>>>);

impl<'w> ZipSink<'w> {
    fn w(&mut self) -> &mut zip::ZipWriter<zip::write::StreamWriter<&'w mut dyn Write>> {
        self.0.as_mut().expect("the zip is written until finish")
    }
}

fn zip_err(e: zip::result::ZipError) -> FilesError {
    FilesError::output("writing the zip stream", io::Error::other(e))
}

fn zip_options(e: &Entry, default: u32) -> zip::write::SimpleFileOptions {
    let mut o = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(mode(e, default))
        .large_file(e.size >= u32::MAX as u64);
    if let Some(t) = e.mtime.and_then(zip_time) {
        o = o.last_modified_time(t);
    }
    o
}

/// A Unix time as a zip (DOS) time, which covers 1980 to 2107.
fn zip_time(secs: i64) -> Option<zip::DateTime> {
    let days = secs.div_euclid(86_400);
    let s = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    zip::DateTime::from_date_and_time(
        u16::try_from(y).ok()?,
        m as u8,
        d as u8,
        (s / 3600) as u8,
        (s / 60 % 60) as u8,
        (s % 60) as u8,
    )
    .ok()
}

impl Sink for ZipSink<'_> {
    fn dir(&mut self, rel: &[String], e: &Entry) -> Result<bool> {
        self.w()
            .add_directory(rel.join("/"), zip_options(e, 0o755))
            .map_err(zip_err)?;
        Ok(true)
    }

    fn file(&mut self, rel: &[String], e: &Entry, content: &mut dyn Read) -> Result<u64> {
        self.w()
            .start_file(rel.join("/"), zip_options(e, 0o644))
            .map_err(zip_err)?;
        let mut buf = vec![0u8; BUF];
        let mut total = 0;
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(x) if x.kind() == io::ErrorKind::Interrupted => continue,
                Err(x) => return Err(read_err(rel, x)),
            };
            self.w()
                .write_all(&buf[..n])
                .map_err(|x| FilesError::output("writing the zip stream", x))?;
            total += n as u64;
        }
        Ok(total)
    }

    fn symlink(&mut self, rel: &[String], e: &Entry, target: &str) -> Result<()> {
        self.w()
            .add_symlink(rel.join("/"), target, zip_options(e, 0o777))
            .map_err(zip_err)
    }

    fn hard_link(&mut self, _: &[String], _: &Entry, first: &[String]) -> Result<()> {
        Err(FilesError::BadPath(format!(
            "a zip has no hard links (to {})",
            display_path(first)
        )))
    }

    fn has_links(&self) -> bool {
        false
    }

    fn finish(&mut self) -> Result<()> {
        match self.0.take() {
            Some(w) => w.finish().map(|_| ()).map_err(zip_err),
            None => Ok(()),
        }
    }
}
