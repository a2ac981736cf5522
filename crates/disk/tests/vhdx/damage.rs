//! Bad vhdx images: refused with a clear error, never a panic, a hang or an unbounded allocation.

use super::*;

#[test]
fn writer_handles_odd_sizes_large_sparse_disks_and_refuses_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of 512: the virtual size is rounded up to a whole sector.
    let out = dir.path().join("odd.vhdx");
    let size = 3 * MIB + 100;
    let w = VhdxWriter::create(&out, size, false).unwrap();
    w.write_at(&vec![0x77; (2 * MIB + 100) as usize], MIB)
        .unwrap();
    assert!(w.write_at(&[1; 1024], size).is_err(), "write past the end");
    w.finish().unwrap();
    let r = open(&out).unwrap();
    assert_eq!(r.size(), 3 * MIB + 512);
    let mut tail = vec![0u8; 512];
    r.read_at(&mut tail, 3 * MIB).unwrap();
    assert!(tail[..100].iter().all(|&b| b == 0x77) && tail[100..].iter().all(|&b| b == 0));
    let check = qemu_img(&["check", "-f", "vhdx"], &[&out]);
    assert!(check.contains("No errors were found"), "{check}");

    // A 100 GiB disk with little data: a small file, quick to write and check.
    let big = dir.path().join("big.vhdx");
    let w = VhdxWriter::create(&big, 100 * GIB, false).unwrap();
    w.write_at(&[0x42; 128 * 1024], 70 * GIB).unwrap();
    w.write_zeros(0, 10 * GIB).unwrap();
    w.write_at(&[0x43; 64 * 1024], 100 * GIB - 64 * KIB)
        .unwrap();
    w.finish().unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&big).unwrap().blocks() * 512 < 8 * MIB);
    let check = qemu_img(&["check", "-f", "vhdx"], &[&big]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = open(&big).unwrap();
    assert_eq!(r.allocated_bytes().unwrap(), 2 * MIB);
    let mut buf = vec![0u8; 128 * 1024];
    r.read_at(&mut buf, 70 * GIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    let mut buf = vec![0u8; 64 * 1024];
    let verified = run(Command::new("qemu-io")
        .args(["-r", "-f", "vhdx", "-c"])
        .arg(format!("read -P 0x43 {} 65536", 100 * GIB - 64 * KIB))
        .arg(&big));
    assert!(!verified.contains("failed"), "{verified}");
    r.read_at(&mut buf, 100 * GIB - 64 * KIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x43));

    assert!(matches!(
        vmvault_disk::create(&big, "vhdx", MIB, false),
        Err(DiskError::Exists { .. })
    ));
    assert!(matches!(
        VhdxWriter::create(&dir.path().join("huge.vhdx"), 65 << 40, false),
        Err(DiskError::Unsupported { .. })
    ));
    // An unfinished image is no valid VHDX: the file identifier is written last.
    let unfinished = dir.path().join("unfinished.vhdx");
    let w = VhdxWriter::create(&unfinished, 4 * MIB, false).unwrap();
    w.write_at(&[1; 65536], 0).unwrap();
    drop(w);
    assert!(VhdxReader::open(&unfinished, &mut vmvault_disk::Chain::default()).is_err());
}

#[test]
fn truncated_images_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path(), "s.vhdx");
    let len = std::fs::metadata(&img).unwrap().len();
    let last_block = block_offset_in_file(&img, 6);
    for cut in [
        0,
        4,
        100,
        64 * KIB + 10,
        130 * KIB,
        200 * KIB,
        MIB,
        2 * MIB + 5,
        3 * MIB + 100,
        last_block + 4096,
        len - 1,
    ] {
        let bad = fresh_copy(&img, dir.path());
        File::options()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let detail = match open(&bad) {
            Err(DiskError::Invalid { detail, .. }) => detail,
            Err(e) => panic!("cut at {cut}: expected an invalid image error, got {e}"),
            Ok(_) => panic!("cut at {cut}: opened"),
        };
        assert!(
            detail.contains("truncated") || detail.contains("vhdxfile"),
            "cut at {cut}: {detail}"
        );
    }
}

