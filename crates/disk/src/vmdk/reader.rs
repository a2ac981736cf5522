//! A VMDK disk as a whole: its extents (one sparse file, or the extents a text descriptor
//! names) laid end to end, and the parent its unallocated grains are read from.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::descriptor::{self, Access, Descriptor, NO_PARENT_CID};
use super::header::{SparseHeader, COWD_MAGIC, MAGIC, SECTOR};
use super::sparse::{read_descriptor, SparseExtent};
use super::{data_error, FORMAT, MAX_DESCRIPTOR, MAX_DISK_BYTES};
use crate::{DiskError, DiskReader};

/// Extent files kept open at once: a 2 TiB twoGbMaxExtent disk has over a thousand of them,
/// more than a default limit of open files allows, and a backup reads them one after another.
const OPEN_FILES: usize = 32;
/// Extents a descriptor may name (a 62 TiB disk in 2 GiB extents has about 32,000).
const MAX_EXTENTS: usize = 1 << 16;

enum Kind {
    Zero,
    Flat {
        file: usize,
        offset: u64,
    },
    Sparse {
        file: usize,
        sparse: Box<SparseExtent>,
    },
}

struct Extent {
    /// Byte offset of the extent in the virtual disk.
    start: u64,
    len: u64,
    kind: Kind,
}

/// The files a disk's extents live in, opened on demand and closed when many are open.
struct Files {
    paths: Vec<PathBuf>,
    open: Mutex<VecDeque<(usize, Arc<File>)>>,
}

impl Files {
    fn get(&self, i: usize) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.iter().position(|(j, _)| *j == i) {
            let f = open[n].1.clone();
            if let Some(entry) = open.remove(n) {
                open.push_back(entry);
            }
            return Ok(f);
        }
        let f =
            Arc::new(File::open(&self.paths[i]).map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {e}", self.paths[i].display()))
            })?);
        if open.len() >= OPEN_FILES {
            open.pop_front();
        }
        open.push_back((i, f.clone()));
        Ok(f)
    }

    fn add(&mut self, path: PathBuf, file: Option<File>) -> usize {
        self.paths.push(path);
        let i = self.paths.len() - 1;
        if let Some(f) = file {
            let open = self.open.get_mut().unwrap_or_else(|p| p.into_inner());
            if open.len() >= OPEN_FILES {
                open.pop_front();
            }
            open.push_back((i, Arc::new(f)));
        }
        i
    }
}

/// Reads a VMDK disk: a monolithic sparse or stream-optimized file, or a text descriptor and
/// the flat, sparse and zero extents it names; a delta disk reads unallocated grains from its
/// parent (`parentFileNameHint`).
pub struct VmdkReader {
    path: PathBuf,
    size: u64,
    create_type: String,
    extents: Vec<Extent>,
    files: Files,
    parent: Option<Box<dyn DiskReader>>,
}

fn invalid(path: &Path, detail: impl Into<String>) -> DiskError {
    DiskError::invalid(path, FORMAT, detail)
}

/// Reads up to `buf.len()` bytes at `offset`, fewer where the file ends.
fn read_some(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// What a VMDK file is: a sparse extent (with its embedded descriptor, if any) or a descriptor.
enum Opened {
    Sparse(File, Box<SparseExtent>, Descriptor),
    Text(Descriptor),
}

fn open_file(path: &Path) -> Result<Opened, DiskError> {
    let file = File::open(path).map_err(|e| DiskError::io(path, e))?;
    let meta = file.metadata().map_err(|e| DiskError::io(path, e))?;
    if !meta.is_file() {
        return Err(DiskError::NotADisk {
            path: path.display().to_string(),
        });
    }
    let mut head = [0u8; 64];
    let n = read_some(&file, &mut head, 0).map_err(|e| DiskError::io(path, e))?;
    if n >= 4 && (&head[..4] == MAGIC || &head[..4] == COWD_MAGIC) {
        let sparse = SparseExtent::open(&file, path, None)?;
        let desc = match &sparse.descriptor {
            Some(text) => descriptor::parse(text).map_err(|e| invalid(path, e))?,
            None => Descriptor::default(),
        };
        return Ok(Opened::Sparse(file, Box::new(sparse), desc));
    }
    if meta.len() > MAX_DESCRIPTOR {
        return Err(invalid(
            path,
            format!(
                "no KDMV magic, and at {} bytes too large for a descriptor file",
                meta.len()
            ),
        ));
    }
    let mut raw = vec![0u8; meta.len() as usize];
    let n = read_some(&file, &mut raw, 0).map_err(|e| DiskError::io(path, e))?;
    raw.truncate(n);
    let text = String::from_utf8_lossy(&raw);
    let desc = descriptor::parse(&text).map_err(|e| invalid(path, e))?;
    if desc.create_type.is_none() && desc.extents.is_empty() {
        return Err(invalid(
            path,
            "neither a sparse extent (KDMV magic) nor a descriptor file (no createType, no extents)",
        ));
    }
    Ok(Opened::Text(desc))
}

/// The CID a VMDK file's descriptor gives, read without opening the whole disk.
fn cid_of(path: &Path) -> Result<Option<u32>, DiskError> {
    let file = File::open(path).map_err(|e| DiskError::io(path, e))?;
    let mut head = [0u8; 512];
    let n = read_some(&file, &mut head, 0).map_err(|e| DiskError::io(path, e))?;
    let text = match SparseHeader::parse(&head) {
        Some(h) if n == head.len() => {
            let len = file.metadata().map_err(|e| DiskError::io(path, e))?.len();
            read_descriptor(&file, path, &h, len)?.unwrap_or_default()
        }
        _ => {
            let mut raw = vec![0u8; MAX_DESCRIPTOR as usize];
            let n = read_some(&file, &mut raw, 0).map_err(|e| DiskError::io(path, e))?;
            String::from_utf8_lossy(&raw[..n]).into_owned()
        }
    };
    Ok(descriptor::parse(&text).map_err(|e| invalid(path, e))?.cid)
}

/// A path a descriptor names, relative to the descriptor's folder unless absolute.
fn resolve(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(name)
    }
}

