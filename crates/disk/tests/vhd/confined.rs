//! A differencing VHD's parent locators are paths the image's writer chose: a parent outside
//! the child's folder is refused unless its folder is allowed (see backing_files_are_confined).

use super::*;

fn child_of(base: &Path, locators: Vec<Locator>) -> Child {
    Child {
        size: 4 * MIB,
        block_size: 2 * MIB as u32,
        unique_id: [0x42; 16],
        parent_id: unique_id(base),
        parent_name: "base.vhd".into(),
        locators,
        blocks: Vec::new(),
    }
}

#[test]
fn a_parent_outside_the_childs_folder_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let base = other.path().join("base.vhd");
    qemu_img(&["create", "-q", "-f", "vpc"], &[&base, Path::new("4M")]);
    let abs = base.canonicalize().unwrap();
    let child = dir.path().join("child.vhd");
    child_of(&base, vec![(*b"W2ku", utf16le(abs.to_str().unwrap()))]).write(&child);
    let err = match vmvault_disk::open(&child, "vhd") {
        Ok(_) => panic!("opened a parent outside the folder"),
        Err(e) => e,
    };
    assert!(matches!(err, DiskError::Confined { .. }), "{err}");
    assert!(err.to_string().contains(abs.to_str().unwrap()), "{err}");
    let r = vmvault_disk::open_allowing(&child, "vhd", &[other.path().into()]).unwrap();
    assert_eq!(r.backing().unwrap().path().canonicalize().unwrap(), abs);
    // A host file named by a locator is refused before a byte of it is read.
    child_of(&base, vec![(*b"W2ku", utf16le("/etc/passwd"))]).write(&child);
    let err = vmvault_disk::open(&child, "vhd").err().expect("refused");
    assert!(matches!(err, DiskError::Confined { .. }), "{err}");
    // A copy beside the child is still found when a stale locator points outside.
    std::fs::copy(&base, dir.path().join("base.vhd")).unwrap();
    child_of(&base, vec![(*b"W2ku", utf16le(abs.to_str().unwrap()))]).write(&child);
    let r = vmvault_disk::open(&child, "vhd").unwrap();
    assert_eq!(
        r.backing().unwrap().path().canonicalize().unwrap(),
        dir.path().join("base.vhd").canonicalize().unwrap()
    );
}
