//! An image names the other files it reads: a qcow2 backing file, a VMDK's extents and
//! parent. Whoever writes the image (a tenant uploading it, a guest planting a header on a
//! disk read as "auto") chooses those names, so a backup that followed them would copy any
//! host file into the vault (`/etc/shadow`; the class of CVE-2022-47951). By default every
//! such file must lie in the image's own folder (or below it), symlinks resolved; other
//! folders are allowed by name.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmvault_disk::{DiskError, DiskReader};

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 of 1 MiB at `image` whose backing file is named `backing` (written as given,
/// unchecked, as an attacker would), read as `format`.
fn qcow2_over(image: &Path, backing: &str, format: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        format,
        s(image),
        "1M",
    ]);
}

/// [`qcow2_over`] a raw backing file.
fn qcow2_backed_by(image: &Path, backing: &str) {
    qcow2_over(image, backing, "raw");
}

fn refused(r: Result<Box<dyn DiskReader>, DiskError>, file: &str) -> String {
    let err = match r {
        Ok(r) => panic!("{} opened, pulling in {file}", r.path().display()),
        Err(e) => e,
    };
    assert!(matches!(err, DiskError::Confined { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(file), "{msg:?} should name {file}");
    assert!(
        msg.contains("allow_backing"),
        "{msg:?} should say how to allow it"
    );
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    msg
}

fn secret_folder() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let secret = d.path().join("shadow");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    (d, secret)
}

#[test]
fn a_qcow2_backing_file_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_other, secret) = secret_folder();
    let image = dir.path().join("x.qcow2");
    let depth = "../".repeat(dir.path().components().count());
    let relative = format!("{depth}{}", s(&secret).trim_start_matches('/'));
    for backing in [s(&secret).to_string(), relative, "/etc/passwd".to_string()] {
        qcow2_backed_by(&image, &backing);
        let file = if backing.starts_with("/etc") {
            "/etc/passwd".to_string()
        } else {
            secret.canonicalize().unwrap().display().to_string()
        };
        refused(vmvault_disk::open(&image, "qcow2"), &file);
        refused(vmvault_disk::open(&image, "auto"), &file);
    }
}

#[test]
fn a_symlink_beside_the_image_is_judged_by_what_it_points_at() {
    let dir = tempfile::tempdir().unwrap();
    let (_other, secret) = secret_folder();
    symlink(&secret, dir.path().join("base.raw")).unwrap();
    let image = dir.path().join("x.qcow2");
    qcow2_backed_by(&image, "base.raw");
    refused(
        vmvault_disk::open(&image, "qcow2"),
        s(&secret.canonicalize().unwrap()),
    );
}

#[test]
fn backing_files_in_the_folder_or_an_allowed_one_are_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bases")).unwrap();
    let base = dir.path().join("bases/base.raw");
    std::fs::write(&base, vec![0x11; 1 << 20]).unwrap();
    let image = dir.path().join("x.qcow2");
    qcow2_backed_by(&image, "bases/base.raw");
    let r = vmvault_disk::open(&image, "qcow2").unwrap();
    let mut buf = [0u8; 4];
    r.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0x11; 4]);
    assert_eq!(
        vmvault_disk::files(&*r),
        [image.canonicalize().unwrap(), base.canonicalize().unwrap()]
    );

    let (other, secret) = secret_folder();
    qcow2_backed_by(&image, s(&secret));
    refused(vmvault_disk::open(&image, "qcow2"), "shadow");
    let allow = [other.path().to_path_buf()];
    let r = vmvault_disk::open_allowing(&image, "qcow2", &allow).unwrap();
    r.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x5a; 4]);
    // Allowing a folder allows that folder, not its neighbours.
    let sibling = tempfile::tempdir().unwrap();
    refused(
        vmvault_disk::open_allowing(&image, "qcow2", &[sibling.path().into()]),
        "shadow",
    );
}

