//! Garbage collection running in the middle of a backup never deletes a chunk the backup has
//! decided to reuse; and a backup that starts while a collection runs waits for it.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use vmvault_engine::{
    backup_image_vm, prune, restore_disk, verify, BackupOptions, NoProgress, Progress,
    PruneDecision, RestoreOptions, VerifyOptions, VmDescription,
};
use vmvault_store::{
    gc::SAFETY_MARGIN, CreateOptions, Kind, LocalBackend, ObjectInfo, ReadBackend, Vault,
    WriteBackend,
};

fn open(dir: &std::path::Path) -> Vault {
    let backend: Arc<dyn WriteBackend> = Arc::new(LocalBackend::new(dir));
    Vault::open(backend, || Ok(Vec::new())).unwrap()
}

fn random_image(path: &std::path::Path, size: usize, seed: u64) {
    let mut x = seed;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::File::create(path)
        .unwrap()
        .write_all(&data)
        .unwrap();
}

fn description(dir: &std::path::Path, vm: &str, image: &str) -> VmDescription {
    let text = format!(
        "name = \"{vm}\"\ncpus = 1\nmemory_mib = 64\n[[disks]]\nname = \"os\"\npath = \"{image}\"\n"
    );
    let p = dir.join(format!("{vm}.toml"));
    std::fs::write(&p, text).unwrap();
    VmDescription::load(&p).unwrap()
}

/// A local backend with hooks: the fault-injection way of forcing one interleaving.
struct Hooked {
    inner: LocalBackend,
    on_touch: Box<dyn Fn() + Send + Sync>,
    on_list_chunks: Box<dyn Fn() + Send + Sync>,
}

impl ReadBackend for Hooked {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read(&self, kind: Kind, name: &str) -> vmvault_store::Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn stat(&self, kind: Kind, name: &str) -> vmvault_store::Result<Option<ObjectInfo>> {
        self.inner.stat(kind, name)
    }
    fn list(&self, kind: Kind) -> vmvault_store::Result<Vec<ObjectInfo>> {
        let list = self.inner.list(kind)?;
        if kind == Kind::Chunk {
            (self.on_list_chunks)();
        }
        Ok(list)
    }
}

impl WriteBackend for Hooked {
    fn create(&self) -> vmvault_store::Result<()> {
        self.inner.create()
    }
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> vmvault_store::Result<()> {
        self.inner.write(kind, name, data)
    }
    fn remove(&self, kind: Kind, name: &str) -> vmvault_store::Result<()> {
        self.inner.remove(kind, name)
    }
    fn touch(&self, kind: Kind, name: &str) -> vmvault_store::Result<Option<u64>> {
        let found = self.inner.touch(kind, name)?;
        if found.is_some() {
            (self.on_touch)();
        }
        Ok(found)
    }
    fn remove_unless_touched(
        &self,
        kind: Kind,
        name: &str,
        cutoff: SystemTime,
    ) -> vmvault_store::Result<bool> {
        self.inner.remove_unless_touched(kind, name, cutoff)
    }
    fn sync(&self) -> vmvault_store::Result<()> {
        self.inner.sync()
    }
    fn remove_temporaries(&self, older_than: SystemTime) -> vmvault_store::Result<u64> {
        self.inner.remove_temporaries(older_than)
    }
}

/// A one-shot signal between threads.
#[derive(Default)]
struct Signal(Mutex<bool>, Condvar);

impl Signal {
    fn set(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }
    fn wait(&self) {
        let mut g = self.0.lock().unwrap();
        while !*g {
            g = self.1.wait(g).unwrap();
        }
    }
}

