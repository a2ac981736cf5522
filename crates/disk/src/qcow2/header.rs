//! The qcow2 header and its extensions: everything in the image's first cluster.

use std::fs::File;
use std::path::Path;

use super::FORMAT;
use crate::DiskError;

pub(super) const MAGIC: &[u8; 4] = b"QFI\xfb";
const V2_HEADER_LEN: usize = 72;
const V3_MIN_HEADER_LEN: usize = 104;
/// The spec's floor (512-byte clusters) and QEMU's implementation limit (2 MiB): QEMU refuses
/// anything outside, so no image a VM ran on has it.
pub(super) const MIN_CLUSTER_BITS: u32 = 9;
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
/// Subclusters are a 32nd of a cluster and must stay at least 512 bytes.
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// QEMU's limit on the active L1 table (32 MiB of entries); it bounds the virtual size a header
/// may claim, and with it everything the reader allocates for the L1 table.
pub(super) const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// QEMU's limit on the refcount table (8 MiB).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_BACKING_NAME: usize = 1023;
/// QEMU keeps the backing format name in a 16-byte buffer, NUL included.
const MAX_BACKING_FORMAT: usize = 15;

const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Compression {
    /// Raw deflate (no zlib header), as QEMU writes it despite the name.
    Zlib,
    Zstd,
}

#[derive(Debug)]
pub(super) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_offset: u64,
    /// Entries of the L1 table that map the virtual disk (the table may hold more, for the VM
    /// state of internal snapshots, which a backup does not read).
    pub l1_used: u64,
    pub backing_file: Option<Vec<u8>>,
    pub backing_format: Option<String>,
    pub extended_l2: bool,
    pub compression: Compression,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// L2 entries per table: 8-byte entries, or 16-byte ones with extended L2.
pub(super) fn l2_entries(cluster_bits: u32, extended_l2: bool) -> u64 {
    (1u64 << cluster_bits) / if extended_l2 { 16 } else { 8 }
}

