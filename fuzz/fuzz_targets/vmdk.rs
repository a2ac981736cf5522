#![no_main]
use libfuzzer_sys::fuzz_target;

// Opens arbitrary bytes as a VMDK image (sparse extent or text descriptor) and uses it as a
// backup would: it must fail cleanly or read, never panic, hang or allocate wildly.
fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("vmvault-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("image");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(r) = vmvault_disk::open(&path, "vmdk") {
        let size = r.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 2, size.saturating_sub(65536)] {
            if off + 65536 <= size {
                let _ = r.read_at(&mut buf, off);
                let _ = r.may_have_data(off, 65536);
            }
        }
        let _ = r.allocated_bytes();
    }
});
