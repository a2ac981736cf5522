//! Backups of QEMU VMs against a real QEMU (TCG, no guest OS: the guest's writes are made
//! through QEMU's `qemu-io` on the guest's own device, which is what a guest's writes are to
//! the block layer). A second QMP monitor writes while the backup holds the first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::json;
use vmvault_engine::{
    backup_running_vm, backup_stopped_vm, restore_disk, BackupOptions, DiskDescription, Progress,
    RestoreOptions, RunningVm,
};
use vmvault_format::{Consistency, Manifest};
use vmvault_qemu::Qmp;
use vmvault_store::faulty::{Faults, Faulty};
use vmvault_store::{CreateOptions, Kind, LocalBackend, Vault, WriteBackend};
use vmvault_testkit::random_bytes;
use vmvault_testkit::QemuVm;

const QCOW2_SIZE: usize = 24 << 20;
const RAW_SIZE: usize = 12 << 20;

fn vault(faulty: Arc<Faulty>) -> Vault {
    let backend: Arc<dyn WriteBackend> = faulty;
    let opts = CreateOptions {
        passphrase: Some(b"pw".to_vec()),
        kdf: vmvault_format::KdfParams {
            memory_kib: 64,
            time: 1,
            parallelism: 1,
        },
        ..CreateOptions::default()
    };
    Vault::create(backend, opts).unwrap()
}

/// Collects messages; runs `on_start` (once) when the first disk starts being read, which is
/// after the instant was taken.
#[derive(Default)]
struct Recorder {
    messages: Mutex<Vec<String>>,
    on_start: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Progress for Recorder {
    fn start(&self, _: &str, _: u64) {
        if let Some(f) = self.on_start.lock().unwrap().take() {
            f();
        }
    }
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn message(&self, text: &str) {
        self.messages.lock().unwrap().push(text.to_string());
    }
}

impl Recorder {
    fn said(&self, what: &str) -> bool {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains(what))
    }
}

struct Setup {
    dir: tempfile::TempDir,
    vault: Vault,
    faulty: Arc<Faulty>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalBackend::new(dir.path().join("vault")));
        let faulty = Arc::new(Faulty::new(local));
        let vault = vault(faulty.clone());
        Setup { dir, vault, faulty }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A qcow2 and a raw disk with random contents (and a hole in each).
    fn make_disks(&self) -> (Vec<u8>, Vec<u8>) {
        let mut q = random_bytes(QCOW2_SIZE, 1);
        q[4 << 20..8 << 20].fill(0);
        let mut r = random_bytes(RAW_SIZE, 2);
        r[2 << 20..3 << 20].fill(0);
        std::fs::write(self.path("os.raw"), &q).unwrap();
        let st = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(self.path("os.raw"))
            .arg(self.path("os.qcow2"))
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::remove_file(self.path("os.raw")).unwrap();
        std::fs::write(self.path("data.raw"), &r).unwrap();
        (q, r)
    }

    /// A VM named web01 with both disks, and a second monitor at `monitor2.sock`.
    fn start_vm(&self) -> Option<QemuVm> {
        let os = format!(
            "driver=qcow2,node-name=drive0,file.driver=file,file.filename={}",
            self.path("os.qcow2").display()
        );
        let data = format!(
            "driver=file,node-name=drive1,filename={}",
            self.path("data.raw").display()
        );
        let second = format!(
            "unix:{},server=on,wait=off",
            self.path("monitor2.sock").display()
        );
        let _ = std::fs::remove_file(self.path("monitor2.sock"));
        let vm = QemuVm::start(
            0,
            &[
                "-name",
                "web01",
                "-blockdev",
                &os,
                "-blockdev",
                &data,
                "-device",
                "virtio-blk-pci,drive=drive0,id=vblk0",
                "-device",
                "virtio-blk-pci,drive=drive1,id=vblk1",
                "-qmp",
                &second,
            ],
        )?;
        // Running, as the VMs users back up are (SeaBIOS finds nothing to boot and waits).
        let mut qmp = Qmp::connect(&vm.qmp_socket()).unwrap();
        qmp.execute("cont", json!({})).unwrap();
        Some(vm)
    }

    fn backup(&self, vm: &QemuVm, progress: &Recorder) -> vmvault_engine::Result<Manifest> {
        let running = RunningVm {
            qmp: vm.qmp_socket(),
            name: None,
            scratch: self.dir.path().to_path_buf(),
            quiesce: None,
        };
        backup_running_vm(&self.vault, running, &BackupOptions::default(), progress)
    }

    fn restored(&self, m: &Manifest, disk: &str) -> Vec<u8> {
        let out = self.path(&format!("restored-{disk}.raw"));
        let opts = RestoreOptions {
            overwrite: true,
            format: Some("raw".into()),
            ..RestoreOptions::default()
        };
        let record = m.disks.iter().find(|d| d.name == disk).unwrap();
        restore_disk(
            &self.vault,
            m,
            record,
            &out,
            &opts,
            &vmvault_engine::NoProgress,
        )
        .unwrap();
        std::fs::read(out).unwrap()
    }
}

