//! A differencing VHDX's parent locator holds paths the image's writer chose: a parent outside
//! the child's folder is refused unless its folder is allowed (see backing_files_are_confined).

use super::*;

#[test]
fn a_parent_outside_the_childs_folder_is_refused_unless_allowed() {
    let d = diff_pair();
    let other = tempfile::tempdir().unwrap();
    let moved = other.path().join("parent.vhdx");
    std::fs::rename(&d.parent, &moved).unwrap();
    let linkage = data_write_guid(&moved);
    let abs = moved.canonicalize().unwrap();
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", &linkage),
            ("absolute_win32_path", abs.to_str().unwrap()),
        ],
    );
    let err = open(&d.child).err().expect("a parent outside the folder");
    assert!(matches!(err, DiskError::Confined { .. }), "{err}");
    assert!(err.to_string().contains(abs.to_str().unwrap()), "{err}");
    let r = vmvault_disk::open_allowing(&d.child, "vhdx", &[other.path().into()]).unwrap();
    let mut want = d.parent_data.clone();
    for block in [1u64, 4, 5, 9] {
        let at = (block * MIB) as usize;
        want[at..at + MIB as usize].copy_from_slice(&d.child_data[at..at + MIB as usize]);
    }
    assert_same(&read_all(&*r), &want, "allowed parent");
}
