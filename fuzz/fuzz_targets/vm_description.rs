#![no_main]
use libfuzzer_sys::fuzz_target;
use vmvault_engine::VmDescription;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = VmDescription::parse(text) {
            assert_eq!(VmDescription::parse(&d.to_toml()).unwrap(), d);
        }
    }
});
