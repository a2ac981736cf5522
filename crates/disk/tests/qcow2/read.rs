//! Reading qcow2 images that qemu-img made: every subformat, holes, chains, speed of the backup's access pattern.

use super::*;

#[test]
fn reads_every_subformat_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // 6 MiB + 3.5 KiB: not a multiple of any cluster size.
    let size = 6 * M + 7 * 512;
    let src = dir.path().join("src.raw");
    let want = make_raw(&src, size, 11);
    let cases: &[(&str, &[&str], &str)] = &[
        ("v2", &["-o", "compat=0.10"], "v2"),
        ("v3", &["-o", "compat=1.1"], "v3"),
        ("c512", &["-o", "cluster_size=512"], "v3"),
        ("c4k", &["-o", "cluster_size=4096"], "v3"),
        ("c64k", &["-o", "cluster_size=65536"], "v3"),
        ("c2m", &["-o", "cluster_size=2M"], "v3"),
        ("extl2", &["-o", "extended_l2=on,cluster_size=128k"], "v3"),
        ("zlib", &["-c"], "v3"),
        ("zlib-v2", &["-c", "-o", "compat=0.10"], "v2"),
        ("zlib-c512", &["-c", "-o", "cluster_size=512"], "v3"),
        ("zlib-c2m", &["-c", "-o", "cluster_size=2M"], "v3"),
        ("zstd", &["-c", "-o", "compression_type=zstd"], "v3"),
        (
            "zstd-extl2",
            &["-c", "-o", "compression_type=zstd,extended_l2=on"],
            "v3",
        ),
    ];
    for (name, opts, sub) in cases {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&img)]);
        qemu_img(&args);
        let r = open(&img);
        assert_eq!(r.format(), "qcow2");
        assert_eq!(r.subformat().as_deref(), Some(*sub), "{name}");
        assert_eq!(r.size(), size);
        assert!(r.backing().is_none());
        let got = read_all(r.as_ref(), M);
        assert_same(&got, &want, name);
        assert_same(&got, &qemu_raw(&img), name);
        check_unaligned_reads(r.as_ref(), &want, 3);
        check_map(&img, r.as_ref());
        // Every 64 KiB block holding data is said to, whatever the cluster size.
        for (i, block) in want.chunks(64 * K as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                assert!(r
                    .may_have_data(i as u64 * 64 * K, block.len() as u64)
                    .unwrap());
            }
        }
    }
}

/// Several threads read one reader at once (the backup may): caches and decoders are shared.
#[test]
fn concurrent_reads_agree_with_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let want = make_raw(&src, 8 * M, 13);
    for (name, opts) in [
        ("plain", &["-o", "cluster_size=4096"][..]),
        ("zstd", &["-c", "-o", "compression_type=zstd"][..]),
        ("zlib", &["-c"][..]),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&img)]);
        qemu_img(&args);
        let r = open(&img);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (r, want) = (&r, &want);
                scope.spawn(move || {
                    let mut rng = Rng(t * 1000 + 1);
                    for _ in 0..50 {
                        let off = rng.below(want.len() as u64);
                        let len = rng.below((want.len() as u64 - off).min(2 * M)) + 1;
                        let mut buf = vec![0u8; len as usize];
                        r.read_at(&mut buf, off).unwrap();
                        assert_same(&buf, &want[off as usize..(off + len) as usize], name);
                    }
                });
            }
        });
    }
}

#[test]
fn holes_and_zero_clusters_are_reported_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("holes.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(
        &img,
        &[
            "write -P 0xab 1M 192k",
            "write -P 0xcd 8M 64k",
            "write -P 0x11 16M 128k",
            // A zero cluster over allocated data, and one over nothing.
            "write -z 16M 64k",
            "write -z 32M 1M",
        ],
    );
    let r = open(&img);
    assert!(!r.may_have_data(0, M).unwrap());
    assert!(r.may_have_data(M, 64 * K).unwrap());
    assert!(r.may_have_data(0, 2 * M).unwrap());
    assert!(!r.may_have_data(M + 192 * K, 8 * M - (M + 192 * K)).unwrap());
    assert!(!r.may_have_data(16 * M, 64 * K).unwrap(), "zero cluster");
    assert!(r.may_have_data(16 * M + 64 * K, 64 * K).unwrap());
    assert!(!r.may_have_data(32 * M, 32 * M).unwrap());
    assert_eq!(r.allocated_bytes().unwrap(), 192 * K + 64 * K + 64 * K);
    let mut buf = vec![1u8; 128 * K as usize];
    r.read_at(&mut buf, 16 * M).unwrap();
    assert!(buf[..64 * K as usize].iter().all(|&b| b == 0));
    assert!(buf[64 * K as usize..].iter().all(|&b| b == 0x11));
    check_map(&img, r.as_ref());
    assert_same(&read_all(r.as_ref(), M), &qemu_raw(&img), "holes");
}

#[test]
fn a_mostly_empty_100_gib_disk_reports_its_holes_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "100G"]);
    qemu_io(
        &img,
        &[
            "write -P 0x5a 0 64k",
            "write -P 0x5b 50G 64k",
            "write -P 0x5c 102399M 1M",
        ],
    );
    let r = open(&img);
    assert_eq!(r.size(), 100 * G);
    let with_data: Vec<u64> = (0..100)
        .filter(|&i| r.may_have_data(i * G, G).unwrap())
        .collect();
    assert_eq!(with_data, vec![0, 50, 99]);
    assert!(r.may_have_data(0, 100 * G).unwrap());
    assert!(!r.may_have_data(64 * K, 50 * G - 64 * K).unwrap());
    assert_eq!(r.allocated_bytes().unwrap(), 64 * K + 64 * K + M);
    let mut buf = vec![0u8; 64 * K as usize];
    r.read_at(&mut buf, 50 * G).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5b));
    r.read_at(&mut buf, 70 * G).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // The backup's pattern: ask, then read only what may hold data.
    let mut chunk = vec![0u8; M as usize];
    let mut read = 0;
    for i in 0..100 * 1024 {
        if r.may_have_data(i * M, M).unwrap() {
            r.read_at(&mut chunk, i * M).unwrap();
            read += 1;
        }
    }
    assert_eq!(read, 3);
}

