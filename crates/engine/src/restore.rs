//! Restore: manifest → disk index → chunks fetched in parallel, each checked against its digest,
//! → written at their offsets; zero chunks become holes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_channel::bounded;
use vmvault_format::{DiskIndex, DiskRecord, Manifest};
use vmvault_store::Vault;

use vmvault_disk::{CreateOptions, NewDisk, NewFile};

use crate::{EngineError, Progress, Result, VmDescription};

/// Where a restore's chunks come from: the vault itself, by each disk's index, or the server
/// for a host agent, which has no vault key and asks for chunks by position.
pub trait PointChunks: Sync {
    /// The chunks of one disk of the point.
    fn disk(&self, record: &DiskRecord) -> Result<Box<dyn DiskChunks + '_>>;
}

/// One disk's chunks, each fetched by its position.
pub trait DiskChunks: Sync {
    /// Where each chunk lies (only `disk_size` and `chunk_size` are used).
    fn layout(&self) -> DiskIndex;
    /// A fetcher for one worker thread.
    fn fetcher(&self) -> Box<dyn ChunkFetcher + '_>;
}

pub trait ChunkFetcher {
    /// Chunk `i` (`len` bytes), checked; `None` for a chunk of zeros.
    fn fetch(&mut self, i: usize, len: usize) -> Result<Option<&[u8]>>;
}

/// The vault's own chunks.
pub struct VaultChunks<'v>(pub &'v Vault);

struct VaultDisk<'v> {
    vault: &'v Vault,
    index: DiskIndex,
}

struct VaultFetcher<'a> {
    index: &'a DiskIndex,
    reader: vmvault_store::ChunkReader<'a>,
}

impl PointChunks for VaultChunks<'_> {
    fn disk(&self, record: &DiskRecord) -> Result<Box<dyn DiskChunks + '_>> {
        Ok(Box::new(VaultDisk {
            vault: self.0,
            index: self.0.load_index(&record.index, record.size)?,
        }))
    }
}

impl DiskChunks for VaultDisk<'_> {
    fn layout(&self) -> DiskIndex {
        DiskIndex {
            chunks: Vec::new(),
            ..self.index
        }
    }

    fn fetcher(&self) -> Box<dyn ChunkFetcher + '_> {
        Box::new(VaultFetcher {
            index: &self.index,
            reader: self.vault.chunk_reader(),
        })
    }
}

impl ChunkFetcher for VaultFetcher<'_> {
    fn fetch(&mut self, i: usize, len: usize) -> Result<Option<&[u8]>> {
        let digest = &self.index.chunks[i];
        if digest.is_zero_chunk() {
            return Ok(None);
        }
        Ok(Some(self.reader.read(digest, len)?))
    }
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Replace files that exist at the target.
    pub overwrite: bool,
    /// Threads fetching and opening chunks.
    pub workers: usize,
    /// The image format to write (one of `vmvault_disk::WRITE_FORMATS`); `None`: each disk's
    /// source format where vmvault can write it, else raw.
    pub format: Option<String>,
    /// A VM restore's folder must be new: it is made exclusively (0700), so nothing planted
    /// at its name (a symlink to elsewhere) is written through, and removed if the restore
    /// fails. Otherwise an existing folder is restored into.
    pub new_folder: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            overwrite: false,
            workers: crate::worker_count(),
            format: None,
            new_folder: false,
        }
    }
}

/// A restored piece of a disk, on its way to the writer.
enum Piece {
    Zeros(u64, u64),
    Data(u64, Vec<u8>),
}

impl RestoreOptions {
    /// The format a disk is restored in.
    pub fn format_for(&self, disk: &DiskRecord) -> String {
        match &self.format {
            Some(f) => f.clone(),
            None if vmvault_disk::WRITE_FORMATS.contains(&disk.format.as_str()) => {
                disk.format.clone()
            }
            None => "raw".into(),
        }
    }
}

/// Restores one disk of a point to an image at `to` (or onto a block device, as raw), in the
/// format `opts` says. The image is written beside `to` and put there once whole; a restore
/// that fails removes it, and says what it could not remove.
pub fn restore_disk(
    vault: &Vault,
    manifest: &Manifest,
    disk: &DiskRecord,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let workers = opts.workers.max(vault.backend().concurrency());
    let opts = RestoreOptions {
        workers,
        ..opts.clone()
    };
    restore_disk_from(&VaultChunks(vault), manifest, disk, to, &opts, progress)
}

