//! Any bytes handed to the object opener: an error or a payload within the limit, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmvault_format::{Codec, Keys, ObjectKind};

fuzz_target!(|data: &[u8]| {
    let keys = Keys {
        data: [7; 32],
        id: [9; 32],
    };
    for codec in [Codec::plain(1), Codec::encrypted(&keys, 1)] {
        for kind in [ObjectKind::Chunk, ObjectKind::Index, ObjectKind::Manifest] {
            let mut bytes = data.to_vec();
            if let Ok(plain) = codec.opener().open(kind, &mut bytes, 1 << 20) {
                assert!(plain.len() <= 1 << 20);
            }
        }
    }
});
