//! Guest disks from untrusted bytes (GPT, MBR with logical partitions, a filesystem on the
//! whole disk), then their filesystems: see shared/guest.rs.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "shared/guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| guest::disk(data));