/// The interleaving that loses data when the sweep trusts its listing: the collector lists
/// chunks (old times), the backup then touches (reuses) them, the collector then deletes.
#[test]
fn gc_between_listing_and_deleting_spares_what_a_backup_touched_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vdir = dir.join("vault");
    let plain: Arc<dyn WriteBackend> = Arc::new(LocalBackend::new(&vdir));
    let opts = CreateOptions {
        chunk_size: 64 * 1024,
        // Pruned points go at once: this test races the collection of what they held.
        soft_delete_days: 0,
        ..CreateOptions::default()
    };
    let vault = Vault::create(plain, opts).unwrap();
    random_image(&dir.join("x.raw"), 8 << 20, 1);
    random_image(&dir.join("y.raw"), 2 << 20, 2);

    // VM b's points hold images x and y; pruned, their chunks are unreferenced and old.
    let mut plan = Vec::new();
    for image in ["x.raw", "y.raw"] {
        let m = backup_image_vm(
            &vault,
            &description(dir, "b", image),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
        plan.push(PruneDecision {
            id: m.id,
            vm: "b".into(),
            time: m.time.clone(),
            keep: false,
            reasons: vec![],
        });
    }
    prune(&vault, &plan, "test", "prune").unwrap();
    std::thread::sleep(SAFETY_MARGIN + Duration::from_millis(200));

    let backup_touching = Arc::new(Signal::default());
    let gc_listed = Arc::new(Signal::default());
    let backup_touched_more = Arc::new(Signal::default());
    let touches = Arc::new(AtomicUsize::new(0));
    let backup_backend: Arc<dyn WriteBackend> = Arc::new(Hooked {
        inner: LocalBackend::new(&vdir),
        on_touch: {
            let (touching, listed, more, touches) = (
                backup_touching.clone(),
                gc_listed.clone(),
                backup_touched_more.clone(),
                touches.clone(),
            );
            Box::new(move || match touches.fetch_add(1, Ordering::SeqCst) {
                0 => {
                    touching.set();
                    listed.wait();
                }
                40 => more.set(),
                _ => {}
            })
        },
        on_list_chunks: Box::new(|| {}),
    });
    let gc_backend: Arc<dyn WriteBackend> = Arc::new(Hooked {
        inner: LocalBackend::new(&vdir),
        on_touch: Box::new(|| {}),
        on_list_chunks: {
            let (listed, more) = (gc_listed.clone(), backup_touched_more.clone());
            Box::new(move || {
                listed.set();
                more.wait();
            })
        },
    });
    let backup_vault = Vault::open(backup_backend, || Ok(Vec::new())).unwrap();
    let gc_vault = Vault::open(gc_backend, || Ok(Vec::new())).unwrap();

    let (a, report) = std::thread::scope(|s| {
        let backup = s.spawn(|| {
            let one_worker = BackupOptions {
                workers: 1,
                ..BackupOptions::default()
            };
            backup_image_vm(
                &backup_vault,
                &description(dir, "a", "x.raw"),
                &one_worker,
                &NoProgress,
            )
        });
        backup_touching.wait();
        let report = gc_vault.gc(&mut |_| {}).unwrap();
        (backup.join().unwrap().unwrap(), report)
    });
    assert!(touches.load(Ordering::SeqCst) > 40);
    assert!(report.chunks_spared >= 41, "{report:?}");
    assert!(
        report.chunks_removed >= 32,
        "y's chunks are garbage: {report:?}"
    );
    assert!(a.stats.chunks_reused >= 41, "{:?}", a.stats);

    let v = verify(
        &vault,
        &VerifyOptions {
            read_data: true,
            ..VerifyOptions::default()
        },
        &NoProgress,
    )
    .unwrap();
    assert!(v.is_clean(), "{:?}", v.problems);
    let out = dir.join("r.raw");
    restore_disk(
        &vault,
        &a,
        &a.disks[0],
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(dir.join("x.raw")).unwrap()
    );
}

/// Records the messages a backup reports.
#[derive(Default)]
struct Messages(Mutex<Vec<String>>);

impl Progress for Messages {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn message(&self, m: &str) {
        self.0.lock().unwrap().push(m.to_string());
    }
}

#[test]
fn a_backup_waits_while_gc_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vdir = dir.join("vault");
    let backend: Arc<dyn WriteBackend> = Arc::new(LocalBackend::new(&vdir));
    let vault = Vault::create(backend, CreateOptions::default()).unwrap();
    random_image(&dir.join("x.raw"), 1 << 20, 2);
    // A gc lock as a running collection holds it: written by a live process (this one).
    let gc_vault = open(&vdir);
    let (tx, rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let (_guard, _cutoff) = gc_vault.lock_gc(&mut |_| {}).unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    });
    rx.recv().unwrap();
    let messages = Messages::default();
    let started = std::time::Instant::now();
    backup_image_vm(
        &vault,
        &description(dir, "a", "x.raw"),
        &BackupOptions::default(),
        &messages,
    )
    .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the backup waited"
    );
    let said = messages.0.lock().unwrap().join("\n");
    assert!(said.contains("waiting for garbage collection"), "{said}");
    holder.join().unwrap();
}