/// Writes `pattern` over `[offset, offset + len)` of the guest device `device` through the
/// second monitor, the way the guest's own writes reach the disk.
fn guest_write(monitor: &Path, device: &str, pattern: u8, offset: usize, len: usize) {
    let mut qmp = Qmp::connect(monitor).unwrap();
    let cmd =
        format!("qemu-io -d {device}/virtio-backend \"write -P {pattern:#x} {offset} {len}\"");
    let out = qmp
        .execute("human-monitor-command", json!({ "command-line": cmd }))
        .unwrap();
    assert!(
        !out.as_str().unwrap_or("").contains("error"),
        "qemu-io: {out}"
    );
}

fn apply(data: &mut [u8], pattern: u8, offset: usize, len: usize) {
    data[offset..offset + len].fill(pattern);
}

#[test]
fn a_running_vm_is_backed_up_at_one_instant_and_then_only_what_changed_is_read() {
    let s = Setup::new();
    let (mut os, mut data) = s.make_disks();
    let Some(vm) = s.start_vm() else { return };
    let monitor = s.path("monitor2.sock");

    // The guest writes to both disks after the instant, before their blocks are read.
    let progress = Recorder::default();
    let m2 = monitor.clone();
    *progress.on_start.lock().unwrap() = Some(Box::new(move || {
        guest_write(&m2, "vblk0", 0xab, 1 << 20, 128 << 10);
        guest_write(&m2, "vblk0", 0xcd, 5 << 20, 64 << 10);
        guest_write(&m2, "vblk1", 0xef, 0, 64 << 10);
    }));
    let first = s.backup(&vm, &progress).unwrap();
    assert_eq!(first.vm, "web01", "the name comes from QEMU's -name");
    assert_eq!(first.source, "qemu");
    assert_eq!(first.consistency, Consistency::Crash);
    assert!(
        first.consistency_reason.contains("no guest agent"),
        "{}",
        first.consistency_reason
    );
    assert_eq!(first.vm_config.disks.len(), 2);
    assert_eq!(first.disks[0].format, "qcow2");
    assert_eq!(first.disks[1].format, "raw");
    assert!(progress.said("disk vblk0: reading it whole: no changed-block tracking yet"));
    // The point is the disks at the instant, not the guest's later writes.
    assert!(
        s.restored(&first, "vblk0") == os,
        "vblk0 is the disk at the instant"
    );
    assert!(
        s.restored(&first, "vblk1") == data,
        "vblk1 is the disk at the instant"
    );
    apply(&mut os, 0xab, 1 << 20, 128 << 10);
    apply(&mut os, 0xcd, 5 << 20, 64 << 10);
    apply(&mut data, 0xef, 0, 64 << 10);

    // The second backup reads only what those writes touched, at the bitmap's granularity
    // (64 KiB): the rest of each chunk comes from the first point's chunk in the vault.
    let progress = Recorder::default();
    let second = s.backup(&vm, &progress).unwrap();
    assert!(progress.said("disk vblk0: reading only what changed since"));
    assert!(progress.said("disk vblk1: reading only what changed since"));
    assert_eq!(
        second.disks[0].stats.bytes_read,
        192 << 10,
        "{:?}",
        second.disks[0].stats
    );
    assert_eq!(
        second.disks[1].stats.bytes_read,
        64 << 10,
        "{:?}",
        second.disks[1].stats
    );
    assert!(s.restored(&second, "vblk0") == os);
    assert!(s.restored(&second, "vblk1") == data);
    // No leftovers in QEMU: nodes, jobs, exports, and one tracking bitmap per disk.
    let mut qmp = Qmp::connect(&monitor).unwrap();
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    assert!(!nodes.to_string().contains("vmvault-pit"), "{nodes}");
    let disks = vmvault_qemu::block::disks(&mut qmp).unwrap();
    for d in &disks {
        let ours: Vec<_> = d
            .bitmaps
            .iter()
            .filter(|b| b.name.starts_with("vmvault."))
            .collect();
        assert_eq!(ours.len(), 1, "{:?}", d.bitmaps);
        assert!(ours[0].name.ends_with(&second.id.to_hex()));
        assert!(ours[0].recording);
        assert_eq!(
            ours[0].persistent,
            d.name == "vblk0",
            "persistent on qcow2 only"
        );
        // Gone: the next backup cannot trust anything and reads the disk whole.
        vmvault_qemu::bitmap::remove(&mut qmp, &d.node, &ours[0].name).unwrap();
    }
    drop(qmp);

    // An incremental point is the same as a full re-read of the same disks.
    let progress = Recorder::default();
    let full = s.backup(&vm, &progress).unwrap();
    assert!(progress.said("disk vblk0: reading it whole"));
    assert!(full.stats.bytes_read > 20 << 20, "{:?}", full.stats);
    assert_eq!(
        full.disks[0].index, second.disks[0].index,
        "same chunks, same index"
    );
    assert_eq!(
        full.disks[1].index, second.disks[1].index,
        "same chunks, same index"
    );
}

