//! fat filesystems from untrusted bytes: see shared/guest.rs.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "shared/guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| guest::filesystem(data, vmvault_files::FsType::Fat));
