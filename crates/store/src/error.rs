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
    /// A vault rule (the lock, a point's retention in force) does not allow it.
    #[error("{0}")]
    Refused(String),
    /// An object whose bytes fail their check (digest, tag, decoding), in one region.
    #[error("{object} is damaged in {location}: {reason}")]
    Damaged {
        location: String,
        object: String,
        reason: String,
    },
    /// A lock this process held is no longer trusted (see `locks`): what it guarded was not
    /// finished.
    #[error("{0}")]
    LockLost(String),
    /// Work stopped before it changed anything because something it needs is damaged (garbage
    /// collection meeting a manifest or index it cannot read).
    #[error("{0}")]
    DamageStopped(String),
    /// The work was cancelled (a server job's cancel, Ctrl-C): see [`crate::Cancellable`].
    #[error("{0}")]
    Cancelled(String),
    /// A remote store's failure that is not an I/O error of this machine. Its text never holds
    /// credentials: backends redact before they build it.
    #[error("{location}: {detail}")]
    Remote {
        location: String,
        detail: String,
        transient: bool,
    },
}

impl StoreError {
    /// Whether the same call may succeed if repeated (see the backend contract).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Remote { transient, .. } => *transient,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }

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

impl vmvault_class::Classify for StoreError {
    fn class(&self) -> vmvault_class::Class {
        use vmvault_class::Class;
        match self {
            StoreError::WrongPassphrase { .. } => Class::Passphrase,
            StoreError::Busy(_) => Class::Busy,
            StoreError::NotAVault { .. }
            | StoreError::NotEmpty { .. }
            | StoreError::Invalid(_)
            | StoreError::Passphrase(_) => Class::Input,
            StoreError::NotFound(_) => Class::NotFound,
            StoreError::Refused(_) => Class::Refused,
            StoreError::Cancelled(_) => Class::Cancelled,
            StoreError::DamageStopped(_) => Class::Damage,
            e if e.is_transient() => Class::Transient,
            // Damage met while working (a backup, a restore) is the work failing; verify
            // and GC say "damage" (3) through DamageStopped and their own reports.
            StoreError::Damaged { .. }
            | StoreError::Full { .. }
            | StoreError::Io { .. }
            | StoreError::Format { .. }
            | StoreError::LockLost(_)
            | StoreError::Remote { .. } => Class::Failure,
        }
    }
}
