//! The vault's rules as a test suite every kind of storage must pass (issue 12, "the rules
//! matrix ... through the engine, on a directory, on S3 and on Azure"): whatever the storage,
//! a delete, a prune's plan, an on-demand burst, undelete, the lock and garbage collection all
//! end in the same store functions, and nothing the rules keep disappears.
//!
//! Each check is an attack: a shorter policy after the fact, a burst of on-demand points, a
//! host clock that runs ahead, a marker or rules object forged without the vault's key. Run by
//! this crate's tests on a directory and by crates/cloud's on Garage, moto and Azurite; the
//! checks that need a directory (the storage's clock moved back by hand on a file, legacy
//! markers) are this module's own tests.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vmvault_format::{
    Codec, Consistency, KdfParams, Keep, Keys, Manifest, ObjectKind, PointId, PointRetention,
    TransferStats, VmConfig, MANIFEST_VERSION,
};

use crate::{
    plan_prune, Clock, CreateOptions, Deleted, Kind, ManualClock, StoreError, Vault, WriteBackend,
};

const PASS: &[u8] = b"rules test";
const DAY: Duration = Duration::from_secs(86_400);

/// Runs every check, each on a fresh empty region from `fresh`. Panics on the first broken rule.
pub fn run(fresh: &dyn Fn() -> Arc<dyn WriteBackend>) {
    a_locked_vault_keeps_what_the_recorded_retention_keeps(fresh());
    on_demand_points_never_count_and_stay_until_their_time(fresh());
    a_point_with_no_recorded_end_never_leaves_a_locked_vault(fresh());
    the_lock_is_never_cleared_and_soft_delete_only_grows(fresh());
    soft_delete_off_removes_at_once_in_an_unlocked_vault(fresh());
    a_deleted_point_outlives_a_host_clock_that_runs_ahead(fresh());
    a_forged_marker_neither_hides_nor_purges_a_point(fresh());
    a_forged_rules_object_does_not_unlock_the_vault(fresh());
}

/// An encrypted vault (cheap key derivation) on `backend`, and a clock the checks move.
pub fn create(backend: Arc<dyn WriteBackend>, soft_delete_days: u32) -> (Vault, Arc<ManualClock>) {
    let opts = CreateOptions {
        chunk_size: 64 * 1024,
        passphrase: Some(PASS.to_vec()),
        kdf: KdfParams {
            memory_kib: 64,
            time: 1,
            parallelism: 1,
        },
        soft_delete_days,
        ..CreateOptions::default()
    };
    Vault::create(backend.clone(), opts).expect("create a vault");
    open(backend)
}

/// The vault on `backend` as a second process opens it, with a clock of its own.
pub fn open(backend: Arc<dyn WriteBackend>) -> (Vault, Arc<ManualClock>) {
    let clock = ManualClock::starting_now();
    let vault = Vault::open(backend, || Ok(PASS.to_vec()))
        .expect("open the vault")
        .with_clock(clock.clone());
    (vault, clock)
}

pub fn now(clock: &ManualClock) -> DateTime<Utc> {
    DateTime::<Utc>::from(clock.now())
}

/// A point of `vm` taken `days_ago` days before `at` (no disks: the rules look at manifests).
pub fn point(
    vault: &Vault,
    vm: &str,
    at: DateTime<Utc>,
    days_ago: i64,
    r: PointRetention,
) -> PointId {
    let t = at - chrono::Duration::days(days_ago);
    let m = Manifest {
        version: MANIFEST_VERSION,
        id: PointId::generate(),
        vm: vm.into(),
        time: t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        source: "image".into(),
        consistency: Consistency::Crash,
        consistency_reason: "test".into(),
        host: "test".into(),
        program: "test".into(),
        chunk_size: 64 * 1024,
        vm_config: VmConfig {
            name: vm.into(),
            cpus: 1,
            memory_mib: 64,
            firmware: "bios".into(),
            disks: Vec::new(),
            nics: Vec::new(),
        },
        disks: Vec::new(),
        stats: TransferStats::default(),
        retention: r,
    };
    vault.save_manifest(&m).expect("save a manifest");
    m.id
}

