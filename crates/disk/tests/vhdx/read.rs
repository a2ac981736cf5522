//! Reading vhdx images that qemu-img made: every subformat, holes, chains, speed of the backup's access pattern.

use super::*;

#[test]
fn converted_images_read_like_their_source() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of any block size: the last block is cut short.
    let size = 37 * MIB + 3 * 512;
    let src = dir.path().join("src.raw");
    let data = make_source(&src, size, 7);
    for (opts, subformat) in [
        ("subformat=dynamic,block_size=1M", "dynamic"),
        ("subformat=dynamic,block_size=32M", "dynamic"),
        ("subformat=dynamic", "dynamic"),
        ("subformat=fixed,block_size=1M", "fixed"),
        (
            "subformat=fixed,block_size=32M,block_state_zero=off",
            "fixed",
        ),
        (
            "subformat=fixed,block_size=8M,block_state_zero=off",
            "fixed",
        ),
    ] {
        let out = dir.path().join("out.vhdx");
        let _ = std::fs::remove_file(&out);
        qemu_img(
            &["convert", "-f", "raw", "-O", "vhdx", "-o", opts],
            &[&src, &out],
        );
        let r = vmvault_disk::open(&out, "auto").unwrap();
        assert_eq!(r.format(), "vhdx");
        assert_eq!(r.subformat().as_deref(), Some(subformat), "{opts}");
        assert_eq!(r.size(), size, "{opts}");
        assert!(r.backing().is_none());
        let got = read_all(&*r);
        assert_same(&got, &data, opts);
        assert_same(&got, &qemu_raw(&out, dir.path()), opts);
        // Unaligned reads across block boundaries.
        let mut buf = vec![0u8; 3 * MIB as usize + 777];
        for off in [1, MIB - 100, 8 * MIB - 1, size - buf.len() as u64] {
            r.read_at(&mut buf, off).unwrap();
            assert_same(&buf, &data[off as usize..off as usize + buf.len()], opts);
        }
        assert!(r.read_at(&mut buf[..2], size - 1).is_err(), "read past end");
        assert!(r.allocated_bytes().unwrap() <= size.next_multiple_of(32 * MIB));
    }
}

#[test]
fn qemu_io_writes_are_read_and_holes_reported() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let mut want = vec![0u8; size as usize];
    let writes = [
        (0xabu8, MIB, 64 * KIB),
        (0x11, 5 * MIB + 512, 3 * 512),
        (0x22, 9 * MIB - 4 * KIB, 8 * KIB), // across a block boundary
        (0x33, size - 64 * KIB, 64 * KIB),
    ];
    for (opts, bs) in [
        ("block_size=1M", MIB),
        ("block_size=1M,block_state_zero=off", MIB),
    ] {
        let img = dir.path().join("w.vhdx");
        let _ = std::fs::remove_file(&img);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx", "-o", opts])
            .arg(&img)
            .arg(size.to_string()));
        for &(p, off, len) in &writes {
            qemu_io_write(&img, p, off, len);
            want[off as usize..(off + len) as usize].fill(p);
        }
        let r = open(&img).unwrap();
        assert_eq!(r.subformat().as_deref(), Some("dynamic"));
        let got = read_all(&*r);
        assert_same(&got, &want, opts);
        assert_same(&got, &qemu_raw(&img, dir.path()), opts);

        // Written blocks have data, every other block is a hole.
        let written: Vec<u64> = vec![1, 5, 8, 9, 63];
        for block in 0..size / bs {
            assert_eq!(
                r.may_have_data(block * bs, bs).unwrap(),
                written.contains(&block),
                "{opts}: block {block}"
            );
        }
        assert!(r.may_have_data(0, size).unwrap());
        assert!(!r.may_have_data(10 * MIB, 50 * MIB).unwrap());
        assert!(!r.may_have_data(size, MIB).unwrap(), "past the end");
        assert_eq!(r.allocated_bytes().unwrap(), written.len() as u64 * bs);
    }
}

#[test]
fn fixed_images_hold_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o"])
        .arg("subformat=fixed,block_size=1M,block_state_zero=off")
        .arg(&img)
        .arg((5 * MIB + 512).to_string()));
    qemu_io_write(&img, 0x44, 2 * MIB, 4096);
    let r = open(&img).unwrap();
    assert_eq!(r.subformat().as_deref(), Some("fixed"));
    assert_eq!(r.allocated_bytes().unwrap(), 5 * MIB + 512);
    assert!(r.may_have_data(0, MIB).unwrap());
    let got = read_all(&*r);
    let mut want = vec![0u8; (5 * MIB + 512) as usize];
    want[2 * MIB as usize..2 * MIB as usize + 4096].fill(0x44);
    assert_same(&got, &want, "fixed");
}

#[test]
fn huge_sparse_image_opens_and_reports_holes_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx"])
        .arg(&img)
        .arg("100G"));
    qemu_io_write(&img, 0x5a, 50 * GIB + 3 * MIB, 64 * KIB);
    let r = open(&img).unwrap();
    assert_eq!(r.size(), 100 * GIB);
    for gib in 0..100 {
        assert_eq!(
            r.may_have_data(gib * GIB, GIB).unwrap(),
            gib == 50,
            "GiB {gib}"
        );
    }
    assert!(r.may_have_data(0, 100 * GIB).unwrap());
    let mut buf = vec![0u8; MIB as usize];
    r.read_at(&mut buf, 50 * GIB + 3 * MIB).unwrap();
    assert!(buf[..64 * KIB as usize].iter().all(|&b| b == 0x5a));
    assert!(buf[64 * KIB as usize..].iter().all(|&b| b == 0));
    // QEMU picks 16 MiB blocks for a disk of 100 GiB.
    assert_eq!(r.allocated_bytes().unwrap(), 16 * MIB);
}

