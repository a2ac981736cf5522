use std::io;

use thiserror::Error;
use vmvault_disk::DiskError;
use vmvault_store::StoreError;

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Bad input from the user: a description file, a point name, an option.
    #[error("{0}")]
    Input(String),
    /// The point a name means, or one that may be it, cannot be read.
    #[error("{0}")]
    DamagedPoint(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// QEMU refused or failed a step of a running VM's backup.
    #[error(transparent)]
    Qemu(#[from] vmvault_qemu::QemuError),
    #[error("reading the point in time over NBD: {0}")]
    Nbd(#[from] vmvault_nbd::NbdError),
    /// A restore failed and could not take back all it wrote: `left` says what remains.
    #[error("{error} ({left})")]
    Partial {
        error: Box<EngineError>,
        left: String,
    },
}

impl EngineError {
    pub fn io(context: impl Into<String>, source: io::Error) -> EngineError {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}

impl vmvault_class::Classify for EngineError {
    fn class(&self) -> vmvault_class::Class {
        use vmvault_class::Class;
        match self {
            EngineError::Store(s) => s.class(),
            EngineError::Input(_) => Class::Input,
            EngineError::DamagedPoint(_) => Class::Damage,
            // A disk that cannot be opened or read as its format is bad input to a backup,
            // except one that is simply missing.
            EngineError::Disk(d) => match d.class() {
                Class::NotFound => Class::NotFound,
                _ => Class::Input,
            },
            EngineError::Io { .. } | EngineError::Qemu(_) | EngineError::Nbd(_) => Class::Failure,
            // What failed decides, not what it left behind.
            EngineError::Partial { error, .. } => error.class(),
        }
    }
}
