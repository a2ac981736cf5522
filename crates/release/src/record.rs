//! The signed release record, its canonical bytes and its detached signature file.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::{ReleaseError, ReleaseKey, ReleasePublicKey};

/// The record's first line and the signature file's `format`.
pub const FORMAT: &str = "vmvault release 1";

/// A release version, `MAJOR.MINOR.PATCH`, ordered by its numbers. Nothing else is accepted
/// (no `v` prefix, pre-release or build part, no leading zeros): a version names a directory
/// and is compared against every version a host has run, so each one has exactly one
/// spelling.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

/// Why a version did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("version {0:?} is not MAJOR.MINOR.PATCH (three numbers and two dots, like 0.2.0)")]
    NotThreeNumbers(String),
    #[error("version {0:?} has a number with a leading zero")]
    LeadingZero(String),
    #[error("version {0:?} has a number too large")]
    TooLarge(String),
}

impl Version {
    pub const fn new(major: u64, minor: u64, patch: u64) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<Version, VersionError> {
        let bad = || VersionError::NotThreeNumbers(text.to_string());
        let mut numbers = [0u64; 3];
        let mut parts = text.split('.');
        for n in &mut numbers {
            let part = parts.next().ok_or_else(bad)?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            if part.len() > 1 && part.starts_with('0') {
                return Err(VersionError::LeadingZero(text.to_string()));
            }
            *n = part
                .parse()
                .map_err(|_| VersionError::TooLarge(text.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Version::new(numbers[0], numbers[1], numbers[2]))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The target triple this binary was built for, as a signer writes it for it.
///
/// Built from `std::env::consts::{ARCH, OS}` and the C library, which is what decides
/// whether a binary runs here. The triple is only ever compared for equality with the one a
/// release was signed for, so a platform mapped imprecisely fails closed: its agent refuses
/// releases until the signer uses the same spelling, and never runs a foreign binary. The
/// agent runs on Linux KVM hosts, where the common triples come out exactly right.
pub fn this_target() -> String {
    use std::env::consts::{ARCH, OS};
    let arch = match ARCH {
        "riscv64" => "riscv64gc",
        "powerpc64" if cfg!(target_endian = "little") => "powerpc64le",
        "x86" => "i686",
        other => other,
    };
    match OS {
        "linux" => {
            let libc = if cfg!(target_env = "musl") {
                "musl"
            } else {
                "gnu"
            };
            format!("{arch}-unknown-linux-{libc}")
        }
        "macos" => format!("{arch}-apple-darwin"),
        os => format!("{arch}-unknown-{os}"),
    }
}

/// What a release signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub version: Version,
    /// The target triple, like `x86_64-unknown-linux-gnu`.
    pub target: String,
    pub sha256: [u8; 32],
    pub size: u64,
}

impl Release {
    /// The record of `bytes` as `version` for `target`.
    pub fn of_bytes(bytes: &[u8], version: Version, target: &str) -> Result<Release, ReleaseError> {
        check_target(target)?;
        Ok(Release {
            version,
            target: target.to_string(),
            sha256: sha256_of(bytes),
            size: bytes.len() as u64,
        })
    }

    /// The record of the file at `path`, read in pieces (a binary need not fit in memory).
    pub fn of_file(path: &Path, version: Version, target: &str) -> Result<Release, ReleaseError> {
        check_target(target)?;
        let (sha256, size) = hash_file(path)?;
        Ok(Release {
            version,
            target: target.to_string(),
            sha256,
            size,
        })
    }

    /// The bytes the signature is over, as the crate documentation spells them out.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        format!(
            "{FORMAT}\nversion {}\ntarget {}\nsha256 {}\nsize {}\n",
            self.version,
            self.target,
            hex::encode(self.sha256),
            self.size
        )
        .into_bytes()
    }
}

/// A record and its signature: the content of a `FILE.sig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRelease {
    pub release: Release,
    pub signature: [u8; 64],
}

/// The JSON of a `FILE.sig`. Unknown fields are refused: they would not be signed, and a
/// reader that skipped them might skip something a later format means.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigFile {
    format: String,
    version: Version,
    target: String,
    sha256: String,
    size: u64,
    signature: String,
}

