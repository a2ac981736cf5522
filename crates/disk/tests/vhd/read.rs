//! Reading vhd images that qemu-img made: every subformat, holes, chains, speed of the backup's access pattern.

use super::*;

#[test]
fn vhd_dynamic_images_from_qemu_read_like_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Not a multiple of the 2 MiB block size, nor of a CHS cylinder.
    let size = 37 * MIB + 3 * 512;
    let want = make_raw(&src, size, 1);
    for opts in ["subformat=dynamic", "subformat=dynamic,force_size=on"] {
        let image = dir.path().join("d.vhd");
        qemu_img(
            &["convert", "-f", "raw", "-O", "vpc", "-o", opts],
            &[&src, &image],
        );
        let r = vmvault_disk::open(&image, "auto").unwrap();
        assert_eq!(r.format(), "vhd");
        assert_eq!(r.subformat().as_deref(), Some("dynamic"));
        assert!(r.backing().is_none());
        assert_eq!(r.size(), qemu_virtual_size(&image), "{opts}");
        assert!(r.size() >= size);
        if opts.contains("force_size") {
            assert_eq!(r.size(), size);
        }
        let got = read_all(r.as_ref(), MIB as usize);
        assert_same_disk(&got, &want, opts);
        assert_eq!(
            got,
            qemu_raw(&image, dir.path()),
            "{opts}: as qemu-img reads it"
        );
        // Unaligned pieces cross block boundaries mid-sector.
        assert_eq!(read_all(r.as_ref(), 777_777), got);
        assert_parallel_reads(r.as_ref(), &got);

        // Holes where QEMU allocated nothing, data where it did.
        let mut allocated = 0;
        for (start, len, data) in qemu_map(&image) {
            assert_eq!(
                r.may_have_data(start, len).unwrap(),
                data,
                "{opts}: {start}+{len}"
            );
            if data {
                allocated += len;
            }
        }
        assert!(
            !r.may_have_data(8 * MIB, 6 * MIB).unwrap(),
            "the forced hole"
        );
        assert!(r.may_have_data(size - 4096, 4096).unwrap());
        assert_eq!(r.allocated_bytes().unwrap(), allocated);
        assert!(allocated < size);
        std::fs::remove_file(&image).unwrap();
    }
}

#[test]
fn vhd_fixed_images_from_qemu_read_like_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 29 * MIB + 5 * 512;
    let want = make_raw(&src, size, 2);
    for opts in ["subformat=fixed", "subformat=fixed,force_size=on"] {
        let image = dir.path().join("f.vhd");
        qemu_img(
            &["convert", "-f", "raw", "-O", "vpc", "-o", opts],
            &[&src, &image],
        );
        let r = vmvault_disk::open(&image, "auto").unwrap();
        assert_eq!(r.format(), "vhd");
        assert_eq!(r.subformat().as_deref(), Some("fixed"));
        assert_eq!(r.size(), qemu_virtual_size(&image), "{opts}");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), r.size() + 512);
        let got = read_all(r.as_ref(), MIB as usize);
        assert_same_disk(&got, &want, opts);
        assert_eq!(
            got,
            qemu_raw(&image, dir.path()),
            "{opts}: as qemu-img reads it"
        );
        assert_parallel_reads(r.as_ref(), &got);
        // QEMU leaves zeros unwritten: holes in the data area are reported.
        assert!(
            !r.may_have_data(8 * MIB, 6 * MIB).unwrap(),
            "the forced hole"
        );
        for off in (0..r.size()).step_by(MIB as usize) {
            let len = MIB.min(r.size() - off);
            let chunk = &got[off as usize..(off + len) as usize];
            if chunk.iter().any(|b| *b != 0) {
                assert!(r.may_have_data(off, len).unwrap(), "data at {off}");
            }
        }
        let allocated = r.allocated_bytes().unwrap();
        assert!(allocated > 0 && allocated < size - 6 * MIB, "{allocated}");
        std::fs::remove_file(&image).unwrap();
    }
}