/// [`restore_disk`] from any [`PointChunks`].
pub fn restore_disk_from(
    chunks: &dyn PointChunks,
    manifest: &Manifest,
    disk: &DiskRecord,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let format = write_format(opts, disk)?;
    // Read before the target is made: a point whose index is lost leaves nothing to undo.
    let source = chunks.disk(disk)?;
    let target = vmvault_disk::create(to, &format, disk.size, opts.overwrite)?;
    let written = write_disk(&*source, manifest, disk, &target, opts, progress)
        .and_then(|()| target.place().map_err(EngineError::from));
    written.map_err(|e| undone(e, [target.discard()]))
}

/// The format `disk` is restored in, if vmvault writes it.
fn write_format(opts: &RestoreOptions, disk: &DiskRecord) -> Result<String> {
    let format = opts.format_for(disk);
    if !vmvault_disk::WRITE_FORMATS.contains(&format.as_str()) {
        return Err(EngineError::Input(format!(
            "cannot write disk images in format {format:?}: choose one of {}",
            vmvault_disk::WRITE_FORMATS.join(", ")
        )));
    }
    Ok(format)
}

/// `error`, with what the failed restore could not take back (from [`NewDisk::discard`]).
fn undone(error: EngineError, left: impl IntoIterator<Item = Option<String>>) -> EngineError {
    let left: Vec<String> = left.into_iter().flatten().collect();
    if left.is_empty() {
        return error;
    }
    EngineError::Partial {
        error: Box::new(error),
        left: left.join("; "),
    }
}

