//! Signed agent releases (docs/design.md, "Releases and the keys they touch"): the release
//! key ([`ReleaseKey`]), the record it signs ([`Release`], [`SignedRelease`]) and the agent's
//! side of an upgrade ([`Installation`]): refuse what it must not run, swap atomically, give
//! the new version a deadline to come back healthy, and roll back when it does not.
//!
//! # Trust chain
//!
//! Whoever holds the release key can run code as root on every auto-upgrading host, so the
//! agent trusts exactly one thing: the release public key it got at enrollment, covered by the
//! server's proof (`EnrollAnswer::release_key` in vmvault-api). It never takes a key from a
//! release, an upgrade offer or a later heartbeat: a compromised server that could hand over a
//! new key could push anything. The server either makes the key itself (`STATE/release.key`,
//! [`ReleaseKey::load_or_create`]) or knows only the public half of an offline key; then it can
//! withhold releases but never forge one. The host's own key cannot sign a release: it is a
//! different key with a different job, and nothing here accepts it.
//!
//! # The signed record
//!
//! The signature covers a short record, not the binary alone, so that a correctly signed
//! binary cannot be passed off as another version (to undo a fix) or another architecture. The
//! bytes signed ([`Release::canonical_bytes`]) are five lines of ASCII, each ended by one LF
//! (0x0A), with one space (0x20) between key and value, no other whitespace, nothing before or
//! after:
//!
//! ```text
//! vmvault release 1\n
//! version MAJOR.MINOR.PATCH\n          decimal, no leading zeros ("0.2.0")
//! target TRIPLE\n                      [A-Za-z0-9_.-]{1,64} ("x86_64-unknown-linux-gnu")
//! sha256 HEX\n                         64 lowercase hex digits of the binary's SHA-256
//! size N\n                             the binary's length in bytes, decimal, no leading zeros
//! ```
//!
//! For the 14-byte file `vmvault 0.2.0\n` released as 0.2.0 for x86_64 Linux, the 144 bytes
//! signed are these lines, each ended by LF:
//!
//! ```text
//! vmvault release 1
//! version 0.2.0
//! target x86_64-unknown-linux-gnu
//! sha256 8f4e732e5ef28b36ca3f027cdec0dfc9ef225032da6113d0349e489fb1ab54f3
//! size 14
//! ```
//!
//! The signature is plain Ed25519 (RFC 8032: no prehash, no context) over those bytes. The
//! first line names the format: a record of another kind signed by the same key can never read
//! as a release, and a later format changes the number. The target is restricted to a few
//! characters so that no value can carry a line break and make two records share their bytes.
//! `tests/releases.rs` pins a key, a record and its signature byte for byte.
//!
//! The detached signature file (`FILE.sig`, [`SignedRelease::to_json`]) carries the record's
//! fields and the signature in JSON: `{"format": "vmvault release 1", "version": "0.2.0",
//! "target": "...", "sha256": "<hex>", "size": N, "signature": "<128 hex digits>"}`. The JSON
//! is only transport: what is checked is the canonical bytes rebuilt from the parsed fields.
//!
//! # The agent's layout
//!
//! ```text
//! ROOT/versions/V/vmvault     one binary per version, mode 0755
//! ROOT/current  -> versions/V the version systemd starts (ExecStart=ROOT/current/vmvault)
//! ROOT/previous -> versions/U what a rollback goes back to
//! ROOT/state.json             {"ran": [versions that came up healthy], "bad": [rolled back]}
//! ROOT/upgrade.pending        {"from", "to", "deadline"} while an upgrade awaits its health
//! ```
//!
//! The swaps go through `current.new`, `previous.new`, `state.json.new`, `upgrade.pending.new`
//! and `versions/V/vmvault.tmp`, each renamed over its real name. Nothing else in ROOT is read
//! or written: the host key, the pinned fingerprint and the release key may live in the same
//! state directory, and an upgrade or a rollback must never be able to touch them.
//!
//! The upgrade: [`Installation::install`] checks everything first (signature, target, hash
//! and size, newer than every version this host has run, not rolled back before) and only
//! then writes; a refused release leaves every file as it was. It writes `upgrade.pending`
//! before it swaps `current`, so there is never a `current` that nobody waits on. The agent
//! then restarts into the new version, which calls [`Installation::confirm_healthy`] after its
//! first healthy heartbeat. A version that fails its health check calls
//! [`Installation::rollback`] itself; one that cannot start or hangs is rolled back by
//! systemd's `OnFailure=` running `previous/vmvault agent rollback`; and an agent that starts
//! and finds [`Installation::overdue`] rolls back too. Time is an argument (unix seconds)
//! everywhere, so tests never sleep.

mod fsx;
mod install;
mod key;
mod record;

pub use install::{BadVersion, Installation, Pending, DEFAULT_HEALTH_DEADLINE_SECS};
pub use key::{ReleaseKey, ReleasePublicKey};
pub use record::{
    sign, sign_release, this_target, verify, verify_file, Release, SignedRelease, Version,
    VersionError, FORMAT,
};

/// Why a release was refused, or an installation could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("the release's signature does not check against the release key (not signed by it, or the record was changed)")]
    BadSignature,
    #[error("the release is built for {got}, but this host runs {want}")]
    WrongTarget { want: String, got: String },
    #[error(
        "release {version} is not newer than {highest}, the highest version this host has run"
    )]
    NotNewer { version: Version, highest: Version },
    #[error(
        "release {version} was rolled back on this host ({reason}) and is not installed again"
    )]
    MarkedBad { version: Version, reason: String },
    #[error("an upgrade to {to} is waiting for its health check: it must be confirmed or rolled back first")]
    UpgradePending { to: Version },
    #[error("{0} has no current version to fall back to: the running agent must be adopted first")]
    NoCurrent(String),
    #[error("there is no healthy previous version to roll back to from {0}")]
    NoPrevious(Version),
    #[error("the binary does not match its signature: {0}")]
    Mismatch(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
    #[error(transparent)]
    Version(#[from] VersionError),
}

impl ReleaseError {
    /// An `Io` error about `what`, for `map_err`.
    pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Self {
        move |source| ReleaseError::Io {
            context: what.to_string(),
            source,
        }
    }
}
