//! The server's errors, and how each reaches an API client: a status and a stable JSON shape
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// Accepted but waiting for a second administrator (multi-user authorization).
    /// `token`: a token the request mints, which works once the request is approved.
    #[error("{message}")]
    PendingApproval {
        message: String,
        approval: i64,
        token: Option<String>,
    },
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Engine(#[from] vmvault_engine::EngineError),
    #[error(transparent)]
    Store(#[from] vmvault_store::StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("configuration: {0}")]
    Config(String),
    /// A job's thread panicked: a bug, not a condition a retry would change.
    #[error("the job panicked (a bug in vmvault: please report it): {0}")]
    Panicked(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::Input(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::PendingApproval { .. } => (StatusCode::ACCEPTED, "approval_required"),
            Error::Engine(vmvault_engine::EngineError::Input(_)) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            Error::Store(s) | Error::Engine(vmvault_engine::EngineError::Store(s)) => match s {
                vmvault_store::StoreError::Refused(_) => (StatusCode::FORBIDDEN, "forbidden"),
                vmvault_store::StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                vmvault_store::StoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                vmvault_store::StoreError::Busy(_) => (StatusCode::CONFLICT, "conflict"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: bad_request, unauthorized, forbidden, not_found, conflict,
    /// approval_required, internal.
    pub code: String,
    pub message: String,
    /// The approval request that must be granted, for `approval_required`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<i64>,
    /// For `approval_required` on a request that mints a token (a new admin, a token for
    /// another user): the token, shown this once, which works from its approval on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        let (approval, token) = match self {
            Error::PendingApproval {
                approval, token, ..
            } => (Some(approval), token),
            _ => (None, None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message,
                approval,
                token,
            },
        };
        (status, axum::Json(body)).into_response()
    }
}
