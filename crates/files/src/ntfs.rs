//! NTFS through the `ntfs` crate (read-only, no `unsafe`): resident and non-resident data,
//! sparse files, attribute lists, hard links (one file record under several names: the record
//! number is the entry's `id`), alternate data streams (listed). vmvault adds what the crate
//! lacks: LZNT1-compressed files (`lznt1`) and Interix symlinks (as ntfs-3g makes them).
//! EFS-encrypted files are refused with a clear error.

use std::io::{self, Read, Seek, SeekFrom};

use ntfs::attribute_value::NtfsAttributeValue;
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsAttributeFlags, NtfsAttributeType, NtfsError, NtfsFile, NtfsReadSeek};

use crate::disk::Part;
use crate::error::{FilesError, Result};
use crate::fs::{display_path, Entry, Filesystem, Kind, ReadSeek, Stream, MAX_DIR_ENTRIES};
use crate::lznt1::Compressed;

pub struct NtfsFs {
    ntfs: Ntfs,
    part: Part,
    label: Option<String>,
    /// An index entry with its file name takes at least 0x52 bytes: 64 is a safe floor.
    limit: usize,
    capacity: u64,
}

/// 100-ns intervals from 1601-01-01 to 1970-01-01.
const NT_EPOCH_OFFSET: i64 = 116_444_736_000_000_000;
/// File records below this number are NTFS's own ($MFT, $Bitmap, ...): not listed.
const FIRST_USER_RECORD: u64 = 24;
const ROOT_RECORD: u64 = 5;
const INTERIX_LINK: &[u8] = b"IntxLNK\x01";

fn damaged(path: &[String], e: NtfsError) -> FilesError {
    FilesError::damaged("NTFS filesystem", format!("{}: {e}", display_path(path)))
}

impl NtfsFs {
    pub fn open(part: Part) -> Result<NtfsFs> {
        let mut fs = part.clone();
        let mut ntfs = Ntfs::new(&mut fs).map_err(|e| damaged(&[], e))?;
        ntfs.read_upcase_table(&mut fs)
            .map_err(|e| damaged(&[], e))?;
        let label = match ntfs.volume_name(&mut fs) {
            Some(Ok(n)) => Some(n.name().to_string_lossy()).filter(|l| !l.is_empty()),
            _ => None,
        };
        let limit = crate::fs::entry_limit(part.len(), 64).min(MAX_DIR_ENTRIES);
        Ok(NtfsFs {
            ntfs,
            capacity: part.len(),
            part,
            label,
            limit,
        })
    }

