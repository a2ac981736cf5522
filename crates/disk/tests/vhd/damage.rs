//! Bad vhd images: refused with a clear error, never a panic, a hang or an unbounded allocation.

use super::*;

#[test]
fn vhd_broken_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let child = |id: u8, parent_id: [u8; 16], locator: &str| Child {
        size,
        block_size: 2 * MIB as u32,
        unique_id: [id; 16],
        parent_id,
        parent_name: String::new(),
        locators: vec![(*b"W2ru", utf16le(locator))],
        blocks: vec![(1, vec![0xff; 512], vec![id; 2 * MIB as usize])],
    };
    // a -> b -> a
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    child(0xa, [0xb; 16], ".\\b.vhd").write(&a);
    child(0xb, [0xa; 16], ".\\a.vhd").write(&b);
    assert_invalid(vmvault_disk::open(&a, "auto"), "loops");
    // a -> a
    child(0xa, [0xa; 16], ".\\a.vhd").write(&a);
    assert_invalid(vmvault_disk::open(&a, "vhd"), "loops");
    // A missing parent says where it was looked for.
    child(0xa, [0xb; 16], ".\\gone.vhd").write(&a);
    let msg = assert_invalid(vmvault_disk::open(&a, "vhd"), "parent image not found");
    assert!(msg.contains("gone.vhd"), "{msg}");
    // A parent that is not the one the child was made from.
    let c = dir.path().join("c.vhd");
    qemu_img(&["create", "-q", "-f", "vpc"], &[&c, Path::new("4M")]);
    child(0xa, [0xb; 16], ".\\c.vhd").write(&a);
    assert_invalid(vmvault_disk::open(&a, "vhd"), "unique id");
    // Only locators vmvault does not follow.
    let mut only_old = child(0xa, [0xb; 16], "");
    only_old.locators = vec![(*b"Wi2k", b"C:\\old.vhd".to_vec())];
    only_old.write(&a);
    let msg = assert_invalid(vmvault_disk::open(&a, "vhd"), "parent");
    assert!(msg.contains("Wi2k"), "{msg}");
    // A locator past the end of the file.
    child(0xa, [0xb; 16], ".\\b.vhd").write(&a);
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[512 + 576 + 16..512 + 576 + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    fix_header_checksum(&mut bytes);
    std::fs::write(&a, &bytes).unwrap();
    assert_invalid(vmvault_disk::open(&a, "vhd"), "parent locator 0");
}

