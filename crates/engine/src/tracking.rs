//! Changed-block tracking: which of a disk's dirty bitmaps to trust, and what to do with the
//! others, decided before the instant is taken.
//!
//! Every backup leaves one bitmap per disk, named for the vault and for the recovery point it
//! follows: `vmvault.<vault id, 8 hex>.<point id>`. It records every write after that point's
//! instant. At the next backup the bitmap is trusted only when its point is still in the vault
//! with a disk of the same name and size; its dirty chunks are read and every other chunk's
//! digest is taken from that point's index.
//!
//! A backup that did not finish leaves a second bitmap, named for a point that was never
//! written; it is folded into the trusted one (their union holds every write since the trusted
//! point). A bitmap whose point exists but is older than the trusted one's holds nothing
//! newer and is dropped. Anything else (no bitmap, a point that is gone, a resized disk, a
//! bitmap QEMU marks inconsistent after a crash) means the whole disk is read, and the
//! backup says why.

use vmvault_format::PointId;
use vmvault_qemu::block::BlockDisk;

use crate::destination::KnownPoint;

/// The name prefix of the bitmaps one vault keeps.
pub(crate) fn bitmap_prefix(vault_id: &[u8; 16]) -> String {
    format!("vmvault.{}.", hex8(vault_id))
}

