//! vmdk images from untrusted bytes: see shared/image.rs.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "shared/image.rs"]
mod image;

fuzz_target!(|data: &[u8]| image::open_and_read(data, "vmdk"));