#[test]
fn tracking_survives_a_restart_and_a_stopped_vm_is_backed_up_from_its_images() {
    let s = Setup::new();
    let (mut os, mut data) = s.make_disks();
    let Some(mut vm) = s.start_vm() else { return };
    let first = s.backup(&vm, &Recorder::default()).unwrap();
    guest_write(&s.path("monitor2.sock"), "vblk0", 0x11, 9 << 20, 4096);
    apply(&mut os, 0x11, 9 << 20, 4096);
    let mut qmp = Qmp::connect(&s.path("monitor2.sock")).unwrap();
    qmp.execute("quit", json!({})).unwrap();
    assert!(vm.wait_exit(std::time::Duration::from_secs(20)));
    drop(vm);

    // Stopped: the qcow2's bitmap is used through our own paused QEMU; the raw disk is read
    // whole. The point says it is crash-consistent and why.
    let progress = Recorder::default();
    let disks = vec![
        DiskDescription {
            name: "vblk0".into(),
            path: s.path("os.qcow2"),
            format: "qcow2".into(),
            bus: "virtio".into(),
            allow_backing: Vec::new(),
        },
        DiskDescription {
            name: "vblk1".into(),
            path: s.path("data.raw"),
            format: "raw".into(),
            bus: "virtio".into(),
            allow_backing: Vec::new(),
        },
    ];
    let stopped = backup_stopped_vm(
        &s.vault,
        "web01",
        &disks,
        s.dir.path(),
        &BackupOptions::default(),
        &progress,
    );
    let stopped = match stopped {
        Ok(m) => m,
        Err(e) => panic!("{e}: {:?}", progress.messages.lock().unwrap()),
    };
    assert!(stopped.consistency_reason.contains("stopped"));
    assert!(progress.said("disk vblk0: reading only what changed since"));
    assert!(progress.said("disk vblk1: reading it whole"));
    assert_eq!(stopped.disks[0].stats.bytes_read, 64 << 10);
    // The raw file is not sparse: its zeros are read too.
    assert_eq!(stopped.disks[1].stats.bytes_read as usize, RAW_SIZE);
    assert!(s.restored(&stopped, "vblk0") == os);
    assert!(s.restored(&stopped, "vblk1") == data);
    let _ = first;

    // Started again: the bitmap the stopped backup left in the image records the new writes.
    let Some(vm) = s.start_vm() else { return };
    guest_write(&s.path("monitor2.sock"), "vblk0", 0x22, 0, 4096);
    guest_write(&s.path("monitor2.sock"), "vblk1", 0x33, 0, 4096);
    apply(&mut os, 0x22, 0, 4096);
    apply(&mut data, 0x33, 0, 4096);
    let progress = Recorder::default();
    let third = s.backup(&vm, &progress).unwrap();
    assert_eq!(
        third.disks[0].stats.bytes_read,
        64 << 10,
        "{:?}",
        progress.messages
    );
    assert!(progress.said("disk vblk1: reading it whole: no changed-block tracking (a raw disk"));
    assert!(s.restored(&third, "vblk0") == os);
    assert!(s.restored(&third, "vblk1") == data);
}

