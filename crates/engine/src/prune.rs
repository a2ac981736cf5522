//! Prune: which recovery points a retention policy keeps, with the rules restic and Proxmox
//! Backup Server use, per VM.
//!
//! Points are walked newest first. `last` keeps the N newest. For each of hourly, daily, weekly
//! (ISO weeks), monthly and yearly, a point is kept when it is the newest one in a period
//! (hour, day, ...) not yet covered by that rule, until the rule has kept N points; periods
//! with no point do not count. A point kept by any rule is kept. Periods are in local time.

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDateTime, Timelike};
use serde::Serialize;
use vmvault_format::{Manifest, PointId};
use vmvault_store::Vault;

use crate::select::point_time;
use crate::{EngineError, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Retention {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        *self == Retention::default()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneDecision {
    pub id: PointId,
    pub vm: String,
    pub time: String,
    pub keep: bool,
    /// The rules that keep it ("last", "daily", ...); empty when it is removed.
    pub reasons: Vec<&'static str>,
}

type Period = fn(&NaiveDateTime) -> (i32, u32, u32, u32);

const RULES: [(&str, Period); 5] = [
    ("hourly", |t| (t.year(), t.ordinal(), t.hour(), 0)),
    ("daily", |t| (t.year(), t.ordinal(), 0, 0)),
    ("weekly", |t| {
        let w = t.iso_week();
        (w.year(), w.week(), 0, 0)
    }),
    ("monthly", |t| (t.year(), t.month(), 0, 0)),
    ("yearly", |t| (t.year(), 0, 0, 0)),
];

/// Decides for every point (of `vm`, or of every VM) whether `retention` keeps it. Times are
/// put into periods by `local` (local time in the CLI, fixed in tests).
pub fn plan_prune(
    points: &[Manifest],
    retention: &Retention,
    vm: Option<&str>,
    local: impl Fn(chrono::DateTime<chrono::Utc>) -> NaiveDateTime,
) -> Result<Vec<PruneDecision>> {
    if retention.is_empty() {
        return Err(EngineError::Input(
            "give at least one --keep-* option: prune does not remove every recovery point".into(),
        ));
    }
    let mut by_vm: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in points.iter().filter(|m| vm.is_none_or(|v| m.vm == v)) {
        by_vm.entry(&m.vm).or_default().push(m);
    }
    let counts = [
        retention.hourly,
        retention.daily,
        retention.weekly,
        retention.monthly,
        retention.yearly,
    ];
    let mut out = Vec::new();
    for (_, mut list) in by_vm {
        list.sort_by(|a, b| b.time.cmp(&a.time));
        let mut last_left = retention.last;
        let mut left = counts;
        let mut seen: [Option<(i32, u32, u32, u32)>; 5] = [None; 5];
        for m in list {
            let mut reasons = Vec::new();
            if last_left > 0 {
                last_left -= 1;
                reasons.push("last");
            }
            // A point whose time cannot be read is kept: prune never guesses.
            match point_time(m).map(&local) {
                Some(t) => {
                    for (r, (name, period)) in RULES.iter().enumerate() {
                        let p = period(&t);
                        if left[r] > 0 && seen[r] != Some(p) {
                            left[r] -= 1;
                            seen[r] = Some(p);
                            reasons.push(name);
                        }
                    }
                }
                None => reasons.push("unreadable time"),
            }
            out.push(PruneDecision {
                id: m.id,
                vm: m.vm.clone(),
                time: m.time.clone(),
                keep: !reasons.is_empty(),
                reasons,
            });
        }
    }
    Ok(out)
}

/// Removes the manifests of the points `plan` does not keep; their chunks go at the next gc.
pub fn prune(vault: &Vault, plan: &[PruneDecision]) -> Result<usize> {
    let mut removed = 0;
    for d in plan.iter().filter(|d| !d.keep) {
        vault.remove_manifest(&d.id)?;
        removed += 1;
    }
    vault.backend().sync()?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmvault_format::{Consistency, TransferStats, VmConfig};

    fn point(vm: &str, time: &str) -> Manifest {
        Manifest {
            version: 1,
            id: PointId::generate(),
            vm: vm.into(),
            time: time.into(),
            source: "image".into(),
            consistency: Consistency::Crash,
            consistency_reason: String::new(),
            host: String::new(),
            program: String::new(),
            chunk_size: 1 << 20,
            vm_config: VmConfig {
                name: vm.into(),
                cpus: 1,
                memory_mib: 1,
                firmware: "bios".into(),
                disks: vec![],
                nics: vec![],
            },
            disks: vec![],
            stats: TransferStats::default(),
        }
    }

    fn kept(points: &[Manifest], r: Retention) -> Vec<String> {
        let plan = plan_prune(points, &r, None, |t| t.naive_utc()).unwrap();
        let mut k: Vec<String> = plan
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.time[..16].to_string())
            .collect();
        k.sort();
        k
    }

    /// Two points a day, at 01:00 and 13:00, from 2026-01-01 (a Thursday) to 2026-03-01.
    fn series() -> Vec<Manifest> {
        let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T01:00:00Z").unwrap();
        (0..120)
            .map(|i| {
                let t = start + chrono::Duration::hours(12 * i);
                point(
                    "web01",
                    &t.to_utc()
                        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                )
            })
            .collect()
    }

    #[test]
    fn keep_last_and_daily() {
        let k = kept(
            &series(),
            Retention {
                last: 3,
                ..Default::default()
            },
        );
        assert_eq!(
            k,
            ["2026-02-28T13:00", "2026-03-01T01:00", "2026-03-01T13:00"]
        );
        let k = kept(
            &series(),
            Retention {
                daily: 2,
                ..Default::default()
            },
        );
        assert_eq!(k, ["2026-02-28T13:00", "2026-03-01T13:00"]);
    }

    #[test]
    fn weekly_uses_iso_weeks_and_monthly_months() {
        // ISO weeks end on Sundays: 2026-03-01, 02-22 and 02-15 are.
        let k = kept(
            &series(),
            Retention {
                weekly: 3,
                ..Default::default()
            },
        );
        assert_eq!(
            k,
            ["2026-02-15T13:00", "2026-02-22T13:00", "2026-03-01T13:00"]
        );
        let k = kept(
            &series(),
            Retention {
                monthly: 5,
                ..Default::default()
            },
        );
        assert_eq!(
            k,
            ["2026-01-31T13:00", "2026-02-28T13:00", "2026-03-01T13:00"]
        );
        let k = kept(
            &series(),
            Retention {
                yearly: 5,
                hourly: 1,
                ..Default::default()
            },
        );
        assert_eq!(k, ["2026-03-01T13:00"]);
    }

    #[test]
    fn rules_combine_and_vms_are_separate() {
        let mut points = series();
        points.push(point("db01", "2020-05-05T00:00:00.000000000Z"));
        let r = Retention {
            last: 1,
            daily: 3,
            monthly: 2,
            ..Default::default()
        };
        let plan = plan_prune(&points, &r, None, |t| t.naive_utc()).unwrap();
        let keep: Vec<_> = plan.iter().filter(|d| d.keep).collect();
        // web01: 03-01 13:00 (last, daily, monthly), 02-28 13:00 (daily, monthly), 02-27 13:00.
        assert_eq!(keep.iter().filter(|d| d.vm == "web01").count(), 3);
        assert!(
            keep.iter().any(|d| d.vm == "db01"),
            "another VM's only point is its last"
        );
        let only_db = plan_prune(&points, &r, Some("db01"), |t| t.naive_utc()).unwrap();
        assert_eq!(only_db.len(), 1);
    }

    #[test]
    fn empty_policy_is_refused() {
        assert!(plan_prune(&series(), &Retention::default(), None, |t| t.naive_utc()).is_err());
    }
}
