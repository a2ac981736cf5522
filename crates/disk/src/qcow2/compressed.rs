//! Compressed clusters: zlib (raw deflate, as QEMU writes it) and zstd, decompressed with
//! reused decoder contexts, on several threads for the many clusters of a large read.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::header::Compression;
use super::map::{Extent, Kind};
use super::reader::{lock, Qcow2Reader};

/// Compressed clusters lying close together are read with one pread of at most this.
const COMPRESSED_BATCH_BYTES: u64 = 4 << 20;
/// A cluster is at most 2 MiB, so QEMU's zstd frames never need a window above that: a frame
/// asking for more (zstd would allow 128 MiB) is refused instead of allocated.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;
/// Decoders kept for reuse: one per thread decompressing at once.
const DECODER_POOL: usize = 16;
/// Threads decompressing the clusters of one read (a 1 MiB read holds 16 of 64 KiB).
const MAX_DECOMPRESS_THREADS: usize = 8;

pub(super) enum Decoder {
    Zlib(flate2::Decompress),
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
}

impl Qcow2Reader {
    /// Where a compressed cluster's bytes are: (host offset, bytes to read).
    fn compressed_location(&self, entry: u64) -> io::Result<(u64, u64)> {
        let size_bits = self.cluster_bits - 8;
        let shift = 62 - size_bits;
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << size_bits) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        if host >= 1 << 56 || host >= self.file_len {
            return Err(self.invalid(format!(
                "compressed cluster at {host} lies past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        Ok((host, len))
    }

    /// Fills the compressed extents' parts of `buf` (which starts at virtual `base`), reading
    /// the compressed bytes of neighbouring clusters with one pread. Whole clusters are
    /// decompressed straight into `buf`, on several threads when there are many: inflating
    /// is what limits reading a compressed image. A part of a cluster goes through
    /// `last_compressed`, for the next read of the same cluster.
    pub(super) fn read_compressed(
        &self,
        extents: &[Extent],
        buf: &mut [u8],
        base: u64,
    ) -> io::Result<()> {
        let cs = self.cluster_size();
        let mut todo = Vec::with_capacity(extents.len());
        for e in extents {
            let Kind::Compressed(entry) = e.kind else {
                continue;
            };
            let cached = match &*lock(&self.last_compressed) {
                Some((last, data)) if *last == entry => Some(data.clone()),
                _ => None,
            };
            match cached {
                Some(data) => copy_from_cluster(e, &data, buf, base, cs),
                None => {
                    let (host, len) = self.compressed_location(entry)?;
                    todo.push((*e, entry, host, host + len));
                }
            }
        }
        // Batches of nearby compressed clusters, each read with one pread.
        let mut batches = Vec::new();
        let mut i = 0;
        while i < todo.len() {
            let start = todo[i].2;
            let mut end = todo[i].3;
            let mut j = i + 1;
            while j < todo.len()
                && todo[j].2 >= todo[j - 1].2
                && todo[j].3 - start <= COMPRESSED_BATCH_BYTES
            {
                end = end.max(todo[j].3);
                j += 1;
            }
            // The last compressed cluster may end inside its final sector, at the end of file.
            let end = end.min(self.file_len);
            let mut raw = vec![0u8; (end - start) as usize];
            self.file.read_exact_at(&mut raw, start)?;
            batches.push((start, raw, i..j));
            i = j;
        }
        let mut whole = Vec::new();
        let mut partial = Vec::new();
        let mut rest: &mut [u8] = buf;
        let mut rest_base = base;
        for (start, raw, range) in &batches {
            let end = start + raw.len() as u64;
            for &(e, entry, host, host_end) in &todo[range.clone()] {
                let src = &raw[(host - start) as usize..(host_end.min(end) - start) as usize];
                if e.len == cs {
                    // Extents come in order and do not overlap: carve each one's slice off.
                    let tail = std::mem::take(&mut rest);
                    let (dst, tail) =
                        tail[(e.offset - rest_base) as usize..].split_at_mut(cs as usize);
                    rest = tail;
                    rest_base = e.offset + cs;
                    whole.push((src, dst, e.offset));
                } else {
                    partial.push((src, e, entry));
                }
            }
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_DECOMPRESS_THREADS)
            .min(whole.len() / 2)
            .max(1);
        if threads == 1 {
            let mut decoder = self.take_decoder()?;
            for (src, dst, offset) in whole {
                self.decompress(&mut decoder, src, dst, offset)?;
            }
            self.return_decoder(decoder);
        } else {
            let per_thread = whole.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let mut jobs = whole;
                let mut handles = Vec::new();
                while !jobs.is_empty() {
                    let tail = jobs.split_off(per_thread.min(jobs.len()));
                    let mine = std::mem::replace(&mut jobs, tail);
                    handles.push(scope.spawn(move || -> io::Result<()> {
                        let mut decoder = self.take_decoder()?;
                        for (src, dst, offset) in mine {
                            self.decompress(&mut decoder, src, dst, offset)?;
                        }
                        self.return_decoder(decoder);
                        Ok(())
                    }));
                }
                handles.into_iter().try_for_each(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("decompression thread panicked")))
                })
            })?;
        }
        if !partial.is_empty() {
            let mut decoder = self.take_decoder()?;
            for (src, e, entry) in partial {
                let mut data = vec![0u8; cs as usize];
                self.decompress(&mut decoder, src, &mut data, e.offset)?;
                copy_from_cluster(&e, &data, buf, base, cs);
                *lock(&self.last_compressed) = Some((entry, Arc::new(data)));
            }
            self.return_decoder(decoder);
        }
        Ok(())
    }

    fn return_decoder(&self, decoder: Decoder) {
        let mut pool = lock(&self.decoders);
        if pool.len() < DECODER_POOL {
            pool.push(decoder);
        }
    }

    /// Decoder contexts are reused: creating a zstd one costs more than decoding a cluster.
    fn take_decoder(&self) -> io::Result<Decoder> {
        if let Some(d) = lock(&self.decoders).pop() {
            return Ok(d);
        }
        Ok(match self.compression {
            Compression::Zlib => Decoder::Zlib(flate2::Decompress::new(false)),
            Compression::Zstd => {
                let mut d = zstd::stream::raw::Decoder::new()?;
                d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))?;
                Decoder::Zstd(Box::new(d))
            }
        })
    }

    /// Decompresses one cluster into `out` (a cluster long), which must come out full, as
    /// QEMU requires: what follows the data in its last sector is padding or the next
    /// cluster's data.
    fn decompress(
        &self,
        decoder: &mut Decoder,
        src: &[u8],
        out: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        let produced = match decoder {
            Decoder::Zlib(d) => {
                d.reset(false);
                d.decompress(src, out, flate2::FlushDecompress::Finish)
                    .map_err(|e| {
                        self.invalid(format!(
                            "compressed cluster at virtual offset {offset}: bad deflate data: {e}"
                        ))
                    })?;
                d.total_out() as usize
            }
            Decoder::Zstd(d) => unzstd(d, src, out).map_err(|e| {
                self.invalid(format!(
                    "compressed cluster at virtual offset {offset}: bad zstd data: {e}"
                ))
            })?,
        };
        if produced != out.len() {
            return Err(self.invalid(format!(
                "compressed cluster at virtual offset {offset} holds {produced} bytes, not a \
                 cluster of {}",
                out.len()
            )));
        }
        Ok(())
    }
}

/// Decodes zstd frames until `out` is full (QEMU may end one frame and start another).
fn unzstd(
    d: &mut zstd::stream::raw::Decoder<'static>,
    src: &[u8],
    out: &mut [u8],
) -> io::Result<usize> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    // A decoder left mid-frame by a damaged cluster must not carry that state over.
    d.reinit()?;
    let mut input = InBuffer::around(src);
    let mut output = OutBuffer::around(out);
    while output.pos() < output.capacity() && input.pos < src.len() {
        let before = (input.pos, output.pos());
        d.run(&mut input, &mut output)?;
        if (input.pos, output.pos()) == before {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no progress"));
        }
    }
    Ok(output.pos())
}

fn copy_from_cluster(e: &Extent, cluster: &[u8], buf: &mut [u8], base: u64, cs: u64) {
    let within = (e.offset % cs) as usize;
    let dst = &mut buf[(e.offset - base) as usize..][..e.len as usize];
    dst.copy_from_slice(&cluster[within..within + e.len as usize]);
}
