//! Bad qcow2 images: refused with a clear error, never a panic, a hang or an unbounded allocation.

use super::*;

#[test]
fn writer_refuses_bad_pieces_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.qcow2");
    let w = Qcow2Writer::create(&out, 4 * M, false).unwrap();
    assert!(w.write_at(&[1u8; 4096], 0).is_err(), "not a 64 KiB piece");
    assert!(w.write_at(&[1u8; 65536], 4096).is_err(), "unaligned");
    assert!(w.write_at(&[1u8; 65536], 4 * M).is_err(), "past the end");
    assert!(
        w.write_zeros(4 * M - 64 * K, 128 * K).is_err(),
        "past the end"
    );
    drop(w);
    assert!(matches!(
        Qcow2Writer::create(&out, 4 * M, false),
        Err(DiskError::Exists { .. })
    ));
    assert!(Qcow2Writer::create(&out, 4 * M, true).is_ok());
    assert!(matches!(
        Qcow2Writer::create(&dir.path().join("huge"), u64::MAX / 2, false),
        Err(DiskError::Unsupported { .. })
    ));
}

#[test]
fn truncated_images_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (img, l1, l2) = sample(dir.path(), "t.qcow2");
    let bytes = std::fs::read(&img).unwrap();
    let data_start = l2 + 64 * K;
    let cuts = [
        0,
        3,
        50,
        71,
        72,
        100,
        104,
        112,
        4096,
        64 * K,
        l1 + 4,
        l2,
        l2 + 100,
        data_start + 10,
        data_start + 64 * K,
    ];
    for cut in cuts {
        assert!(cut < bytes.len() as u64);
        let t = dir.path().join(format!("cut{cut}.qcow2"));
        std::fs::write(&t, &bytes[..cut as usize]).unwrap();
        match vmvault_disk::open(&t, "qcow2") {
            Err(e) => assert_invalid(&e, ""),
            Ok(r) => {
                let e = read_everything(r.as_ref()).expect_err("truncated data must fail");
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "cut at {cut}: {e}");
                assert!(e.to_string().contains("past the end"), "{e}");
            }
        }
    }
}

#[test]
fn tables_pointing_past_the_end_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (img, l1, l2) = sample(dir.path(), "p.qcow2");
    let len = std::fs::metadata(&img).unwrap().len();
    // L1 table itself past the end.
    put_be64(&img, 40, len.next_multiple_of(64 * K));
    assert_invalid(&open_err(&img), "past the end");
    put_be64(&img, 40, l1);
    // L1 entry naming an L2 table past the end.
    put_be64(
        &img,
        l1,
        (1 << 63) | (len.next_multiple_of(64 * K) + 64 * K),
    );
    assert_invalid(&open_err(&img), "past the end");
    // Unaligned L2 table.
    put_be64(&img, l1, (1 << 63) | (l2 + 512));
    assert_invalid(&open_err(&img), "unaligned");
    put_be64(&img, l1, (1 << 63) | l2);
    // L2 entry naming a data cluster past the end: the image opens, reading it fails.
    put_be64(
        &img,
        l2,
        (1 << 63) | (len.next_multiple_of(64 * K) + 10 * 64 * K),
    );
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let mut buf = vec![0u8; 64 * K as usize];
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(r.may_have_data(0, 64 * K).unwrap());
    // Unaligned data cluster.
    put_be64(&img, l2, (1 << 63) | 0x10200);
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("unaligned"), "{e}");
    // Compressed cluster past the end.
    put_be64(&img, l2, (1 << 62) | (len + 4096));
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    // Compressed cluster of garbage.
    put_be64(&img, l2, (1 << 62) | (3 << 54) | 512);
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
}

