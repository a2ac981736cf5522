//! The transmission phase of the client: reads, writes and block status, each reply checked
//! against the request it answers before it is believed.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use super::{Client, Extent};
use crate::proto::*;
use crate::{NbdError, Result};

impl<S: Read + Write> Client<S> {
    /// Reads `buf.len()` bytes at `off`, in requests no larger than the server allows.
    pub fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let max = self.max_block as usize;
        for (i, piece) in buf.chunks_mut(max).enumerate() {
            let at = off + (i * max) as u64;
            let r = self.read_piece(at, piece);
            self.note(&r);
            r?;
        }
        Ok(())
    }

    /// Marks the connection unusable after an error that leaves the stream mid-reply.
    fn note<T>(&mut self, r: &Result<T>) {
        if matches!(r, Err(NbdError::Io(_) | NbdError::Protocol { .. })) {
            self.broken = true;
        }
    }

    fn read_piece(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let handle = self.send(CMD_READ, 0, off, buf.len() as u32)?;
        if !self.structured {
            let (magic, error, h) = (
                read_u32(&mut self.s)?,
                read_u32(&mut self.s)?,
                read_u64(&mut self.s)?,
            );
            if magic != SIMPLE_REPLY_MAGIC || h != handle {
                return Err(NbdError::server("a malformed simple reply"));
            }
            if error != 0 {
                return Err(command_error("READ", off, error, String::new()));
            }
            return Ok(self.s.read_exact(buf)?);
        }
        let len = buf.len() as u64;
        // Content chunks seen, by start: none may overlap another.
        let mut seen = BTreeMap::<u64, u64>::new();
        let mut covered = 0u64;
        let mut error = None;
        loop {
            let chunk = self.chunk(handle, "READ", off)?;
            let at = |o: u64, n: u64| -> Result<usize> {
                let rel = o
                    .checked_sub(off)
                    .filter(|r| r.checked_add(n).is_some_and(|e| e <= len));
                rel.map(|r| r as usize).ok_or_else(|| {
                    NbdError::server(format!("a read chunk outside the request at {o}"))
                })
            };
            match chunk.kind {
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let o = read_u64(&mut self.s)?;
                    let n = if chunk.kind == REPLY_TYPE_OFFSET_DATA {
                        (chunk.len as u64).checked_sub(8).filter(|&n| n > 0)
                    } else if chunk.len == 12 {
                        Some(read_u32(&mut self.s)? as u64).filter(|&n| n > 0)
                    } else {
                        None
                    };
                    let n = n.ok_or_else(|| NbdError::server("a malformed read chunk"))?;
                    let rel = at(o, n)?;
                    let overlaps = seen
                        .range(..o + n)
                        .next_back()
                        .is_some_and(|(&s, &e)| s < o + n && e > o);
                    if overlaps {
                        return Err(NbdError::server("overlapping read chunks"));
                    }
                    seen.insert(o, o + n);
                    covered += n;
                    let dst = &mut buf[rel..rel + n as usize];
                    if chunk.kind == REPLY_TYPE_OFFSET_DATA {
                        self.s.read_exact(dst)?;
                    } else {
                        dst.fill(0);
                    }
                }
                REPLY_TYPE_NONE if chunk.len == 0 => {}
                k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
                    let (errno, message) = self.error_payload(chunk.len)?;
                    error.get_or_insert(command_error("READ", off, errno, message));
                }
                k => return Err(NbdError::server(format!("reply chunk type {k} to READ"))),
            }
            if chunk.done {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        if covered != len {
            return Err(NbdError::server(format!(
                "a read of {len} bytes answered with {covered}"
            )));
        }
        Ok(())
    }

    /// The next reply to `handle`: a simple reply's error, or a structured chunk's header.
    fn reply(&mut self, handle: u64) -> Result<Reply> {
        let magic = read_u32(&mut self.s)?;
        if magic == SIMPLE_REPLY_MAGIC {
            let error = read_u32(&mut self.s)?;
            let h = read_u64(&mut self.s)?;
            if h != handle {
                return Err(NbdError::server(format!(
                    "a reply for handle {h}, not {handle}"
                )));
            }
            return Ok(Reply::Simple(error));
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(NbdError::server("a reply without its magic"));
        }
        let flags = read_u16(&mut self.s)?;
        let kind = read_u16(&mut self.s)?;
        let h = read_u64(&mut self.s)?;
        let len = read_u32(&mut self.s)?;
        if h != handle {
            return Err(NbdError::server(format!(
                "a reply for handle {h}, not {handle}"
            )));
        }
        if len > MAX_REQUEST + 64 {
            return Err(NbdError::server(format!("a reply chunk of {len} bytes")));
        }
        Ok(Reply::Chunk(Chunk {
            done: flags & REPLY_FLAG_DONE != 0,
            kind,
            len,
        }))
    }

    /// A structured chunk replying to `command`, which must not be answered simply unless
    /// with an error.
    fn chunk(&mut self, handle: u64, command: &'static str, off: u64) -> Result<Chunk> {
        match self.reply(handle)? {
            Reply::Chunk(c) => Ok(c),
            Reply::Simple(0) => Err(NbdError::server(format!("a simple reply to {command}"))),
            Reply::Simple(e) => Err(command_error(command, off, e, String::new())),
        }
    }

    /// Writes `data` at `off`, in requests no larger than the server allows. A read-only
    /// server answers `EPERM`.
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.check_range(off, data.len() as u64)?;
        let max = self.max_block as usize;
        for (i, piece) in data.chunks(max).enumerate() {
            let at = off + (i * max) as u64;
            let r = self.write_piece(at, piece);
            self.note(&r);
            r?;
        }
        Ok(())
    }

    fn write_piece(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let handle = self.send(CMD_WRITE, 0, off, data.len() as u32)?;
        self.s.write_all(data)?;
        let mut error = None;
        loop {
            let chunk = match self.reply(handle)? {
                Reply::Simple(0) => return Ok(()),
                Reply::Simple(e) => return Err(command_error("WRITE", off, e, String::new())),
                Reply::Chunk(c) => c,
            };
            match chunk.kind {
                REPLY_TYPE_NONE if chunk.len == 0 => {}
                k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
                    let (errno, message) = self.error_payload(chunk.len)?;
                    error.get_or_insert(command_error("WRITE", off, errno, message));
                }
                k => return Err(NbdError::server(format!("reply chunk type {k} to WRITE"))),
            }
            if chunk.done {
                return error.map_or(Ok(()), Err);
            }
        }
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(NbdError::Unsupported(format!(
                "{len} bytes at {off} are past the export's end ({})",
                self.size
            )));
        }
        Ok(())
    }

    fn error_payload(&mut self, len: u32) -> Result<(u32, String)> {
        if len as usize > MAX_STRING + 14 {
            return Err(NbdError::server(format!("an error chunk of {len} bytes")));
        }
        let data = read_vec(&mut self.s, len as usize)?;
        let mut r = Bytes(&data);
        let (Some(errno), Some(mlen)) = (r.u32(), r.u16()) else {
            return Err(NbdError::server("a malformed error chunk"));
        };
        let message = r
            .take(mlen as usize)
            .ok_or_else(|| NbdError::server("a malformed error chunk"))?;
        Ok((errno, String::from_utf8_lossy(message).into_owned()))
    }

    /// The status of `[off, off + len)` in metadata context `context` (selected when
    /// connecting), as consecutive extents covering the whole range.
    pub fn block_status(&mut self, off: u64, len: u64, context: &str) -> Result<Vec<Extent>> {
        let id = self
            .contexts
            .iter()
            .find(|(_, n)| n == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| {
                NbdError::Unsupported(format!("metadata context {context:?} was not selected"))
            })?;
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                NbdError::Unsupported(format!(
                    "block status of {len} bytes at {off} is past the end"
                ))
            })?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        while pos < end {
            let ask = (end - pos).min(u32::MAX as u64 & !511) as u32;
            let r = self.status_piece(pos, ask, id);
            self.note(&r);
            for e in r? {
                match out.last_mut() {
                    Some(last) if last.flags == e.flags => last.len += e.len,
                    _ => out.push(e),
                }
                pos += e.len;
            }
        }
        Ok(out)
    }

    /// One `NBD_CMD_BLOCK_STATUS`: the extents the server gave for context `id`.
    fn status_piece(&mut self, off: u64, len: u32, id: u32) -> Result<Vec<Extent>> {
        let handle = self.send(CMD_BLOCK_STATUS, 0, off, len)?;
        let mut mine = None;
        let mut error = None;
        loop {
            let chunk = self.chunk(handle, "BLOCK_STATUS", off)?;
            match chunk.kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    if chunk.len < 12 || (chunk.len - 4) % 8 != 0 {
                        return Err(NbdError::server("a malformed block status chunk"));
                    }
                    let data = read_vec(&mut self.s, chunk.len as usize)?;
                    let mut r = Bytes(&data);
                    // Other selected contexts answer too: only ours is kept.
                    if r.u32() == Some(id) {
                        let mut extents = Vec::new();
                        let mut sum = 0u64;
                        while let (Some(n), Some(flags)) = (r.u32(), r.u32()) {
                            sum += n as u64;
                            if n == 0 || sum > len as u64 {
                                return Err(NbdError::server(
                                    "block status extents past the request",
                                ));
                            }
                            extents.push(Extent {
                                len: n as u64,
                                flags,
                            });
                        }
                        mine = Some(extents);
                    }
                }
                REPLY_TYPE_NONE if chunk.len == 0 => {}
                k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
                    let (errno, message) = self.error_payload(chunk.len)?;
                    error.get_or_insert(command_error("BLOCK_STATUS", off, errno, message));
                }
                k => {
                    return Err(NbdError::server(format!(
                        "reply chunk type {k} to BLOCK_STATUS"
                    )))
                }
            }
            if chunk.done {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        mine.filter(|m| !m.is_empty())
            .ok_or_else(|| NbdError::server("no block status for the context asked"))
    }
}

enum Reply {
    /// A simple reply, with its error (0: success).
    Simple(u32),
    Chunk(Chunk),
}

struct Chunk {
    done: bool,
    kind: u16,
    len: u32,
}

fn command_error(command: &'static str, offset: u64, errno: u32, message: String) -> NbdError {
    NbdError::Command {
        command,
        offset,
        errno,
        message,
    }
}
