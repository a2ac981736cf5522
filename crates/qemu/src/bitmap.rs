//! Dirty bitmaps: the changed-block tracking QEMU keeps for a disk.
//!
//! A bitmap records which clusters the guest wrote while it is enabled. A persistent one (on
//! a qcow2 node) is written into the image when QEMU closes it, and comes back enabled when
//! QEMU opens the image again; if QEMU dies instead, the image marks it in use and QEMU reports
//! it `inconsistent` from then on: it cannot be trusted and must be read whole.

use serde_json::json;

use crate::{Qmp, Result};

pub fn enable(qmp: &mut Qmp, node: &str, name: &str) -> Result<()> {
    qmp.execute(
        "block-dirty-bitmap-enable",
        json!({ "node": node, "name": name }),
    )
    .map(drop)
}

pub fn remove(qmp: &mut Qmp, node: &str, name: &str) -> Result<()> {
    qmp.execute(
        "block-dirty-bitmap-remove",
        json!({ "node": node, "name": name }),
    )
    .map(drop)
}

/// Adds `sources`' dirty bits into `target` (all on `node`).
pub fn merge(qmp: &mut Qmp, node: &str, target: &str, sources: &[&str]) -> Result<()> {
    qmp.execute(
        "block-dirty-bitmap-merge",
        json!({ "node": node, "target": target, "bitmaps": sources }),
    )
    .map(drop)
}

/// Folds `other` into `keep` and removes it, losing no write: `keep` records again before
/// `other` is merged, so a write lands in one of them at every moment.
pub fn fold(qmp: &mut Qmp, node: &str, keep: &str, other: &str) -> Result<()> {
    enable(qmp, node, keep)?;
    merge(qmp, node, keep, &[other])?;
    remove(qmp, node, other)
}
