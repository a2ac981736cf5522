//! The vmdk writer: what it writes, qemu-img checks and compares.

use super::*;

#[test]
fn writer_output_passes_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let size = 70 * MIB + 5 * 512; // not a multiple of the grain: the last piece is partial
    let raw = dir.path().join("src.raw");
    let regs = regions(size);
    make_raw(&raw, size, &regs, 3);
    let mut rng = Rng(5);
    let mut order = pieces(size, &mut rng);
    for (name, shuffled) in [("in-order", false), ("shuffled", true)] {
        if shuffled {
            shuffle(&mut order, &mut rng);
        }
        let out = dir.path().join(format!("{name}.vmdk"));
        write_image(&raw, &out, &order);
        check_with_qemu(&raw, &out);
        let grains = assert_streamable(&out);
        assert!(grains > 0);
        let r = VmdkReader::open(&out, &mut vmvault_disk::Chain::default()).unwrap();
        assert_eq!(r.size(), size);
        assert_eq!(r.subformat().as_deref(), Some("streamOptimized"));
        assert_same_as_raw(&r, &raw);
        assert_holes(&r, &regs);
        // Only grains holding data were written.
        assert!(fs::metadata(&out).unwrap().len() < 10 * MIB);
    }
    assert!(matches!(
        VmdkWriter::create(&dir.path().join("in-order.vmdk"), size, false),
        Err(DiskError::Exists { .. })
    ));
}

#[test]
fn writer_puts_grains_back_in_order_when_they_arrive_out_of_order() {
    // More incompressible data than the writer holds back (64 MiB), written backwards, makes
    // it write grains out of order and rewrite the file at finish.
    let dir = tempfile::tempdir().unwrap();
    let size = 96 * MIB;
    let raw = dir.path().join("src.raw");
    let mut f = File::create(&raw).unwrap();
    let mut rng = Rng(17);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..96 {
        if i % 10 == 3 {
            buf.fill(0);
        } else {
            fill(&mut buf, 0, &mut rng);
        }
        f.write_all(&buf).unwrap();
    }
    drop(f);
    let mut order: Vec<(u64, u64)> = (0..size / MIB).map(|i| (i * MIB, MIB)).collect();
    order.reverse();
    let out = dir.path().join("out.vmdk");
    write_image(&raw, &out, &order);
    assert!(!dir.path().join("out.vmdk.vmvault-tmp").exists());
    check_with_qemu(&raw, &out);
    assert_streamable(&out);
    let r = open(&out);
    assert_same_as_raw(&*r, &raw);
}

#[test]
fn writer_handles_empty_and_tiny_disks() {
    let dir = tempfile::tempdir().unwrap();
    // qemu cannot open a disk of 0 sectors as streamOptimized (it takes a sparse file of no
    // capacity for a descriptor file), so that size is checked with vmvault's reader only.
    for size in [0u64, 512, 64 * KIB, 64 * KIB + 512] {
        let raw = dir.path().join(format!("{size}.raw"));
        let mut data = vec![0u8; size as usize];
        if size > 0 {
            data[size as usize - 1] = 9;
        }
        fs::write(&raw, &data).unwrap();
        let out = dir.path().join(format!("{size}.vmdk"));
        let w = VmdkWriter::create(&out, size, false).unwrap();
        if size > 0 {
            w.write_at(&data, 0).unwrap();
        }
        w.finish().unwrap();
        assert!(
            w.write_at(&data, 0).is_err() || size == 0,
            "no writes after finish"
        );
        if size > 0 {
            check_with_qemu(&raw, &out);
        }
        assert_streamable(&out);
        let r = open(&out);
        assert_eq!(r.size(), size);
        let mut back = vec![0u8; size as usize];
        r.read_at(&mut back, 0).unwrap();
        assert!(back == data);
    }
    // Writes must be whole grains.
    let w = VmdkWriter::create(&dir.path().join("x.vmdk"), MIB, false).unwrap();
    assert!(w.write_at(&[1u8; 512], 512).is_err());
    assert!(w.write_at(&[1u8; 512], 0).is_err());
    assert!(w.write_at(&[1u8; 65536], MIB).is_err());
}