/// base (raw) <- mid (qcow2, -F raw) <- top (qcow2, -F qcow2), writes in each layer.
#[test]
fn backing_chains_read_as_one_disk() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let want_base = make_raw(&base, 8 * M, 5);
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    // Relative backing names: QEMU resolves them against the overlay's folder.
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0x21 1M 128k",
            "write -P 0x22 3M 64k",
            "write -z 5M 256k",
        ],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "12M",
    ]);
    qemu_io(&top, &["write -P 0x31 1M 64k", "write -P 0x32 7M 2M"]);

    let r = open(&top);
    assert_eq!(r.size(), 12 * M);
    assert_eq!(r.subformat().as_deref(), Some("v2"));
    let b1 = r.backing().expect("mid");
    assert_eq!(b1.format(), "qcow2");
    assert_eq!(b1.size(), 8 * M);
    let b2 = b1.backing().expect("base");
    assert_eq!(b2.format(), "raw");
    assert!(b2.backing().is_none());
    let got = read_all(r.as_ref(), M);
    let qemu = qemu_raw(&top);
    assert_same(&got, &qemu, "chain");
    // Spot checks by hand, so that the test does not only trust qemu-img.
    assert!(got[M as usize..(M + 64 * K) as usize]
        .iter()
        .all(|&b| b == 0x31));
    let mid_part = (M + 64 * K) as usize..(M + 128 * K) as usize;
    assert!(got[mid_part].iter().all(|&b| b == 0x21));
    assert!(got[5 * M as usize..(5 * M + 256 * K) as usize]
        .iter()
        .all(|&b| b == 0));
    assert_same(&got[..M as usize], &want_base[..M as usize], "base part");
    assert!(
        got[9 * M as usize..].iter().all(|&b| b == 0),
        "past the base"
    );
    check_unaligned_reads(r.as_ref(), &qemu, 9);
    check_map(&top, r.as_ref());
    // The zero clusters in mid hide base's data.
    assert!(!r.may_have_data(5 * M, 256 * K).unwrap());
}

#[test]
fn qcow2_backing_with_extended_l2_and_compression() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, 4 * M, 2);
    let base = dir.path().join("base.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&src), s(&base)]);
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&mid),
    ]);
    // Subclusters of 4 KiB: allocated, zero and unallocated ones in one cluster.
    qemu_io(
        &mid,
        &[
            "write -P 0x41 4k 4k",
            "write -z 16k 8k",
            "write -P 0x42 200k 12k",
            "write -z 1M 128k",
        ],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&mid),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 0x51 2M 4k"]);
    let qemu = qemu_raw(&top);
    // Without its backing format extension (renamed to an unknown one, which readers skip),
    // the backing file's format is detected.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&top)
        .unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    let at = head
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    file.write_all_at(&[0x12, 0x34, 0x56, 0x78], at as u64)
        .unwrap();
    let r = open(&top);
    assert_same(&read_all(r.as_ref(), M), &qemu, "ext-l2 chain");
    check_unaligned_reads(r.as_ref(), &qemu, 17);
    check_map(&top, r.as_ref());
    let m = Qcow2Reader::open(&mid, &mut vmvault_disk::Chain::default()).unwrap();
    assert_eq!(m.allocated_bytes().unwrap(), 4 * K + 12 * K);
    assert!(!m.may_have_data(16 * K, 8 * K).unwrap());
    assert!(m.may_have_data(4 * K, 4 * K).unwrap());
}

#[test]
fn internal_snapshots_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(&img, &["write -P 0x61 0 1M"]);
    qemu_img(&["snapshot", "-c", "one", s(&img)]);
    qemu_io(&img, &["write -P 0x62 512k 1M"]);
    let r = open(&img);
    assert_same(&read_all(r.as_ref(), M), &qemu_raw(&img), "snapshot");
    check_map(&img, r.as_ref());
}

#[test]
fn dirty_images_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&img),
        "4M",
    ]);
    qemu_io(&img, &["write -P 0x71 0 1M"]);
    patch(&img, 79, |b| *b |= 1);
    let r = open(&img);
    let mut buf = vec![0u8; M as usize];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x71));
}

/// The backup's access pattern over 256 MiB: `may_have_data` then `read_at`, 1 MiB at a time.
#[test]
fn sequential_read_of_256_mib_in_1_mib_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 256 * M;
    let want = make_raw(&src, size, 21);
    for (name, opts) in [("plain", &[][..]), ("zlib", &["-c"][..])] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&img)]);
        qemu_img(&args);
        let r = open(&img);
        let mut buf = vec![0u8; M as usize];
        for i in 0..size / M {
            let part = &want[(i * M) as usize..((i + 1) * M) as usize];
            if r.may_have_data(i * M, M).unwrap() {
                r.read_at(&mut buf, i * M).unwrap();
                assert_same(&buf, part, name);
            } else {
                assert!(
                    part.iter().all(|&b| b == 0),
                    "{name}: data at MiB {i} missed"
                );
            }
        }
        std::fs::remove_file(&img).unwrap();
    }
}