fn refuse_create_type(path: &Path, create_type: &str) -> Result<(), DiskError> {
    const DEVICES: &[&str] = &[
        "fullDevice",
        "partitionedDevice",
        "vmfsRaw",
        "vmfsRawDeviceMap",
        "vmfsPassthroughRawDeviceMap",
        "vmfsRDM",
        "vmfsRDMP",
    ];
    const ESX_DELTAS: &[&str] = &["vmfsSparse", "seSparse"];
    if DEVICES.iter().any(|d| d.eq_ignore_ascii_case(create_type)) {
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!(
                "createType {create_type:?} maps a physical device: the data is on the device, \
                 not in image files"
            ),
        ));
    }
    if ESX_DELTAS
        .iter()
        .any(|d| d.eq_ignore_ascii_case(create_type))
    {
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!("createType {create_type:?} (ESXi snapshot delta format)"),
        ));
    }
    Ok(())
}

/// Checks an extent file a descriptor names and returns its length.
fn extent_file_len(image: &Path, file: &Path) -> Result<u64, DiskError> {
    match std::fs::metadata(file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(invalid(
            image,
            format!("the extent file {} it names is missing", file.display()),
        )),
        Err(e) => Err(DiskError::io(file, e)),
        Ok(m) if !m.is_file() => Err(DiskError::unsupported(
            image,
            FORMAT,
            format!(
                "the extent file {} is not a regular file (device extents are not read)",
                file.display()
            ),
        )),
        Ok(m) => Ok(m.len()),
    }
}

impl VmdkReader {
    pub fn open(path: &Path, chain: &mut crate::Chain) -> Result<VmdkReader, DiskError> {
        chain.begin(path)?;
        let mut files = Files {
            paths: Vec::new(),
            open: Mutex::new(VecDeque::new()),
        };
        let mut extents = Vec::new();
        let (desc, create_type) = match open_file(path)? {
            Opened::Sparse(file, sparse, desc) => {
                let derived = if sparse.compressed {
                    "streamOptimized"
                } else {
                    "monolithicSparse"
                };
                let create_type = desc.create_type.clone().unwrap_or(derived.to_string());
                let len = sparse.len;
                let file = files.add(path.to_path_buf(), Some(file));
                extents.push(Extent {
                    start: 0,
                    len,
                    kind: Kind::Sparse { file, sparse },
                });
                (desc, create_type)
            }
            Opened::Text(desc) => {
                let create_type = desc.create_type.clone().unwrap_or_default();
                refuse_create_type(path, &create_type)?;
                Self::open_extents(path, &desc, chain, &mut files, &mut extents)?;
                (desc, create_type)
            }
        };
        let size = extents.last().map_or(0, |e| e.start + e.len);
        let parent = Self::open_parent(path, &desc, chain)?;
        Ok(VmdkReader {
            path: path.to_path_buf(),
            size,
            create_type,
            extents,
            files,
            parent,
        })
    }

