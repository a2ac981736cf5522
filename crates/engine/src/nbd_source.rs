//! A disk read from an NBD export (QEMU's point-in-time of a running VM's disk): the
//! allocation map and the dirty bitmap are asked for once, at the start, since the export's
//! contents are frozen for as long as it exists.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vmvault_disk::DiskReader;
use vmvault_nbd::proto::{STATE_DIRTY, STATE_ZERO};
use vmvault_nbd::{Client, ConnectOptions, Extent};

use crate::Result;

const ALLOCATION: &str = "base:allocation";

pub(crate) struct NbdSource {
    client: Mutex<Client<UnixStream>>,
    size: u64,
    format: &'static str,
    socket: PathBuf,
    /// Starts and ends of the ranges that read as zeros, in order.
    zeros: Vec<(u64, u64)>,
}

impl NbdSource {
    /// Connects to `export`; with `bitmap`, the dirty bitmap's context is selected too.
    pub fn connect(
        socket: &Path,
        export: &str,
        format: &'static str,
        bitmap: Option<&str>,
    ) -> Result<NbdSource> {
        let mut contexts = vec![ALLOCATION.to_string()];
        contexts.extend(bitmap.map(|b| format!("qemu:dirty-bitmap:{b}")));
        let opts = ConnectOptions {
            export: export.to_string(),
            meta_contexts: contexts,
        };
        let mut client = Client::connect_unix(socket, &opts)?;
        let size = client.size();
        let mut zeros = Vec::new();
        let mut at = 0;
        for e in extents(&mut client, size, ALLOCATION)? {
            // A hole that is not known to read as zeros still has to be read.
            if e.flags & STATE_ZERO != 0 {
                match zeros.last_mut() {
                    Some((_, end)) if *end == at => *end = at + e.len,
                    _ => zeros.push((at, at + e.len)),
                }
            }
            at += e.len;
        }
        Ok(NbdSource {
            client: Mutex::new(client),
            size,
            format,
            socket: socket.to_path_buf(),
            zeros,
        })
    }

    /// The ranges the bitmap `bitmap` marks dirty, per `chunk_size` chunk: (offset in the
    /// chunk, length), in order.
    pub fn dirty_ranges(&self, bitmap: &str, chunk_size: u64) -> Result<Vec<Vec<(u32, u32)>>> {
        let count = self.size.div_ceil(chunk_size) as usize;
        let mut dirty: Vec<Vec<(u32, u32)>> = vec![Vec::new(); count];
        let context = format!("qemu:dirty-bitmap:{bitmap}");
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = 0;
        for e in extents(&mut client, self.size, &context)? {
            if e.flags & STATE_DIRTY != 0 {
                // Split the extent at chunk boundaries.
                let (mut from, end) = (at, (at + e.len).min(self.size));
                while from < end {
                    let chunk = from / chunk_size;
                    let stop = ((chunk + 1) * chunk_size).min(end);
                    let ranges = &mut dirty[chunk as usize];
                    let start = (from - chunk * chunk_size) as u32;
                    let len = (stop - from) as u32;
                    match ranges.last_mut() {
                        Some(last) if last.0 + last.1 == start => last.1 += len,
                        _ => ranges.push((start, len)),
                    }
                    from = stop;
                }
            }
            at += e.len;
        }
        Ok(dirty)
    }
}

/// The whole export's extents in `context`, asked for in pieces the server accepts.
fn extents(client: &mut Client<UnixStream>, size: u64, context: &str) -> Result<Vec<Extent>> {
    const STEP: u64 = 1 << 30;
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let len = (size - at).min(STEP);
        let got = client.block_status(at, len, context)?;
        let covered: u64 = got.iter().map(|e| e.len).sum();
        if covered == 0 {
            break;
        }
        at += covered;
        out.extend(got);
    }
    Ok(out)
}

impl DiskReader for NbdSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        client.read_at(offset, buf).map_err(io::Error::other)
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        // The zero range that starts at or before `offset`, if it covers the whole request.
        let i = self.zeros.partition_point(|&(start, _)| start <= offset);
        Ok(!(i > 0 && self.zeros[i - 1].1 >= offset + len))
    }

    fn format(&self) -> &'static str {
        self.format
    }

    fn path(&self) -> &Path {
        &self.socket
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let zero: u64 = self.zeros.iter().map(|(s, e)| e - s).sum();
        Ok(self.size - zero)
    }
}
