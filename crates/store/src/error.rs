use std::io;

use thiserror::Error;
use vmvault_format::FormatError;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{location} is not a vmvault vault (no vault config there)")]
    NotAVault { location: String },
    #[error("{location} is not empty: a vault is created only in an empty or new directory")]
    NotEmpty { location: String },
    #[error("vault storage is full at {location}: {source}")]
    Full { location: String, source: io::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{context}: {source}")]
    Format {
        context: String,
        source: FormatError,
    },
    #[error("wrong passphrase for vault {location}")]
    WrongPassphrase { location: String },
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Passphrase(String),
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn format(context: impl Into<String>, source: FormatError) -> StoreError {
        StoreError::Format {
            context: context.into(),
            source,
        }
    }
}