#[test]
fn vhd_qemu_io_writes_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let writes: [(u64, u64); 5] = [
        (0, 4096),
        (3 * MIB - 512, 1024), // across a block boundary, unaligned
        (5 * MIB + 7 * 512, 64 << 10),
        (16 * MIB, 2 * MIB), // exactly one block
        (63 * MIB, MIB),     // the last MiB
    ];
    for subformat in ["dynamic", "fixed"] {
        let image = dir.path().join(format!("{subformat}.vhd"));
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={subformat},force_size=on"),
            ],
            &[&image, Path::new("64M")],
        );
        let mut want = vec![0u8; 64 * MIB as usize];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let pattern = 0xab + i as u8;
            qemu_io_write(&image, pattern, off, len);
            want[off as usize..(off + len) as usize].fill(pattern);
        }
        let r = vmvault_disk::open(&image, "vhd").unwrap();
        assert_eq!(r.subformat().as_deref(), Some(subformat));
        assert_eq!(r.size(), 64 * MIB);
        assert_eq!(read_all(r.as_ref(), MIB as usize), want, "{subformat}");
        let mut buf = vec![0u8; 1000];
        r.read_at(&mut buf, 3 * MIB - 600).unwrap();
        assert_eq!(
            buf,
            want[(3 * MIB - 600) as usize..(3 * MIB + 400) as usize]
        );
        assert!(r.read_at(&mut buf, 64 * MIB - 999).is_err(), "past the end");
        // Each 2 MiB block holds data exactly when a write touched it.
        for block in 0..32u64 {
            let (s, e) = (block * 2 * MIB, (block + 1) * 2 * MIB);
            let touched = writes.iter().any(|&(o, l)| o < e && s < o + l);
            assert_eq!(
                r.may_have_data(s, 2 * MIB).unwrap(),
                touched,
                "{subformat} block {block}"
            );
        }
        if subformat == "dynamic" {
            // Blocks 0, 1, 2, 8, 31: the 2nd write spans blocks 1 and 2.
            assert_eq!(r.allocated_bytes().unwrap(), 5 * 2 * MIB);
        }
    }
}

#[test]
fn vhd_mostly_empty_100g_disks_open_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let size = 100u64 << 30;
    for subformat in ["dynamic", "fixed"] {
        let image = dir.path().join(format!("{subformat}.vhd"));
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={subformat},force_size=on"),
            ],
            &[&image, Path::new("100G")],
        );
        qemu_io_write(&image, 0x77, 50 << 30, MIB);
        let started = Instant::now();
        let r = vmvault_disk::open(&image, "vhd").unwrap();
        assert_eq!(r.size(), size);
        // Every 1 MiB chunk, as a backup asks.
        let with_data: Vec<u64> = (0..size / MIB)
            .filter(|i| r.may_have_data(i * MIB, MIB).unwrap())
            .collect();
        // A dynamic disk allocates whole 2 MiB blocks; qemu-img writes the first 4 KiB of a
        // new file (zeros, to probe alignment), which a fixed disk's data area reports.
        let written = (50 << 30) / MIB;
        let want = match subformat {
            "dynamic" => vec![written, written + 1],
            _ => vec![0, written],
        };
        assert_eq!(with_data, want, "{subformat}");
        assert!(!r.may_have_data(2 * MIB, size / 2 - 2 * MIB).unwrap());
        assert!(r.may_have_data(0, size).unwrap());
        let mut buf = vec![0u8; MIB as usize];
        r.read_at(&mut buf, 50 << 30).unwrap();
        assert!(buf.iter().all(|b| *b == 0x77));
        eprintln!(
            "{subformat} 100 GiB: opened and mapped in {:?}",
            started.elapsed()
        );
        let allocated = r.allocated_bytes().unwrap();
        match subformat {
            "dynamic" => assert_eq!(allocated, 2 * MIB),
            _ => assert!((MIB..8 * MIB).contains(&allocated), "{allocated}"),
        }
    }
}

