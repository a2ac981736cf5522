//! The key file: the vault's two secrets wrapped by a key derived from the passphrase.
//!
//! ```text
//! offset size field
//!   0     8   magic "VMVKEY\0\0"
//!   8     2   version = 1 (u16 LE)
//!  10     2   KDF: 1 = Argon2id version 0x13 (u16 LE)
//!  12     4   Argon2 memory cost in KiB (u32 LE)
//!  16     4   Argon2 time cost, passes (u32 LE)
//!  20     4   Argon2 parallelism (u32 LE)
//!  24    32   salt (random)
//!  56    12   nonce (random)
//!  68    64   wrapped keys: AES-256-GCM(KEK, nonce, aad = bytes 0..68) of data key ‖ id key
//! 132    16   AES-GCM tag
//! 148    32   checksum: BLAKE3(bytes 0..148)
//! ```
//! KEK = Argon2id(passphrase, salt, memory, time, parallelism) → 32 bytes.
//!
//! The checksum tells a damaged file (checksum mismatch) from a wrong passphrase (checksum good,
//! tag fails). Changing the passphrase rewrites only this file: the data key never changes.

use argon2::{Algorithm, Argon2, Params, Version};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::error::{invalid, FormatError};
use crate::Keys;

pub const KEYFILE_MAGIC: [u8; 8] = *b"VMVKEY\0\0";
pub const KEYFILE_LEN: usize = 180;
const VERSION: u16 = 1;
const KDF_ARGON2ID: u16 = 1;
const WHAT: &str = "key file";

const _: () = assert!(KEYFILE_LEN == 8 + 2 + 2 + 4 + 4 + 4 + 32 + 12 + 64 + 16 + 32);

/// Argon2id cost parameters, stored in the key file so they can be raised later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub time: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes: about a quarter second here, the OWASP-recommended class of cost.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            time: 3,
            parallelism: 1,
        }
    }
}

impl KdfParams {
    fn argon2(&self) -> Result<Argon2<'static>, FormatError> {
        // Bounds keep a hostile key file from asking for unbounded memory or time.
        if self.memory_kib > 4 * 1024 * 1024 || self.time > 100 || self.parallelism > 64 {
            return Err(invalid(WHAT, "Argon2 parameters are out of bounds"));
        }
        let params = Params::new(self.memory_kib, self.time, self.parallelism, Some(32))
            .map_err(|e| invalid(WHAT, format!("Argon2 parameters: {e}")))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub kdf: KdfParams,
    pub salt: [u8; 32],
    pub nonce: [u8; 12],
    pub wrapped: [u8; 80],
}

impl KeyFile {
    /// Wraps `keys` under `passphrase` with a fresh salt and nonce.
    pub fn wrap(keys: &Keys, passphrase: &[u8], kdf: KdfParams) -> Result<KeyFile, FormatError> {
        let mut salt = [0u8; 32];
        let mut nonce = [0u8; 12];
        crate::random_bytes(&mut salt);
        crate::random_bytes(&mut nonce);
        let mut file = KeyFile {
            kdf,
            salt,
            nonce,
            wrapped: [0; 80],
        };
        let kek = file.derive(passphrase)?;
        let mut body = [0u8; 64];
        body[..32].copy_from_slice(&keys.data);
        body[32..].copy_from_slice(&keys.id);
        let aad = file.head();
        let tag = kek
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut body,
            )
            .expect("64 bytes seal");
        file.wrapped[..64].copy_from_slice(&body);
        file.wrapped[64..].copy_from_slice(tag.as_ref());
        Ok(file)
    }

    /// Unwraps the vault's keys; a wrong passphrase is [`FormatError::WrongPassphrase`].
    pub fn unwrap_keys(&self, passphrase: &[u8]) -> Result<Keys, FormatError> {
        let kek = self.derive(passphrase)?;
        let mut body = self.wrapped;
        let aad = self.head();
        let plain = kek
            .open_in_place(
                Nonce::assume_unique_for_key(self.nonce),
                Aad::from(&aad[..]),
                &mut body,
            )
            .map_err(|_| FormatError::WrongPassphrase)?;
        Ok(Keys {
            data: plain[..32].try_into().unwrap(),
            id: plain[32..64].try_into().unwrap(),
        })
    }

    fn derive(&self, passphrase: &[u8]) -> Result<LessSafeKey, FormatError> {
        let mut kek = [0u8; 32];
        self.kdf
            .argon2()?
            .hash_password_into(passphrase, &self.salt, &mut kek)
            .map_err(|e| invalid(WHAT, format!("Argon2: {e}")))?;
        let key = UnboundKey::new(&AES_256_GCM, &kek).expect("32-byte key");
        kek = [0; 32];
        let _ = kek;
        Ok(LessSafeKey::new(key))
    }

    fn head(&self) -> [u8; 68] {
        let mut b = [0u8; 68];
        b[0..8].copy_from_slice(&KEYFILE_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&KDF_ARGON2ID.to_le_bytes());
        b[12..16].copy_from_slice(&self.kdf.memory_kib.to_le_bytes());
        b[16..20].copy_from_slice(&self.kdf.time.to_le_bytes());
        b[20..24].copy_from_slice(&self.kdf.parallelism.to_le_bytes());
        b[24..56].copy_from_slice(&self.salt);
        b[56..68].copy_from_slice(&self.nonce);
        b
    }

    pub fn encode(&self) -> [u8; KEYFILE_LEN] {
        let mut b = [0u8; KEYFILE_LEN];
        b[..68].copy_from_slice(&self.head());
        b[68..148].copy_from_slice(&self.wrapped);
        let sum = blake3::hash(&b[..148]);
        b[148..].copy_from_slice(sum.as_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<KeyFile, FormatError> {
        crate::error::check_fixed(b, &KEYFILE_MAGIC, VERSION, KEYFILE_LEN, WHAT)?;
        if blake3::hash(&b[..148]).as_bytes()[..] != b[148..] {
            return Err(FormatError::Checksum { what: WHAT });
        }
        if u16::from_le_bytes([b[10], b[11]]) != KDF_ARGON2ID {
            return Err(invalid(WHAT, "unknown key derivation function"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Ok(KeyFile {
            kdf: KdfParams {
                memory_kib: u32_at(12),
                time: u32_at(16),
                parallelism: u32_at(20),
            },
            salt: b[24..56].try_into().unwrap(),
            nonce: b[56..68].try_into().unwrap(),
            wrapped: b[68..148].try_into().unwrap(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        time: 1,
        parallelism: 1,
    };

    #[test]
    fn wrap_unwrap_and_wrong_passphrase() {
        let keys = Keys::generate();
        let file = KeyFile::wrap(&keys, b"correct horse", CHEAP).unwrap();
        let decoded = KeyFile::decode(&file.encode()).unwrap();
        assert_eq!(decoded, file);
        assert_eq!(decoded.unwrap_keys(b"correct horse").unwrap(), keys);
        assert_eq!(
            decoded.unwrap_keys(b"wrong").unwrap_err(),
            FormatError::WrongPassphrase
        );
    }

    #[test]
    fn any_flipped_byte_is_damage_not_a_wrong_passphrase() {
        let file = KeyFile::wrap(&Keys::generate(), b"pw", CHEAP)
            .unwrap()
            .encode();
        for i in 0..KEYFILE_LEN {
            let mut d = file;
            d[i] ^= 1;
            let err = KeyFile::decode(&d).unwrap_err();
            assert_ne!(err, FormatError::WrongPassphrase, "byte {i}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(f) = KeyFile::decode(&bytes) { let _ = f.unwrap_keys(b"x"); }
        }
    }
}
