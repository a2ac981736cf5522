//! A small ext4 reader of our own for what `ext4-view` 1.0 refuses: filesystems with
//! `inline_data` (small files and folders kept inside their inodes). It reads the superblock,
//! the group descriptors (32- and 64-byte), inodes, extent trees and block maps, inline data
//! (the inode's 60 bytes plus its `system.data` attribute), and folders by a linear scan of
//! their blocks (htree index blocks look like empty entries, checksum tails have inode 0).
//! It does not replay the journal and does not follow symlinks inside paths. Every count and
//! offset is checked before use; extent trees are at most 5 deep and 100,000 nodes.

use std::io::{self, Read, Seek, SeekFrom};

use crate::disk::Part;
use crate::error::{FilesError, Result};
use crate::fs::{display_path, entry_limit, Entry, Filesystem, Kind, ReadSeek, MAX_DIR_ENTRIES};

const EXTENTS_FL: u32 = 0x8_0000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const ROOT: u32 = 2;

pub struct Ext4Lite {
    part: Part,
    block: u64,
    inode_size: u64,
    per_group: u64,
    inodes: u64,
    tables: Vec<u64>,
    label: Option<String>,
    limit: usize,
    capacity: u64,
}

#[derive(Clone)]
struct Inode {
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    mtime_nanos: u32,
    flags: u32,
    links: u16,
    block: [u8; 60],
    /// The in-inode extended attribute area.
    xattrs: Vec<u8>,
}

fn bad(reason: impl std::fmt::Display) -> FilesError {
    FilesError::damaged("ext4 filesystem", reason)
}

