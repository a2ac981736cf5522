//! Fault matrix: garbage collection never deletes what a running backup will reference, however
//! the backup runs (another PID namespace, another host name, a clock that lags, a process
//! paused past the stale age), and a backup whose lock was judged dead never commits.
//!
//! The backups that must be foreign run as real child processes (this test binary, run again)
//! under `unshare`: a PID namespace of their own, and for "another host" a UTS namespace with
//! another host name. That needs root, as CI runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmvault_format::{
    Consistency, DiskIndex, DiskRecord, Manifest, ObjectKind, PointId, TransferStats, VmConfig,
    MANIFEST_VERSION,
};
use vmvault_store::{
    CreateOptions, Kind, LocalBackend, ManualClock, StoreError, Vault, WriteBackend,
};

const CHUNKS: usize = 8;
const CHUNK: usize = 64 * 1024;
/// The child's exit code when its commit was refused because its lock was lost.
const LOST: i32 = 10;

fn backend(dir: &Path) -> Arc<dyn WriteBackend> {
    Arc::new(LocalBackend::new(dir))
}

fn create(dir: &Path) {
    let opts = CreateOptions {
        chunk_size: CHUNK as u32,
        ..CreateOptions::default()
    };
    Vault::create(backend(dir), opts).unwrap();
}

fn open(dir: &Path) -> Vault {
    Vault::open(backend(dir), || Ok(Vec::new())).unwrap()
}

/// Stores `CHUNKS` new chunks and their index, as a backup does before its manifest.
fn store_disk(vault: &Vault, seed: u8) -> DiskRecord {
    let mut index = DiskIndex {
        disk_size: (CHUNKS * CHUNK) as u64,
        chunk_size: CHUNK as u32,
        chunks: Vec::new(),
    };
    let mut nonce = [0u8; 8];
    vmvault_format::random_bytes(&mut nonce);
    for i in 0..CHUNKS {
        let mut data = vec![seed; CHUNK];
        data[..8].copy_from_slice(&nonce);
        data[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        let digest = vault.codec().digest(&data);
        let sealed = vault.codec().seal(ObjectKind::Chunk, &data);
        assert!(!vault.touch_chunk(&digest, CHUNK).unwrap());
        vault.write_chunk(&digest, &sealed).unwrap();
        index.chunks.push(digest);
    }
    let digest = vault.save_index(&index).unwrap();
    DiskRecord {
        name: "os".into(),
        format: "raw".into(),
        size: index.disk_size,
        index: digest,
        stats: TransferStats::default(),
    }
}

fn manifest(vm: &str, disk: DiskRecord) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        id: PointId::generate(),
        vm: vm.into(),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        source: "image".into(),
        consistency: Consistency::Crash,
        consistency_reason: "test".into(),
        host: vmvault_store::locks::hostname(),
        program: "test".into(),
        chunk_size: CHUNK as u32,
        vm_config: VmConfig {
            name: vm.into(),
            cpus: 1,
            memory_mib: 64,
            firmware: "bios".into(),
            disks: Vec::new(),
            nics: Vec::new(),
        },
        disks: vec![disk],
        stats: TransferStats::default(),
        retention: Default::default(),
    }
}

/// Every chunk of every recovery point is in the vault; returns how many points there are.
fn assert_whole(dir: &Path) -> usize {
    let vault = open(dir);
    let (points, bad) = vault.points().unwrap();
    assert!(bad.is_empty(), "unreadable points: {bad:?}");
    for m in &points {
        for d in &m.disks {
            let index = vault.load_index(&d.index, d.size).unwrap();
            let missing = index
                .chunks
                .iter()
                .filter(|c| !c.is_zero_chunk())
                .filter(|c| {
                    vault
                        .backend()
                        .stat(Kind::Chunk, &c.to_hex())
                        .unwrap()
                        .is_none()
                })
                .count();
            assert_eq!(missing, 0, "point {} lost {missing} chunk(s)", m.id);
        }
    }
    points.len()
}

