//! qcow2 images, versions 2 and 3, as QEMU's `docs/interop/qcow2.txt` specifies them (the
//! "qcow2 image file format" document of QEMU 10; version 3 is the one QEMU names
//! `compat=1.1`, version 2 `compat=0.10`).
//!
//! Read, without converting:
//! - v2 and v3 headers, cluster sizes 512 B to 2 MiB (QEMU's own limits), header extensions
//!   (backing format, feature names; unknown ones ignored, as the spec allows);
//! - the active L1 table (held in memory; its size bounded by the virtual size, by QEMU's
//!   32 MiB limit and by the file's size) and L2 tables (read once, cached up to 32 MiB);
//!   refcounts are never needed to read, so they are not read;
//! - standard, zero (v3 zero flag) and unallocated clusters, and extended L2 entries
//!   (incompatible bit 4: 32 subclusters per cluster, each allocated, zero or unallocated);
//! - compressed clusters, zlib (raw deflate, as QEMU writes it) or zstd (compression type 1);
//! - backing files (a relative name is resolved against the image's folder, the backing
//!   format extension is honoured, "auto" detection otherwise), the chain opened through
//!   [`crate::open_in_chain`], which refuses loops and chains deeper than [`crate::MAX_CHAIN`];
//!   a missing backing file is said as such ([`crate::DiskError::MissingBacking`]);
//! - images marked dirty (incompatible bit 0): only refcounts may be stale, and reading does
//!   not use them;
//! - internal snapshots are ignored: the active L1 table is what a running VM sees.
//!
//! Refused:
//! - images marked corrupt (incompatible bit 1) are invalid: QEMU itself found their
//!   metadata inconsistent, and a backup of them would be a guess;
//! - external data files (incompatible bit 2) and encryption (AES or LUKS, `crypt_method`
//!   not 0) are unsupported: the data lives elsewhere, or needs a key vmvault does not have;
//! - unknown incompatible feature bits, compression types other than zlib and zstd, and
//!   backing files given as protocol URLs or `json:` specifications are unsupported.
//!
//! `allocated_bytes` counts the virtual bytes of clusters (or subclusters) this image maps to
//! data, compressed clusters at their uncompressed size, zero clusters as nothing.
//!
//! The writer makes qcow2 v3 images with 64 KiB clusters and 16-bit refcounts, no backing
//! file and no compression (see [`Qcow2Writer`]).

mod compressed;
mod header;
mod map;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use reader::Qcow2Reader;
pub use writer::Qcow2Writer;

const FORMAT: &str = "qcow2";