#[test]
fn vhd_differencing_chains_read_through_their_parents() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("base.raw");
    let size = 20 * MIB;
    let base_bytes = make_raw(&src, size, 5);
    let base = dir.path().join("base.vhd");
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
        &[&src, &base],
    );
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    qemu_img(
        &["create", "-q", "-f", "vpc"],
        &[&other.join("base.vhd"), Path::new("20M")],
    );
    let mut rng = Rng(50);
    let abs = base.canonicalize().unwrap();
    let abs_str = abs.to_str().unwrap().to_string();
    let url = format!("file://localhost{}", abs_str.replace(' ', "%20"));
    let locator_sets: Vec<(&str, Vec<Locator>)> = vec![
        ("W2ru relative", vec![(*b"W2ru", utf16le(".\\base.vhd"))]),
        (
            "W2ru in another case",
            vec![(*b"W2ru", utf16le(".\\BASE.VHD"))],
        ),
        ("W2ku absolute", vec![(*b"W2ku", utf16le(&abs_str))]),
        (
            "W2ku Windows path, parent beside the child",
            vec![(*b"W2ku", utf16le("D:\\Hyper-V\\Disks\\base.vhd"))],
        ),
        ("MacX file URL", vec![(*b"MacX", url.into_bytes())]),
        (
            "a stale W2ru to a namesake, the W2ku to the parent",
            vec![
                (*b"W2ru", utf16le(".\\other\\base.vhd")),
                (*b"W2ku", utf16le(&abs_str)),
            ],
        ),
        (
            "W2ru wins over a W2ku that points elsewhere",
            vec![
                (*b"W2ku", utf16le("/nonexistent/base.vhd")),
                (*b"W2ru", utf16le(".\\base.vhd")),
            ],
        ),
    ];
    for (what, locators) in locator_sets {
        let child = Child {
            size,
            block_size: 2 * MIB as u32,
            unique_id: [0x42; 16],
            parent_id: unique_id(&base),
            parent_name: "base.vhd".into(),
            locators,
            blocks: child_blocks(size, &mut rng),
        };
        let path = dir.path().join("child.vhd");
        child.write(&path);
        let want = child.expected(&base_bytes);
        let r = vmvault_disk::open(&path, "auto").unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.subformat().as_deref(), Some("differencing"), "{what}");
        let parent = r.backing().expect("a parent");
        assert_eq!(parent.subformat().as_deref(), Some("dynamic"));
        assert_eq!(parent.path().canonicalize().unwrap(), abs, "{what}");
        assert_eq!(read_all(r.as_ref(), MIB as usize), want, "{what}");
        assert_eq!(read_all(r.as_ref(), 100_000), want, "{what}: unaligned");
        assert_parallel_reads(r.as_ref(), &want);
        // Set bits: 2 MiB + block 2 (half of its sectors) + 3 sectors + 1 MiB.
        let bits: u64 = child
            .blocks
            .iter()
            .map(|(_, b, _)| b.iter().map(|x| u64::from(x.count_ones())).sum::<u64>())
            .sum();
        assert_eq!(r.allocated_bytes().unwrap(), bits * 512, "{what}");
        for block in 0..size / (2 * MIB) {
            let (s, e) = (block * 2 * MIB, (block + 1) * 2 * MIB);
            let has = r.may_have_data(s, 2 * MIB).unwrap();
            let mine = child.blocks.iter().any(|b| b.0 == block);
            assert_eq!(
                has,
                mine || parent.may_have_data(s, 2 * MIB).unwrap(),
                "{what} {block}"
            );
            if !has {
                assert!(want[s as usize..e as usize].iter().all(|b| *b == 0));
            }
        }
        // The parent's forced hole (8..14 MiB) is blocks 4..6; block 5 has 3 sectors here.
        assert!(!r.may_have_data(8 * MIB, 2 * MIB).unwrap());
        assert!(r.may_have_data(10 * MIB, 2 * MIB).unwrap());
        assert!(!r
            .may_have_data(10 * MIB + 3 * 512, 2 * MIB - 3 * 512)
            .unwrap());
        assert!(r.may_have_data(14 * MIB, MIB).unwrap());
    }

    // Three deep: base <- mid <- top, the top bigger than its parents.
    let mid = dir.path().join("mid.vhd");
    let mid_child = Child {
        size,
        block_size: 2 * MIB as u32,
        unique_id: [0x51; 16],
        parent_id: unique_id(&base),
        parent_name: "base.vhd".into(),
        locators: vec![(*b"W2ru", utf16le(".\\base.vhd"))],
        blocks: child_blocks(size, &mut rng),
    };
    mid_child.write(&mid);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let top = sub.join("top.vhd");
    let top_child = Child {
        size: size + 4 * MIB,
        block_size: 512 << 10,
        unique_id: [0x52; 16],
        parent_id: [0x51; 16],
        parent_name: "mid.vhd".into(),
        locators: vec![(*b"W2ru", utf16le("..\\mid.vhd"))],
        blocks: vec![
            (1, vec![0xf0; 512], vec![0x99; 512 << 10]),
            (45, vec![0x01; 512], vec![0x98; 512 << 10]),
        ],
    };
    top_child.write(&top);
    let want = top_child.expected(&mid_child.expected(&base_bytes));
    // Its parent lies above its folder: read only when that folder is allowed.
    assert!(matches!(
        vmvault_disk::open(&top, "vhd"),
        Err(DiskError::Confined { .. })
    ));
    let r = vmvault_disk::open_allowing(&top, "vhd", &[dir.path().into()]).unwrap();
    assert_eq!(r.size(), size + 4 * MIB);
    assert_eq!(read_all(r.as_ref(), MIB as usize), want);
    assert_eq!(
        r.backing()
            .unwrap()
            .backing()
            .unwrap()
            .subformat()
            .as_deref(),
        Some("dynamic")
    );
    // Past the parents' end: only block 45 (22.5 MiB) has data.
    assert!(!r.may_have_data(size, 2 * MIB).unwrap());
    assert!(r.may_have_data(size + 2 * MIB, 2 * MIB).unwrap());
}