#[test]
fn a_failed_backup_loses_no_change_and_a_gone_point_means_a_full_read() {
    let s = Setup::new();
    let (mut os, _) = s.make_disks();
    let Some(vm) = s.start_vm() else { return };
    let monitor = s.path("monitor2.sock");
    let first = s.backup(&vm, &Recorder::default()).unwrap();

    // A backup that fails after its instant (the scratch folder is gone: the fleece cannot be
    // made) and one that fails while reading (the point's index cannot be saved: read-only
    // vault) both leave the changes tracked.
    guest_write(&monitor, "vblk0", 0x44, 3 << 20, 4096);
    apply(&mut os, 0x44, 3 << 20, 4096);
    let gone = RunningVm {
        qmp: vm.qmp_socket(),
        name: None,
        scratch: s.path("no-such-folder"),
        quiesce: None,
    };
    assert!(backup_running_vm(
        &s.vault,
        gone,
        &BackupOptions::default(),
        &Recorder::default()
    )
    .is_err());
    let progress = Recorder::default();
    let m2 = monitor.clone();
    *progress.on_start.lock().unwrap() = Some(Box::new(move || {
        // Written after the failed backup's instant: in its new bitmap, folded back.
        guest_write(&m2, "vblk0", 0x55, 7 << 20, 4096);
    }));
    apply(&mut os, 0x55, 7 << 20, 4096);
    s.faulty.set(Faults {
        refuse_writes_of: Some(Kind::Point),
        ..Faults::default()
    });
    let failed = s.backup(&vm, &progress);
    s.faulty.set(Faults::default());
    assert!(failed.is_err(), "the point could not be written");

    let next = s.backup(&vm, &Recorder::default()).unwrap();
    assert!(
        s.restored(&next, "vblk0") == os,
        "every change since the first point is in"
    );
    assert!(
        next.disks[0].stats.bytes_read <= 3 << 20,
        "{:?}",
        next.disks[0].stats
    );

    // The vault lost the chunks a backup would keep or patch from: they are read whole from
    // the disk instead, and the point is still right.
    std::fs::remove_dir_all(s.path("vault/chunks")).unwrap();
    guest_write(&monitor, "vblk0", 0x66, 11 << 20, 4096);
    apply(&mut os, 0x66, 11 << 20, 4096);
    let progress = Recorder::default();
    let next = s.backup(&vm, &progress).unwrap();
    assert!(
        progress.said("missing from the vault or unreadable"),
        "{:?}",
        progress.messages
    );
    assert!(s.restored(&next, "vblk0") == os);

    // The point the tracking follows is removed: the next backup reads the whole disk.
    s.vault.set_soft_delete_days(0).unwrap();
    s.vault
        .delete_point(&next.id, "test", "point delete")
        .unwrap();
    let progress = Recorder::default();
    let after = s.backup(&vm, &progress).unwrap();
    assert!(progress.said("the recovery point its tracking started from is gone"));
    assert!(s.restored(&after, "vblk0") == os);
    let _ = first;
}

