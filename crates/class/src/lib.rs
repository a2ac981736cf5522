//! The one classification of vmvault's errors. Every library error says which [`Class`] it is
//! ([`Classify`]); the CLI's exit code, the server's HTTP status and the API's error code all
//! come from the class, so a failure means the same thing locally, through the API and
//! through the CLI talking to a server (which maps the API's code back to the class).
//!
//! The table in [`Class::ALL`] order is the README's exit-code table; a test in the CLI
//! checks that the README says the same.

/// What kind of failure an error is, as a user acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Bad input: usage, a description file, a point name, not a vault, a path.
    Input,
    /// What was named does not exist (a point, a VM, a job, a guest path).
    NotFound,
    /// It exists already or conflicts with what is there (a name taken).
    Conflict,
    /// Damage: a point that cannot be read, verify's findings, a damaged guest filesystem.
    Damage,
    /// The vault's passphrase is wrong.
    Passphrase,
    /// Someone else holds what this needs (a backup of the VM, a garbage collection).
    Busy,
    /// A rule refuses it: a role, a locked vault, a retention in force.
    Refused,
    /// No or a bad credential.
    Unauthorized,
    /// Accepted, waiting for a second administrator.
    Pending,
    /// Storage or a server is unreachable for now; the same command may work later.
    Transient,
    /// Stopped on request (Ctrl-C, a job's cancel) before it finished; nothing half-made
    /// is left as if whole.
    Cancelled,
    /// Anything else: I/O, full storage, a bug.
    Failure,
}

impl Class {
    pub const ALL: [Class; 12] = [
        Class::Input,
        Class::NotFound,
        Class::Conflict,
        Class::Damage,
        Class::Passphrase,
        Class::Busy,
        Class::Refused,
        Class::Unauthorized,
        Class::Pending,
        Class::Transient,
        Class::Cancelled,
        Class::Failure,
    ];

    /// The process exit code (the README's table).
    pub fn exit_code(self) -> i32 {
        match self {
            Class::Failure | Class::Transient => 1,
            Class::Input | Class::NotFound | Class::Conflict => 2,
            Class::Damage => 3,
            Class::Passphrase => 4,
            Class::Busy => 5,
            Class::Refused | Class::Unauthorized => 6,
            Class::Pending => 7,
            // What a shell reports for a command ended by SIGINT.
            Class::Cancelled => 130,
        }
    }

    /// The HTTP status an API response has for it.
    pub fn http_status(self) -> u16 {
        match self {
            Class::Input => 400,
            Class::Unauthorized => 401,
            Class::Refused => 403,
            Class::NotFound => 404,
            Class::Conflict | Class::Busy | Class::Cancelled => 409,
            Class::Passphrase => 422,
            Class::Pending => 202,
            Class::Transient => 503,
            Class::Damage | Class::Failure => 500,
        }
    }

    /// The stable `error.code` of an API response.
    pub fn api_code(self) -> &'static str {
        match self {
            Class::Input => "bad_request",
            Class::NotFound => "not_found",
            Class::Conflict => "conflict",
            Class::Damage => "damaged",
            Class::Passphrase => "wrong_passphrase",
            Class::Busy => "busy",
            Class::Refused => "forbidden",
            Class::Unauthorized => "unauthorized",
            Class::Pending => "approval_required",
            Class::Transient => "unavailable",
            Class::Cancelled => "cancelled",
            Class::Failure => "internal",
        }
    }

    /// The class an API error code names (the CLI's view of a server's answer).
    pub fn from_api_code(code: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.api_code() == code)
    }

    /// The class of an HTTP status without a code we know (a proxy's answer, say).
    pub fn from_http_status(status: u16) -> Class {
        match status {
            401 => Class::Unauthorized,
            403 => Class::Refused,
            404 => Class::NotFound,
            409 => Class::Conflict,
            422 => Class::Passphrase,
            429 | 502..=504 => Class::Transient,
            400..=499 => Class::Input,
            _ => Class::Failure,
        }
    }
}

/// An error that knows its class.
pub trait Classify {
    fn class(&self) -> Class;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_code_is_distinct_and_maps_back() {
        for c in Class::ALL {
            assert_eq!(Class::from_api_code(c.api_code()), Some(c));
        }
        assert_eq!(Class::from_api_code("nonsense"), None);
    }

    #[test]
    fn the_cases_users_meet_are_never_a_server_error() {
        for c in [
            Class::Busy,
            Class::Passphrase,
            Class::NotFound,
            Class::Input,
            Class::Refused,
        ] {
            let s = c.http_status();
            assert!((400..500).contains(&s), "{c:?} is {s}");
        }
        assert_eq!(Class::Busy.http_status(), 409);
        assert_eq!(Class::NotFound.http_status(), 404);
    }

    #[test]
    fn a_status_without_a_code_keeps_its_meaning() {
        for c in Class::ALL {
            let back = Class::from_http_status(c.http_status());
            // Statuses shared by two classes come back as one of them, with its exit code.
            if ![Class::Busy, Class::Damage, Class::Pending, Class::Cancelled].contains(&c) {
                assert_eq!(back.exit_code(), c.exit_code(), "{c:?}");
            }
        }
    }
}