#[test]
fn every_link_of_a_chain_is_judged_against_the_top_images_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (other, secret) = secret_folder();
    // top (here) -> mid (here) -> the secret: the second link is the one that leaves.
    let mid = dir.path().join("mid.qcow2");
    qcow2_backed_by(&mid, s(&secret));
    let top = dir.path().join("top.qcow2");
    qcow2_over(&top, "mid.qcow2", "qcow2");
    refused(vmvault_disk::open(&top, "qcow2"), "shadow");
    let r = vmvault_disk::open_allowing(&top, "qcow2", &[other.path().into()]).unwrap();
    assert_eq!(vmvault_disk::files(&*r).len(), 3);
}

/// A VMDK descriptor naming `extents` (FLAT lines) of `sectors` sectors each.
fn vmdk_descriptor(path: &Path, extents: &[(&str, u64)], parent: Option<&str>) {
    let mut text = String::from("# Disk DescriptorFile\nversion=1\nCID=12345678\n");
    match parent {
        Some(p) => text.push_str(&format!(
            "parentCID=ffffffff\nparentFileNameHint=\"{p}\"\ncreateType=\"monolithicFlat\"\n"
        )),
        None => text.push_str("parentCID=ffffffff\ncreateType=\"monolithicFlat\"\n"),
    }
    text.push_str("\n# Extent description\n");
    for (file, sectors) in extents {
        text.push_str(&format!("RW {sectors} FLAT \"{file}\" 0\n"));
    }
    text.push_str("\nddb.virtualHWVersion = \"4\"\n");
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_vmdk_extent_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (other, secret) = secret_folder();
    std::fs::write(dir.path().join("own-flat.vmdk"), vec![7u8; 1 << 20]).unwrap();
    let image = dir.path().join("x.vmdk");
    let passwd_sectors = std::fs::metadata("/etc/passwd").unwrap().len() / 512;
    let depth = "../".repeat(dir.path().components().count());
    let passwd = format!("{depth}etc/passwd");
    let cases = [
        (vec![("own-flat.vmdk", 2048), (s(&secret), 2048)], "shadow"),
        (vec![(&*passwd, passwd_sectors.max(1))], "/etc/passwd"),
    ];
    for (extents, file) in cases {
        if extents.iter().any(|e| e.1 == 0) {
            continue;
        }
        vmdk_descriptor(&image, &extents, None);
        refused(vmvault_disk::open(&image, "vmdk"), file);
        refused(vmvault_disk::open(&image, "auto"), file);
    }
    vmdk_descriptor(&image, &[("own-flat.vmdk", 2048), (s(&secret), 2048)], None);
    let r = vmvault_disk::open_allowing(&image, "vmdk", &[other.path().into()]).unwrap();
    let files = vmvault_disk::files(&*r);
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.contains(&secret.canonicalize().unwrap()), "{files:?}");
}

#[test]
fn a_vmdk_parent_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (other, _) = secret_folder();
    let parent = other.path().join("parent.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&parent), "1M"]);
    let child = dir.path().join("child.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-u",
        "-b",
        s(&parent),
        "-F",
        "vmdk",
        s(&child),
        "1M",
    ]);
    refused(vmvault_disk::open(&child, "vmdk"), "parent.vmdk");
    vmvault_disk::open_allowing(&child, "vmdk", &[other.path().into()]).unwrap();
}

/// A block device's folder is `/dev`, which holds every disk of the host and `/dev/shm`: a
/// guest that writes a qcow2 header naming `/dev/shm/...` (or another VM's disk) onto its own
/// disk, read as "auto", must not get it read. Needs root (a loop device); skipped otherwise.
#[test]
fn a_block_device_lends_its_folder_to_no_backing_file() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root for a loop device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = PathBuf::from(format!("/dev/shm/vmvault-secret-{}", std::process::id()));
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let planted = dir.path().join("planted.qcow2");
    qcow2_backed_by(&planted, s(&secret));
    let disk = dir.path().join("guest-disk.raw");
    let mut bytes = std::fs::read(&planted).unwrap();
    bytes.resize(4 << 20, 0);
    std::fs::write(&disk, &bytes).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show", s(&disk)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let r = vmvault_disk::open(&dev, "auto");
    let allowed = vmvault_disk::open_allowing(&dev, "auto", &[PathBuf::from("/dev/shm")]);
    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    let _ = std::fs::remove_file(&secret);
    refused(r, s(&secret));
    // Allowed by name, it is read (the rule, not the chain, refused it).
    allowed.unwrap();
}