#[test]
fn damaged_structures_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path(), "s.vhdx");
    let (bat, meta) = regions(&img);
    open(&img).unwrap();

    // One damaged header: the other one is used.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, HEADERS[1] + 100, &[0xff]);
    assert_same(
        &read_all(&*open(&bad).unwrap()),
        &qemu_raw(&img, dir.path()),
        "one header",
    );
    // Both damaged: refused.
    put(&bad, HEADERS[0] + 100, &[0xff]);
    expect_invalid(&bad, "CRC-32C mismatch");

    let bad = fresh_copy(&img, dir.path());
    put(&bad, 0, b"vhdxfilf");
    expect_invalid(&bad, "vhdxfile");

    let bad = fresh_copy(&img, dir.path());
    put_in_headers(&bad, 66, &2u16.to_le_bytes());
    expect_invalid(&bad, "version 2");

    let bad = fresh_copy(&img, dir.path());
    put_in_headers(&bad, 0, b"hEAd");
    expect_invalid(&bad, "signature");

    // Region table: the second copy stands in for a damaged first one.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, REGION_TABLES[0] + 40, &[0x55]);
    open(&bad).unwrap();
    put(&bad, REGION_TABLES[1] + 40, &[0x55]);
    expect_invalid(&bad, "no valid region table");

    // Tables pointing past the end of the file.
    let bad = fresh_copy(&img, dir.path());
    for t in REGION_TABLES {
        put(&bad, t + 16 + 16, &(1u64 << 40).to_le_bytes());
        fix_crc(&bad, t, 64 * KIB as usize);
    }
    expect_invalid(&bad, "past the end of the file");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 6, (1u64 << 40) | 6);
    expect_invalid(&bad, "block 6 at offset");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 6, 6); // a block in the header section
    expect_invalid(&bad, "overlaps the header section");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 6, bat | 6); // a block on top of the BAT
    expect_invalid(&bad, "overlaps the BAT");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 3, 4); // a reserved state
    expect_invalid(&bad, "reserved state 4");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 3, 7); // partially present outside a differencing image
    expect_invalid(&bad, "partially present");

    let bad = fresh_copy(&img, dir.path());
    put(
        &bad,
        meta + 32 + 32 * 2 + 16,
        &(2 * MIB as u32).to_le_bytes(),
    );
    expect_invalid(&bad, "outside the metadata region");

    let bad = fresh_copy(&img, dir.path());
    put(&bad, meta, b"metadatX");
    expect_invalid(&bad, "metadata");

    // Absurd sizes.
    let size_item = metadata_item(&img, 1);
    for (value, needle) in [
        (1u64 << 60, "larger than the format's 64 TiB"),
        (u64::MAX, "larger than the format's 64 TiB"),
        (8 * MIB + 1, "not a multiple"),
        (1u64 << 40, "too small"),
    ] {
        let bad = fresh_copy(&img, dir.path());
        put(&bad, size_item, &value.to_le_bytes());
        expect_invalid(&bad, needle);
    }
    let params = metadata_item(&img, 0);
    for (value, needle) in [
        (3 * MIB as u32, "block size"),
        (512 * 1024, "block size"),
        (512 * MIB as u32, "block size"),
    ] {
        let bad = fresh_copy(&img, dir.path());
        put(&bad, params, &value.to_le_bytes());
        expect_invalid(&bad, needle);
    }
    let bad = fresh_copy(&img, dir.path());
    put(&bad, metadata_item(&img, 3), &1000u32.to_le_bytes());
    expect_invalid(&bad, "logical sector size 1000");

    // A differencing image without a parent locator.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, params + 4, &2u32.to_le_bytes());
    expect_invalid(&bad, "without a parent locator");

    // A required metadata item missing.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, meta + 10, &4u16.to_le_bytes());
    expect_invalid(&bad, "physical sector size metadata item is missing");
}

#[test]
fn unknown_required_features_and_pending_logs_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path(), "s.vhdx");
    let (_, meta) = regions(&img);

    // A header naming a log: its updates are not in the BAT yet.
    let bad = fresh_copy(&img, dir.path());
    put_in_headers(&bad, 48, &[0x42; 16]);
    let detail = expect_unsupported(&bad, "log");
    assert!(detail.contains("qemu-img check -r all"), "{detail}");
    assert!(detail.contains("Hyper-V"), "{detail}");

    // An unknown region flagged required.
    let bad = fresh_copy(&img, dir.path());
    for t in REGION_TABLES {
        put(&bad, t + 8, &3u32.to_le_bytes());
        let mut entry = [0u8; 32];
        entry[0..16].copy_from_slice(&[0x99; 16]);
        entry[16..24].copy_from_slice(&(5 * MIB).to_le_bytes());
        entry[24..28].copy_from_slice(&(MIB as u32).to_le_bytes());
        entry[28..32].copy_from_slice(&1u32.to_le_bytes());
        put(&bad, t + 16 + 64, &entry);
        fix_crc(&bad, t, 64 * KIB as usize);
    }
    expect_unsupported(&bad, "region");
    // The same region, not required, is skipped.
    for t in REGION_TABLES {
        put(&bad, t + 16 + 64 + 28, &0u32.to_le_bytes());
        fix_crc(&bad, t, 64 * KIB as usize);
    }
    open(&bad).unwrap();

    // An unknown metadata item flagged required.
    let bad = fresh_copy(&img, dir.path());
    let mut entry = [0u8; 32];
    entry[0..16].copy_from_slice(&[0x98; 16]);
    entry[16..20].copy_from_slice(&(64 * 1024 + 8192u32).to_le_bytes());
    entry[20..24].copy_from_slice(&8u32.to_le_bytes());
    entry[24..28].copy_from_slice(&4u32.to_le_bytes());
    put(&bad, meta + 32 + 32 * 5, &entry);
    put(&bad, meta + 10, &6u16.to_le_bytes());
    expect_unsupported(&bad, "metadata item");
    // Not required: skipped.
    put(&bad, meta + 32 + 32 * 5 + 24, &0u32.to_le_bytes());
    open(&bad).unwrap();
}

