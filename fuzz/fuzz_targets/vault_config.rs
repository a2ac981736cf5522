#![no_main]
use libfuzzer_sys::fuzz_target;
use vmvault_format::VaultConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = VaultConfig::decode(data) {
        assert_eq!(VaultConfig::decode(&c.encode()).unwrap(), c);
    }
});
