#![no_main]
use libfuzzer_sys::fuzz_target;
use vmvault_format::KeyFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = KeyFile::decode(data) {
        assert_eq!(KeyFile::decode(&f.encode()).unwrap(), f);
    }
});
