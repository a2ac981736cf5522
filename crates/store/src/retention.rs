//! Retention: which recovery points a policy's keep rules keep, with the rules restic and
//! Proxmox Backup Server use, per VM; and whether the retention a point was taken under is
//! still in force (what a locked vault asks before it lets a point go).
//!
//! Points are walked newest first. `last` keeps the N newest. For each of hourly, daily, weekly
//! (ISO weeks), monthly and yearly, a point is kept when it is the newest one in a period
//! (hour, day, ...) not yet covered by that rule, until the rule has kept N points; periods
//! with no point do not count. A point kept by any rule is kept. Periods are in local time.
//!
//! On-demand points (retention `until`) are never counted by a policy's rules, so a burst of
//! them evicts nothing: they are kept until their own time ends, and then nothing keeps them.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use serde::Serialize;
use vmvault_format::{Keep, Manifest, PointId, PointRetention};

use crate::{Result, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct PruneDecision {
    pub id: PointId,
    pub vm: String,
    pub time: String,
    pub keep: bool,
    /// The rules that keep it ("last", "daily", "keep-until", ...); empty when it may go.
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

/// When a point was taken, if its manifest says so readably.
pub fn point_time(m: &Manifest) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&m.time)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn until_of(m: &Manifest) -> Option<Option<DateTime<Utc>>> {
    match &m.retention {
        PointRetention::Until { until } => Some(
            DateTime::parse_from_rfc3339(until)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        ),
        _ => None,
    }
}

/// Decides for every point (of `vm`, or of every VM) whether `keep` keeps it. Times are put
/// into periods by `local` (local time in the CLI, a policy's time zone on the server).
/// On-demand points are decided by their own time against `now`, never counted.
pub fn plan_prune(
    points: &[Manifest],
    keep: &Keep,
    vm: Option<&str>,
    now: DateTime<Utc>,
    local: impl Fn(DateTime<Utc>) -> NaiveDateTime,
) -> Result<Vec<PruneDecision>> {
    if keep.is_empty() {
        return Err(StoreError::Invalid(
            "give at least one --keep-* option: prune does not remove every recovery point".into(),
        ));
    }
    let mut by_vm: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in points.iter().filter(|m| vm.is_none_or(|v| m.vm == v)) {
        by_vm.entry(&m.vm).or_default().push(m);
    }
    let counts = [
        keep.hourly,
        keep.daily,
        keep.weekly,
        keep.monthly,
        keep.yearly,
    ];
    let mut out = Vec::new();
    for (_, mut list) in by_vm {
        list.sort_by(|a, b| b.time.cmp(&a.time));
        let mut last_left = keep.last;
        let mut left = counts;
        let mut seen: [Option<(i32, u32, u32, u32)>; 5] = [None; 5];
        for m in list {
            let mut reasons = Vec::new();
            if let Some(until) = until_of(m) {
                // An unreadable time is kept: retention never guesses.
                if until.is_none_or(|u| u > now) {
                    reasons.push("keep-until");
                }
                out.push(decision(m, reasons));
                continue;
            }
            if last_left > 0 {
                last_left -= 1;
                reasons.push("last");
            }
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
            out.push(decision(m, reasons));
        }
    }
    Ok(out)
}

fn decision(m: &Manifest, reasons: Vec<&'static str>) -> PruneDecision {
    PruneDecision {
        id: m.id,
        vm: m.vm.clone(),
        time: m.time.clone(),
        keep: !reasons.is_empty(),
        reasons,
    }
}

/// Why the retention `point` was taken under still keeps it, if it does: its own keep-until
/// time, or its policy's rules (as recorded in it, in its recorded time zone) over the live
/// points of its VM in `live`. A point that recorded no end is always kept. This is the
/// question a locked vault asks; a later policy, time zone or protection changes nothing.
pub fn in_force(point: &Manifest, live: &[Manifest], now: DateTime<Utc>) -> Option<String> {
    match &point.retention {
        PointRetention::None => Some("it was taken with no end of retention".into()),
        PointRetention::Until { until } => match until_of(point).flatten() {
            Some(u) if u <= now => None,
            _ => Some(format!("it is kept until {until}")),
        },
        PointRetention::Policy {
            policy,
            keep,
            time_zone,
        } => {
            if keep.is_empty() {
                return None;
            }
            let Ok(tz) = time_zone.parse::<chrono_tz::Tz>() else {
                return Some(format!("its policy's time zone {time_zone:?} is unknown"));
            };
            let mut list: Vec<Manifest> = live
                .iter()
                .filter(|m| m.vm == point.vm && m.id != point.id)
                .cloned()
                .collect();
            list.push(point.clone());
            let plan = plan_prune(&list, keep, Some(&point.vm), now, |t| {
                t.with_timezone(&tz).naive_local()
            })
            .ok()?;
            let d = plan.iter().find(|d| d.id == point.id)?;
            d.keep.then(|| {
                format!(
                    "the retention it was taken under, policy '{policy}' ({}), keeps it ({})",
                    keep.describe(),
                    d.reasons.join(", ")
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmvault_format::{Consistency, TransferStats, VmConfig};
    type Retention = Keep;

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
            retention: PointRetention::None,
        }
    }

    fn kept(points: &[Manifest], r: Retention) -> Vec<String> {
        let plan = plan_prune(points, &r, None, Utc::now(), |t| t.naive_utc()).unwrap();
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
        let plan = plan_prune(&points, &r, None, Utc::now(), |t| t.naive_utc()).unwrap();
        let keep: Vec<_> = plan.iter().filter(|d| d.keep).collect();
        // web01: 03-01 13:00 (last, daily, monthly), 02-28 13:00 (daily, monthly), 02-27 13:00.
        assert_eq!(keep.iter().filter(|d| d.vm == "web01").count(), 3);
        assert!(
            keep.iter().any(|d| d.vm == "db01"),
            "another VM's only point is its last"
        );
        let only_db = plan_prune(&points, &r, Some("db01"), Utc::now(), |t| t.naive_utc()).unwrap();
        assert_eq!(only_db.len(), 1);
    }

    #[test]
    fn empty_policy_is_refused() {
        assert!(
            plan_prune(&series(), &Retention::default(), None, Utc::now(), |t| t
                .naive_utc())
            .is_err()
        );
    }

    #[test]
    fn on_demand_points_are_never_counted() {
        let mut points = series();
        let now = Utc::now();
        // A burst of on-demand points newer than every scheduled one.
        for i in 0..5 {
            let mut p = point("web01", &format!("2026-03-02T0{i}:00:00.000000000Z"));
            p.retention = PointRetention::Until {
                until: (now + chrono::Duration::days(30)).to_rfc3339(),
            };
            points.push(p);
        }
        let mut expired = point("web01", "2026-03-02T09:00:00.000000000Z");
        expired.retention = PointRetention::Until {
            until: (now - chrono::Duration::days(1)).to_rfc3339(),
        };
        points.push(expired.clone());
        let keep = Retention {
            last: 3,
            ..Default::default()
        };
        let plan = plan_prune(&points, &keep, None, now, |t| t.naive_utc()).unwrap();
        let kept_scheduled: Vec<_> = plan
            .iter()
            .filter(|d| d.keep && d.reasons == ["last"])
            .map(|d| d.time[..16].to_string())
            .collect();
        assert_eq!(
            kept_scheduled,
            ["2026-03-01T13:00", "2026-03-01T01:00", "2026-02-28T13:00"]
        );
        assert_eq!(
            plan.iter().filter(|d| d.reasons == ["keep-until"]).count(),
            5
        );
        assert!(!plan.iter().find(|d| d.id == expired.id).unwrap().keep);
    }

    #[test]
    fn in_force_uses_the_recorded_rules_and_zone() {
        let now = Utc::now();
        let mut points = series();
        for p in &mut points {
            p.retention = PointRetention::Policy {
                policy: "daily".into(),
                keep: Retention {
                    daily: 7,
                    ..Default::default()
                },
                time_zone: "Pacific/Kiritimati".into(),
            };
        }
        let newest = points.last().unwrap().clone();
        assert!(in_force(&newest, &points, now).is_some());
        let oldest = points[0].clone();
        assert_eq!(in_force(&oldest, &points, now), None);
        let mut none = oldest.clone();
        none.retention = PointRetention::None;
        assert!(in_force(&none, &points, now).is_some());
    }
}