pub(super) fn parse(file: &File, path: &Path, file_len: u64) -> Result<Header, DiskError> {
    let invalid = |detail: String| DiskError::invalid(path, FORMAT, detail);
    if file_len < V2_HEADER_LEN as u64 {
        return Err(invalid(format!(
            "truncated: {file_len} bytes, shorter than the {V2_HEADER_LEN}-byte header"
        )));
    }
    let mut fixed = [0u8; V2_HEADER_LEN];
    crate::read_exact_at(file, &mut fixed, 0, path, FORMAT)?;
    if &fixed[0..4] != MAGIC {
        return Err(invalid("no QFI\\xfb magic at offset 0".into()));
    }
    let version = be32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(invalid(format!(
            "unknown version {version} (qcow2 has versions 2 and 3)"
        )));
    }
    let cluster_bits = be32(&fixed, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(invalid(format!(
            "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} \
             (512 B to 2 MiB clusters)"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    // Extensions and the backing file name live in the first cluster; 2 MiB at most.
    let head_len = cluster_size.min(file_len) as usize;
    let mut head = vec![0u8; head_len];
    crate::read_exact_at(file, &mut head, 0, path, FORMAT)?;
    let truncated = |what: &str| {
        invalid(format!(
            "truncated: the {what} lies past the end of the file ({file_len} bytes)"
        ))
    };

    let (incompat, header_len, refcount_order) = if version == 2 {
        (0, V2_HEADER_LEN, 4)
    } else {
        if head.len() < V3_MIN_HEADER_LEN {
            return Err(truncated("version 3 header"));
        }
        let len = be32(&head, 100) as u64;
        if len < V3_MIN_HEADER_LEN as u64 || len > cluster_size || len & 7 != 0 {
            return Err(invalid(format!(
                "header_length {len} is not a multiple of 8 between {V3_MIN_HEADER_LEN} and \
                 the cluster size {cluster_size}"
            )));
        }
        if len > head.len() as u64 {
            return Err(truncated("header"));
        }
        (be64(&head, 72), len as usize, be32(&head, 96))
    };
    if refcount_order > 6 {
        return Err(invalid(format!(
            "refcount_order {refcount_order} above 6 (64-bit refcounts)"
        )));
    }

    let backing_offset = be64(&head, 8);
    let backing_len = be32(&head, 16) as usize;
    let ext_end = if backing_offset != 0 {
        backing_offset.min(cluster_size) as usize
    } else {
        cluster_size as usize
    };
    let ext = parse_extensions(&head, header_len, ext_end, path, file_len)?;

    let unknown = incompat & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let bits: Vec<String> = (0..64)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(
                |b| match ext.feature_names.iter().find(|(bit, _)| *bit == b) {
                    Some((_, name)) => format!("{b} ({name})"),
                    None => b.to_string(),
                },
            )
            .collect();
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!("unknown incompatible feature bit(s) {}", bits.join(", ")),
        ));
    }
    if incompat & INCOMPAT_CORRUPT != 0 {
        return Err(invalid(
            "marked corrupt (incompatible bit 1): QEMU found its metadata inconsistent; \
             `qemu-img check -r all` may repair it"
                .into(),
        ));
    }
    if incompat & INCOMPAT_DATA_FILE != 0 {
        let name = ext
            .data_file
            .map(|n| format!(" ({})", String::from_utf8_lossy(&n)))
            .unwrap_or_default();
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!(
                "external data file{name}: the guest data lives in another file; convert the \
                 image with `qemu-img convert -O qcow2` first"
            ),
        ));
    }
    let crypt_method = be32(&head, 32);
    if crypt_method != 0 {
        let kind = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "unknown method",
        };
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!(
                "encrypted image (crypt_method {crypt_method}, {kind}): vmvault has no key to \
                 read it with"
            ),
        ));
    }

    let compression_type = if header_len > V3_MIN_HEADER_LEN {
        head[104]
    } else {
        0
    };
    let compression = if incompat & INCOMPAT_COMPRESSION_TYPE != 0 {
        match compression_type {
            0 => {
                return Err(invalid(
                    "compression type bit set without a compression_type field".into(),
                ))
            }
            1 => Compression::Zstd,
            t => {
                return Err(DiskError::unsupported(
                    path,
                    FORMAT,
                    format!("compression type {t} (only 0, zlib, and 1, zstd, are known)"),
                ))
            }
        }
    } else if compression_type != 0 {
        return Err(invalid(format!(
            "compression_type {compression_type} without the compression type bit"
        )));
    } else {
        Compression::Zlib
    };

    let extended_l2 = incompat & INCOMPAT_EXTENDED_L2 != 0;
    if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(invalid(format!(
            "extended L2 entries need clusters of at least 16 KiB, not {cluster_size} bytes"
        )));
    }

    let size = be64(&head, 24);
    if size > i64::MAX as u64 {
        return Err(invalid(format!("absurd virtual size {size}")));
    }
    let l1_span = cluster_size * l2_entries(cluster_bits, extended_l2);
    let l1_used = size.div_ceil(l1_span);
    if l1_used > MAX_L1_ENTRIES {
        return Err(invalid(format!(
            "absurd virtual size {size}: it needs {l1_used} L1 entries, above QEMU's limit of \
             {MAX_L1_ENTRIES}"
        )));
    }
    let l1_size = be32(&head, 36) as u64;
    if l1_size < l1_used {
        return Err(invalid(format!(
            "L1 table of {l1_size} entries cannot map the virtual size {size} (needs {l1_used})"
        )));
    }
    if l1_size > MAX_L1_ENTRIES {
        return Err(invalid(format!(
            "L1 table of {l1_size} entries, above QEMU's limit of {MAX_L1_ENTRIES}"
        )));
    }
    let l1_offset = be64(&head, 40);
    if l1_size > 0 {
        if l1_offset & (cluster_size - 1) != 0 {
            return Err(invalid(format!(
                "L1 table offset {l1_offset} is not cluster-aligned"
            )));
        }
        match l1_offset.checked_add(l1_size * 8) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(invalid(format!(
                    "L1 table at {l1_offset} ({l1_size} entries) runs past the end of the file \
                     ({file_len} bytes)"
                )))
            }
        }
    }
    // Not read, but QEMU refuses an image whose refcount table or snapshot table are
    // misplaced, so such a header is damaged.
    let refcount_offset = be64(&head, 48);
    let refcount_clusters = be32(&head, 56) as u64;
    if refcount_offset & (cluster_size - 1) != 0 {
        return Err(invalid(format!(
            "refcount table offset {refcount_offset} is not cluster-aligned"
        )));
    }
    if refcount_clusters == 0 || refcount_clusters * cluster_size > MAX_REFCOUNT_TABLE_BYTES {
        return Err(invalid(format!(
            "refcount table of {refcount_clusters} clusters (QEMU needs 1 to 8 MiB of them)"
        )));
    }
    if refcount_offset
        .checked_add(refcount_clusters * cluster_size)
        .is_none_or(|end| end > file_len)
    {
        return Err(invalid(format!(
            "refcount table at {refcount_offset} runs past the end of the file ({file_len} \
             bytes)"
        )));
    }
    let nb_snapshots = be32(&head, 60);
    let snapshots_offset = be64(&head, 64);
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(invalid(format!("{nb_snapshots} snapshots, above 65536")));
    }
    if nb_snapshots > 0
        && (snapshots_offset & (cluster_size - 1) != 0 || snapshots_offset >= file_len)
    {
        return Err(invalid(format!(
            "snapshot table offset {snapshots_offset} is not cluster-aligned or lies past the \
             end of the file ({file_len} bytes)"
        )));
    }

    // An empty name is how QEMU writes "no backing file" when it drops one.
    let backing_file = if backing_offset != 0 && backing_len != 0 {
        let end = backing_offset
            .checked_add(backing_len as u64)
            .filter(|&e| backing_len <= MAX_BACKING_NAME && e <= cluster_size)
            .ok_or_else(|| {
                invalid(format!(
                    "backing file name of {backing_len} bytes at {backing_offset} does not fit \
                     in the first cluster (or exceeds {MAX_BACKING_NAME} bytes)"
                ))
            })?;
        if end > head.len() as u64 {
            return Err(truncated("backing file name"));
        }
        Some(head[backing_offset as usize..end as usize].to_vec())
    } else {
        None
    };

    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_offset,
        l1_used,
        backing_file,
        backing_format: ext.backing_format,
        extended_l2,
        compression,
    })
}