#[test]
fn image_with_a_log_to_replay_is_refused_until_qemu_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("log.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&img)
        .arg("8M"));
    // QEMU updates the BAT through a log entry, then clears the log GUID in the headers.
    // Setting it back to the entry's GUID leaves the image as a crash right after the log
    // write would: an active log that must be replayed.
    qemu_io_write(&img, 0x71, MIB, 64 * KIB);
    let log_offset = read_u64(&img, HEADERS[0] + 72);
    let mut entry = [0u8; 48];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut entry, log_offset)
        .unwrap();
    assert_eq!(&entry[0..4], b"loge", "QEMU left its log entry");
    put_in_headers(&img, 48, &entry[32..48]);
    let detail = expect_unsupported(&img, "log");
    assert!(detail.contains("qemu-img check -r all"), "{detail}");
    // QEMU agrees the log needs replaying, and replays it when told to.
    let ro = Command::new("qemu-img")
        .args(["info", "-f", "vhdx"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!ro.status.success(), "qemu-img opened it read-only");
    let _ = Command::new("qemu-img")
        .args(["check", "-r", "all", "-f", "vhdx"])
        .arg(&img)
        .output()
        .unwrap();
    let r = open(&img).unwrap();
    let mut buf = vec![0u8; 128 * KIB as usize];
    r.read_at(&mut buf, MIB).unwrap();
    assert!(buf[..64 * KIB as usize].iter().all(|&b| b == 0x71));
    assert!(buf[64 * KIB as usize..].iter().all(|&b| b == 0));
}

#[test]
fn differencing_with_a_missing_or_changed_parent_is_invalid() {
    let d = diff_pair();
    let linkage = data_write_guid(&d.parent);
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", &linkage),
            ("relative_path", ".\\gone.vhdx"),
            ("absolute_win32_path", "C:\\VMs\\gone.vhdx"),
        ],
    );
    let detail = expect_invalid(&d.child, "parent disk not found");
    assert!(detail.contains("gone.vhdx"), "{detail}");

    let d = diff_pair();
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", "{12345678-1234-1234-1234-123456789abc}"),
            ("relative_path", "parent.vhdx"),
        ],
    );
    expect_invalid(&d.child, "not the disk this image was made from");

    let d = diff_pair();
    make_differencing(&d.child, &[("relative_path", "parent.vhdx")]);
    expect_invalid(&d.child, "parent_linkage");

    // A parent that is not a VHDX.
    let d = diff_pair();
    std::fs::write(d.parent.with_extension("raw2"), vec![0u8; 4096]).unwrap();
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", "{12345678-1234-1234-1234-123456789abc}"),
            ("relative_path", "parent.raw2"),
        ],
    );
    expect_invalid(&d.child, "vhdxfile");
}

#[test]
fn differencing_chain_that_loops_is_invalid() {
    let d = diff_pair();
    let a = d.child.clone();
    let b = d.child.with_file_name("b.vhdx");
    std::fs::copy(&a, &b).unwrap();
    let (la, lb) = (data_write_guid(&a), data_write_guid(&b));
    make_differencing(&a, &[("parent_linkage", &lb), ("relative_path", "b.vhdx")]);
    make_differencing(&b, &[("parent_linkage", &la), ("relative_path", "a.vhdx")]);
    std::fs::rename(&a, a.with_file_name("a.vhdx")).unwrap();
    let a = a.with_file_name("a.vhdx");
    match open(&a) {
        Err(DiskError::Invalid { format, detail, .. }) => {
            assert_eq!(format, "backing chain");
            assert!(detail.contains("loops"), "{detail}");
        }
        Err(e) => panic!("expected a loop error, got {e}"),
        Ok(_) => panic!("a looping chain opened"),
    }
    // An image that is its own parent.
    let c = a.with_file_name("c.vhdx");
    std::fs::copy(&d.parent, &c).unwrap();
    let lc = data_write_guid(&c);
    make_differencing(&c, &[("parent_linkage", &lc), ("relative_path", "c.vhdx")]);
    assert!(matches!(open(&c), Err(DiskError::Invalid { .. })));
}
