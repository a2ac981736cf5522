//! The release key: Ed25519 through ring, stored as the PKCS#8 v2 document ring makes (the
//! private seed and the public key, so that loading can check the two belong together).

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::{fsx, ReleaseError};

/// The private release key. It can make every auto-upgrading host run code as root, so it
/// has no `Clone` and its `Debug` shows only the public half.
pub struct ReleaseKey {
    pair: Ed25519KeyPair,
}

/// The public half: what a server hands out at enrollment and an agent checks releases with.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReleasePublicKey([u8; 32]);

impl ReleaseKey {
    /// A new random key and its PKCS#8 document (the bytes to keep; they are the key).
    pub fn generate() -> Result<(ReleaseKey, Vec<u8>), ReleaseError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| {
            ReleaseError::Format("the system's random number generator failed".into())
        })?;
        let pkcs8 = doc.as_ref().to_vec();
        Ok((ReleaseKey::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// The key in a PKCS#8 v2 document (as [`generate`](Self::generate) makes), refused if
    /// its public half does not match its private one.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<ReleaseKey, ReleaseError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|pair| ReleaseKey { pair })
            .map_err(|e| ReleaseError::Format(format!("not an Ed25519 PKCS#8 v2 key: {e}")))
    }

    /// The key in `path`, made there first if there is none (mode 0600, written whole before
    /// it appears under its name). An existing file is never replaced: losing a release key
    /// would strand every host that trusts it, so a file that does not parse is an error to
    /// look at, not something to write over. A key file that others can read is refused too:
    /// whoever reads it can sign releases.
    pub fn load_or_create(path: &Path) -> Result<ReleaseKey, ReleaseError> {
        loop {
            if let Some(key) = Self::load(path)? {
                return Ok(key);
            }
            let (key, pkcs8) = Self::generate()?;
            let name = path.file_name().ok_or_else(|| {
                ReleaseError::Format(format!("{} is not a file name", path.display()))
            })?;
            let tmp = path.with_file_name(format!(
                ".{}.{}.tmp",
                name.to_string_lossy(),
                std::process::id()
            ));
            if fsx::create_new(path, &tmp, &mut pkcs8.as_slice(), 0o600)? {
                return Ok(key);
            }
            // Another process made it between our look and our link: use theirs.
        }
    }

    fn load(path: &Path) -> Result<Option<ReleaseKey>, ReleaseError> {
        let Some(bytes) = fsx::read_if_exists(path)? else {
            return Ok(None);
        };
        let mode = std::fs::metadata(path)
            .map_err(ReleaseError::io(format!("reading {}", path.display())))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(ReleaseError::Format(format!(
                "{} can be read by others (mode {:o}): make it 0600",
                path.display(),
                mode & 0o777
            )));
        }
        ReleaseKey::from_pkcs8(&bytes)
            .map(Some)
            .map_err(|e| ReleaseError::Format(format!("{}: {e}", path.display())))
    }

    pub fn public(&self) -> ReleasePublicKey {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        ReleasePublicKey(bytes)
    }

    /// The public key in hex (64 digits), as enrollment hands it out.
    pub fn public_hex(&self) -> String {
        self.public().to_hex()
    }

    /// Ed25519 over `message`. Crate-private: the only thing this key signs is a release
    /// record, so that its signature can never be lifted onto something else.
    pub(crate) fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        let mut sig = [0; 64];
        sig.copy_from_slice(self.pair.sign(message).as_ref());
        sig
    }
}

impl fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseKey({})", self.public_hex())
    }
}

impl ReleasePublicKey {
    /// 64 hex digits (either case), as [`to_hex`](Self::to_hex) writes them.
    pub fn from_hex(text: &str) -> Result<ReleasePublicKey, ReleaseError> {
        let mut bytes = [0; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| {
            ReleaseError::Format(format!(
                "{text:?} is not a release public key (64 hex digits)"
            ))
        })?;
        Ok(ReleasePublicKey(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> ReleasePublicKey {
        ReleasePublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `signature` is this key's over `message`.
    pub(crate) fn checks(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Display for ReleasePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ReleasePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleasePublicKey({})", self.to_hex())
    }
}