/// A 256 MiB disk read as a backup reads it: `may_have_data`, then `read_at`, 1 MiB at a time.
#[test]
fn vhd_sequential_read_of_256_mib() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 256 * MIB;
    make_raw(&src, size, 8);
    let raw = RawReader::open(&src).unwrap();
    for (subformat, opts) in [
        ("dynamic", "subformat=dynamic,force_size=on"),
        ("fixed", "subformat=fixed,force_size=on"),
    ] {
        let image = dir.path().join(format!("{subformat}.vhd"));
        qemu_img(
            &["convert", "-f", "raw", "-O", "vpc", "-o", opts],
            &[&src, &image],
        );
        let r = vmvault_disk::open(&image, "vhd").unwrap();
        assert_eq!(r.size(), size);
        let mut buf = vec![0u8; MIB as usize];
        let mut want = vec![0u8; MIB as usize];
        let started = Instant::now();
        let mut read = 0u64;
        for off in (0..size).step_by(MIB as usize) {
            if r.may_have_data(off, MIB).unwrap() {
                r.read_at(&mut buf, off).unwrap();
                read += MIB;
            } else {
                buf.fill(0);
            }
            raw.read_at(&mut want, off).unwrap();
            assert!(buf == want, "{subformat}: MiB at {off}");
        }
        let checked = started.elapsed();
        // For comparison (not asserted): the same pass over the VHD alone and over the raw file.
        let mut time_pass = |r: &dyn DiskReader| {
            let started = Instant::now();
            for off in (0..size).step_by(MIB as usize) {
                if r.may_have_data(off, MIB).unwrap() {
                    r.read_at(&mut buf, off).unwrap();
                }
            }
            started.elapsed()
        };
        let vhd_time = time_pass(r.as_ref());
        let raw_time = time_pass(&raw);
        eprintln!(
            "{subformat}: 256 MiB checked in {checked:?} ({} MiB read); a backup pass takes \
             {vhd_time:?}, {raw_time:?} over the raw file",
            read / MIB
        );
    }
}
