//! Talking to QEMU: a QMP client ([`Qmp`]), and the block-layer steps vmvault drives through it.
//!
//! The live restore ([`live`]) and the QEMU side of a running VM's backup: what the VM has
//! ([`block`]), its disks held at an instant ([`snapshot`]) and their changed-block tracking
//! ([`bitmap`]).

pub mod bitmap;
pub mod block;
pub mod live;
mod qmp;
pub mod snapshot;

pub use qmp::{Event, Qmp, DEFAULT_TIMEOUT};

use thiserror::Error;

pub type Result<T, E = QemuError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: {0}")]
    Timeout(String),
    #[error("QEMU closed its QMP connection")]
    Closed,
    #[error("{0}")]
    Job(String),
}
