//! The NBD (Network Block Device) protocol: a read-only server for anything that implements
//! [`Export`], and a client for reading other servers' exports (QEMU's among them).
//!
//! Both ends speak the fixed newstyle handshake with `NBD_OPT_GO`, structured replies and
//! metadata contexts (`base:allocation`; on the client also `qemu:dirty-bitmap:NAME`), as the
//! NBD project's `doc/proto.md` describes them. Nothing here knows about vaults or QEMU.
//!
//! Everything the other end sends is untrusted: option and request sizes are bounded
//! ([`proto::MAX_OPTION`], [`proto::MAX_REQUEST`]), lengths are checked before anything is
//! allocated, and a peer that breaks the protocol gets an error or a closed connection, never a
//! panic.

mod client;
pub mod proto;
mod server;

use std::io;

pub use client::{Client, ConnectOptions, Extent};
pub use server::Server;
use thiserror::Error;

/// A disk as an NBD server serves it: read-only, random access, with its holes known.
pub trait Export: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `off`; the server never asks past [`Export::size`].
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The runs of `[off, off + len)` in order, as (length, holds data). A run without data
    /// reads as zeros. Runs may be shorter in total than `len`: the rest counts as data.
    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<(u64, bool)>>;
}

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The other end broke the protocol; the connection is not usable any more.
    #[error("NBD protocol error from the {peer}: {detail}")]
    Protocol { peer: &'static str, detail: String },
    /// The server answered an option with an error.
    #[error("the NBD server refused {option}: {reply}{}", in_parens(.message))]
    Refused {
        option: &'static str,
        reply: String,
        message: String,
    },
    /// The server answered a command with an error; the connection stays usable.
    #[error("NBD {command} at offset {offset}: {}{}", proto::errno_name(*.errno), in_parens(.message))]
    Command {
        command: &'static str,
        offset: u64,
        errno: u32,
        message: String,
    },
    /// Something the server did not offer (structured replies, a metadata context...).
    #[error("{0}")]
    Unsupported(String),
}

fn in_parens(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(" ({m})")
    }
}

impl NbdError {
    pub(crate) fn server(detail: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            peer: "server",
            detail: detail.into(),
        }
    }

    pub(crate) fn client(detail: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            peer: "client",
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = NbdError> = std::result::Result<T, E>;

/// An export held in memory, whose all-zero 64 KiB blocks are holes: for tests and fuzzing.
pub struct MemoryExport {
    data: Vec<u8>,
}

impl MemoryExport {
    pub fn new(data: Vec<u8>) -> MemoryExport {
        MemoryExport { data }
    }

    const BLOCK: u64 = 65536;
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(off).map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let end = off.saturating_add(len).min(self.size());
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = off;
        while pos < end {
            let next = ((pos / Self::BLOCK + 1) * Self::BLOCK).min(end);
            let data = self.data[pos as usize..next as usize]
                .iter()
                .any(|&b| b != 0);
            match out.last_mut() {
                Some((n, d)) if *d == data => *n += next - pos,
                _ => out.push((next - pos, data)),
            }
            pos = next;
        }
        Ok(out)
    }
}
