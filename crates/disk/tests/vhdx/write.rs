//! The vhdx writer: what it writes, qemu-img checks and compares.

use super::*;

#[test]
fn writer_output_passes_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte multiples that are not 64 KiB or 1 MiB multiples, and a size that QEMU would
    // pick another block size for.
    for (i, size) in [20 * MIB + 3 * 512, 3 * MIB + 64 * KIB, 130 * MIB + 512]
        .into_iter()
        .enumerate()
    {
        let src = dir.path().join("src.raw");
        let data = make_source(&src, size, 1000 + i as u64);
        let out = dir.path().join("out.vhdx");
        let w = vmvault_disk::create(&out, "vhdx", size, true).unwrap();
        let want = write_shuffled(&w, &data, 77 + i as u64);
        let expected = dir.path().join("expected.raw");
        std::fs::write(&expected, &want).unwrap();

        let check = qemu_img(&["check", "-f", "vhdx"], &[&out]);
        assert!(check.contains("No errors were found"), "{check}");
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", "vhdx"], &[&expected, &out]);
        assert!(cmp.contains("Images are identical"), "{cmp}");
        let info = qemu_img(&["info", "-f", "vhdx"], &[&out]);
        assert!(info.contains(&format!("({size} bytes)")), "{info}");

        let r = open(&out).unwrap();
        assert_eq!(r.subformat().as_deref(), Some("dynamic"));
        assert_same(&read_all(&*r), &want, "our reader on our writer's image");
        // Holes stay holes: blocks never written, or written with zeros only.
        for block in 0..size.div_ceil(MIB) {
            let range = (block * MIB) as usize..((block + 1) * MIB).min(size) as usize;
            if want[range.clone()].iter().all(|&b| b == 0) {
                assert!(
                    !r.may_have_data(block * MIB, MIB).unwrap(),
                    "block {block} is all zeros yet allocated"
                );
            }
        }
    }
}
