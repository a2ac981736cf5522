//! Bad vmdk images: refused with a clear error, never a panic, a hang or an unbounded allocation.

use super::*;

#[test]
fn truncated_images_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 40 * MIB;
    make_raw(&raw, size, &regions(size), 41);
    let sparse = dir.path().join("sparse.vmdk");
    convert(&raw, &sparse, "monolithicSparse");
    let stream = dir.path().join("stream.vmdk");
    write_image(&raw, &stream, &pieces(size, &mut Rng(1)));
    for image in [&sparse, &stream] {
        let len = fs::metadata(image).unwrap().len();
        let gd = le64(image, 56);
        let mut cuts = vec![
            0,
            3,
            100,
            511,
            512,
            513,
            1024,
            20 * 512,
            65536,
            len / 3,
            len / 2,
            len - 1536,
            len - 512,
            len - 1,
        ];
        if gd != u64::MAX {
            cuts.push(gd * 512 + 2);
        }
        for cut in cuts {
            let t = copy_to(image, dir.path(), "cut.vmdk");
            OpenOptions::new()
                .write(true)
                .open(&t)
                .unwrap()
                .set_len(cut)
                .unwrap();
            match vmvault_disk::open(&t, "vmdk") {
                Err(DiskError::Invalid { detail, .. }) => assert!(!detail.is_empty()),
                Err(e) => panic!("{} cut at {cut}: expected Invalid, got {e:?}", p(image)),
                Ok(_) => panic!("{} cut at {cut} of {len} opened", p(image)),
            }
        }
    }
}

#[test]
fn damaged_headers_and_tables_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 40 * MIB;
    make_raw(&raw, size, &regions(size), 43);
    let good = dir.path().join("good.vmdk");
    convert(&raw, &good, "monolithicSparse");
    let len = fs::metadata(&good).unwrap().len();
    let gd = le64(&good, 56);
    let case = |name: &str, at: u64, bytes: &[u8]| {
        let t = copy_to(&good, dir.path(), name);
        patch(&t, at, bytes);
        t
    };
    assert_invalid(&case("magic", 0, b"XDMV"), "no KDMV magic");
    assert_unsupported(&case("cowd", 0, b"COWD"), "COWD");
    assert_unsupported(&case("v4", 4, &4u32.to_le_bytes()), "version 4");
    assert_invalid(&case("v0", 4, &0u32.to_le_bytes()), "version 0");
    assert_invalid(
        &case("cap", 12, &(1u64 << 60).to_le_bytes()),
        "absurd capacity",
    );
    assert_invalid(
        &case("cap2", 12, &(1u64 << 40).to_le_bytes()),
        "grain directory",
    );
    assert_invalid(&case("grain", 20, &3u64.to_le_bytes()), "power of two");
    assert_unsupported(&case("grain2", 20, &(1u64 << 20).to_le_bytes()), "grain of");
    assert_invalid(
        &case("gtes", 44, &0u32.to_le_bytes()),
        "entries per grain table",
    );
    assert_invalid(
        &case("gd", 56, &(len / 512).to_le_bytes()),
        "grain directory",
    );
    assert_invalid(&case("gd0", 56, &0u64.to_le_bytes()), "grain directory");
    assert_invalid(&case("gdend", 56, &u64::MAX.to_le_bytes()), "footer");
    assert_invalid(&case("newline", 73, b"\r\n"), "newline");
    assert_unsupported(
        &case("algo", 77, &7u16.to_le_bytes()),
        "compression algorithm 7",
    );
    assert_invalid(&case("desc", 28, &(len / 512).to_le_bytes()), "descriptor");
    // A grain directory entry, then a grain table entry, pointing past the end.
    assert_invalid(
        &case("gde", gd * 512, &u32::MAX.to_le_bytes()),
        "grain table 0",
    );
    let gt = le32(&good, gd * 512) as u64;
    assert_invalid(
        &case("gte", gt * 512, &((len / 512) as u32 + 7).to_le_bytes()),
        "points past the end",
    );
    // Corrupt compressed grain data opens, but reading it fails cleanly.
    let stream = dir.path().join("stream.vmdk");
    convert(&raw, &stream, "streamOptimized");
    let overhead = le64(&stream, 64) * 512;
    patch(&stream, overhead + 12, &[0xff; 64]);
    let r = open(&stream);
    let err = r.read_at(&mut vec![0u8; 65536], 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    patch(&stream, overhead, &77u64.to_le_bytes());
    let err = r.read_at(&mut vec![0u8; 65536], 0).unwrap_err();
    assert!(err.to_string().contains("sector 77"), "{err}");
    // Not an image at all.
    let junk = dir.path().join("junk.vmdk");
    fs::write(&junk, b"hello, world\n").unwrap();
    assert_invalid(&junk, "neither");
    let big = dir.path().join("big.vmdk");
    File::create(&big).unwrap().set_len(2 * MIB).unwrap();
    assert_invalid(&big, "too large for a descriptor");
}

