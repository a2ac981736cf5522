//! The vault config: the one object that says what a vault is, readable without the key.
//!
//! ```text
//! offset size field
//!  0     8    magic "VMVCONF\0"
//!  8     2    version = 1 (u16 LE)
//! 10     2    flags: bit 0 = encrypted; other bits 0
//! 12     4    chunk size in bytes (u32 LE), a power of two in [64 KiB, 16 MiB]
//! 16    16    vault id (random)
//! 32     8    creation time, seconds since the Unix epoch (i64 LE)
//! 40     4    zstd level used when writing (i32 LE)
//! 44    12    reserved, 0
//! 56     8    checksum: the first 8 bytes of BLAKE3(bytes 0..56)
//! ```

use crate::error::{invalid, FormatError};
use crate::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

pub const CONFIG_MAGIC: [u8; 8] = *b"VMVCONF\0";
pub const CONFIG_LEN: usize = 64;
const VERSION: u16 = 1;
const FLAG_ENCRYPTED: u16 = 1;
const WHAT: &str = "vault config";

const _: () = assert!(CONFIG_LEN == 8 + 2 + 2 + 4 + 16 + 8 + 4 + 12 + 8);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    pub encrypted: bool,
    pub chunk_size: u32,
    pub vault_id: [u8; 16],
    pub created: i64,
    pub zstd_level: i32,
}

impl VaultConfig {
    /// Checks the values a vault may be created with.
    pub fn validate(&self) -> Result<(), FormatError> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(invalid(
                WHAT,
                format!("chunk size {cs} is not a power of two between 64 KiB and 16 MiB"),
            ));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(invalid(
                WHAT,
                format!("zstd level {} is not in 1..=19", self.zstd_level),
            ));
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&CONFIG_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        b[10..12].copy_from_slice(&flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..32].copy_from_slice(&self.vault_id);
        b[32..40].copy_from_slice(&self.created.to_le_bytes());
        b[40..44].copy_from_slice(&self.zstd_level.to_le_bytes());
        let sum = blake3::hash(&b[..56]);
        b[56..64].copy_from_slice(&sum.as_bytes()[..8]);
        b
    }

    pub fn decode(b: &[u8]) -> Result<VaultConfig, FormatError> {
        crate::error::check_fixed(b, &CONFIG_MAGIC, VERSION, CONFIG_LEN, WHAT)?;
        if blake3::hash(&b[..56]).as_bytes()[..8] != b[56..64] {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let flags = u16::from_le_bytes([b[10], b[11]]);
        if flags & !FLAG_ENCRYPTED != 0 || b[44..56].iter().any(|&x| x != 0) {
            return Err(invalid(WHAT, "unknown flags or reserved bytes set"));
        }
        let config = VaultConfig {
            encrypted: flags & FLAG_ENCRYPTED != 0,
            chunk_size: u32::from_le_bytes(b[12..16].try_into().unwrap()),
            vault_id: b[16..32].try_into().unwrap(),
            created: i64::from_le_bytes(b[32..40].try_into().unwrap()),
            zstd_level: i32::from_le_bytes(b[40..44].try_into().unwrap()),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> VaultConfig {
        VaultConfig {
            encrypted: true,
            chunk_size: 1 << 20,
            vault_id: [9; 16],
            created: 1_700_000_000,
            zstd_level: 1,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let b = sample().encode();
        assert_eq!(VaultConfig::decode(&b).unwrap(), sample());
        for i in 0..CONFIG_LEN {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(VaultConfig::decode(&d).is_err(), "flip at {i}");
        }
        assert!(VaultConfig::decode(&b[..63]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = VaultConfig::decode(&bytes);
        }
    }
}