impl SignedRelease {
    /// The signature file's text (pretty JSON and a final newline).
    pub fn to_json(&self) -> String {
        let file = SigFile {
            format: FORMAT.to_string(),
            version: self.release.version,
            target: self.release.target.clone(),
            sha256: hex::encode(self.release.sha256),
            size: self.release.size,
            signature: hex::encode(self.signature),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("plain strings and numbers");
        text.push('\n');
        text
    }

    /// A signature file's content. Only its form is checked here; [`verify`] checks the rest.
    pub fn from_json(text: &[u8]) -> Result<SignedRelease, ReleaseError> {
        let bad = |what: String| ReleaseError::Format(format!("not a release signature: {what}"));
        let file: SigFile = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        if file.format != FORMAT {
            return Err(bad(format!(
                "format {:?}, this version reads {FORMAT:?}",
                file.format
            )));
        }
        check_target(&file.target)?;
        let mut sha256 = [0; 32];
        hex::decode_to_slice(&file.sha256, &mut sha256)
            .map_err(|_| bad("sha256 is not 64 hex digits".into()))?;
        let mut signature = [0; 64];
        hex::decode_to_slice(&file.signature, &mut signature)
            .map_err(|_| bad("signature is not 128 hex digits".into()))?;
        Ok(SignedRelease {
            release: Release {
                version: file.version,
                target: file.target,
                sha256,
                size: file.size,
            },
            signature,
        })
    }

    /// The signature file at `path`.
    pub fn read(path: &Path) -> Result<SignedRelease, ReleaseError> {
        let text =
            std::fs::read(path).map_err(ReleaseError::io(format!("reading {}", path.display())))?;
        SignedRelease::from_json(&text)
            .map_err(|e| ReleaseError::Format(format!("{}: {e}", path.display())))
    }
}

/// Sign `release` with `key`.
pub fn sign_release(key: &ReleaseKey, release: Release) -> Result<SignedRelease, ReleaseError> {
    check_target(&release.target)?;
    let signature = key.sign_bytes(&release.canonical_bytes());
    Ok(SignedRelease { release, signature })
}

/// Sign the binary at `binary` as `version` for `target`. The target is the binary's, not
/// the signing machine's: releases are often built and signed on one machine for several
/// ([`this_target`] is the value for a binary built here, for here).
pub fn sign(
    key: &ReleaseKey,
    binary: &Path,
    version: Version,
    target: &str,
) -> Result<SignedRelease, ReleaseError> {
    sign_release(key, Release::of_file(binary, version, target)?)
}

/// Whether `signed` is `public`'s signature over its record and `binary` is what the record
/// says: the signature first (nothing about an unsigned record is worth comparing), then the
/// size, then the SHA-256. The target and the version are the installer's to judge.
pub fn verify(
    public: &ReleasePublicKey,
    signed: &SignedRelease,
    binary: &[u8],
) -> Result<(), ReleaseError> {
    verify_record(public, signed)?;
    check_size(&signed.release, binary.len() as u64)?;
    check_sha256(&signed.release, &sha256_of(binary))
}

/// [`verify`] for the binary in the file at `path`, read in pieces.
pub fn verify_file(
    public: &ReleasePublicKey,
    signed: &SignedRelease,
    path: &Path,
) -> Result<(), ReleaseError> {
    verify_record(public, signed)?;
    let (sha256, size) = hash_file(path)?;
    check_size(&signed.release, size)?;
    check_sha256(&signed.release, &sha256)
}

fn verify_record(public: &ReleasePublicKey, signed: &SignedRelease) -> Result<(), ReleaseError> {
    // A target that could not have been signed (see check_target) is refused as unsigned.
    if check_target(&signed.release.target).is_err()
        || !public.checks(&signed.release.canonical_bytes(), &signed.signature)
    {
        return Err(ReleaseError::BadSignature);
    }
    Ok(())
}

fn check_size(release: &Release, size: u64) -> Result<(), ReleaseError> {
    if size != release.size {
        return Err(ReleaseError::Mismatch(format!(
            "it is {size} bytes, the signature says {}",
            release.size
        )));
    }
    Ok(())
}

fn check_sha256(release: &Release, sha256: &[u8; 32]) -> Result<(), ReleaseError> {
    if *sha256 != release.sha256 {
        return Err(ReleaseError::Mismatch(format!(
            "its SHA-256 is {}, the signature says {}",
            hex::encode(sha256),
            hex::encode(release.sha256)
        )));
    }
    Ok(())
}

/// A target triple goes into the record as one line: allow only what triples are made of,
/// so no value can carry a line break (or anything else that could make two records share
/// their bytes).
fn check_target(target: &str) -> Result<(), ReleaseError> {
    let ok = (1..=64).contains(&target.len())
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !ok {
        return Err(ReleaseError::Format(format!(
            "{target:?} is not a target triple (1 to 64 of A-Z a-z 0-9 _ . -)"
        )));
    }
    Ok(())
}

pub(crate) fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&SHA256, bytes).as_ref());
    out
}

fn hash_file(path: &Path) -> Result<([u8; 32], u64), ReleaseError> {
    let what = || format!("reading {}", path.display());
    let mut file = File::open(path).map_err(ReleaseError::io(what()))?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReleaseError::io(what())(e)),
        };
        ctx.update(&buf[..n]);
        size += n as u64;
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((out, size))
}