#[test]
fn vhd_bad_images_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, 16 * MIB, 6);
    let dynamic = dir.path().join("d.vhd");
    qemu_img(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ],
        &[&src, &dynamic],
    );
    let fixed = dir.path().join("f.vhd");
    qemu_img(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
        ],
        &[&src, &fixed],
    );
    let good_d = std::fs::read(&dynamic).unwrap();
    let good_f = std::fs::read(&fixed).unwrap();
    let bad = dir.path().join("bad.vhd");
    let try_bytes = |bytes: &[u8], needle: &str| -> String {
        std::fs::write(&bad, bytes).unwrap();
        assert_invalid(vmvault_disk::open(&bad, "vhd"), needle)
    };

    // Truncated at several points.
    let len = good_d.len();
    for cut in [0, 1, 511, 600, 1536 + 4, 4096, len / 2, len - 513] {
        try_bytes(&good_d[..cut], "");
    }
    try_bytes(&good_d[..4096], "past the end");
    try_bytes(&good_d[..len / 2], "truncated");
    for cut in [0, 100, 4096, good_f.len() / 2, good_f.len() - 1] {
        try_bytes(&good_f[..cut], "");
    }
    // A fixed disk that lost data but kept its footer.
    let mut short = good_f[..good_f.len() - 512 - 4096].to_vec();
    short.extend_from_slice(&good_f[good_f.len() - 512..]);
    try_bytes(&short, "truncated");

    // Checksums.
    let mut b = good_d.clone();
    b[48] ^= 1;
    try_bytes(&b, "checksum");
    let mut b = good_d.clone();
    b[512 + 40] ^= 1;
    try_bytes(&b, "checksum");
    let mut b = good_f.clone();
    let at = b.len() - 512;
    b[at + 30] ^= 0x20;
    try_bytes(&b, "checksum");

    // Flipped fields, checksums fixed so that the field itself is what is refused.
    let edit_footer = |f: &dyn Fn(&mut [u8]), fixed_disk: bool| {
        let mut b = if fixed_disk {
            good_f.clone()
        } else {
            good_d.clone()
        };
        let at = if fixed_disk { b.len() - 512 } else { 0 };
        f(&mut b[at..at + 512]);
        fix_footer_checksum(&mut b, at);
        b
    };
    let edit_header = |f: &dyn Fn(&mut [u8])| {
        let mut b = good_d.clone();
        f(&mut b[512..1536]);
        fix_header_checksum(&mut b);
        b
    };
    try_bytes(&edit_footer(&|f| f[12] = 2, false), "version");
    try_bytes(&edit_footer(&|f| f[63] = 7, false), "disk type 7");
    try_bytes(&edit_footer(&|f| f[63] = 1, true), "disk type 1");
    try_bytes(&edit_header(&|h| h[7] = b'f'), "cxsparse");
    try_bytes(&edit_header(&|h| h[25] = 3), "version");
    try_bytes(
        &edit_header(&|h| h[32..36].copy_from_slice(&3000u32.to_be_bytes())),
        "block size",
    );
    try_bytes(
        &edit_header(&|h| h[28..32].copy_from_slice(&1u32.to_be_bytes())),
        "too few",
    );
    // Tables pointing past the end.
    try_bytes(
        &edit_footer(
            &|f| f[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes()),
            false,
        ),
        "dynamic disk header at offset",
    );
    try_bytes(
        &edit_footer(
            &|f| f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()),
            false,
        ),
        "past the end",
    );
    try_bytes(
        &edit_header(&|h| h[16..24].copy_from_slice(&(1u64 << 33).to_be_bytes())),
        "block allocation table at offset",
    );
    let mut b = good_d.clone();
    b[1536..1540].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    try_bytes(&b, "block 0 at offset");
    let mut b = good_d.clone();
    b[1536..1540].copy_from_slice(&1u32.to_be_bytes());
    try_bytes(&b, "overlaps");
    // Absurd virtual sizes.
    for size in [u64::MAX, 1 << 60, 1 << 49] {
        let big = edit_footer(&|f| f[48..56].copy_from_slice(&size.to_be_bytes()), false);
        try_bytes(&big, "");
        try_bytes(
            &edit_footer(&|f| f[48..56].copy_from_slice(&size.to_be_bytes()), true),
            "truncated",
        );
    }
    try_bytes(
        &edit_footer(
            &|f| f[48..56].copy_from_slice(&(1u64 << 49).to_be_bytes()),
            false,
        ),
        "absurd",
    );
    try_bytes(
        &edit_footer(
            &|f| f[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes()),
            false,
        ),
        "too few",
    );
    // No footer at all.
    let mut garbage = vec![0u8; 8192];
    Rng(7).fill(&mut garbage);
    try_bytes(&garbage, "no footer");

    // Damage the reader tolerates: the footer at the end lost (the copy at 0 is used), or
    // the copy at 0 lost (the end's is used).
    let mut b = good_d.clone();
    b.truncate(len - 512);
    std::fs::write(&bad, &b).unwrap();
    let want = std::fs::read(&src).unwrap();
    let r = vmvault_disk::open(&bad, "vhd").unwrap();
    assert_eq!(read_all(r.as_ref(), MIB as usize), want);
    let mut b = good_d.clone();
    b[..512].fill(0);
    std::fs::write(&bad, &b).unwrap();
    let r = vmvault_disk::open(&bad, "vhd").unwrap();
    assert_eq!(read_all(r.as_ref(), MIB as usize), want);

    // Not a file.
    assert!(matches!(
        vmvault_disk::open(dir.path(), "vhd"),
        Err(DiskError::NotADisk { .. })
    ));
}
