//! A vault in two regions: replication (sync and async, through a queue that survives a
//! restart), reads that fall back to the other region, collection across both, retries, and
//! a primary that loses power. Regions here are local directories under the fault-injecting
//! wrapper; the same wrappers over S3 and Azure Blob are tested in the cli and cloud crates.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmvault_engine::{
    backup_image_vm, prune, restore_disk, verify, BackupOptions, NoProgress, PruneDecision,
    RestoreOptions, VerifyOptions, VmDescription,
};
use vmvault_store::faulty::{Faults, Faulty};
use vmvault_store::{
    CreateOptions, Kind, LocalBackend, ReadBackend, Regions, Replication, RetryPolicy, Retrying,
    StoreError, Vault, WriteBackend,
};
use vmvault_testkit::random_bytes;

fn local(dir: &Path) -> Arc<dyn WriteBackend> {
    Arc::new(LocalBackend::new(dir))
}

fn description(dir: &Path, vm: &str, image: &Path) -> VmDescription {
    let text = format!(
        "name = \"{vm}\"\ncpus = 1\nmemory_mib = 64\n[[disks]]\nname = \"os\"\npath = \"{}\"\n",
        image.display()
    );
    let p = dir.join(format!("{vm}.toml"));
    std::fs::write(&p, text).unwrap();
    VmDescription::load(&p).unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    notices: Arc<Mutex<Vec<String>>>,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            notices: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn regions(
        &self,
        primary: Arc<dyn WriteBackend>,
        secondary: Arc<dyn WriteBackend>,
        sync: bool,
    ) -> Regions {
        let notices = self.notices.clone();
        Regions {
            primary,
            secondary: Some(secondary),
            replication: if sync {
                Replication::Sync
            } else {
                Replication::Async {
                    state_dir: self.path("state"),
                    capacity: 10_000,
                }
            },
            notify: Arc::new(move |m: &str| notices.lock().unwrap().push(m.to_string())),
        }
    }

    /// A 6 MiB image with a hole, written anew with `seed`.
    fn image(&self, seed: u64) -> std::path::PathBuf {
        let p = self.path("disk.img");
        let mut data = random_bytes(6 << 20, seed);
        data[2 << 20..3 << 20].fill(0);
        std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
        p
    }

    fn backup(&self, vault: &Vault, seed: u64) -> vmvault_format::Manifest {
        let image = self.image(seed);
        let desc = description(self.dir.path(), "web01", &image);
        backup_image_vm(vault, &desc, &BackupOptions::default(), &NoProgress).unwrap()
    }

    fn restored(&self, vault: &Vault, m: &vmvault_format::Manifest) -> Vec<u8> {
        let out = self.path("out.img");
        let opts = RestoreOptions {
            overwrite: true,
            ..RestoreOptions::default()
        };
        restore_disk(vault, m, &m.disks[0], &out, &opts, &NoProgress).unwrap();
        std::fs::read(out).unwrap()
    }
}

/// Reads every chunk of every point back and expects no problem.
fn assert_verifies(vault: &Vault) {
    let opts = VerifyOptions {
        read_data: true,
        ..VerifyOptions::default()
    };
    let r = verify(vault, &opts, &NoProgress).unwrap();
    assert!(r.is_clean(), "{}: {:?}", vault.location(), r.problems);
}

fn names(b: &dyn ReadBackend, kind: Kind) -> BTreeSet<String> {
    b.list(kind).unwrap().into_iter().map(|o| o.name).collect()
}

fn same_objects(a: &dyn ReadBackend, b: &dyn ReadBackend) {
    for kind in [
        Kind::Config,
        Kind::Key,
        Kind::Chunk,
        Kind::Index,
        Kind::Point,
    ] {
        assert_eq!(names(a, kind), names(b, kind), "{kind:?}");
    }
}

fn encrypted() -> CreateOptions {
    CreateOptions {
        passphrase: Some(b"pw".to_vec()),
        // Cheap key derivation: these tests open vaults many times.
        kdf: vmvault_format::KdfParams {
            memory_kib: 64,
            time: 1,
            parallelism: 1,
        },
        // Pruned points go at once: these tests collect what they held.
        soft_delete_days: 0,
        ..CreateOptions::default()
    }
}

fn pass() -> Result<Vec<u8>, String> {
    Ok(b"pw".to_vec())
}