    /// The file `path` names, and its name there.
    fn find(&self, path: &[String]) -> Result<NtfsFile<'_>> {
        let mut fs = self.part.clone();
        let mut file = self
            .ntfs
            .root_directory(&mut fs)
            .map_err(|e| damaged(&[], e))?;
        for (i, name) in path.iter().enumerate() {
            let here = &path[..=i];
            if !file.is_directory() {
                return Err(FilesError::NotADirectory(display_path(&path[..i])));
            }
            let index = file
                .directory_index(&mut fs)
                .map_err(|e| damaged(here, e))?;
            let mut finder = index.finder();
            let entry = match NtfsFileNameIndex::find(&mut finder, &self.ntfs, &mut fs, name) {
                None => return Err(FilesError::NotFound(display_path(here))),
                Some(e) => e.map_err(|e| damaged(here, e))?,
            };
            let next = entry
                .to_file(&self.ntfs, &mut fs)
                .map_err(|e| damaged(here, e))?;
            if next.file_record_number() < FIRST_USER_RECORD {
                return Err(FilesError::NotFound(display_path(here)));
            }
            file = next;
        }
        Ok(file)
    }

    fn entry(&self, name: String, file: &NtfsFile<'_>, path: &[String]) -> Result<Entry> {
        let mut fs = self.part.clone();
        let info = file.info().map_err(|e| damaged(path, e))?;
        let reparse = info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::REPARSE_POINT);
        let mut streams = Vec::new();
        let mut size = 0;
        let mut attrs = file.attributes();
        let mut count = 0;
        while let Some(item) = attrs.next(&mut fs) {
            count += 1;
            if count > 4096 {
                return Err(FilesError::Limit(format!(
                    "{}: more than 4096 attributes",
                    display_path(path)
                )));
            }
            let item = item.map_err(|e| damaged(path, e))?;
            let attr = item.to_attribute().map_err(|e| damaged(path, e))?;
            if attr.ty().ok() != Some(NtfsAttributeType::Data) {
                continue;
            }
            let stream = attr.name().map_err(|e| damaged(path, e))?;
            if stream.is_empty() {
                size = attr.value_length();
            } else {
                streams.push(Stream {
                    name: stream.to_string_lossy(),
                    size: attr.value_length(),
                });
            }
        }
        let system = info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::SYSTEM);
        let mut kind = if reparse {
            Kind::Other
        } else if file.is_directory() {
            Kind::Dir
        } else {
            Kind::File
        };
        // ntfs-3g stores a symlink as an Interix one: a system file holding "IntxLNK\1" and
        // the target in UTF-16.
        let mut target = None;
        if kind == Kind::File && system && (10..=8192).contains(&size) {
            let mut data = vec![0u8; size as usize];
            let mut r = NtfsReader {
                file: self.find(path)?,
                fs: self.part.clone(),
                pos: 0,
                len: size,
            };
            if r.read_exact(&mut data).is_ok() && data.starts_with(INTERIX_LINK) {
                let units: Vec<u16> = data[8..]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                target = Some(String::from_utf16_lossy(&units));
                kind = Kind::Symlink;
            }
        }
        let mut e = Entry::new(name, kind, if kind == Kind::File { size } else { 0 });
        e.target = target;
        let t = info.modification_time().nt_timestamp() as i64 - NT_EPOCH_OFFSET;
        e.mtime = Some(t.div_euclid(10_000_000));
        e.mtime_nanos = (t.rem_euclid(10_000_000) * 100) as u32;
        e.id = Some(file.file_record_number());
        e.links = Some(u32::from(file.hard_link_count()));
        e.streams = streams;
        Ok(e)
    }
}

impl Filesystem for NtfsFs {
    fn kind(&self) -> &'static str {
        "ntfs"
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn stat(&self, path: &[String]) -> Result<Entry> {
        let file = self.find(path)?;
        self.entry(path.last().cloned().unwrap_or_default(), &file, path)
    }

    fn list(&self, path: &[String]) -> Result<Vec<Entry>> {
        let dir = self.find(path)?;
        if !dir.is_directory() {
            return Err(FilesError::NotADirectory(display_path(path)));
        }
        let mut fs = self.part.clone();
        let index = dir.directory_index(&mut fs).map_err(|e| damaged(path, e))?;
        let mut iter = index.entries();
        let mut out = Vec::new();
        let mut seen = 0usize;
        while let Some(item) = iter.next(&mut fs) {
            seen += 1;
            // Each name may come twice (its DOS twin).
            if seen > 2 * self.limit {
                return Err(FilesError::Limit(format!(
                    "{}: more than {} entries",
                    display_path(path),
                    self.limit
                )));
            }
            let item = item.map_err(|e| damaged(path, e))?;
            let Some(key) = item.key() else { continue };
            let key = key.map_err(|e| damaged(path, e))?;
            // Every long name has an 8.3 twin in the DOS namespace: list each file once.
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let record = item.file_reference().file_record_number();
            if record < FIRST_USER_RECORD || record == ROOT_RECORD {
                continue;
            }
            let name = key.name().to_string_lossy();
            let mut child = path.to_vec();
            child.push(name.clone());
            let file = item
                .to_file(&self.ntfs, &mut fs)
                .map_err(|e| damaged(&child, e))?;
            out.push(self.entry(name, &file, &child)?);
        }
        Ok(out)
    }