fn u16at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Ext4Lite {
    pub fn open(part: Part) -> Result<Ext4Lite> {
        let mut sb = [0u8; 1024];
        part.read_exact_at(1024, &mut sb).map_err(bad)?;
        if u16at(&sb, 56) != 0xEF53 {
            return Err(bad("no superblock"));
        }
        let log = u32at(&sb, 24);
        if log > 6 {
            return Err(bad(format!("block size 2^{}", 10 + log)));
        }
        let block = 1024u64 << log;
        let incompat = u32at(&sb, 96);
        if incompat & (0x1 | 0x8 | 0x10 | 0x1_0000) != 0 {
            return Err(FilesError::Unsupported(format!(
                "ext4 features {incompat:#x} (compression, journal device, meta_bg or encryption)"
            )));
        }
        let inode_size = if u32at(&sb, 76) >= 1 {
            u64::from(u16at(&sb, 88))
        } else {
            128
        };
        if !(128..=block).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(bad(format!("inode size {inode_size}")));
        }
        let per_group = u64::from(u32at(&sb, 40));
        let inodes = u64::from(u32at(&sb, 0));
        if per_group == 0 || per_group > block * 8 {
            return Err(bad(format!("{per_group} inodes per group")));
        }
        let desc = if incompat & 0x80 != 0 {
            u64::from(u16at(&sb, 254))
        } else {
            32
        };
        if !(32..=1024).contains(&desc) {
            return Err(bad(format!("group descriptor size {desc}")));
        }
        let groups = inodes.div_ceil(per_group);
        if groups * desc > part.len() {
            return Err(bad(format!("{groups} groups")));
        }
        let mut gdt = vec![0u8; (groups * desc) as usize];
        let first = u64::from(u32at(&sb, 20)) + 1;
        part.read_exact_at(first * block, &mut gdt).map_err(bad)?;
        let tables = gdt
            .chunks_exact(desc as usize)
            .map(|d| {
                let hi = if desc >= 64 {
                    u64::from(u32at(d, 0x28))
                } else {
                    0
                };
                (hi << 32 | u64::from(u32at(d, 8))).saturating_mul(block)
            })
            .collect();
        let name: Vec<u8> = sb[120..136]
            .iter()
            .copied()
            .take_while(|&c| c != 0)
            .collect();
        let label =
            Some(String::from_utf8_lossy(&name).trim().to_string()).filter(|l| !l.is_empty());
        let limit = entry_limit(part.len(), 12).min(MAX_DIR_ENTRIES);
        Ok(Ext4Lite {
            capacity: part.len(),
            part,
            block,
            inode_size,
            per_group,
            inodes,
            tables,
            label,
            limit,
        })
    }

    fn inode(&self, n: u32) -> Result<Inode> {
        let n = u64::from(n);
        if n == 0 || n > self.inodes {
            return Err(bad(format!("inode {n} out of range")));
        }
        let (group, index) = ((n - 1) / self.per_group, (n - 1) % self.per_group);
        let at = self.tables[group as usize].saturating_add(index * self.inode_size);
        let mut b = vec![0u8; self.inode_size as usize];
        self.part.read_exact_at(at, &mut b).map_err(bad)?;
        let extra = if b.len() > 128 {
            u64::from(u16at(&b, 128))
        } else {
            0
        };
        let xattr_start = (128 + extra) as usize;
        let mtime_extra = if extra >= 8 && b.len() >= 140 {
            u32at(&b, 136)
        } else {
            0
        };
        Ok(Inode {
            mode: u16at(&b, 0),
            uid: u32::from(u16at(&b, 2)) | u32::from(u16at(&b, 120)) << 16,
            gid: u32::from(u16at(&b, 24)) | u32::from(u16at(&b, 122)) << 16,
            size: u64::from(u32at(&b, 4)) | u64::from(u32at(&b, 108)) << 32,
            mtime: i64::from(u32at(&b, 16) as i32) + (i64::from(mtime_extra & 3) << 32),
            mtime_nanos: (mtime_extra >> 2).min(999_999_999),
            flags: u32at(&b, 32),
            links: u16at(&b, 26),
            block: b[40..100].try_into().expect("60 bytes"),
            xattrs: b.get(xattr_start..).unwrap_or_default().to_vec(),
        })
    }

    /// The `system.data` attribute that continues inline data past the inode's 60 bytes.
    fn inline_tail(i: &Inode) -> Vec<u8> {
        let x = &i.xattrs;
        if x.len() < 4 || u32at(x, 0) != 0xEA02_0000 {
            return Vec::new();
        }
        let mut at = 4;
        while at + 16 <= x.len() && u32at(x, at) != 0 {
            let (len, index) = (x[at] as usize, x[at + 1]);
            let (offs, size) = (u16at(x, at + 2) as usize, u32at(x, at + 8) as usize);
            let name = x.get(at + 16..at + 16 + len).unwrap_or_default();
            if index == 7 && name == b"data" {
                return x
                    .get(4 + offs..4 + offs + size)
                    .unwrap_or_default()
                    .to_vec();
            }
            at += (16 + len).div_ceil(4) * 4;
        }
        Vec::new()
    }

    /// The extents of a file: (first logical block, first physical block, length, written).
    fn extents(&self, i: &Inode) -> Result<Vec<(u64, u64, u64, bool)>> {
        let mut out = Vec::new();
        let mut nodes = 0;
        self.extent_node(&i.block, 6, &mut out, &mut nodes)?;
        out.sort_by_key(|e| e.0);
        Ok(out)
    }

    fn extent_node(
        &self,
        node: &[u8],
        max_depth: u16,
        out: &mut Vec<(u64, u64, u64, bool)>,
        nodes: &mut u32,
    ) -> Result<()> {
        *nodes += 1;
        if *nodes > 100_000 || node.len() < 12 || u16at(node, 0) != 0xF30A {
            return Err(bad("extent tree"));
        }
        let (count, depth) = (u16at(node, 2) as usize, u16at(node, 6));
        if depth >= max_depth || 12 + count * 12 > node.len() {
            return Err(bad("extent tree"));
        }
        for e in node[12..12 + count * 12].chunks_exact(12) {
            if depth == 0 {
                let len = u16at(e, 4);
                let (len, written) = if len > 32768 {
                    (len - 32768, false)
                } else {
                    (len, true)
                };
                let start = u64::from(u16at(e, 6)) << 32 | u64::from(u32at(e, 8));
                out.push((u64::from(u32at(e, 0)), start, u64::from(len), written));
            } else {
                let leaf = u64::from(u16at(e, 8)) << 32 | u64::from(u32at(e, 4));
                let mut child = vec![0u8; self.block as usize];
                self.part
                    .read_exact_at(leaf.saturating_mul(self.block), &mut child)
                    .map_err(bad)?;
                self.extent_node(&child, depth, out, nodes)?;
            }
        }
        Ok(())
    }

    /// The physical block of logical block `l` in a block-mapped file (0: a hole).
    fn mapped(&self, i: &Inode, l: u64) -> Result<u64> {
        let per = self.block / 4;
        let ptr = |n: usize| u64::from(u32at(&i.block, n * 4));
        let (mut blk, mut rest, levels) = if l < 12 {
            return Ok(ptr(l as usize));
        } else if l - 12 < per {
            (ptr(12), l - 12, 1)
        } else if l - 12 - per < per * per {
            (ptr(13), l - 12 - per, 2)
        } else {
            (ptr(14), l - 12 - per - per * per, 3)
        };
        for level in (0..levels).rev() {
            if blk == 0 {
                return Ok(0);
            }
            let span = per.pow(level);
            let mut b = [0u8; 4];
            let at = blk.saturating_mul(self.block) + (rest / span) * 4;
            self.part.read_exact_at(at, &mut b).map_err(bad)?;
            blk = u64::from(u32::from_le_bytes(b));
            rest %= span;
        }
        Ok(blk)
    }

    /// A file's whole content, for folders and symlinks (at most 64 MiB).
    fn content(&self, i: &Inode) -> Result<Vec<u8>> {
        if i.size > 64 << 20 {
            return Err(FilesError::Limit("a folder or symlink over 64 MiB".into()));
        }
        let mut out = Vec::new();
        self.reader(i)?.read_to_end(&mut out).map_err(bad)?;
        Ok(out)
    }

    fn reader(&self, i: &Inode) -> Result<LiteReader<'_>> {
        let map = if i.flags & INLINE_DATA_FL != 0 {
            let mut data = i.block.to_vec();
            data.extend(Self::inline_tail(i));
            data.truncate(i.size as usize);
            Map::Inline(data)
        } else if i.flags & EXTENTS_FL != 0 {
            Map::Extents(self.extents(i)?)
        } else {
            Map::Blocks(Box::new(i.clone()))
        };
        Ok(LiteReader {
            fs: self,
            map,
            len: i.size,
            pos: 0,
        })
    }

    /// (name, inode) of every entry of folder inode `i`.
    fn dir(&self, i: &Inode, path: &[String]) -> Result<Vec<(String, u32)>> {
        if i.mode & 0xF000 != 0x4000 {
            return Err(FilesError::NotADirectory(display_path(path)));
        }
        let data = self.content(i)?;
        let (data, chunk) = if i.flags & INLINE_DATA_FL != 0 {
            (data.get(4..).unwrap_or_default().to_vec(), usize::MAX)
        } else {
            (data, self.block as usize)
        };
        let mut out = Vec::new();
        for block in data.chunks(chunk.min(data.len().max(1))) {
            let mut at = 0;
            while at + 8 <= block.len() {
                let (ino, rec) = (u32at(block, at), u16at(block, at + 4) as usize);
                let len = block[at + 6] as usize;
                if rec < 8 || at + rec > block.len() || 8 + len > rec {
                    if ino == 0 && block[at..].iter().all(|&b| b == 0) {
                        break;
                    }
                    return Err(bad(format!("{}: a folder entry", display_path(path))));
                }
                let name = String::from_utf8_lossy(&block[at + 8..at + 8 + len]).into_owned();
                if ino != 0 && name != "." && name != ".." {
                    if out.len() >= self.limit {
                        return Err(FilesError::Limit(format!(
                            "{}: too many entries",
                            display_path(path)
                        )));
                    }
                    out.push((name, ino));
                }
                at += rec;
            }
        }
        Ok(out)
    }

    fn lookup(&self, path: &[String]) -> Result<(u32, Inode)> {
        let mut n = ROOT;
        let mut inode = self.inode(n)?;
        for (k, name) in path.iter().enumerate() {
            let here = &path[..=k];
            let found = self
                .dir(&inode, &path[..k])?
                .into_iter()
                .find(|(e, _)| e == name);
            n = found
                .ok_or_else(|| FilesError::NotFound(display_path(here)))?
                .1;
            inode = self.inode(n)?;
        }
        Ok((n, inode))
    }

    fn entry(&self, name: String, n: u32, i: &Inode, path: &[String]) -> Result<Entry> {
        let kind = match i.mode & 0xF000 {
            0x8000 => Kind::File,
            0x4000 => Kind::Dir,
            0xA000 => Kind::Symlink,
            _ => Kind::Other,
        };
        let mut e = Entry::new(name, kind, i.size);
        e.mode = Some(u32::from(i.mode) & 0o7777);
        (e.uid, e.gid) = (Some(i.uid), Some(i.gid));
        (e.mtime, e.mtime_nanos) = (Some(i.mtime), i.mtime_nanos);
        e.links = Some(u32::from(i.links));
        e.id = Some(u64::from(n));
        if kind == Kind::Symlink {
            e.target = Some(self.target(i, path)?);
        }
        Ok(e)
    }

    fn target(&self, i: &Inode, _path: &[String]) -> Result<String> {
        let fast = i.flags & (EXTENTS_FL | INLINE_DATA_FL) == 0 && i.size < 60;
        let bytes = if fast {
            i.block[..i.size as usize].to_vec()
        } else {
            self.content(i)?
        };
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

enum Map {
    Inline(Vec<u8>),
    Extents(Vec<(u64, u64, u64, bool)>),
    Blocks(Box<Inode>),
}

struct LiteReader<'a> {
    fs: &'a Ext4Lite,
    map: Map,
    len: u64,
    pos: u64,
}

