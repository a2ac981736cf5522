//! Talking to QEMU: a QMP client ([`Qmp`]), and the block-layer steps vmvault drives through it.
//!
//! The live restore ([`live`]) and the QEMU side of a running VM's backup: what the VM has
//! ([`block`]), its disks held at an instant ([`snapshot`]) and their changed-block tracking
//! ([`bitmap`]). The guest agent ([`Qga`]) quiesces guests for application-consistent points
//! ([`quiesce`], with per-VM [`scripts`]).

pub mod bitmap;
pub mod block;
pub mod live;
pub mod qga;
mod qmp;
pub mod quiesce;
mod quiesce_child;
pub mod scripts;
pub mod snapshot;

pub use qga::Qga;
pub use qmp::{Event, Qmp, DEFAULT_TIMEOUT};
pub use quiesce::{child_main, quiesce, Level, QuiesceOptions, QuiesceSession, Quiesced, Released};
pub use scripts::{Script, Scripts, ScriptsError};

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
    /// The guest agent answered something unexpected.
    #[error("guest agent: {0}")]
    GuestAgent(String),
    /// The guest agent did not answer in time (none running, or stuck).
    #[error("guest agent: {0}")]
    AgentTimeout(String),
    /// A pre- or post-script failed and `continue_on_failure` is off: the job fails.
    #[error("{0}")]
    Script(String),
    /// The quiesce helper process broke (it is killed and the guest thawed).
    #[error("{0}")]
    Helper(String),
}
