//! The client against QEMU's own NBD server, `qemu-nbd`: a qcow2 image with data, holes and a
//! persistent dirty bitmap, read back and asked for its allocation and its dirty extents.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmvault_nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use vmvault_nbd::{Client, ConnectOptions, Extent, NbdError};

const MIB: u64 = 1 << 20;
const K64: u64 = 65536;

fn run(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} cannot run ({e}): qemu-utils must be installed"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A `qemu-nbd` serving an image on a unix socket; killed when dropped.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> QemuNbd {
        let socket = dir.join("qemu-nbd.sock");
        let child = Command::new("qemu-nbd")
            .arg(format!("--socket={}", socket.display()))
            .args(["--format=qcow2", "--read-only", "--persistent"])
            .args(extra)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-nbd (qemu-utils) is installed");
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, socket }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 40 MiB qcow2: 0x11 over the first MiB, then a persistent bitmap `bm0` is added and
/// 0xab is written at 2 MiB (64 KiB) and 0xcd at 35 MiB (128 KiB). Returns the expected bytes.
fn make_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = dir.join("disk.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "40M"]);
    run("qemu-io", &["-c", "write -q -P 0x11 0 1M", p]);
    run("qemu-img", &["bitmap", "--add", "--enable", p, "bm0"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -q -P 0xab 2M 64k",
            "-c",
            "write -q -P 0xcd 35M 128k",
            p,
        ],
    );
    let mut want = vec![0u8; 40 * MIB as usize];
    want[..MIB as usize].fill(0x11);
    want[2 * MIB as usize..(2 * MIB + K64) as usize].fill(0xab);
    want[35 * MIB as usize..(35 * MIB + 2 * K64) as usize].fill(0xcd);
    (img, want)
}

fn covered(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// The ranges whose flags satisfy `pick`, as (start, length).
fn ranges(extents: &[Extent], pick: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for e in extents {
        if pick(e.flags) {
            out.push((pos, e.len));
        }
        pos += e.len;
    }
    out
}

#[test]
fn reads_allocation_and_a_dirty_bitmap_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (img, want) = make_image(dir.path());
    let server = QemuNbd::start(dir.path(), &img, &["-B", "bm0"]);
    let opts = ConnectOptions {
        export: String::new(),
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:bm0".into()],
    };
    let mut c = Client::connect_unix(&server.socket, &opts).unwrap();
    assert_eq!(c.size(), 40 * MIB);
    assert!(c.read_only());
    assert!(c.structured_replies());

    // The whole disk in one call: more than qemu-nbd's 32 MiB maximum, so split in two.
    let mut got = vec![0xffu8; want.len()];
    c.read_at(0, &mut got).unwrap();
    assert!(got == want, "the bytes read differ from the image's");
    // An unaligned read across data and a hole.
    let mut small = vec![0xffu8; 5000];
    c.read_at(MIB - 1000, &mut small).unwrap();
    assert_eq!(
        &small[..],
        &want[(MIB - 1000) as usize..(MIB + 4000) as usize]
    );

    let alloc = c.block_status(0, c.size(), "base:allocation").unwrap();
    assert_eq!(covered(&alloc), 40 * MIB);
    assert_eq!(
        ranges(&alloc, |f| f & STATE_ZERO == 0),
        vec![(0, MIB), (2 * MIB, K64), (35 * MIB, 2 * K64)],
        "{alloc:?}"
    );
    assert!(
        ranges(&alloc, |f| f & STATE_HOLE != 0).contains(&(MIB, MIB)),
        "{alloc:?}"
    );

    // Only what was written after the bitmap was added is dirty.
    let dirty = c
        .block_status(0, c.size(), "qemu:dirty-bitmap:bm0")
        .unwrap();
    assert_eq!(covered(&dirty), 40 * MIB);
    assert_eq!(
        ranges(&dirty, |f| f & STATE_DIRTY != 0),
        vec![(2 * MIB, K64), (35 * MIB, 2 * K64)]
    );
    // A range inside the export, not starting at 0.
    let part = c
        .block_status(2 * MIB, MIB, "qemu:dirty-bitmap:bm0")
        .unwrap();
    assert_eq!(
        part,
        vec![
            Extent {
                len: K64,
                flags: STATE_DIRTY
            },
            Extent {
                len: MIB - K64,
                flags: 0
            }
        ]
    );

    // Reads past the end are refused before anything is sent; the connection stays usable.
    assert!(c.read_at(40 * MIB - 10, &mut [0u8; 20]).is_err());
    c.read_at(0, &mut small[..10]).unwrap();
    assert_eq!(&small[..10], &[0x11; 10]);
    // A read-only qemu-nbd refuses writes (with EINVAL and a message, where vmvault's server
    // says EPERM); the connection goes on.
    match c.write_at(0, &[0u8; 512]) {
        Err(NbdError::Command { message, .. }) => assert!(message.contains("read-only")),
        w => panic!("the write was not refused: {w:?}"),
    }
    c.read_at(0, &mut small[..10]).unwrap();
    assert_eq!(&small[..10], &[0x11; 10]);
    c.disconnect().unwrap();
}

#[test]
fn contexts_and_exports_the_server_lacks_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let server = QemuNbd::start(dir.path(), &img, &["-x", "snap"]);
    // qemu-nbd without -B offers no dirty bitmap.
    let opts = ConnectOptions {
        export: "snap".into(),
        meta_contexts: vec!["qemu:dirty-bitmap:bm0".into()],
    };
    match Client::connect_unix(&server.socket, &opts) {
        Err(NbdError::Unsupported(m)) => assert!(m.contains("qemu:dirty-bitmap:bm0"), "{m}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a missing bitmap was granted"),
    }
    let opts = ConnectOptions {
        export: "other".into(),
        meta_contexts: vec![],
    };
    match Client::connect_unix(&server.socket, &opts) {
        Err(e @ NbdError::Refused { .. }) => assert!(e.to_string().contains("GO"), "{e}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("an unknown export was opened"),
    }
    // The right name works, and block status needs a selected context.
    let opts = ConnectOptions {
        export: "snap".into(),
        meta_contexts: vec![],
    };
    let mut c = Client::connect_unix(&server.socket, &opts).unwrap();
    assert!(matches!(
        c.block_status(0, MIB, "base:allocation"),
        Err(NbdError::Unsupported(_))
    ));
    let mut b = [0u8; 4];
    c.read_at(2 * MIB, &mut b).unwrap();
    assert_eq!(b, [0xab; 4]);
}
