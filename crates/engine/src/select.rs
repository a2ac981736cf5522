//! Naming a recovery point: `VM@latest`, `VM@ID-PREFIX`, `VM@RFC3339-TIME` (the newest point at
//! or before that time), or just `VM` for its latest.

use vmvault_format::{DiskRecord, Manifest};

use crate::{EngineError, Result};

/// Picks the one point `spec` names out of `points` (sorted oldest first).
pub fn select_point<'a>(points: &'a [Manifest], spec: &str) -> Result<&'a Manifest> {
    let (vm, which) = spec.split_once('@').unwrap_or((spec, "latest"));
    let mine: Vec<&Manifest> = points.iter().filter(|m| m.vm == vm).collect();
    if mine.is_empty() {
        return Err(EngineError::Input(format!(
            "no recovery point of VM {vm:?} in this vault"
        )));
    }
    if which == "latest" {
        return Ok(mine[mine.len() - 1]);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(which) {
        let t = t.with_timezone(&chrono::Utc);
        return mine
            .iter()
            .rev()
            .find(|m| point_time(m).is_some_and(|pt| pt <= t))
            .copied()
            .ok_or_else(|| {
                EngineError::Input(format!(
                    "VM {vm} has no recovery point at or before {which}"
                ))
            });
    }
    let prefix = which.to_ascii_lowercase();
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EngineError::Input(format!(
            "{spec:?}: after '@' give latest, a recovery point id (or its first digits), or an RFC 3339 time"
        )));
    }
    let found: Vec<&&Manifest> = mine
        .iter()
        .filter(|m| m.id.to_hex().starts_with(&prefix))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(EngineError::Input(format!(
            "no recovery point of VM {vm} has an id starting with {prefix}"
        ))),
        many => Err(EngineError::Input(format!(
            "{prefix} matches {} recovery points of VM {vm} ({}); give more digits",
            many.len(),
            many.iter()
                .map(|m| m.id.short())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub(crate) fn point_time(m: &Manifest) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(&m.time)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// The disk named `name` of a recovery point; bad input naming the disks it has otherwise.
pub fn select_disk<'a>(manifest: &'a Manifest, name: &str) -> Result<&'a DiskRecord> {
    manifest
        .disks
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            EngineError::Input(format!(
                "recovery point {} of {} has no disk {name:?} (it has: {})",
                manifest.id.short(),
                manifest.vm,
                manifest
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}
