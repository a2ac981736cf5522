//! The qcow2 writer: what it writes, qemu-img checks and compares.

use super::*;

#[test]
fn writer_output_passes_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    restore_and_check(dir.path(), "small", 5 * M + 7 * 512, 3);
    restore_and_check(dir.path(), "aligned", 16 * M, 4);
    restore_and_check(dir.path(), "tiny", 512, 5);
    restore_and_check(dir.path(), "empty", 0, 6);
}

#[test]
fn writer_spreads_over_several_l2_tables() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * G / 2 + 4096;
    let out = dir.path().join("wide.qcow2");
    let w = Qcow2Writer::create(&out, size, false).unwrap();
    let piece = vec![0x99u8; M as usize];
    let mut at_end = vec![0x98u8; (M + 4096) as usize];
    at_end[0] = 1;
    w.write_at(&at_end, size - (M + 4096)).unwrap();
    w.write_at(&piece, 600 * M).unwrap();
    w.write_at(&piece, 0).unwrap();
    w.write_zeros(M, 599 * M).unwrap();
    w.finish().unwrap();
    // Finishing twice changes nothing; writing after finishing is refused.
    w.finish().unwrap();
    assert!(w.write_at(&piece, 2 * M).is_err());
    let check = qemu_img(&["check", "-f", "qcow2", s(&out)]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = open(&out);
    assert_eq!(r.size(), size);
    check_map(&out, r.as_ref());
    assert_eq!(r.allocated_bytes().unwrap(), 3 * M + 4096);
    let mut buf = vec![0u8; M as usize];
    r.read_at(&mut buf, 600 * M).unwrap();
    assert!(buf.iter().all(|&b| b == 0x99));
    r.read_at(&mut buf, 700 * M).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut tail = vec![0u8; (M + 4096) as usize];
    r.read_at(&mut tail, size - (M + 4096)).unwrap();
    assert_same(&tail, &at_end, "tail");
}

/// Over 32768 host clusters (2 GiB of data): the refcounts need a second refcount block,
/// which must count itself.
#[test]
fn writer_needs_several_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * G;
    let out = dir.path().join("full.qcow2");
    let w = Qcow2Writer::create(&out, size, false).unwrap();
    let mut piece = vec![0u8; M as usize];
    let written = 2 * G + 64 * M;
    // Backwards, so that host clusters run opposite to guest clusters.
    for i in (0..written / M).rev() {
        piece.fill(i as u8 | 1);
        piece[..8].copy_from_slice(&i.to_be_bytes());
        w.write_at(&piece, i * M).unwrap();
    }
    w.finish().unwrap();
    let check = qemu_img(&["check", "-f", "qcow2", s(&out)]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = open(&out);
    assert_eq!(r.allocated_bytes().unwrap(), written);
    check_map(&out, r.as_ref());
    for i in [0, 1, 1000, written / M - 1] {
        r.read_at(&mut piece, i * M).unwrap();
        assert_eq!(piece[..8], i.to_be_bytes());
        assert!(piece[8..].iter().all(|&b| b == i as u8 | 1));
    }
    assert!(!r.may_have_data(written, size - written).unwrap());
}
