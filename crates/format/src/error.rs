use thiserror::Error;

/// What can be wrong with bytes handed to a parser in this crate.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a vmvault {what}: bad magic number")]
    BadMagic { what: &'static str },
    #[error("{what} format version {found} is not supported by this vmvault (it reads version {supported})")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what} is truncated or has trailing bytes ({len} bytes)")]
    BadLength { what: &'static str, len: usize },
    #[error("{what} is damaged: checksum mismatch")]
    Checksum { what: &'static str },
    #[error("{what} is damaged or was written with another key: authentication failed")]
    Authentication { what: &'static str },
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("{what} is damaged: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("{what} is encrypted but no key was given")]
    NeedKey { what: &'static str },
    #[error("{what} would need {needed} bytes, more than the limit of {limit}")]
    TooLarge {
        what: &'static str,
        needed: u64,
        limit: u64,
    },
}

pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        what,
        detail: detail.into(),
    }
}

/// Checks the preamble every fixed-size file shares: magic, a u16 version at 8, exact length.
/// The length is checked after the version so that a newer, longer file says "unsupported
/// version" rather than "truncated".
pub(crate) fn check_fixed(
    b: &[u8],
    magic: &[u8; 8],
    version: u16,
    len: usize,
    what: &'static str,
) -> Result<(), FormatError> {
    if b.len() < 10 || b[0..8] != magic[..] {
        return Err(FormatError::BadMagic { what });
    }
    let found = u16::from_le_bytes([b[8], b[9]]);
    if found != version {
        return Err(FormatError::UnsupportedVersion {
            what,
            found: found.into(),
            supported: version.into(),
        });
    }
    if b.len() != len {
        return Err(FormatError::BadLength { what, len: b.len() });
    }
    Ok(())
}
