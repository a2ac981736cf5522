//! The body every disk-format fuzz target shares: the input written to a file, opened as one
//! format, then read and mapped the way a backup would. Never a panic, a hang or an allocation
//! the input's size does not justify.

pub fn open_and_read(data: &[u8], format: &str) {
    let dir = std::env::temp_dir().join(format!("vmvault-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("image");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(r) = vmvault_disk::open(&path, format) else {
        return;
    };
    let size = r.size();
    let mut buf = vec![0u8; 65536];
    for off in [0, size / 2, size.saturating_sub(65536)] {
        if off + 65536 <= size {
            let _ = r.read_at(&mut buf, off);
            let _ = r.may_have_data(off, 65536);
        }
    }
    // A read cutting clusters or blocks, as an unaligned caller would.
    if size >= 1000 {
        let _ = r.read_at(&mut buf[..777], 123);
    }
    let _ = r.may_have_data(0, size);
    let _ = r.allocated_bytes();
}