impl Read for LiteReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let bs = self.fs.block;
        let (l, within) = (self.pos / bs, self.pos % bs);
        let n = ((bs - within).min(self.len - self.pos)).min(buf.len() as u64) as usize;
        let err = |e: FilesError| io::Error::other(e.to_string());
        let physical = match &self.map {
            Map::Inline(d) => {
                let start = self.pos as usize;
                let n = n.min(d.len().saturating_sub(start));
                buf[..n].copy_from_slice(&d[start..start + n]);
                self.pos += n as u64;
                return Ok(n);
            }
            Map::Extents(ext) => {
                let i = ext.partition_point(|e| e.0 <= l);
                match i.checked_sub(1).map(|i| ext[i]) {
                    Some((first, start, len, true)) if l < first + len => start + (l - first),
                    _ => 0,
                }
            }
            Map::Blocks(inode) => self.fs.mapped(inode, l).map_err(err)?,
        };
        if physical == 0 {
            buf[..n].fill(0);
        } else {
            let at = physical.saturating_mul(bs) + within;
            self.fs.part.read_exact_at(at, &mut buf[..n])?;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for LiteReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::fs::seek_target(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

impl Filesystem for Ext4Lite {
    fn kind(&self) -> &'static str {
        "ext4"
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn stat(&self, path: &[String]) -> Result<Entry> {
        let (n, i) = self.lookup(path)?;
        self.entry(path.last().cloned().unwrap_or_default(), n, &i, path)
    }

    fn list(&self, path: &[String]) -> Result<Vec<Entry>> {
        let (_, dir) = self.lookup(path)?;
        let mut out = Vec::new();
        for (name, n) in self.dir(&dir, path)? {
            let mut child = path.to_vec();
            child.push(name.clone());
            out.push(self.entry(name, n, &self.inode(n)?, &child)?);
        }
        Ok(out)
    }

    fn read_link(&self, path: &[String]) -> Result<String> {
        let (_, i) = self.lookup(path)?;
        self.target(&i, path)
    }

    fn open(&self, path: &[String]) -> Result<Box<dyn ReadSeek + '_>> {
        let (_, i) = self.lookup(path)?;
        if i.mode & 0xF000 != 0x8000 {
            return Err(FilesError::BadPath(format!(
                "{}: not a regular file",
                display_path(path)
            )));
        }
        Ok(Box::new(self.reader(&i)?))
    }

    fn max_entries(&self) -> usize {
        self.limit
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }
}