#[test]
fn absurd_sizes_and_flipped_header_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, _) = sample(dir.path(), "h.qcow2");
    let good = std::fs::read(&img).unwrap();
    let reset = || std::fs::write(&img, &good).unwrap();

    put_be64(&img, 24, 1 << 62);
    assert_invalid(&open_err(&img), "absurd virtual size");
    reset();
    put_be64(&img, 24, u64::MAX);
    assert_invalid(&open_err(&img), "absurd virtual size");
    reset();
    put_be64(&img, 24, G);
    assert_invalid(&open_err(&img), "cannot map the virtual size");
    reset();
    put_be32(&img, 4, 4);
    assert_invalid(&open_err(&img), "unknown version 4");
    reset();
    put_be32(&img, 4, 1);
    assert_invalid(&open_err(&img), "unknown version 1");
    reset();
    put_be32(&img, 20, 22);
    assert_invalid(&open_err(&img), "cluster_bits 22");
    reset();
    put_be32(&img, 20, 8);
    assert_invalid(&open_err(&img), "cluster_bits 8");
    reset();
    patch(&img, 0, |b| *b = b'X');
    assert_invalid(&open_err(&img), "magic");
    reset();
    put_be32(&img, 100, 96);
    assert_invalid(&open_err(&img), "header_length");
    reset();
    put_be32(&img, 36, u32::MAX);
    assert_invalid(&open_err(&img), "L1 table");
    reset();
    patch(&img, 79, |b| *b |= 2);
    assert_invalid(&open_err(&img), "corrupt");
    reset();
    patch(&img, 79, |b| *b |= 1 << 5);
    assert_unsupported(&open_err(&img), "incompatible feature bit(s) 5");
    reset();
    patch(&img, 72, |b| *b |= 1 << 7);
    assert_unsupported(&open_err(&img), "bit(s) 63");
    reset();
    put_be32(&img, 32, 1);
    assert_unsupported(&open_err(&img), "encrypted");
    reset();
    patch(&img, 79, |b| *b |= 8);
    patch(&img, 104, |b| *b = 2);
    assert_unsupported(&open_err(&img), "compression type 2");
    reset();
    patch(&img, 104, |b| *b = 1);
    assert_invalid(&open_err(&img), "compression type bit");
    reset();
    patch(&img, 79, |b| *b |= 16);
    // Extended L2 entries reinterpret the tables; the result must not be taken for data.
    if let Ok(r) = vmvault_disk::open(&img, "qcow2") {
        let _ = read_everything(r.as_ref());
    }

    // Every field, top bit flipped, then all ones, in an image where each of them matters
    // (with a backing file and a snapshot): each damage is refused.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 4 << 20]).unwrap();
    let img = dir.path().join("flip.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&img),
    ]);
    qemu_io(&img, &["write -P 0x35 0 64k"]);
    qemu_img(&["snapshot", "-c", "snap", s(&img)]);
    qemu_io(&img, &["write -P 0x36 1M 64k"]);
    let good = std::fs::read(&img).unwrap();
    let reset = || std::fs::write(&img, &good).unwrap();
    for (at, width) in [
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 4),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (72, 8),
        (96, 4),
        (100, 4),
    ] {
        for all_ones in [false, true] {
            reset();
            for i in 0..width {
                patch(&img, at + i, |b| {
                    if all_ones {
                        *b = 0xff
                    } else if i == 0 {
                        *b ^= 0x80
                    }
                });
            }
            match vmvault_disk::open(&img, "qcow2") {
                Err(DiskError::Invalid { .. }) | Err(DiskError::Unsupported { .. }) => {}
                Err(e) => panic!("field at {at}: unexpected error {e:?}"),
                Ok(r) => panic!("field at {at} flipped, still opened: {:?}", r.size()),
            }
        }
    }
}

#[test]
fn encrypted_and_external_data_file_images_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let luks = dir.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "--object",
        "secret,id=sec0,data=password",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&luks),
        "1M",
    ]);
    assert_unsupported(&open_err(&luks), "LUKS");
    let ext = dir.path().join("ext.qcow2");
    let data = dir.path().join("ext.data");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data)),
        s(&ext),
        "1M",
    ]);
    let e = open_err(&ext);
    assert_unsupported(&e, "external data file");
    assert!(e.to_string().contains("ext.data"), "{e}");
}

#[test]
fn backing_loops_are_invalid_and_a_missing_backing_file_is_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&b), "1M"]);
    qemu_img(&["create", "-f", "qcow2", "-b", s(&b), "-F", "qcow2", s(&a)]);
    qemu_img(&["rebase", "-u", "-b", s(&a), "-F", "qcow2", s(&b)]);
    match open_err(&a) {
        DiskError::Invalid { detail, .. } => assert!(detail.contains("loops"), "{detail}"),
        e => panic!("{e:?}"),
    }
    // An image that is its own backing file.
    qemu_img(&["rebase", "-u", "-b", s(&a), "-F", "qcow2", s(&a)]);
    assert!(matches!(open_err(&a), DiskError::Invalid { .. }));

    let c = dir.path().join("c.qcow2");
    let gone = dir.path().join("gone.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&gone), "1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&gone),
        "-F",
        "qcow2",
        s(&c),
    ]);
    std::fs::remove_file(&gone).unwrap();
    // Said as what it is, not as a damaged image (issue 12, item 8).
    let e = open_err(&c);
    assert!(matches!(e, DiskError::MissingBacking { .. }), "{e:?}");
    assert!(
        e.to_string().contains("backing file") && e.to_string().contains("gone.qcow2"),
        "{e}"
    );
    assert!(!e.to_string().contains("not a valid"), "{e}");

    // A backing format vmvault does not read.
    let d = dir.path().join("d.qcow2");
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    qemu_img(&["create", "-f", "qcow2", "-b", s(&base), "-F", "raw", s(&d)]);
    let file = OpenOptions::new().read(true).write(true).open(&d).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    let at = head.windows(3).position(|w| w == b"raw").unwrap();
    file.write_all_at(b"qed", at as u64).unwrap();
    assert!(matches!(
        open_err(&d),
        DiskError::UnsupportedFormat(f) if f == "qed"
    ));
}