#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<Vec<u8>>,
    feature_names: Vec<(u32, String)>,
}

/// Header extensions run from the end of the header to the backing file name (or the end of
/// the first cluster), each padded to 8 bytes, until an end marker.
fn parse_extensions(
    head: &[u8],
    start: usize,
    end: usize,
    path: &Path,
    file_len: u64,
) -> Result<Extensions, DiskError> {
    let invalid = |detail: String| DiskError::invalid(path, FORMAT, detail);
    let mut ext = Extensions::default();
    let mut off = start;
    // A header extension header that does not fit before the end is padding, as QEMU reads it.
    while off + 8 <= end {
        if off + 8 > head.len() {
            return Err(invalid(format!(
                "truncated: header extensions run past the end of the file ({file_len} bytes)"
            )));
        }
        let kind = be32(head, off);
        let len = be32(head, off + 4) as usize;
        if kind == EXT_END {
            break;
        }
        let data_start = off + 8;
        let data_end = data_start
            .checked_add(len)
            .filter(|&e| e <= end)
            .ok_or_else(|| {
                invalid(format!(
                    "header extension {kind:#010x} of {len} bytes at {off} runs past the \
                     header area"
                ))
            })?;
        if data_end > head.len() {
            return Err(invalid(format!(
                "truncated: header extension {kind:#010x} runs past the end of the file \
                 ({file_len} bytes)"
            )));
        }
        let data = &head[data_start..data_end];
        match kind {
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT {
                    return Err(invalid(format!(
                        "backing format name of {len} bytes (at most {MAX_BACKING_FORMAT})"
                    )));
                }
                let name = std::str::from_utf8(data)
                    .map_err(|_| invalid("backing format name is not UTF-8".into()))?;
                ext.backing_format = Some(name.to_string());
            }
            EXT_DATA_FILE => ext.data_file = Some(data.to_vec()),
            EXT_FEATURE_NAMES => {
                for entry in data.chunks_exact(48) {
                    // Only incompatible features (type 0) are ever named in an error.
                    if entry[0] == 0 {
                        let name = &entry[2..];
                        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(46)];
                        ext.feature_names
                            .push((entry[1] as u32, String::from_utf8_lossy(name).into()));
                    }
                }
            }
            _ => {}
        }
        // Padding to 8 bytes; `len` is below the 2 MiB first cluster, so nothing overflows.
        off = data_start + len.div_ceil(8) * 8;
    }
    Ok(ext)
}
