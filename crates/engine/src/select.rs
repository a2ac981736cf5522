//! Naming a recovery point: `VM@latest`, `VM@ID-PREFIX`, `VM@RFC3339-TIME` (the newest point at
//! or before that time), or just `VM` for its latest.
//!
//! A damaged manifest hides which VM it belongs to and when it was taken. Where it could be
//! the point a name means (a newer point than the one `latest` or a time would pick), the
//! selection refuses and names it instead of quietly giving an older point: a restore of
//! "latest" that brings back last week's disk is data loss the user never sees.

use std::time::{Duration, SystemTime};

use vmvault_format::{DiskRecord, Manifest, PointId};
use vmvault_store::Vault;

use crate::{EngineError, Result};

/// How much later than a point's own time a damaged manifest must have been written to count
/// as possibly newer: covers the clocks of the host that took the point and of the storage.
const CLOCK_MARGIN: Duration = Duration::from_secs(600);

/// A recovery point whose manifest cannot be read.
#[derive(Debug, Clone)]
pub struct DamagedPoint {
    pub id: PointId,
    pub reason: String,
    /// When storage says the manifest was written, if it can say.
    pub written: Option<SystemTime>,
}

/// Every recovery point of a vault: the readable ones oldest first, and the damaged ones.
#[derive(Debug, Clone, Default)]
pub struct Points {
    pub good: Vec<Manifest>,
    pub damaged: Vec<DamagedPoint>,
}

impl Points {
    pub fn read(vault: &Vault) -> Result<Points> {
        let (good, bad) = vault.points()?;
        let mut damaged = Vec::new();
        for (id, e) in bad {
            damaged.push(DamagedPoint {
                id,
                reason: e.to_string(),
                written: vault.point_written(&id).unwrap_or(None),
            });
        }
        Ok(Points { good, damaged })
    }

    /// The one point `spec` names (see the module doc).
    pub fn select(&self, spec: &str) -> Result<&Manifest> {
        select_point(&self.good, &self.damaged, spec)
    }
}

/// Picks the one point `spec` names out of `points` (sorted oldest first); `damaged` are the
/// points that could not be read, which may be the one meant.
pub fn select_point<'a>(
    points: &'a [Manifest],
    damaged: &[DamagedPoint],
    spec: &str,
) -> Result<&'a Manifest> {
    let (vm, which) = spec.split_once('@').unwrap_or((spec, "latest"));
    let mine: Vec<&Manifest> = points.iter().filter(|m| m.vm == vm).collect();
    let by_id = !(which == "latest" || chrono::DateTime::parse_from_rfc3339(which).is_ok());
    if by_id {
        let prefix = which.to_ascii_lowercase();
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EngineError::Input(format!(
                "{spec:?}: after '@' give latest, a recovery point id (or its first digits), or an RFC 3339 time"
            )));
        }
        return by_prefix(&mine, damaged, vm, &prefix);
    }
    if mine.is_empty() {
        if let Some(d) = damaged.first() {
            return Err(damaged_error(d, vm, None));
        }
        return Err(EngineError::Input(format!(
            "no recovery point of VM {vm:?} in this vault"
        )));
    }
    let chosen = if which == "latest" {
        mine[mine.len() - 1]
    } else {
        let t = chrono::DateTime::parse_from_rfc3339(which)
            .expect("checked above")
            .with_timezone(&chrono::Utc);
        mine.iter()
            .rev()
            .find(|m| point_time(m).is_some_and(|pt| pt <= t))
            .copied()
            .ok_or_else(|| {
                EngineError::Input(format!(
                    "VM {vm} has no recovery point at or before {which}"
                ))
            })?
    };
    let chosen_at = point_time(chosen).map(SystemTime::from);
    if let Some(d) = damaged.iter().find(|d| could_be_newer(d, chosen_at)) {
        return Err(damaged_error(d, vm, Some(chosen)));
    }
    Ok(chosen)
}

/// Whether a damaged point may have been taken after `than` (unknown times: it may).
fn could_be_newer(d: &DamagedPoint, than: Option<SystemTime>) -> bool {
    match (d.written, than) {
        (Some(written), Some(than)) => written + CLOCK_MARGIN >= than,
        _ => true,
    }
}

fn damaged_error(d: &DamagedPoint, vm: &str, instead: Option<&Manifest>) -> EngineError {
    let hint = match instead {
        Some(m) => format!(
            "name a point by its id to restore an older one (e.g. {vm}@{}), or run `vmvault verify`",
            m.id.short()
        ),
        None => "run `vmvault verify`".to_string(),
    };
    EngineError::DamagedPoint(format!(
        "recovery point {} cannot be read and may be the newest of VM {vm} ({}); {hint}",
        d.id.short(),
        d.reason
    ))
}

fn by_prefix<'a>(
    mine: &[&'a Manifest],
    damaged: &[DamagedPoint],
    vm: &str,
    prefix: &str,
) -> Result<&'a Manifest> {
    let found: Vec<&&Manifest> = mine
        .iter()
        .filter(|m| m.id.to_hex().starts_with(prefix))
        .collect();
    let hurt: Vec<&DamagedPoint> = damaged
        .iter()
        .filter(|d| d.id.to_hex().starts_with(prefix))
        .collect();
    match (found.as_slice(), hurt.as_slice()) {
        ([one], []) => Ok(one),
        ([], [d]) => Err(EngineError::DamagedPoint(format!(
            "recovery point {} cannot be read ({}); run `vmvault verify`",
            d.id.short(),
            d.reason
        ))),
        ([], []) if mine.is_empty() => Err(EngineError::Input(format!(
            "no recovery point of VM {vm:?} in this vault"
        ))),
        ([], []) => Err(EngineError::Input(format!(
            "no recovery point of VM {vm} has an id starting with {prefix}"
        ))),
        (many, hurt) => Err(EngineError::Input(format!(
            "{prefix} matches {} recovery points of VM {vm} ({}); give more digits",
            many.len() + hurt.len(),
            many.iter()
                .map(|m| m.id.short())
                .chain(hurt.iter().map(|d| format!("{} (damaged)", d.id.short())))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub(crate) use vmvault_store::point_time;

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