fn hex8(id: &[u8; 16]) -> String {
    id[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// What to do with one disk's bitmaps before the instant.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Decision {
    /// The trusted bitmap and the point (and that point's disk) it follows.
    /// The disk's size in that point is the disk's size now.
    pub base: Option<(String, PointId)>,
    /// Bitmaps to fold into the base, then remove.
    pub fold: Vec<String>,
    /// Bitmaps to remove.
    pub drop: Vec<String>,
    /// Why the whole disk is read (when there is no base).
    pub full_read_reason: Option<String>,
}

/// Decides for `disk`, given this VM's points in the vault.
pub(crate) fn decide(disk: &BlockDisk, prefix: &str, points: &[KnownPoint]) -> Decision {
    let mut d = Decision::default();
    let mut candidates = Vec::new();
    for b in disk.bitmaps.iter().filter(|b| b.name.starts_with(prefix)) {
        let id = b.name[prefix.len()..].parse::<PointId>().ok();
        match id {
            Some(_) if b.inconsistent => {
                d.drop.push(b.name.clone());
                d.full_read_reason.get_or_insert_with(|| {
                    format!(
                        "its tracking bitmap {} was not saved (QEMU stopped without closing the \
                         image)",
                        b.name
                    )
                });
            }
            Some(id) => candidates.push((b.name.clone(), id)),
            None => d.drop.push(b.name.clone()),
        }
    }
    // The newest point that has a bitmap and still exists is the base.
    let newest = points
        .iter()
        .filter(|m| candidates.iter().any(|(_, id)| *id == m.id))
        .max_by(|a, b| a.time.cmp(&b.time));
    let Some(point) = newest else {
        let reason = if d.full_read_reason.is_some() {
            d.full_read_reason.take()
        } else if candidates.is_empty() {
            Some(if disk.can_persist_bitmaps() {
                "no changed-block tracking yet for this vault (the first backup of this disk, \
                 or the image was replaced or restored)"
                    .to_string()
            } else {
                "no changed-block tracking (a raw disk keeps it only while QEMU runs)".to_string()
            })
        } else {
            Some("the recovery point its tracking started from is gone".to_string())
        };
        d.drop.extend(candidates.into_iter().map(|(n, _)| n));
        d.full_read_reason = reason;
        return d;
    };
    let record = point.disks.iter().find(|(name, _)| *name == disk.name);
    let usable = match record {
        None => Err(format!(
            "the recovery point its tracking started from has no disk {}",
            disk.name
        )),
        Some((_, size)) if *size != disk.size => Err(format!(
            "the disk was resized ({} bytes, {size} at the last backup)",
            disk.size
        )),
        Some(_) => Ok(()),
    };
    if let Err(reason) = usable {
        d.drop.extend(candidates.into_iter().map(|(n, _)| n));
        d.full_read_reason = Some(reason);
        return d;
    }
    let existing = |id: &PointId| points.iter().any(|m| m.id == *id);
    for (name, id) in candidates {
        if id == point.id {
            d.base = Some((name, id));
        } else if existing(&id) {
            d.drop.push(name);
        } else {
            d.fold.push(name);
        }
    }
    d.full_read_reason = None;
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmvault_format::{Digest, DiskRecord, Manifest, TransferStats};
    use vmvault_qemu::block::Bitmap;

    fn disk(bitmaps: &[(&str, bool)]) -> BlockDisk {
        BlockDisk {
            name: "vblk0".into(),
            node: "drive0".into(),
            filename: "d.qcow2".into(),
            format: "qcow2".into(),
            size: 1 << 30,
            qdev: None,
            read_only: false,
            bitmaps: bitmaps
                .iter()
                .map(|(n, inconsistent)| Bitmap {
                    name: n.to_string(),
                    recording: true,
                    persistent: true,
                    busy: false,
                    inconsistent: *inconsistent,
                    granularity: 65536,
                    count: 0,
                })
                .collect(),
        }
    }

    fn point(id: PointId, time: &str, size: u64) -> KnownPoint {
        KnownPoint::from(&manifest(id, time, size))
    }

    fn manifest(id: PointId, time: &str, size: u64) -> Manifest {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "version": vmvault_format::MANIFEST_VERSION, "id": id, "vm": "web01", "time": time,
            "source": "qemu", "consistency": "crash", "consistency_reason": "", "host": "h",
            "program": "p", "chunk_size": 1048576,
            "vm_config": { "name": "web01", "cpus": 1, "memory_mib": 1, "firmware": "bios",
                           "disks": [] },
            "disks": [], "stats": TransferStats::default(),
        }))
        .unwrap();
        m.disks.push(DiskRecord {
            name: "vblk0".into(),
            format: "qcow2".into(),
            size,
            index: Digest([7; 32]),
            stats: TransferStats::default(),
        });
        m
    }

    const P: &str = "vmvault.01020304.";

    #[test]
    fn the_bitmap_of_an_existing_point_is_trusted_and_a_stale_one_is_folded() {
        let (a, b, stale) = (PointId([1; 16]), PointId([2; 16]), PointId([3; 16]));
        let names = [a, b, stale].map(|id| format!("{P}{}", id.to_hex()));
        let d = disk(&[(&names[0], false), (&names[1], false), (&names[2], false)]);
        let points = [
            point(a, "2026-01-01T00:00:00Z", 1 << 30),
            point(b, "2026-01-02T00:00:00Z", 1 << 30),
        ];
        let got = decide(&d, P, &points);
        assert_eq!(got.base.as_ref().map(|b| b.1), Some(b));
        assert_eq!(got.fold, vec![names[2].clone()]);
        assert_eq!(got.drop, vec![names[0].clone()]);
        assert_eq!(got.full_read_reason, None);
    }

    #[test]
    fn anything_untrustworthy_reads_the_whole_disk_and_says_why() {
        let a = PointId([1; 16]);
        let name = format!("{P}{}", a.to_hex());
        let cases: [(BlockDisk, Vec<KnownPoint>, &str); 4] = [
            (disk(&[]), vec![], "no changed-block tracking yet"),
            (disk(&[(&name, false)]), vec![], "is gone"),
            (
                disk(&[(&name, false)]),
                vec![point(a, "2026-01-01T00:00:00Z", 1 << 20)],
                "resized",
            ),
            (
                disk(&[(&name, true)]),
                vec![point(a, "2026-01-01T00:00:00Z", 1 << 30)],
                "not saved",
            ),
        ];
        for (d, points, why) in cases {
            let got = decide(&d, P, &points);
            assert!(got.base.is_none());
            let reason = got.full_read_reason.unwrap();
            assert!(reason.contains(why), "{reason}");
            assert_eq!(
                got.drop.len(),
                d.bitmaps.len(),
                "untrusted bitmaps are dropped"
            );
        }
        // Another vault's and other tools' bitmaps are left alone.
        let other = disk(&[("vmvault.ffffffff.x", false), ("backup-tool", false)]);
        assert!(decide(&other, P, &[]).drop.is_empty());
    }
}
