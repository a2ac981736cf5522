//! What can go wrong reading single files out of a disk.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The path names nothing.
    #[error("{0}: no such file or folder")]
    NotFound(String),
    /// A folder was needed (listing, a path going through it).
    #[error("{0}: not a folder")]
    NotADirectory(String),
    /// A path or pattern that cannot be used.
    #[error("{0}")]
    BadPath(String),
    /// The guest's partition table or filesystem contradicts itself.
    #[error("damaged {what}: {reason}")]
    Damaged { what: String, reason: String },
    /// A valid filesystem using a feature vmvault does not read.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A limit that keeps a hostile filesystem from costing unbounded time or memory.
    #[error("limit reached: {0}")]
    Limit(String),
    /// The disk could not be read (a chunk missing or damaged in the vault).
    #[error("reading the disk: {0}")]
    Disk(String),
    /// Writing the output.
    #[error("{what}: {source}")]
    Output {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = FilesError> = std::result::Result<T, E>;

impl FilesError {
    pub fn damaged(what: impl Into<String>, reason: impl std::fmt::Display) -> FilesError {
        FilesError::Damaged {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub fn output(what: impl Into<String>, source: io::Error) -> FilesError {
        FilesError::Output {
            what: what.into(),
            source,
        }
    }

    /// Whether the guest's own data is at fault (damaged or unsupported), rather than the
    /// caller's path or the vault.
    pub fn is_guest_damage(&self) -> bool {
        matches!(
            self,
            FilesError::Damaged { .. } | FilesError::Unsupported(_)
        )
    }
}

impl vmvault_class::Classify for FilesError {
    fn class(&self) -> vmvault_class::Class {
        use vmvault_class::Class;
        match self {
            FilesError::NotFound(_) => Class::NotFound,
            FilesError::NotADirectory(_) | FilesError::BadPath(_) => Class::Input,
            FilesError::Damaged { .. } | FilesError::Unsupported(_) | FilesError::Limit(_) => {
                Class::Damage
            }
            FilesError::Disk(_) | FilesError::Output { .. } => Class::Failure,
        }
    }
}