#[test]
fn async_replication_copies_every_point_and_the_secondary_restores_alone() {
    let s = Setup::new();
    let (p, q) = (local(&s.path("p")), local(&s.path("q")));
    let vault = Vault::create(s.regions(p.clone(), q.clone(), false), encrypted()).unwrap();
    let m1 = s.backup(&vault, 1);
    let m2 = s.backup(&vault, 2);
    let left = vault
        .replication()
        .unwrap()
        .drain(Duration::from_secs(30))
        .unwrap();
    assert_eq!(left, 0);
    drop(vault);
    same_objects(&*p, &*q);

    // The primary is gone: the secondary is a vault on its own.
    std::fs::remove_dir_all(s.path("p")).unwrap();
    let alone = Vault::open(q.clone(), pass).unwrap();
    let (points, bad) = alone.points().unwrap();
    assert!(bad.is_empty());
    assert_eq!(points.len(), 2);
    let want1 = {
        let mut d = random_bytes(6 << 20, 1);
        d[2 << 20..3 << 20].fill(0);
        d
    };
    assert_eq!(s.restored(&alone, &m1), want1);
    assert_ne!(s.restored(&alone, &m2), want1);
    assert_verifies(&alone);
}

#[test]
fn sync_replication_fails_a_backup_the_secondary_refuses_and_async_carries_on() {
    let s = Setup::new();
    let q = Arc::new(Faulty::new(local(&s.path("q"))));
    let p = local(&s.path("p"));
    let vault = Vault::create(s.regions(p.clone(), q.clone(), true), encrypted()).unwrap();
    q.set(Faults {
        refuse_writes_of: Some(Kind::Chunk),
        ..Faults::default()
    });
    let image = s.image(3);
    let desc = description(s.dir.path(), "web01", &image);
    let err = backup_image_vm(&vault, &desc, &BackupOptions::default(), &NoProgress).unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(
        vault.points().unwrap().0.is_empty(),
        "no point in sync mode"
    );
    drop(vault);

    // The same refusal in async mode: the backup completes, the queue keeps what is owed.
    let vault = Vault::open(s.regions(p.clone(), q.clone(), false), pass).unwrap();
    let m = s.backup(&vault, 3);
    let r = vault.replication().unwrap();
    assert!(r.drain(Duration::from_millis(300)).unwrap() > 0);
    assert!(
        s.notices
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("failing")),
        "the trouble is told"
    );
    q.set(Faults::default());
    assert_eq!(r.drain(Duration::from_secs(60)).unwrap(), 0);
    drop(vault);
    same_objects(&*p, &*q);
    let alone = Vault::open(q.clone() as Arc<dyn WriteBackend>, pass).unwrap();
    assert_eq!(alone.points().unwrap().0[0].id, m.id);
}