    fn max_entries(&self) -> usize {
        self.limit
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_link(&self, path: &[String]) -> Result<String> {
        let e = self.stat(path)?;
        e.target.ok_or_else(|| {
            FilesError::Unsupported(format!(
                "{}: not an Interix symlink (NTFS reparse points are listed, not read)",
                display_path(path)
            ))
        })
    }

    fn open(&self, path: &[String]) -> Result<Box<dyn ReadSeek + '_>> {
        let file = self.find(path)?;
        if file.is_directory() {
            return Err(FilesError::BadPath(format!(
                "{}: is a folder",
                display_path(path)
            )));
        }
        let mut fs = self.part.clone();
        let len = {
            let item = match file.data(&mut fs, "") {
                Some(i) => i.map_err(|e| damaged(path, e))?,
                None => {
                    return Err(FilesError::BadPath(format!(
                        "{}: has no data",
                        display_path(path)
                    )))
                }
            };
            let attr = item.to_attribute().map_err(|e| damaged(path, e))?;
            let flags = attr.flags();
            if flags.contains(NtfsAttributeFlags::COMPRESSED) {
                let compressed = self.compressed(path, &attr, &mut fs)?;
                return Ok(Box::new(compressed));
            }
            if flags.contains(NtfsAttributeFlags::ENCRYPTED) {
                return Err(FilesError::Unsupported(format!(
                    "{}: EFS-encrypted file",
                    display_path(path)
                )));
            }
            attr.value_length()
        };
        Ok(Box::new(NtfsReader {
            file,
            fs,
            pos: 0,
            len,
        }))
    }
}

impl NtfsFs {
    /// A compressed data stream: its runs, read and decompressed by `lznt1`.
    fn compressed(
        &self,
        path: &[String],
        attr: &ntfs::NtfsAttribute<'_, '_>,
        fs: &mut Part,
    ) -> Result<Compressed> {
        let unsupported = |why: &str| {
            FilesError::Unsupported(format!(
                "{}: NTFS-compressed file {why}",
                display_path(path)
            ))
        };
        let cluster = u64::from(self.ntfs.cluster_size());
        if cluster > 4096 {
            return Err(unsupported("with clusters over 4 KiB"));
        }
        let NtfsAttributeValue::NonResident(value) =
            attr.value(fs).map_err(|e| damaged(path, e))?
        else {
            return Err(unsupported("spread over an attribute list"));
        };
        let mut runs = Vec::new();
        for run in value.data_runs() {
            let run = run.map_err(|e| damaged(path, e))?;
            if runs.len() >= 1 << 16 {
                return Err(FilesError::Limit(format!(
                    "{}: more than 65,536 data runs",
                    display_path(path)
                )));
            }
            let at = run.data_position().value().map(|p| p.get());
            runs.push((at, run.allocated_size()));
        }
        Ok(Compressed::new(
            self.part.clone(),
            runs,
            cluster,
            attr.value_length(),
        ))
    }
}

/// A file's unnamed data stream. The attribute value borrows the file, so each read finds it
/// again (cheap: the file record is in memory) and seeks to the position.
struct NtfsReader<'n> {
    file: NtfsFile<'n>,
    fs: Part,
    pos: u64,
    len: u64,
}

impl Read for NtfsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let fs = &mut self.fs;
        let item = self
            .file
            .data(fs, "")
            .ok_or_else(|| io::Error::other("the data stream went away"))?
            .map_err(io::Error::other)?;
        let attr = item.to_attribute().map_err(io::Error::other)?;
        let mut value = attr.value(fs).map_err(io::Error::other)?;
        value
            .seek(fs, SeekFrom::Start(self.pos))
            .map_err(io::Error::other)?;
        let want = ((self.len - self.pos).min(buf.len() as u64)) as usize;
        let n = value.read(fs, &mut buf[..want]).map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for NtfsReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::fs::seek_target(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}
