//! Fault matrix: on object storage, where garbage collection must have the vault to itself, a
//! collection waiting for a running backup and a backup that starts meanwhile never wait for
//! each other forever, and a collection that waits too long gives up, deleting nothing.
//! Real S3 (Garage, or moto) and Azure Blob (Azurite) servers.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vmvault_cloud::{open, RemoteOptions};
use vmvault_store::{
    CreateOptions, Kind, LockInfo, LockTiming, ManualClock, StoreError, Vault, WriteBackend,
};
use vmvault_testkit::{Azurite, S3Server};

const BOUND: Duration = Duration::from_secs(30);

fn vault(url: &str, opts: &RemoteOptions) -> Vault {
    let backend: Arc<dyn WriteBackend> = open(url, opts).unwrap();
    assert!(
        !backend.atomic_touch(),
        "object storage: a collection needs the vault alone"
    );
    Vault::create(backend.clone(), CreateOptions::default()).unwrap();
    Vault::open(backend, || Ok(Vec::new()))
        .unwrap()
        .with_lock_timing(LockTiming {
            poll: Duration::from_millis(50),
            gc_wait_limit: Duration::from_secs(600),
        })
}

/// The collection's lock, once it is written and says whether it waits.
fn gc_lock(vault: &Vault) -> Option<LockInfo> {
    let b = vault.backend();
    b.list(Kind::Lock)
        .unwrap()
        .into_iter()
        .filter(|o| !o.name.ends_with(".dead"))
        .filter_map(|o| serde_json::from_slice::<LockInfo>(&b.read(Kind::Lock, &o.name).ok()?).ok())
        .find(|i| i.kind == vmvault_store::LockKind::Gc)
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let began = std::time::Instant::now();
    while !f() {
        assert!(began.elapsed() < BOUND, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn interleave(vault: Vault) {
    let vault = Arc::new(vault);
    let first = vault.lock_backup("web01", &mut |_| {}).unwrap();
    let (gc_done, gc_result) = mpsc::channel();
    {
        let vault = vault.clone();
        std::thread::spawn(move || {
            let _ = gc_done.send(vault.gc(&mut |_| {}).map(|r| r.points));
        });
    }
    until("the collection waits for the backup", || {
        gc_lock(&vault).is_some_and(|l| l.waiting)
    });
    // A second backup starts while the collection waits: it goes ahead.
    let (b_done, b_result) = mpsc::channel();
    {
        let vault = vault.clone();
        std::thread::spawn(move || {
            let _ = b_done.send(
                vault
                    .lock_backup("db01", &mut |_| {})
                    .map(|g| g.name().to_string()),
            );
        });
    }
    // (It ends at once: its lock goes with it.)
    b_result
        .recv_timeout(BOUND)
        .expect("the second backup waited for a collection that waits for backups")
        .unwrap();
    // Both backups have ended: the collection runs.
    drop(first);
    let points = gc_result
        .recv_timeout(BOUND)
        .expect("the collection ran once the backups ended")
        .unwrap();
    assert_eq!(points, 0);
}

fn gives_up(url: &str, opts: &RemoteOptions) {
    let clock = ManualClock::starting_now();
    let vault = Arc::new(vault(url, opts).with_clock(clock.clone()));
    let held = vault.lock_backup("web01", &mut |_| {}).unwrap();
    let (done, result) = mpsc::channel();
    {
        let vault = vault.clone();
        std::thread::spawn(move || {
            let _ = done.send(vault.gc(&mut |_| {}));
        });
    }
    until("the collection waits", || gc_lock(&vault).is_some());
    clock.advance(Duration::from_secs(601));
    let err = result
        .recv_timeout(BOUND)
        .expect("the collection gives up")
        .unwrap_err();
    assert!(matches!(err, StoreError::Busy(_)), "{err}");
    assert!(err.to_string().contains("gave up"), "{err}");
    assert!(gc_lock(&vault).is_none(), "its lock is gone");
    drop(held);
}

#[test]
fn s3_gc_and_backups_never_deadlock() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("gcwait");
    interleave(vault("s3://gcwait/one", &s3.options()));
    gives_up("s3://gcwait/two", &s3.options());
}

#[test]
fn azure_gc_and_backups_never_deadlock() {
    let Some(az) = Azurite::start() else { return };
    az.create_bucket("gcwait");
    interleave(vault("azblob://gcwait/one", &az.options()));
    gives_up("azblob://gcwait/two", &az.options());
}
