#![no_main]
use libfuzzer_sys::fuzz_target;
use vmvault_format::DiskIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(i) = DiskIndex::decode(data) {
        assert_eq!(i.encode(), data);
        for n in 0..i.chunks.len().min(4) {
            let (start, len) = i.chunk_range(n);
            assert!(start + len as u64 <= i.disk_size);
        }
    }
});