#[test]
fn sequential_backup_reads_of_a_256_mib_image() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let src = dir.path().join("src.raw");
    let data = make_source(&src, size, 99);
    let img = dir.path().join("seq.vhdx");
    qemu_img(
        &["convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M"],
        &[&src, &img],
    );
    let r = VhdxReader::open(&img, &mut vmvault_disk::Chain::default()).unwrap();
    // As the backup reads: may_have_data, then read_at, 1 MiB at a time.
    let mut buf = vec![0u8; MIB as usize];
    let mut skipped = 0;
    for i in 0..size / MIB {
        let want = &data[(i * MIB) as usize..((i + 1) * MIB) as usize];
        if r.may_have_data(i * MIB, MIB).unwrap() {
            r.read_at(&mut buf, i * MIB).unwrap();
            assert_same(&buf, want, "sequential read");
        } else {
            skipped += 1;
            assert!(want.iter().all(|&b| b == 0), "hole at MiB {i} holds data");
        }
    }
    assert!(skipped > 0, "some 1 MiB pieces are holes");

    // Several threads at once, each on its own ranges.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let r = &r;
            let data = &data;
            s.spawn(move || {
                let mut buf = vec![0u8; 3 * MIB as usize / 2];
                let mut off = t * 7 * MIB + 4096 * t;
                while off + buf.len() as u64 <= size {
                    r.read_at(&mut buf, off).unwrap();
                    assert_same(
                        &buf,
                        &data[off as usize..off as usize + buf.len()],
                        "threads",
                    );
                    off += 29 * MIB;
                }
            });
        }
    });
}

#[test]
fn differencing_image_reads_through_its_parent() {
    let d = diff_pair();
    let linkage = data_write_guid(&d.parent);
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", &linkage),
            ("relative_path", ".\\parent.vhdx"),
            ("absolute_win32_path", "C:\\VMs\\parent.vhdx"),
        ],
    );
    // Block 5: partially present, with a sector bitmap block appended to the file; block 2:
    // ZERO (hides the parent); block 3: UNMAPPED (reads from the parent). The sector bitmap
    // entry of chunk 0 is BAT entry 4096 (chunk ratio 4096 for 1 MiB blocks).
    let file_len = std::fs::metadata(&d.child).unwrap().len();
    let bitmap_at = file_len.next_multiple_of(MIB);
    let mut bitmap = vec![0u8; MIB as usize];
    let sectors: Vec<u64> = (0..2048u64)
        .filter(|s| (s / 3) % 2 == 0 || *s == 2047)
        .collect();
    for s in &sectors {
        let bit = 5 * 2048 + s;
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
    }
    put(&d.child, bitmap_at, &bitmap);
    set_bat(&d.child, 4096, bitmap_at | 6);
    let block5 = block_offset_in_file(&d.child, 5);
    set_bat(&d.child, 5, block5 | 7);
    set_bat(&d.child, 2, 2);
    set_bat(&d.child, 3, 3);

    let mut want = d.parent_data.clone();
    for block in [1u64, 4, 9] {
        let r = (block * MIB) as usize..((block + 1) * MIB) as usize;
        want[r.clone()].copy_from_slice(&d.child_data[r]);
    }
    want[2 * MIB as usize..3 * MIB as usize].fill(0);
    for s in &sectors {
        let at = (5 * MIB + s * 512) as usize;
        want[at..at + 512].copy_from_slice(&d.child_data[at..at + 512]);
    }

    let r = open(&d.child).unwrap();
    assert_eq!(r.subformat().as_deref(), Some("differencing"));
    let parent = r.backing().expect("a parent");
    assert_eq!(parent.format(), "vhdx");
    assert_eq!(
        parent.path().canonicalize().unwrap(),
        d.parent.canonicalize().unwrap()
    );
    assert_same(&read_all(&*r), &want, "differencing");
    let mut buf = vec![0u8; 5000];
    for off in [5 * MIB - 1000, 5 * MIB + 1, 5 * MIB + 1535, 6 * MIB - 3000] {
        r.read_at(&mut buf, off).unwrap();
        assert_same(
            &buf,
            &want[off as usize..off as usize + 5000],
            "partial block",
        );
    }
    assert_eq!(
        r.allocated_bytes().unwrap(),
        3 * MIB + sectors.len() as u64 * 512
    );
    assert!(!r.may_have_data(2 * MIB, MIB).unwrap(), "ZERO block");
    assert!(r.may_have_data(5 * MIB, MIB).unwrap(), "partial block");
    for block in [0u64, 3, 6, 7, 8, 10, 11] {
        let parent_has = parent.may_have_data(block * MIB, MIB).unwrap();
        assert_eq!(
            r.may_have_data(block * MIB, MIB).unwrap(),
            parent_has,
            "block {block} is the parent's"
        );
    }
}

#[test]
fn differencing_parent_is_found_beside_the_child_when_moved() {
    let d = diff_pair();
    let linkage = data_write_guid(&d.parent);
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", &linkage),
            ("relative_path", "..\\old-folder\\parent.vhdx"),
            (
                "volume_path",
                "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\VMs\\parent.vhdx",
            ),
            ("absolute_win32_path", "D:\\VMs\\parent.vhdx"),
        ],
    );
    let r = open(&d.child).unwrap();
    let got = read_all(&*r);
    assert_same(
        &got[..MIB as usize],
        &d.parent_data[..MIB as usize],
        "block 0",
    );
}