    fn open_extents(
        path: &Path,
        desc: &Descriptor,
        chain: &crate::Chain,
        files: &mut Files,
        extents: &mut Vec<Extent>,
    ) -> Result<(), DiskError> {
        if desc.extents.is_empty() {
            return Err(invalid(path, "the descriptor names no extents"));
        }
        if desc.extents.len() > MAX_EXTENTS {
            return Err(invalid(
                path,
                format!("the descriptor names {} extents", desc.extents.len()),
            ));
        }
        let mut start = 0u64;
        for (n, line) in desc.extents.iter().enumerate() {
            let len = line
                .sectors
                .checked_mul(SECTOR)
                .and_then(|l| l.checked_add(start).map(|end| (l, end)))
                .filter(|&(_, end)| end <= MAX_DISK_BYTES);
            let Some((len, end)) = len else {
                return Err(invalid(
                    path,
                    format!(
                        "extent {n} makes the disk absurdly large (over {MAX_DISK_BYTES} bytes)"
                    ),
                ));
            };
            if len == 0 {
                return Err(invalid(path, format!("extent {n} has no sectors")));
            }
            if line.access == Access::Denied {
                return Err(DiskError::unsupported(
                    path,
                    FORMAT,
                    format!("extent {n} is NOACCESS: its data cannot be read"),
                ));
            }
            let named = |what: &str| -> Result<PathBuf, DiskError> {
                match &line.file {
                    Some(f) if !f.is_empty() => {
                        let file = resolve(path, f);
                        // A missing or non-regular extent file is refused below, as such.
                        if file.is_file() {
                            chain.admit(path, &file, "extent file")?;
                        }
                        Ok(file)
                    }
                    _ => Err(invalid(path, format!("{what} extent {n} names no file"))),
                }
            };
            let kind = match line.kind.as_str() {
                "ZERO" => Kind::Zero,
                "FLAT" | "VMFS" => {
                    let file = named(&line.kind)?;
                    let offset = line.offset.unwrap_or(0).checked_mul(SECTOR);
                    let need = offset.and_then(|o| o.checked_add(len));
                    let have = extent_file_len(path, &file)?;
                    let (Some(offset), Some(need)) = (offset, need) else {
                        return Err(invalid(path, format!("extent {n}'s offset overflows")));
                    };
                    if have < need {
                        return Err(invalid(
                            path,
                            format!(
                                "the extent file {} is {have} bytes, shorter than the {need} \
                                 the descriptor states",
                                file.display()
                            ),
                        ));
                    }
                    Kind::Flat {
                        file: files.add(file, None),
                        offset,
                    }
                }
                "SPARSE" => {
                    let file_path = named("SPARSE")?;
                    extent_file_len(path, &file_path)?;
                    let file = File::open(&file_path).map_err(|e| DiskError::io(&file_path, e))?;
                    let sparse = SparseExtent::open(&file, &file_path, Some(line.sectors))?;
                    Kind::Sparse {
                        file: files.add(file_path, Some(file)),
                        sparse: Box::new(sparse),
                    }
                }
                "VMFSSPARSE" | "SESPARSE" => {
                    return Err(DiskError::unsupported(
                        path,
                        FORMAT,
                        format!("{} extents (ESXi snapshot formats)", line.kind),
                    ))
                }
                "VMFSRDM" | "VMFSRAW" => {
                    return Err(DiskError::unsupported(
                        path,
                        FORMAT,
                        format!("{} extents (raw device mappings)", line.kind),
                    ))
                }
                other => {
                    return Err(DiskError::unsupported(
                        path,
                        FORMAT,
                        format!("extent type {other:?}"),
                    ))
                }
            };
            extents.push(Extent { start, len, kind });
            start = end;
        }
        Ok(())
    }

    fn open_parent(
        path: &Path,
        desc: &Descriptor,
        chain: &mut crate::Chain,
    ) -> Result<Option<Box<dyn DiskReader>>, DiskError> {
        if !desc.has_parent() {
            return Ok(None);
        }
        let Some(hint) = desc.parent_hint.as_deref() else {
            return Err(DiskError::unsupported(
                path,
                FORMAT,
                "a delta disk (parentCID is set) that names no parentFileNameHint",
            ));
        };
        if hint.is_empty() {
            return Err(invalid(
                path,
                "a delta disk with an empty parentFileNameHint",
            ));
        }
        let parent_path = resolve(path, hint);
        if let Err(e) = std::fs::metadata(&parent_path) {
            if e.kind() == io::ErrorKind::NotFound {
                return Err(invalid(
                    path,
                    format!(
                        "its parent {} (parentFileNameHint) is missing",
                        parent_path.display()
                    ),
                ));
            }
            return Err(DiskError::io(&parent_path, e));
        }
        chain.admit(path, &parent_path, "parent")?;
        let parent = crate::open_in_chain(&parent_path, FORMAT, chain)?;
        // VMware refuses a child whose parent changed since the child was made (the parent's
        // CID no longer matches): reading it would mix two states of the disk.
        if let Some(want) = desc.parent_cid.filter(|&c| c != NO_PARENT_CID) {
            let got = cid_of(&parent_path)?;
            if got != Some(want) {
                let got = got.map_or("none".to_string(), |c| format!("{c:08x}"));
                return Err(invalid(
                    path,
                    format!(
                        "its parent {} has CID {got}, but it was made from CID {want:08x}: the \
                         parent changed since",
                        parent_path.display()
                    ),
                ));
            }
        }
        Ok(Some(parent))
    }