pub fn daily(n: u32) -> PointRetention {
    PointRetention::Policy {
        policy: "daily".into(),
        keep: Keep {
            daily: n,
            ..Keep::default()
        },
        time_zone: "UTC".into(),
    }
}

pub fn live(vault: &Vault) -> Vec<PointId> {
    vault
        .points()
        .expect("list points")
        .0
        .iter()
        .map(|m| m.id)
        .collect()
}

fn refused(r: crate::Result<Deleted>) -> String {
    match r {
        Err(StoreError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A codec with another vault's key: what someone with storage access but not the
/// passphrase can seal.
fn foreign_codec() -> Codec {
    Codec::encrypted(&Keys::generate(), 1)
}

/// Someone re-protects a VM under a policy keeping 1 and prunes with it: the plan would delete
/// nine points; the locked vault refuses the ones the recorded "daily 7" still keeps and
/// soft-deletes the rest.
fn a_locked_vault_keeps_what_the_recorded_retention_keeps(backend: Arc<dyn WriteBackend>) {
    let (vault, clock) = create(backend, 14);
    let at = now(&clock);
    let ids: Vec<PointId> = (0..10)
        .rev()
        .map(|d| point(&vault, "web02", at, d, daily(7)))
        .collect();
    vault.lock_vault("alice").unwrap();
    let keep_one = Keep {
        last: 1,
        ..Keep::default()
    };
    let (points, _) = vault.points().unwrap();
    let plan = plan_prune(&points, &keep_one, Some("web02"), at, |t| t.naive_utc()).unwrap();
    let mut refusals = 0;
    for d in plan.iter().filter(|d| !d.keep) {
        match vault.delete_point(&d.id, "mallory", "prune (keep last 1)") {
            Err(StoreError::Refused(why)) => {
                assert!(why.contains("policy 'daily' (daily 7)"), "{why}");
                refusals += 1;
            }
            Ok(Deleted::Until(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        refusals, 6,
        "the 7 newest days stay (one of them is kept by the plan)"
    );
    assert_eq!(live(&vault), ids[3..].to_vec());
    let why = refused(vault.delete_point(&ids[9], "mallory", "point delete"));
    assert!(why.contains("the vault is locked"), "{why}");
    // What went is soft-deleted, not gone, and a collection keeps it.
    assert_eq!(vault.list_points().unwrap().deleted.len(), 3);
    assert_eq!(vault.gc(&mut |_| {}).unwrap().points_purged, 0);
    let list = vault.list_points().unwrap();
    assert_eq!((list.live.len(), list.deleted.len()), (7, 3));
    // Undelete while the window lasts brings one back.
    vault.undelete_point(&ids[0]).unwrap();
    assert_eq!(live(&vault).len(), 8);
}

/// keep-last 4 after a burst of four on-demand points: nothing scheduled is evicted, and each
/// on-demand point stays until its own time.
fn on_demand_points_never_count_and_stay_until_their_time(backend: Arc<dyn WriteBackend>) {
    let (vault, clock) = create(backend, 14);
    let at = now(&clock);
    let scheduled: Vec<PointId> = (1..=4)
        .rev()
        .map(|d| point(&vault, "au01", at, d, daily(4)))
        .collect();
    let until = (at + chrono::Duration::hours(1)).to_rfc3339();
    let burst: Vec<PointId> = (0..4)
        .map(|_| {
            point(
                &vault,
                "au01",
                at,
                0,
                PointRetention::Until {
                    until: until.clone(),
                },
            )
        })
        .collect();
    let keep = Keep {
        last: 4,
        ..Keep::default()
    };
    let (points, _) = vault.points().unwrap();
    let plan = plan_prune(&points, &keep, Some("au01"), at, |t| t.naive_utc()).unwrap();
    assert!(plan.iter().all(|d| d.keep), "{plan:?}");

    vault.lock_vault("alice").unwrap();
    let why = refused(vault.delete_point(&burst[0], "op", "point delete"));
    assert!(why.contains("kept until"), "{why}");
    clock.advance(2 * 3600 * Duration::from_secs(1));
    assert!(matches!(
        vault.delete_point(&burst[0], "op", "point delete"),
        Ok(Deleted::Until(_))
    ));
    assert_eq!(live(&vault).len(), scheduled.len() + 3);
}

fn a_point_with_no_recorded_end_never_leaves_a_locked_vault(backend: Arc<dyn WriteBackend>) {
    let (vault, clock) = create(backend, 14);
    let old = point(&vault, "cli01", now(&clock), 400, PointRetention::None);
    vault.lock_vault("alice").unwrap();
    let why = refused(vault.delete_point(&old, "bob", "point delete"));
    assert!(why.contains("no end of retention"), "{why}");
}

fn the_lock_is_never_cleared_and_soft_delete_only_grows(backend: Arc<dyn WriteBackend>) {
    let (vault, _) = create(backend.clone(), 0);
    let rules = vault.lock_vault("alice").unwrap();
    assert_eq!(rules.soft_delete_days, 14, "locking turns soft delete on");
    assert!(matches!(
        vault.set_soft_delete_days(0),
        Err(StoreError::Refused(_))
    ));
    assert!(matches!(
        vault.set_soft_delete_days(7),
        Err(StoreError::Refused(_))
    ));
    assert_eq!(vault.set_soft_delete_days(30).unwrap().soft_delete_days, 30);
    // A second process opening the vault sees the same rules.
    let (again, _) = open(backend);
    let r = again.rules().unwrap();
    assert!(r.locked.is_some());
    assert_eq!(r.soft_delete_days, 30);
}

fn soft_delete_off_removes_at_once_in_an_unlocked_vault(backend: Arc<dyn WriteBackend>) {
    let (vault, clock) = create(backend, 0);
    let id = point(&vault, "web01", now(&clock), 1, PointRetention::None);
    assert_eq!(
        vault.delete_point(&id, "bob", "point delete").unwrap(),
        Deleted::Removed
    );
    assert!(vault.list_points().unwrap().deleted.is_empty());
    assert!(live(&vault).is_empty());
}

/// The host's clock runs 15 days ahead of a 14-day window: the storage's clock says the marker
/// is new, so no collection purges the point, and undelete still works.
fn a_deleted_point_outlives_a_host_clock_that_runs_ahead(backend: Arc<dyn WriteBackend>) {
    let (vault, clock) = create(backend, 14);
    let id = point(&vault, "web01", now(&clock), 1, PointRetention::None);
    assert!(matches!(
        vault.delete_point(&id, "bob", "point delete"),
        Ok(Deleted::Until(_))
    ));
    assert!(live(&vault).is_empty());
    let deleted = vault.list_points().unwrap().deleted;
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].1.by, "bob");
    assert_eq!(vault.gc(&mut |_| {}).unwrap().points_purged, 0);
    clock.advance(15 * DAY);
    assert_eq!(vault.gc(&mut |_| {}).unwrap().points_purged, 0);
    assert_eq!(vault.list_points().unwrap().deleted.len(), 1);
    vault.undelete_point(&id).unwrap();
    assert_eq!(live(&vault), vec![id]);
}

fn a_forged_marker_neither_hides_nor_purges_a_point(backend: Arc<dyn WriteBackend>) {
    let (vault, clock) = create(backend.clone(), 14);
    let id = point(&vault, "web01", now(&clock), 1, PointRetention::None);
    let forged = vmvault_format::Deletion {
        version: 1,
        point: id,
        deleted_at: "2000-01-01T00:00:00Z".into(),
        by: "mallory".into(),
        reason: "forged".into(),
    };
    let sealed = foreign_codec().seal(ObjectKind::Deletion, &forged.encode());
    backend
        .write(Kind::Point, &format!("{}.deleted", id.to_hex()), &sealed)
        .unwrap();
    clock.advance(400 * DAY);
    let list = vault.list_points().unwrap();
    assert!(list.live.is_empty() && list.deleted.is_empty());
    assert_eq!(list.unreadable.len(), 1, "the forged marker is damage");
    assert!(
        matches!(list.unreadable[0].1, StoreError::Damaged { .. }),
        "{:?}",
        list.unreadable[0].1
    );
    // gc refuses to purge on its word, and the manifest is still there.
    let _ = vault.gc(&mut |_| {});
    assert!(vault.load_manifest(&id).is_ok());
}

fn a_forged_rules_object_does_not_unlock_the_vault(backend: Arc<dyn WriteBackend>) {
    let (vault, clock) = create(backend.clone(), 14);
    let id = point(&vault, "web01", now(&clock), 1, daily(7));
    vault.lock_vault("alice").unwrap();
    let unlocked = vmvault_format::VaultRules {
        soft_delete_days: 0,
        ..vmvault_format::VaultRules::default()
    };
    let sealed = foreign_codec().seal(ObjectKind::Rules, &unlocked.encode());
    backend.write(Kind::Config, "rules", &sealed).unwrap();
    match vault.delete_point(&id, "mallory", "point delete") {
        Err(StoreError::Damaged { reason, .. }) => {
            assert!(reason.contains("nothing is deleted"), "{reason}")
        }
        other => panic!("expected damage, got {other:?}"),
    }
    assert_eq!(live(&vault), vec![id]);
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use super::*;
    use crate::{LocalBackend, ReadBackend};

    fn local(dir: &Path) -> Arc<dyn WriteBackend> {
        Arc::new(LocalBackend::new(dir))
    }

    #[test]
    fn the_rules_hold_on_a_directory() {
        let dirs = std::sync::Mutex::new(Vec::new());
        run(&|| {
            let d = tempfile::tempdir().unwrap();
            let b = local(d.path());
            dirs.lock().unwrap().push(d);
            b
        });
    }

    /// Puts the storage's time of the deletion marker of `id` `by` into the past.
    fn age_marker(dir: &Path, id: &PointId, by: Duration) {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join("points").join(format!("{}.deleted", id.to_hex())))
            .unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn a_deleted_point_stays_until_its_window_is_over_by_both_clocks() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, clock) = create(local(dir.path()), 14);
        let id = point(&vault, "web01", now(&clock), 1, PointRetention::None);
        vault.delete_point(&id, "bob", "point delete").unwrap();
        clock.advance(15 * DAY);
        assert_eq!(vault.gc(&mut |_| {}).unwrap().points_purged, 0);

        // The storage's time says 15 days, the host's (back to normal) says now: still kept.
        let (fresh, _) = open(local(dir.path()));
        age_marker(dir.path(), &id, 15 * DAY);
        assert_eq!(fresh.gc(&mut |_| {}).unwrap().points_purged, 0);

        // Undelete works while the window lasts; delete again and let both clocks agree.
        fresh.undelete_point(&id).unwrap();
        assert_eq!(live(&fresh), vec![id]);
        let (vault, clock) = open(local(dir.path()));
        vault.delete_point(&id, "bob", "point delete").unwrap();
        age_marker(dir.path(), &id, 15 * DAY);
        clock.advance(15 * DAY);
        assert_eq!(vault.gc(&mut |_| {}).unwrap().points_purged, 1);
        assert!(vault.list_points().unwrap().deleted.is_empty());
        assert!(matches!(
            vault.load_manifest(&id),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn plain_json_markers_of_an_old_server_are_sealed_and_only_ever_safer() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, clock) = create(local(dir.path()), 14);
        let at = now(&clock);
        let id = point(&vault, "web01", at, 1, PointRetention::None);
        let raw = LocalBackend::new(dir.path());
        raw.remove(Kind::Config, "rules").ok();
        raw.write(
            Kind::Config,
            "immutable",
            br#"{"version":1,"locked_at":"2026-11-01T00:00:00Z","by":"admin"}"#,
        )
        .unwrap();
        let legacy = format!("deleted.{}", id.to_hex());
        raw.write(
            Kind::Config,
            &legacy,
            br#"{"version":1,"point":"x","deleted_at":"2000-01-01T00:00:00Z","by":"admin"}"#,
        )
        .unwrap();
        assert!(vault.rules().unwrap().locked.is_some());
        assert_eq!(vault.migrate_legacy_markers().unwrap(), 2);
        assert!(raw.stat(Kind::Config, &legacy).unwrap().is_none());
        let list = vault.list_points().unwrap();
        assert_eq!(list.deleted.len(), 1);
        // The old, unauthenticated time is not believed: the window starts at the migration.
        assert!(list.deleted[0].1.deleted_at.as_str() > "2026-01-01");
        assert!(vault.rules().unwrap().locked.is_some());
    }
}