#[test]
fn descriptor_files_with_bad_extents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("flat.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            p(&flat),
            "4M",
        ],
    );
    let text = fs::read_to_string(&flat).unwrap();
    let variant = |name: &str, from: &str, to: &str| {
        let path = dir.path().join(name);
        assert!(text.contains(from), "{text}");
        fs::write(&path, text.replace(from, to)).unwrap();
        path
    };
    assert_invalid(
        &variant("missing.vmdk", "\"flat-flat.vmdk\"", "\"gone-flat.vmdk\""),
        "gone-flat.vmdk",
    );
    assert_invalid(
        &variant("short.vmdk", "RW 8192 FLAT", "RW 8193 FLAT"),
        "shorter than",
    );
    assert_invalid(
        &variant(
            "offset.vmdk",
            "\"flat-flat.vmdk\" 0",
            "\"flat-flat.vmdk\" 1",
        ),
        "shorter than",
    );
    assert_invalid(
        &variant("huge.vmdk", "RW 8192 FLAT", "RW 9999999999999999 FLAT"),
        "absurdly large",
    );
    assert_invalid(
        &variant(
            "noname.vmdk",
            "RW 8192 FLAT \"flat-flat.vmdk\" 0",
            "RW 8192 FLAT",
        ),
        "names no file",
    );
    assert_invalid(
        &variant("garbled.vmdk", "RW 8192 FLAT", "RW eight FLAT"),
        "invalid extent line",
    );
    assert_unsupported(
        &variant("noaccess.vmdk", "RW 8192", "NOACCESS 8192"),
        "NOACCESS",
    );
    assert_unsupported(
        &variant(
            "vmfssparse.vmdk",
            "FLAT \"flat-flat.vmdk\" 0",
            "VMFSSPARSE \"flat-flat.vmdk\"",
        ),
        "VMFSSPARSE",
    );
    assert_unsupported(
        &variant("device.vmdk", "monolithicFlat", "fullDevice"),
        "physical device",
    );
    assert_unsupported(
        &variant("sesparse.vmdk", "monolithicFlat", "seSparse"),
        "ESXi",
    );
    let dev = variant("dev.vmdk", "\"flat-flat.vmdk\"", "\"/dev/null\"");
    assert_unsupported(&dev, "not a regular file");
    // Zero extents and read-only extents are read.
    let zero = variant(
        "zero.vmdk",
        "RW 8192 FLAT \"flat-flat.vmdk\" 0",
        "RDONLY 4096 FLAT \"flat-flat.vmdk\" 4096\nRW 100 ZERO",
    );
    let r = open(&zero);
    assert_eq!(r.size(), 4196 * 512);
    assert!(!r.may_have_data(4096 * 512, 100 * 512).unwrap());
    let mut buf = vec![1u8; 100 * 512];
    r.read_at(&mut buf, 4096 * 512).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // A sparse extent shorter than its descriptor says, or missing.
    let split = dir.path().join("split.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            p(&split),
            "4M",
        ],
    );
    let text = fs::read_to_string(&split).unwrap();
    fs::write(&split, text.replace("RW 8192 SPARSE", "RW 8200 SPARSE")).unwrap();
    assert_invalid(&split, "only 8192");
    fs::write(&split, &text).unwrap();
    fs::remove_file(dir.path().join("split-s001.vmdk")).unwrap();
    assert_invalid(&split, "split-s001.vmdk");
}

#[test]
fn backing_chains_are_read_and_bad_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    let mid = dir.path().join("mid.vmdk");
    let top = dir.path().join("top.vmdk");
    ok("qemu-img", &["create", "-q", "-f", "vmdk", p(&base), "8M"]);
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x01 0 4M", p(&base)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            p(&mid),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x02 1M 1M", p(&mid)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "mid.vmdk",
            "-F",
            "vmdk",
            p(&top),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x03 3M 2M", p(&top)],
    );
    let r = open(&top);
    let flat = dir.path().join("top.raw");
    qemu_raw(&top, &flat);
    assert_same_as_raw(&*r, &flat);
    let mut buf = vec![0u8; 8 * MIB as usize];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 1));
    assert!(buf[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 2));
    assert!(buf[3 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&b| b == 3));
    assert!(buf[5 * MIB as usize..].iter().all(|&b| b == 0));
    assert!(r.may_have_data(0, MIB).unwrap(), "data two levels down");
    assert!(!r.may_have_data(5 * MIB, 3 * MIB).unwrap());
    assert_eq!(
        r.backing().unwrap().backing().unwrap().path(),
        base.as_path()
    );
    assert_eq!(r.allocated_bytes().unwrap(), 2 * MIB);

    // A parent changed after its child was made (qemu gives it a new CID on write).
    let base2 = copy_to(&base, dir.path(), "base2.vmdk");
    let child2 = dir.path().join("child2.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base2.vmdk",
            "-F",
            "vmdk",
            p(&child2),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x09 0 64k", p(&base2)],
    );
    assert_invalid(&child2, "parent changed");

    // A missing parent.
    let orphan = dir.path().join("orphan.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base2.vmdk",
            "-F",
            "vmdk",
            p(&orphan),
        ],
    );
    fs::remove_file(&base2).unwrap();
    assert_invalid(&orphan, "missing");

    // A chain that loops: a -> b -> a.
    let a = dir.path().join("a.vmdk");
    let b = dir.path().join("b.vmdk");
    ok("qemu-img", &["create", "-q", "-f", "vmdk", p(&b), "4M"]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "b.vmdk",
            "-F",
            "vmdk",
            p(&a),
        ],
    );
    let a_cid = cid(&a);
    set_embedded(&b, "parentCID", &a_cid);
    set_embedded(&b, "parentFileNameHint", "\"a.vmdk\"");
    match vmvault_disk::open(&a, "auto") {
        Err(DiskError::Invalid { detail, .. }) => assert!(detail.contains("loops"), "{detail}"),
        other => panic!("a looping chain gave {:?}", other.err()),
    }
    // A delta that names no parent file.
    let c = copy_to(&a, dir.path(), "c.vmdk");
    set_embedded(&c, "parentFileNameHint", "\"\"");
    let _ = vmvault_disk::open(&c, "vmdk")
        .err()
        .expect("an empty parent name");
}
