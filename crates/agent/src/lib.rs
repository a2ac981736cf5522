//! The host agent (docs/design.md, "Host agents"): it finds the host's VMs ([`discover`]),
//! enrolls with the server once ([`enroll`]), then heartbeats, pulls the jobs the server made
//! for its host and backs VMs up through the server ([`relay`], [`run`]), which alone holds
//! the vault's keys. Nothing listens on the host: every connection goes out to the server.

pub mod client;
pub mod config;
pub mod discover;
pub mod enroll;
pub mod relay;
pub mod restore;
pub mod run;
pub mod state;
pub mod upgrade;

pub use client::Refused;
pub use enroll::enroll;
pub use run::{run, AgentOptions};
pub use state::AgentState;
pub use upgrade::RunEnd;

/// This agent's version, as heartbeats report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad input from the person running the agent (an address, a code).
    #[error("{0}")]
    Input(String),
    /// The server refused a request.
    #[error("the server refused: {} ({})", .0.message, .0.status)]
    Refused(Refused),
    /// The server could not be reached or answered nonsense.
    #[error("{0}")]
    Server(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The server is not the one enrolled with, or enrollment's proofs failed.
    #[error("{0}")]
    Trust(String),
    #[error(transparent)]
    Engine(#[from] vmvault_engine::EngineError),
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> AgentError {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    /// The server's status, if it refused.
    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Refused(r) => Some(r.status),
            _ => None,
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