/// Writes the point's `disk`, whose index is `index`, into `target` and seals it (not yet at
/// its target's name).
fn write_disk(
    source: &dyn DiskChunks,
    manifest: &Manifest,
    disk: &DiskRecord,
    target: &NewDisk,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let index = &source.layout();
    let count = DiskIndex::chunk_count(index.disk_size, index.chunk_size) as usize;
    let to = target.path();
    progress.start(&format!("{} disk {}", manifest.vm, disk.name), disk.size);
    // Workers fetch, open and check chunks into buffers from a fixed pool; this thread alone
    // writes them, because parallel writes to one file only queue on its inode lock (a fifth
    // of a restore's CPU went to spinning on it).
    let workers = opts.workers.max(1);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let pool = 2 * workers + 2;
    let (free_tx, free_rx) = bounded::<Vec<u8>>(pool);
    for _ in 0..pool {
        free_tx.send(Vec::new()).expect("pool channel has room");
    }
    // Bounded, so that a huge disk's holes do not queue up by the million; this thread
    // waits on nothing else, so a full queue only slows the workers.
    let (done_tx, done_rx) = bounded::<Result<Piece>>(16 * pool);
    let mut first_error = None;
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (index, next, stop, done, free) =
                (index, &next, &stop, done_tx.clone(), free_rx.clone());
            s.spawn(move || {
                let mut fetcher = source.fetcher();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let (offset, len) = index.chunk_range(i);
                    let piece = match fetcher.fetch(i, len) {
                        Ok(None) => Ok(Piece::Zeros(offset, len as u64)),
                        Ok(Some(data)) => {
                            let Ok(mut buf) = free.recv() else { return };
                            buf.clear();
                            buf.extend_from_slice(data);
                            Ok(Piece::Data(offset, buf))
                        }
                        Err(e) => Err(e),
                    };
                    if done.send(piece).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let write_error = |e| EngineError::io(format!("writing {}", to.display()), e);
        for piece in done_rx.iter() {
            let written = piece.and_then(|p| match p {
                Piece::Zeros(offset, len) => {
                    target.write_zeros(offset, len).map_err(write_error)?;
                    Ok(len)
                }
                Piece::Data(offset, buf) => {
                    let r = target.write_at(&buf, offset).map_err(write_error);
                    let len = buf.len() as u64;
                    let _ = free_tx.send(buf);
                    r.map(|()| len)
                }
            });
            match written {
                Ok(n) => progress.advance(n),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    progress.finish();
    if let Some(e) = first_error {
        return Err(e);
    }
    target
        .seal()
        .map_err(|e| EngineError::io(format!("syncing {}", to.display()), e))
}

/// Restores every disk of a point into the folder `to` as `NAME.EXT` (by format), with the
/// VM's description as `VM.toml` beside them; returns the files written, description last.
/// Every file is written beside its target first and the lot put in place at the end, so a
/// restore that fails leaves the folder as it found it (or says what it could not undo).
pub fn restore_vm(
    vault: &Vault,
    manifest: &Manifest,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>> {
    let workers = opts.workers.max(vault.backend().concurrency());
    let opts = RestoreOptions {
        workers,
        ..opts.clone()
    };
    restore_vm_from(&VaultChunks(vault), manifest, to, &opts, progress)
}

/// [`restore_vm`] from any [`PointChunks`].
pub fn restore_vm_from(
    chunks: &dyn PointChunks,
    manifest: &Manifest,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>> {
    let made_folder = opts.new_folder || std::fs::symlink_metadata(to).is_err();
    if made_folder {
        make_folder(to, opts.new_folder)?;
    }
    let mut written = Vec::new();
    let r = restore_vm_into(chunks, manifest, to, opts, progress, &mut written);
    if let Err(e) = r {
        let e = undone(e, written.iter().map(Written::discard));
        if made_folder {
            // Only if empty: a folder someone else put files in meanwhile stays.
            let _ = std::fs::remove_dir(to);
        }
        return Err(e);
    }
    Ok(written.iter().map(|w| w.dest().to_path_buf()).collect())
}

/// Makes the folder of a VM restore, its owner's only (0700: it holds the VM's data), and
/// whatever parents it lacks (as the umask says). Unless `exclusive`, a folder made by
/// someone else meanwhile is used as an existing one is.
fn make_folder(to: &Path, exclusive: bool) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let creating = |e| EngineError::io(format!("creating {}", to.display()), e);
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(creating)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(to) {
        // Made by someone else meanwhile: used as an existing folder is.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && exclusive => {
            Err(EngineError::Input(format!(
                "{} exists: this restore goes into a new folder",
                to.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && to.is_dir() => Ok(()),
        r => r.map_err(creating),
    }
}

/// A file of a VM restore, written and waiting to be put in place.
enum Written {
    Disk(NewDisk),
    File(NewFile),
}

impl Written {
    fn dest(&self) -> &Path {
        match self {
            Written::Disk(d) => d.path(),
            Written::File(f) => f.dest(),
        }
    }

    fn place(&self) -> Result<()> {
        match self {
            Written::Disk(d) => d.place()?,
            Written::File(f) => f.place()?,
        }
        Ok(())
    }

    fn discard(&self) -> Option<String> {
        match self {
            Written::Disk(d) => d.discard(),
            Written::File(f) => f.discard(),
        }
    }
}

fn restore_vm_into(
    chunks: &dyn PointChunks,
    manifest: &Manifest,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    written: &mut Vec<Written>,
) -> Result<()> {
    let desc_path = to.join(format!("{}.toml", manifest.vm));
    let file_name = |d: &DiskRecord| {
        format!(
            "{}.{}",
            d.name,
            vmvault_disk::extension(&opts.format_for(d))
        )
    };
    // Refuse before writing anything rather than after the first disk; a symlink, even a
    // dangling one, counts as a file there.
    if !opts.overwrite {
        let targets = manifest.disks.iter().map(|d| to.join(file_name(d)));
        let mut targets = targets.chain([desc_path.clone()]);
        if let Some(p) = targets.find(|p| std::fs::symlink_metadata(p).is_ok()) {
            return Err(EngineError::Input(format!(
                "{} exists; pass --force to overwrite it",
                p.display()
            )));
        }
    }
    // A folder holds image files: a block device planted at a disk's name is refused.
    let create = CreateOptions {
        overwrite: opts.overwrite,
        block_devices: false,
    };
    for disk in &manifest.disks {
        let format = write_format(opts, disk)?;
        let source = chunks.disk(disk)?;
        let file = to.join(file_name(disk));
        let target = vmvault_disk::create_with(&file, &format, disk.size, &create)?;
        written.push(Written::Disk(target));
        if let Some(Written::Disk(target)) = written.last() {
            write_disk(&*source, manifest, disk, target, opts, progress)?;
        }
    }
    let desc = VmDescription::from_config(&manifest.vm_config, |d| {
        let record = manifest.disks.iter().find(|r| r.name == d.name);
        match record {
            Some(r) => {
                // "vhd-fixed" is written as a VHD: descriptions name the format, not the kind.
                let format = opts.format_for(r).replace("-fixed", "");
                (PathBuf::from(file_name(r)), format)
            }
            None => (PathBuf::from(format!("{}.raw", d.name)), "raw".to_string()),
        }
    });
    let file = NewFile::write(&desc_path, desc.to_toml().as_bytes(), opts.overwrite)?;
    written.push(Written::File(file));
    for w in written.iter() {
        w.place()?;
    }
    Ok(())
}