#[test]
fn the_queue_survives_a_restart_while_the_secondary_is_down() {
    let s = Setup::new();
    let q = Arc::new(Faulty::new(local(&s.path("q"))));
    let p = local(&s.path("p"));
    let vault = Vault::create(s.regions(p.clone(), q.clone(), false), encrypted()).unwrap();
    q.set(Faults {
        down: true,
        ..Faults::default()
    });
    s.backup(&vault, 4);
    let (left, overflowed) = vault.replication().unwrap().backlog();
    assert!(left > 0 && !overflowed);
    drop(vault); // the process ends with the queue not empty
    q.set(Faults::default());
    assert!(names(&*q, Kind::Point).is_empty());
    let journals = std::fs::read_dir(s.path("state/replication"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .count();
    assert_eq!(journals, 1, "the journal stays for the next process");

    let vault = Vault::open(s.regions(p.clone(), q.clone(), false), pass).unwrap();
    let r = vault.replication().unwrap();
    assert_eq!(
        r.drain(Duration::from_secs(60)).unwrap(),
        0,
        "adopted and done"
    );
    drop(vault);
    same_objects(&*p, &*q);
}

#[test]
fn reads_fall_back_to_the_other_region_and_say_so() {
    let s = Setup::new();
    let (p, q) = (local(&s.path("p")), local(&s.path("q")));
    let vault = Vault::create(s.regions(p.clone(), q.clone(), true), encrypted()).unwrap();
    let m = s.backup(&vault, 5);
    let want = s.restored(&vault, &m);
    let chunks: Vec<String> = names(&*p, Kind::Chunk).into_iter().collect();
    // One chunk gone from the primary, one damaged there, and the manifest damaged too.
    p.remove(Kind::Chunk, &chunks[0]).unwrap();
    let mut bad = p.read(Kind::Chunk, &chunks[1]).unwrap();
    bad[60] ^= 0x40;
    p.write(Kind::Chunk, &chunks[1], &bad).unwrap();
    let mut bad = p.read(Kind::Point, &m.id.to_hex()).unwrap();
    bad[45] ^= 1;
    p.write(Kind::Point, &m.id.to_hex(), &bad).unwrap();
    drop(vault);

    let vault = Vault::open(s.regions(p.clone(), q.clone(), true), pass).unwrap();
    let (points, unreadable) = vault.points().unwrap();
    assert!(unreadable.is_empty());
    assert_eq!(s.restored(&vault, &points[0]), want);
    let notices = s.notices.lock().unwrap().clone();
    for what in [&chunks[0], &chunks[1], &m.id.to_hex()] {
        let n = notices
            .iter()
            .find(|n| n.contains(what.as_str()))
            .unwrap_or_else(|| panic!("no notice for {what}: {notices:?}"));
        assert!(n.contains("secondary"), "{n}");
    }
    assert!(notices.iter().any(|n| n.contains("damaged")));

    // With one region only, the same damage is an error naming it.
    let primary_only = Vault::open(p.clone(), pass).unwrap();
    match primary_only.load_manifest(&m.id) {
        Err(StoreError::Damaged { location, .. }) => assert_eq!(location, p.location()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn collection_sweeps_both_regions_and_keeps_what_either_references() {
    let s = Setup::new();
    let (p, q) = (local(&s.path("p")), local(&s.path("q")));
    let vault = Vault::create(s.regions(p.clone(), q.clone(), true), encrypted()).unwrap();
    let m1 = s.backup(&vault, 6);
    let m2 = s.backup(&vault, 7);
    let m3 = s.backup(&vault, 8);
    // A point only the secondary still has (its primary manifest was lost).
    p.remove(Kind::Point, &m3.id.to_hex()).unwrap();
    // And a point pruned from both.
    let decisions = vec![PruneDecision {
        id: m1.id,
        vm: m1.vm.clone(),
        time: m1.time.clone(),
        keep: false,
        reasons: vec![],
    }];
    prune(&vault, &decisions, "test", "prune").unwrap();
    assert!(!names(&*q, Kind::Point).contains(&m1.id.to_hex()));
    // Leftovers of an interrupted backup in the secondary, old enough to collect.
    q.write(Kind::Chunk, &"ab".repeat(32), b"junk").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    let f = std::fs::File::options()
        .write(true)
        .open(s.path(&format!("q/chunks/ab/{}", "ab".repeat(32))))
        .unwrap();
    f.set_modified(old).unwrap();
    drop(f);
    // Age everything so the cutoff does not spare it.
    for dir in ["p", "q"] {
        for e in walk(&s.path(dir)) {
            let f = std::fs::File::options().write(true).open(&e).unwrap();
            f.set_modified(old).unwrap();
        }
    }

    let report = vault.gc(&mut |_| {}).unwrap();
    assert_eq!(report.regions, ["primary", "secondary"]);
    assert!(report.chunks_removed > 0);
    assert!(q.stat(Kind::Chunk, &"ab".repeat(32)).unwrap().is_none());
    for m in [&m2, &m3] {
        // Restorable from the vault (m3 through the secondary), each region whole for m2.
        let vault = Vault::open(s.regions(p.clone(), q.clone(), true), pass).unwrap();
        let got = s.restored(&vault, m);
        assert_eq!(got.len(), 6 << 20);
    }
    for region in [&p, &q] {
        let alone = Vault::open(region.clone(), pass).unwrap();
        assert_verifies(&alone);
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn retries_ride_out_transient_failures() {
    let s = Setup::new();
    let faulty = Arc::new(Faulty::new(local(&s.path("p"))));
    // Backup threads share Faulty's call counter, so a retry can land on the
    // next failing call again; a third of calls fail, and 12 attempts make a
    // run of 12 failures (3^-11 per fault) too rare to flake on.
    let policy = RetryPolicy {
        attempts: 12,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    let backend: Arc<dyn WriteBackend> = Arc::new(Retrying::new(faulty.clone(), policy));
    let vault = Vault::create(backend.clone(), encrypted()).unwrap();
    faulty.set(Faults {
        fail_every: 3,
        ..Faults::default()
    });
    let m = s.backup(&vault, 9);
    let got = s.restored(&vault, &m);
    assert_eq!(got.len(), 6 << 20);
    assert!(faulty.calls() > 30, "the faults were really hit");

    // Without retries the same faults fail the backup: the test can fail.
    let bare = Vault::open(faulty.clone() as Arc<dyn WriteBackend>, pass);
    let failed = bare.and_then(|v| {
        let image = s.image(10);
        let desc = description(s.dir.path(), "web02", &image);
        backup_image_vm(&v, &desc, &BackupOptions::default(), &NoProgress)
            .map_err(|e| StoreError::Invalid(e.to_string()))
    });
    assert!(failed.is_err());
}

#[test]
fn a_primary_that_loses_power_mid_backup_keeps_a_valid_vault() {
    // Die after N calls, then lose every write since the last sync, for several N: the vault
    // must open, verify clean, and take the next backup.
    for die_after in [5, 40, 90, 200] {
        let s = Setup::new();
        let faulty = Arc::new(Faulty::new(local(&s.path("p"))));
        let vault = Vault::create(faulty.clone() as Arc<dyn WriteBackend>, encrypted()).unwrap();
        s.backup(&vault, 11);
        faulty.set(Faults {
            die_after: Some(die_after),
            ..Faults::default()
        });
        let image = s.image(12);
        let desc = description(s.dir.path(), "web01", &image);
        let _ = backup_image_vm(&vault, &desc, &BackupOptions::default(), &NoProgress);
        drop(vault);
        faulty.set(Faults::default());
        faulty.lose_unsynced().unwrap();

        let vault = Vault::open(faulty.clone() as Arc<dyn WriteBackend>, pass).unwrap();
        eprintln!("power lost after {die_after} calls");
        assert_verifies(&vault);
        let (points, bad) = vault.points().unwrap();
        assert!(bad.is_empty() && !points.is_empty());
        // Another VM: this process still lives, so the dead backup's lock (if it was synced)
        // looks alive to it; a real power loss takes the process too.
        let image = s.image(13);
        let desc = description(s.dir.path(), "web02", &image);
        let m = backup_image_vm(&vault, &desc, &BackupOptions::default(), &NoProgress).unwrap();
        assert_eq!(s.restored(&vault, &m).len(), 6 << 20);
    }
}

#[test]
fn verify_repair_mends_each_region_from_the_other() {
    let s = Setup::new();
    let (p, q) = (local(&s.path("p")), local(&s.path("q")));
    let vault = Vault::create(s.regions(p.clone(), q.clone(), true), encrypted()).unwrap();
    let m1 = s.backup(&vault, 21);
    let m2 = s.backup(&vault, 22);
    // Chunks only the first point has, so that each loss below is seen on its own.
    let index = |m: &vmvault_format::Manifest| -> BTreeSet<String> {
        let i = vault
            .load_index(&m.disks[0].index, m.disks[0].size)
            .unwrap();
        i.chunks
            .iter()
            .filter(|d| !d.is_zero_chunk())
            .map(|d| d.to_hex())
            .collect()
    };
    let chunks: Vec<String> = index(&m1).difference(&index(&m2)).cloned().collect();
    // Damage in the primary, a loss in the secondary, a manifest lost from the primary, an
    // index lost from the secondary.
    let mut bad = p.read(Kind::Chunk, &chunks[0]).unwrap();
    bad[100] ^= 4;
    p.write(Kind::Chunk, &chunks[0], &bad).unwrap();
    q.remove(Kind::Chunk, &chunks[1]).unwrap();
    // Behind the lost index: only seen once a repair has put the index back.
    let hidden = index(&m2).difference(&index(&m1)).next().cloned().unwrap();
    q.remove(Kind::Chunk, &hidden).unwrap();
    p.remove(Kind::Point, &m1.id.to_hex()).unwrap();
    q.remove(Kind::Index, &m2.disks[0].index.to_hex()).unwrap();

    let opts = VerifyOptions {
        read_data: true,
        repair: false,
    };
    let found = verify(&vault, &opts, &NoProgress).unwrap();
    let regions: BTreeSet<_> = found
        .problems
        .iter()
        .map(|p| p.region.clone().unwrap())
        .collect();
    assert_eq!(regions.len(), 2, "{:?}", found.problems);
    assert!(found.problems.len() >= 4, "{:?}", found.problems);
    assert_eq!(found.repaired, 0);

    let opts = VerifyOptions {
        read_data: true,
        repair: true,
    };
    let mended = verify(&vault, &opts, &NoProgress).unwrap();
    assert!(mended.is_clean(), "{:?}", mended.problems);
    assert!(mended.repaired >= 4);
    let again = verify(&vault, &opts, &NoProgress).unwrap();
    assert!(again.is_clean() && again.repaired == 0);
    drop(vault);
    same_objects(&*p, &*q);
    for region in [&p, &q] {
        let alone = Vault::open(region.clone(), pass).unwrap();
        let r = verify(&alone, &opts, &NoProgress).unwrap();
        assert!(r.is_clean(), "{}: {:?}", region.location(), r.problems);
    }
}