/// The engine's side of quiescing, with a `Quiesce` of the test's own (the guest agent itself
/// is tested in vmvault-qemu and end to end): what the guest writes while quiesced is in the
/// point, what it writes after `end` is not; a failing `begin` or `end` fails the backup
/// without losing a change; a downgrade from `end` is what the point says.
#[test]
fn quiescing_brackets_the_instant_and_its_failures_fail_the_backup() {
    use vmvault_engine::{Quiesce, QuiesceEnd};

    struct Scripted {
        monitor: PathBuf,
        fail_begin: bool,
        fail_end: bool,
        downgrade: bool,
    }
    impl Quiesce for Scripted {
        fn begin(&mut self) -> vmvault_engine::Result<(Consistency, String)> {
            if self.fail_begin {
                return Err(vmvault_engine::EngineError::Input(
                    "pre-script failed".into(),
                ));
            }
            // The application's last words before the instant.
            guest_write(&self.monitor, "vblk0", 0x77, 13 << 20, 4096);
            Ok((Consistency::Application, String::new()))
        }
        fn end(&mut self) -> vmvault_engine::Result<QuiesceEnd> {
            guest_write(&self.monitor, "vblk0", 0x88, 14 << 20, 4096);
            if self.fail_end {
                return Err(vmvault_engine::EngineError::Input(
                    "post-script failed".into(),
                ));
            }
            Ok(QuiesceEnd {
                downgrade: self.downgrade.then(|| {
                    (
                        Consistency::Filesystem,
                        "the post-script failed".to_string(),
                    )
                }),
                ..QuiesceEnd::default()
            })
        }
    }

    let s = Setup::new();
    let (mut os, _) = s.make_disks();
    let Some(vm) = s.start_vm() else { return };
    let monitor = s.path("monitor2.sock");
    let run = |q: &mut Scripted| {
        let running = RunningVm {
            qmp: vm.qmp_socket(),
            name: None,
            scratch: s.dir.path().to_path_buf(),
            quiesce: Some(q),
        };
        backup_running_vm(
            &s.vault,
            running,
            &BackupOptions::default(),
            &Recorder::default(),
        )
    };
    let mut q = Scripted {
        monitor: monitor.clone(),
        fail_begin: false,
        fail_end: false,
        downgrade: false,
    };
    let first = run(&mut q).unwrap();
    assert_eq!(first.consistency, Consistency::Application);
    assert_eq!(first.consistency_reason, "");
    let mut at_instant = os.clone();
    apply(&mut at_instant, 0x77, 13 << 20, 4096);
    assert!(
        s.restored(&first, "vblk0") == at_instant,
        "begin's write in, end's out"
    );
    apply(&mut os, 0x77, 13 << 20, 4096);
    apply(&mut os, 0x88, 14 << 20, 4096);

    q.fail_begin = true;
    assert!(run(&mut q).is_err());
    q.fail_begin = false;
    q.fail_end = true;
    assert!(run(&mut q).is_err());
    q.fail_end = false;
    q.downgrade = true;
    let next = run(&mut q).unwrap();
    assert_eq!(next.consistency, Consistency::Filesystem);
    assert_eq!(next.consistency_reason, "the post-script failed");
    // The failed backups lost nothing: every write before this instant is in.
    assert!(s.restored(&next, "vblk0") == os);
}
