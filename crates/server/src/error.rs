//! The server's errors, and how each reaches an API client: a status and a stable JSON shape
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use vmvault_api::{ErrorBody, ErrorDetail, UnknownRole};
use vmvault_class::{Class, Classify};

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
    /// A host agent's job ended without a point: the agent failed, went silent, broke the
    /// protocol, or the job was cancelled.
    #[error("{0}")]
    Agent(String),
    /// A job's thread panicked: a bug, not a condition a retry would change.
    #[error("the job panicked (a bug in vmvault: please report it): {0}")]
    Panicked(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<vmvault_open::Error> for Error {
    fn from(e: vmvault_open::Error) -> Error {
        match e {
            vmvault_open::Error::Input(m) => Error::Config(m),
            vmvault_open::Error::Store(s) => Error::Store(s),
        }
    }
}

impl From<UnknownRole> for Error {
    fn from(e: UnknownRole) -> Error {
        Error::Input(e.to_string())
    }
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        let class = self.class();
        let status =
            StatusCode::from_u16(class.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, class.api_code())
    }
}

impl Classify for Error {
    fn class(&self) -> Class {
        match self {
            Error::Input(_) | Error::Config(_) => Class::Input,
            Error::NotFound(_) => Class::NotFound,
            Error::Conflict(_) => Class::Conflict,
            Error::Unauthorized(_) => Class::Unauthorized,
            Error::Forbidden(_) => Class::Refused,
            Error::PendingApproval { .. } => Class::Pending,
            Error::Engine(e) => e.class(),
            Error::Store(e) => e.class(),
            Error::Db(_)
            | Error::Io { .. }
            | Error::Tls(_)
            | Error::Agent(_)
            | Error::Panicked(_) => Class::Failure,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmvault_engine::EngineError;
    use vmvault_store::StoreError;

    /// The statuses clients meet, from the one classification (crates/class): what the CLI
    /// turns back into the exit code the same failure has locally.
    #[test]
    fn each_error_has_the_status_and_code_of_its_class() {
        let table: Vec<(Error, u16, &str)> = vec![
            (
                StoreError::Busy("a backup of web01 runs".into()).into(),
                409,
                "busy",
            ),
            (
                StoreError::WrongPassphrase {
                    location: "v".into(),
                }
                .into(),
                422,
                "wrong_passphrase",
            ),
            (
                StoreError::NotFound("point 1234".into()).into(),
                404,
                "not_found",
            ),
            (
                StoreError::Refused("locked".into()).into(),
                403,
                "forbidden",
            ),
            (StoreError::Invalid("bad".into()).into(), 400, "bad_request"),
            (
                StoreError::Cancelled("the job was cancelled".into()).into(),
                409,
                "cancelled",
            ),
            (
                StoreError::Remote {
                    location: "s3://b".into(),
                    detail: "timed out".into(),
                    transient: true,
                }
                .into(),
                503,
                "unavailable",
            ),
            (
                EngineError::Store(StoreError::Busy("gc".into())).into(),
                409,
                "busy",
            ),
            (
                EngineError::Input("no disks".into()).into(),
                400,
                "bad_request",
            ),
            (EngineError::DamagedPoint("p".into()).into(), 500, "damaged"),
            (Error::NotFound("no such item".into()), 404, "not_found"),
            (Error::Conflict("exists".into()), 409, "conflict"),
            (Error::Unauthorized("no token".into()), 401, "unauthorized"),
            (Error::Forbidden("needs admin".into()), 403, "forbidden"),
            (Error::Config("bad".into()), 400, "bad_request"),
            (
                Error::PendingApproval {
                    message: "m".into(),
                    approval: 1,
                    token: None,
                },
                202,
                "approval_required",
            ),
            (Error::Panicked("bug".into()), 500, "internal"),
        ];
        for (e, status, code) in table {
            let what = format!("{e:?}");
            let (s, c) = e.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code), "{what}");
        }
    }
}