fn wait_for(path: &Path) {
    let began = Instant::now();
    while !path.exists() {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "{path:?} never came"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The child: holds a backup lock, stores a disk, says so, waits, then commits.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_backup() {
    let vault_dir = PathBuf::from(std::env::var("VMVAULT_TEST_VAULT").unwrap());
    let sync = PathBuf::from(std::env::var("VMVAULT_TEST_SYNC").unwrap());
    let skew: i64 = std::env::var("VMVAULT_TEST_SKEW")
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    let vault = open(&vault_dir).with_clock(ManualClock::skewed(skew));
    let lock = vault.lock_backup("web01", &mut |_| {}).unwrap();
    let disk = store_disk(&vault, 7);
    std::fs::write(sync.join("ready"), b"").unwrap();
    wait_for(&sync.join("go"));
    match vault.commit_point(&lock, &manifest("web01", disk)) {
        Ok(()) => std::process::exit(0),
        Err(StoreError::LockLost(why)) => {
            eprintln!("lost: {why}");
            std::process::exit(LOST)
        }
        Err(e) => panic!("commit: {e}"),
    }
}

/// How the child backup runs.
struct Foreign {
    /// Another host name (a UTS namespace), besides the PID namespace every child gets.
    host: Option<&'static str>,
    /// The child's clock, ahead (+) or behind (-), in seconds.
    skew: i64,
}

fn spawn_child(vault: &Path, sync: &Path, how: &Foreign) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let test_args = "--exact child_backup --ignored --nocapture --test-threads=1";
    let inner = match how.host {
        Some(h) => format!("hostname {h} && exec {} {test_args}", exe.display()),
        None => format!("exec {} {test_args}", exe.display()),
    };
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"]);
    if how.host.is_some() {
        cmd.arg("--uts");
    }
    cmd.args(["sh", "-c", &inner])
        .env("VMVAULT_TEST_VAULT", vault)
        .env("VMVAULT_TEST_SYNC", sync)
        .env("VMVAULT_TEST_SKEW", how.skew.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn()
        .expect("unshare (util-linux) runs the child backup; the test needs root")
}

/// Runs a child backup, and a collection while it is between storing and committing; returns
/// the child's exit code.
fn race(how: Foreign, gc_vault: impl FnOnce(&Path) -> Vault) -> (i32, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (vault_dir, sync) = (dir.path().join("vault"), dir.path().join("sync"));
    std::fs::create_dir(&sync).unwrap();
    create(&vault_dir);
    let child = spawn_child(&vault_dir, &sync, &how);
    wait_for(&sync.join("ready"));
    // The collector spares whatever storage stamped within SAFETY_MARGIN of its start; the
    // child's chunks must be older than that, as those of a backup that has run for a while
    // are. Storage's times come from the kernel, which no injected clock moves.
    std::thread::sleep(vmvault_store::gc::SAFETY_MARGIN + Duration::from_millis(500));
    let report = gc_vault(&vault_dir).gc(&mut |_| {}).unwrap();
    eprintln!("gc: {report:?}");
    std::fs::write(sync.join("go"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!("child: {}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), dir)
}

#[test]
fn a_backup_in_another_pid_namespace_keeps_its_chunks() {
    let (code, dir) = race(
        Foreign {
            host: None,
            skew: 0,
        },
        open,
    );
    assert_eq!(code, 0, "the backup commits");
    assert_eq!(assert_whole(&dir.path().join("vault")), 1);
}

#[test]
fn a_backup_on_another_host_with_a_lagging_clock_keeps_its_chunks() {
    let host = Foreign {
        host: Some("kvm02"),
        skew: -20 * 60,
    };
    let (code, dir) = race(host, open);
    assert_eq!(code, 0, "the backup commits");
    assert_eq!(assert_whole(&dir.path().join("vault")), 1);
}

/// The collector's clock is 15 minutes ahead: to it, the backup's lock is past the stale age
/// by every measure, as a backup paused for that long is. It may remove the lock and sweep;
/// then the backup must not commit.
#[test]
fn a_backup_whose_lock_was_judged_dead_does_not_commit() {
    let ahead = |dir: &Path| open(dir).with_clock(ManualClock::skewed(15 * 60));
    let (code, dir) = race(
        Foreign {
            host: None,
            skew: 0,
        },
        ahead,
    );
    assert_eq!(code, LOST, "the backup refuses to commit");
    assert_eq!(assert_whole(&dir.path().join("vault")), 0, "no point");
}

/// A holder that could not refresh its lock for longer than it trusts it (a stopped process,
/// storage refusing writes) refuses to commit, whether or not anyone judged it dead.
#[test]
fn a_backup_that_did_not_refresh_its_lock_in_time_does_not_commit() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path());
    let clock = ManualClock::starting_now();
    let vault = open(dir.path()).with_clock(clock.clone());
    let lock = vault.lock_backup("web01", &mut |_| {}).unwrap();
    let disk = store_disk(&vault, 3);
    clock.advance(vmvault_store::locks::LOST_AFTER + Duration::from_secs(1));
    let err = vault
        .commit_point(&lock, &manifest("web01", disk))
        .unwrap_err();
    assert!(matches!(err, StoreError::LockLost(_)), "{err}");
    assert!(err.to_string().contains("was not written"), "{err}");
    assert!(vault.point_ids().unwrap().is_empty());
}

/// A lock written straight into the vault, as another vmvault would.
fn plant_lock(dir: &Path, name: &str, json: serde_json::Value) {
    backend(dir)
        .write(Kind::Lock, name, json.to_string().as_bytes())
        .unwrap();
}

fn lock_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = backend(dir)
        .list(Kind::Lock)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    names.sort();
    names
}

#[test]
fn a_lock_younger_than_the_stale_age_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path());
    let now_ns = |back: u64| {
        (std::time::SystemTime::now() - Duration::from_secs(back))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let host = vmvault_store::locks::hostname();
    // Another kernel, its own stamp 11 minutes old (its clock lags), just written.
    plant_lock(
        dir.path(),
        "00000000000000000001-aaaaaaaa",
        serde_json::json!({"kind": "backup", "vm": "a", "host": "kvm02", "pid": 4242,
            "boot_id": "0b0b0b0b-0000-0000-0000-000000000000", "pid_ns": 4026531836u64,
            "started_ns": now_ns(700), "refreshed_ns": now_ns(660)}),
    );
    // An older vmvault on this host name, which wrote no boot id or namespace: its PID may be
    // another namespace's, so it is not looked up.
    plant_lock(
        dir.path(),
        "00000000000000000002-bbbbbbbb",
        serde_json::json!({"kind": "backup", "vm": "b", "host": host, "pid": 999_999,
            "started_ns": now_ns(5), "refreshed_ns": now_ns(5)}),
    );
    let vault = open(dir.path());
    let report = vault.gc(&mut |_| {}).unwrap();
    assert_eq!(report.chunks_removed, 0);
    assert_eq!(
        lock_names(dir.path()),
        [
            "00000000000000000001-aaaaaaaa",
            "00000000000000000002-bbbbbbbb"
        ]
    );
    // A writer sees them as live backups (of other VMs: it goes on).
    drop(vault.lock_backup("c", &mut |_| {}).unwrap());

    // Past the stale age by the storage's time and its stamp: removed, with a tombstone.
    let later = open(dir.path()).with_clock(ManualClock::skewed(15 * 60));
    later.gc(&mut |_| {}).unwrap();
    assert_eq!(
        lock_names(dir.path()),
        [
            "00000000000000000001-aaaaaaaa.dead",
            "00000000000000000002-bbbbbbbb.dead"
        ]
    );
}

/// A lock of this very kernel and PID namespace whose process has ended is removed at once:
/// a backup killed with -9 does not keep its VM locked.
#[test]
fn a_dead_process_of_this_namespace_does_not_hold_its_lock() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path());
    let vault = open(dir.path());
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let guard = vault.lock_backup("probe", &mut |_| {}).unwrap();
    let mine: serde_json::Value =
        serde_json::from_slice(&backend(dir.path()).read(Kind::Lock, guard.name()).unwrap())
            .unwrap();
    drop(guard);
    let mut dead = mine.clone();
    dead["vm"] = "web01".into();
    dead["pid"] = pid.into();
    dead.as_object_mut().unwrap().remove("pid_start");
    plant_lock(dir.path(), "00000000000000000003-cccccccc", dead);
    let _lock = vault.lock_backup("web01", &mut |_| {}).unwrap();
    assert!(!lock_names(dir.path()).contains(&"00000000000000000003-cccccccc".to_string()));
}

/// Two backups of one VM never both run, however closely they start.
#[test]
fn two_backups_of_one_vm_never_both_run() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path());
    let vault = Arc::new(open(dir.path()));
    for round in 0..40 {
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (vault, barrier, held, most) =
                    (vault.clone(), barrier.clone(), held.clone(), most.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match vault.lock_backup("web01", &mut |_| {}) {
                        Ok(guard) => {
                            let now = held.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(30));
                            held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            drop(guard);
                        }
                        Err(StoreError::Busy(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            most.load(std::sync::atomic::Ordering::SeqCst) <= 1,
            "round {round}: two backups of one VM ran at once"
        );
    }
}
