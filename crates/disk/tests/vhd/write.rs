//! The vhd writer: what it writes, qemu-img checks and compares.

use super::*;

#[test]
fn vhd_dynamic_writer_output_is_what_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Not a multiple of 512: the last piece ends mid-sector.
    let size = 45 * MIB + 3 * (64 << 10) + 1000;
    let want = make_raw(&src, size, 3);
    let out = dir.path().join("out.vhd");
    let w = vmvault_disk::create(&out, "vhd", size, false).unwrap();
    restore(&w, &want, &mut Rng(30));
    drop(w);
    qemu_accepts(&src, &out);
    let vsize = size.next_multiple_of(512);
    assert_eq!(qemu_virtual_size(&out), vsize, "whole sectors");
    let r = vmvault_disk::open(&out, "vhd").unwrap();
    assert_eq!(r.subformat().as_deref(), Some("dynamic"));
    assert_same_disk(&read_all(r.as_ref(), MIB as usize), &want, "read back");
    // A block QEMU finds allocated holds data; zero blocks were left unallocated.
    for (start, len, data) in qemu_map(&out) {
        assert_eq!(r.may_have_data(start, len).unwrap(), data);
        let chunk = &want[start as usize..((start + len) as usize).min(want.len())];
        assert_eq!(data, chunk.iter().any(|b| *b != 0), "block at {start}");
    }
    assert!(!r.may_have_data(8 * MIB, 6 * MIB).unwrap());
    // Unwritten parts of allocated blocks are holes: the file takes about what the data does.
    let on_disk = std::fs::metadata(&out).unwrap().blocks() * 512;
    let src_on_disk = std::fs::metadata(&src).unwrap().blocks() * 512;
    assert!(
        on_disk <= src_on_disk + 4 * MIB,
        "{on_disk} vs {src_on_disk}"
    );

    // Refuses an existing file unless told to overwrite it.
    assert!(matches!(
        vmvault_disk::create(&out, "vhd", size, false),
        Err(DiskError::Exists { .. })
    ));
    let w = VhdWriter::create_dynamic(&out, 4 * MIB, true).unwrap();
    w.finish().unwrap();
    let r = vmvault_disk::open(&out, "vhd").unwrap();
    assert_eq!(r.size(), 4 * MIB);
    assert!(!r.may_have_data(0, 4 * MIB).unwrap());
    assert_eq!(qemu_virtual_size(&out), 4 * MIB);

    assert!(matches!(
        VhdWriter::create_dynamic(&dir.path().join("huge.vhd"), 2041 << 30, false),
        Err(DiskError::Unsupported { .. })
    ));
}

#[test]
fn vhd_fixed_writer_output_is_what_qemu_and_azure_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 45 * MIB + 12345;
    let want = make_raw(&src, size, 4);
    let out = dir.path().join("out.vhd");
    let w = vmvault_disk::create(&out, "vhd-fixed", size, false).unwrap();
    restore(&w, &want, &mut Rng(40));
    drop(w);
    qemu_accepts(&src, &out);
    // Rounded up to whole MiB, as Azure requires.
    let vsize = 46 * MIB;
    assert_eq!(qemu_virtual_size(&out), vsize);
    let bytes_len = std::fs::metadata(&out).unwrap().len();
    assert_eq!(bytes_len, vsize + 512);
    let mut footer = [0u8; 512];
    File::open(&out)
        .unwrap()
        .read_exact_at(&mut footer, vsize)
        .unwrap();
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        vsize
    );
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed"
    );
    let (c, h, s) = spec_geometry(vsize);
    assert_eq!(u16::from_be_bytes([footer[56], footer[57]]), c);
    assert_eq!((footer[58], footer[59]), (h, s));
    let r = vmvault_disk::open(&out, "auto").unwrap();
    assert_eq!(r.subformat().as_deref(), Some("fixed"));
    assert_eq!(r.size(), vsize);
    assert_same_disk(&read_all(r.as_ref(), MIB as usize), &want, "read back");
    // Never-written ranges are holes.
    assert!(!r.may_have_data(8 * MIB, 6 * MIB).unwrap());
    assert!(!r
        .may_have_data(
            size.next_multiple_of(4096),
            vsize - size.next_multiple_of(4096)
        )
        .unwrap());
    let on_disk = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(on_disk < vsize - 6 * MIB, "sparse: {on_disk}");
    assert!(matches!(
        VhdWriter::create_fixed(&dir.path().join("huge.vhd"), 2041 << 30, false),
        Err(DiskError::Unsupported { .. })
    ));
}