    /// The index of the extent holding byte `offset`.
    fn extent_at(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.start + e.len <= offset)
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(parent) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let n = parent.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            parent.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    fn parent_may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let Some(parent) = &self.parent else {
            return Ok(false);
        };
        let len = len.min(parent.size().saturating_sub(offset));
        Ok(len > 0 && parent.may_have_data(offset, len)?)
    }
}

fn flat_may_have_data(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(data) => Ok(data < offset + len),
        Err(rustix::io::Errno::NXIO) => Ok(false),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Bytes of `[offset, offset + len)` of `file` that hold data (not holes).
fn flat_allocated(file: &File, offset: u64, len: u64) -> io::Result<u64> {
    use rustix::fs::{seek, SeekFrom};
    let end = offset + len;
    let mut pos = offset;
    let mut total = 0;
    while pos < end {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                return Ok(total + (end - pos))
            }
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data)).map_err(io::Error::from)?;
        total += hole.min(end) - data;
        pos = hole;
    }
    Ok(total)
}

impl DiskReader for VmdkReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: read past the end of the disk", self.path.display()),
            ));
        }
        let mut done = 0usize;
        let mut i = self.extent_at(offset);
        while done < buf.len() {
            let e = &self.extents[i];
            let pos = offset + done as u64;
            let rel = pos - e.start;
            let n = (buf.len() - done).min((e.len - rel) as usize);
            let piece = &mut buf[done..done + n];
            match &e.kind {
                Kind::Zero => piece.fill(0),
                Kind::Flat { file, offset } => {
                    let f = self.files.get(*file)?;
                    f.read_exact_at(piece, offset + rel).map_err(|err| {
                        if err.kind() == io::ErrorKind::UnexpectedEof {
                            data_error(&self.files.paths[*file], "the flat extent file shrank")
                        } else {
                            err
                        }
                    })?;
                }
                Kind::Sparse { file, sparse } => {
                    let f = self.files.get(*file)?;
                    let start = e.start;
                    sparse.read(&f, piece, rel, &mut |b, at| self.read_parent(b, start + at))?;
                }
            }
            done += n;
            i += 1;
        }
        Ok(())
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        let mut i = self.extent_at(offset);
        while pos < end {
            let e = &self.extents[i];
            let rel = pos - e.start;
            let n = (end - pos).min(e.len - rel);
            let found = match &e.kind {
                Kind::Zero => false,
                Kind::Flat { file, offset } => {
                    flat_may_have_data(&*self.files.get(*file)?, offset + rel, n)?
                }
                Kind::Sparse { file, sparse } => {
                    let f = self.files.get(*file)?;
                    let start = e.start;
                    sparse.may_have_data(&f, rel, n, &mut |at, l| {
                        self.parent_may_have_data(start + at, l)
                    })?
                }
            };
            if found {
                return Ok(true);
            }
            pos += n;
            i += 1;
        }
        Ok(false)
    }

    fn format(&self) -> &'static str {
        FORMAT
    }

    fn subformat(&self) -> Option<String> {
        Some(self.create_type.clone())
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn backing(&self) -> Option<&dyn DiskReader> {
        self.parent.as_deref()
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let mut total = 0u64;
        for e in &self.extents {
            total += match &e.kind {
                Kind::Zero => 0,
                Kind::Flat { file, offset } => {
                    flat_allocated(&*self.files.get(*file)?, *offset, e.len)?
                }
                Kind::Sparse { sparse, .. } => sparse.allocated,
            };
        }
        Ok(total)
    }

    fn extent_files(&self) -> Vec<PathBuf> {
        self.files
            .paths
            .iter()
            .filter(|p| **p != self.path)
            .cloned()
            .collect()
    }
}
