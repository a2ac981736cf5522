//! NTFS-compressed files, which the `ntfs` crate returns raw: the file's data runs cut into
//! compression units of 16 clusters; a unit with all 16 clusters allocated is stored as is,
//! one with none is zeros, any other holds LZNT1 data in its allocated clusters followed by a
//! sparse tail. LZNT1 (MS-XCA 2.5): 4 KiB chunks, each a 2-byte header (size − 1 in the low
//! 12 bits, bit 15 = compressed) and, when compressed, groups of a flag byte and 8 literals or
//! back-references whose split of length and offset bits depends on the position in the chunk.

use std::io::{self, Read, Seek, SeekFrom};

use crate::disk::Part;

const CLUSTERS_PER_UNIT: u64 = 16;
const CHUNK: usize = 4096;

/// A compressed data stream: its runs (`Some(byte offset in the filesystem)` or sparse, and
/// a length in bytes), read one compression unit at a time.
pub struct Compressed {
    fs: Part,
    runs: Vec<(Option<u64>, u64)>,
    unit: u64,
    len: u64,
    pos: u64,
    /// The last unit decoded: its number and bytes.
    cached: Option<(u64, Vec<u8>)>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("LZNT1: {what}"))
}

impl Compressed {
    /// `cluster` must be at most 4 KiB (NTFS compresses nothing with larger clusters).
    pub fn new(fs: Part, runs: Vec<(Option<u64>, u64)>, cluster: u64, len: u64) -> Compressed {
        Compressed {
            fs,
            runs,
            unit: cluster * CLUSTERS_PER_UNIT,
            len,
            pos: 0,
            cached: None,
        }
    }

    /// The allocated bytes of unit `u`, in order, and whether all of the unit is allocated.
    fn gather(&self, u: u64) -> io::Result<(Vec<u8>, bool)> {
        let (start, end) = (u * self.unit, (u + 1) * self.unit);
        let mut out = Vec::new();
        let mut covered = 0;
        let mut at = 0u64;
        for &(lcn, len) in &self.runs {
            let (a, b) = (at.max(start), (at + len).min(end));
            if a < b {
                if let Some(base) = lcn {
                    let old = out.len();
                    out.resize(old + (b - a) as usize, 0);
                    self.fs.read_exact_at(base + (a - at), &mut out[old..])?;
                }
                covered += b - a;
            }
            at += len;
            if at >= end {
                break;
            }
        }
        let whole = out.len() as u64 == self.unit && covered == self.unit;
        Ok((out, whole))
    }

    fn unit_bytes(&mut self, u: u64) -> io::Result<&[u8]> {
        if self.cached.as_ref().map(|c| c.0) != Some(u) {
            let (raw, whole) = self.gather(u)?;
            let data = if whole {
                raw
            } else if raw.is_empty() {
                vec![0; self.unit as usize]
            } else {
                let mut out = Vec::with_capacity(self.unit as usize);
                decompress(&raw, &mut out, self.unit as usize)?;
                out.resize(self.unit as usize, 0);
                out
            };
            self.cached = Some((u, data));
        }
        Ok(&self.cached.as_ref().expect("just filled").1)
    }
}

/// Decompresses LZNT1 `input` onto `out`, at most `limit` bytes in all.
pub fn decompress(input: &[u8], out: &mut Vec<u8>, limit: usize) -> io::Result<()> {
    let mut i = 0;
    while i + 2 <= input.len() && out.len() < limit {
        let header = u16::from_le_bytes([input[i], input[i + 1]]);
        i += 2;
        if header == 0 {
            break;
        }
        let end = i + (header & 0x0FFF) as usize + 1;
        if end > input.len() {
            return Err(bad("a chunk runs past its unit"));
        }
        let chunk_start = out.len();
        if header & 0x8000 == 0 {
            out.extend_from_slice(&input[i..end]);
        } else {
            let mut j = i;
            while j < end {
                let flags = input[j];
                j += 1;
                for bit in 0..8 {
                    if j >= end {
                        break;
                    }
                    if flags & (1 << bit) == 0 {
                        out.push(input[j]);
                        j += 1;
                        continue;
                    }
                    if j + 2 > end {
                        return Err(bad("a cut back-reference"));
                    }
                    let token = u16::from_le_bytes([input[j], input[j + 1]]) as usize;
                    j += 2;
                    let pos = out.len() - chunk_start;
                    let (mut len_mask, mut shift, mut p) = (0x0FFFusize, 12u32, pos.max(1) - 1);
                    while p >= 0x10 {
                        len_mask >>= 1;
                        shift -= 1;
                        p >>= 1;
                    }
                    let len = (token & len_mask) + 3;
                    let back = (token >> shift) + 1;
                    if back > pos || pos + len > CHUNK {
                        return Err(bad("a back-reference out of its chunk"));
                    }
                    for _ in 0..len {
                        out.push(out[out.len() - back]);
                    }
                }
            }
        }
        if out.len() - chunk_start > CHUNK {
            return Err(bad("a chunk larger than 4 KiB"));
        }
        i = end;
    }
    out.truncate(limit);
    Ok(())
}

impl Read for Compressed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let (u, within) = (self.pos / self.unit, (self.pos % self.unit) as usize);
        let left = self.len - self.pos;
        let data = self.unit_bytes(u)?;
        let n = (data.len() - within).min(buf.len()).min(left as usize);
        buf[..n].copy_from_slice(&data[within..within + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Compressed {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::fs::seek_target(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_a_back_reference() {
        // "abcabcabc": three literals, then a back-reference of length 6 at distance 3.
        // At position 3 the split is 12 bits of length... minus one per doubling past 16:
        // pos 3 → shift 12, so token = ((3 - 1) << 12) | (6 - 3).
        let token: u16 = (2 << 12) | 3;
        let mut body = vec![0b0000_1000u8, b'a', b'b', b'c'];
        body.extend_from_slice(&token.to_le_bytes());
        let header: u16 = 0x8000 | 0x3000 | (body.len() as u16 - 1);
        let mut input = header.to_le_bytes().to_vec();
        input.extend_from_slice(&body);
        let mut out = Vec::new();
        decompress(&input, &mut out, 4096).unwrap();
        assert_eq!(out, b"abcabcabc");
    }

    #[test]
    fn hostile_streams_fail_without_panics() {
        for input in [
            vec![0xFF, 0xBF, 1, 0, 0],
            vec![0x05, 0x80, 0xFF, 0xFF, 0xFF],
            vec![0x01, 0x80, 0x01],
            vec![0xFF, 0xFF],
        ] {
            let mut out = Vec::new();
            let _ = decompress(&input, &mut out, 65536);
            assert!(out.len() <= 65536);
        }
    }
}
