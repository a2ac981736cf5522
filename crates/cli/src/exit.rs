//! Exit codes, documented in the README:
//! 0 success; 1 failure (I/O, full storage, damage found while working); 2 bad input (usage,
//! description file, point name, not a vault, a guest path that does not exist); 3 verify
//! found damage, a point a name means cannot be read, garbage collection stopped by damage, or
//! a guest filesystem is damaged or uses what vmvault does not read;
//! 4 wrong passphrase; 5 busy (another backup of the VM, or a garbage collection, is running);
//! 6 refused: by the server (401: no or bad token; 403: the role does not allow it) or by a
//! vault rule (a locked vault keeps the point, a locked vault's soft delete only grows).

use vmvault_disk::DiskError;
use vmvault_engine::EngineError;
use vmvault_files::FilesError;
use vmvault_store::StoreError;

pub const FAILURE: i32 = 1;
pub const INPUT: i32 = 2;
pub const DAMAGE: i32 = 3;
pub const PASSPHRASE: i32 = 4;
pub const BUSY: i32 = 5;
/// The server refused: no or a bad token (401), or a role that does not allow it (403).
pub const REFUSED: i32 = 6;

/// Verify's way of saying it found damage after printing its report.
#[derive(Debug)]
pub struct DamageFound(pub usize);

impl std::fmt::Display for DamageFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verify found {} problem(s)", self.0)
    }
}

impl std::error::Error for DamageFound {}

/// Bad input found by the CLI itself.
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

fn store_code(e: &StoreError) -> i32 {
    match e {
        StoreError::WrongPassphrase { .. } => PASSPHRASE,
        StoreError::Busy(_) => BUSY,
        StoreError::NotAVault { .. } | StoreError::NotEmpty { .. } | StoreError::Invalid(_) => {
            INPUT
        }
        StoreError::Passphrase(_) => INPUT,
        StoreError::DamageStopped(_) => DAMAGE,
        StoreError::Refused(_) => REFUSED,
        _ => FAILURE,
    }
}

fn engine_code(e: &EngineError) -> i32 {
    match e {
        EngineError::Store(s) => store_code(s),
        EngineError::Input(_) => INPUT,
        EngineError::DamagedPoint(_) => DAMAGE,
        // A disk that cannot be opened or read as its format is bad input to a backup.
        EngineError::Disk(_) => INPUT,
        EngineError::Io { .. } | EngineError::Qemu(_) | EngineError::Nbd(_) => FAILURE,
        // What failed decides, not what it left behind.
        EngineError::Partial { error, .. } => engine_code(error),
    }
}

/// `vmvault server`'s own errors (its start: configuration, state directory, vault).
fn server_code(e: &vmvault_server::Error) -> i32 {
    use vmvault_server::Error as S;
    match e {
        S::Config(_) | S::Input(_) => INPUT,
        S::Store(s) => store_code(s),
        S::Engine(e) => engine_code(e),
        _ => FAILURE,
    }
}

pub fn code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.downcast_ref::<DamageFound>().is_some() {
            return DAMAGE;
        }
        if cause.downcast_ref::<InputError>().is_some() {
            return INPUT;
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            return store_code(e);
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            return engine_code(e);
        }
        if let Some(e) = cause.downcast_ref::<FilesError>() {
            return match e {
                FilesError::NotFound(_) | FilesError::NotADirectory(_) | FilesError::BadPath(_) => {
                    INPUT
                }
                FilesError::Damaged { .. } | FilesError::Unsupported(_) | FilesError::Limit(_) => {
                    DAMAGE
                }
                FilesError::Disk(_) | FilesError::Output { .. } => FAILURE,
            };
        }
        if let Some(e) = cause.downcast_ref::<vmvault_server::Error>() {
            return server_code(e);
        }
        if let Some(e) = cause.downcast_ref::<crate::remote::ApiError>() {
            return match e.status {
                401 | 403 => REFUSED,
                400..=499 => INPUT,
                _ => FAILURE,
            };
        }
        if let Some(e) = cause.downcast_ref::<DiskError>() {
            return match e {
                DiskError::Io { .. } => FAILURE,
                _ => INPUT,
            };
        }
    }
    FAILURE
}

/// The error and its causes on one line.
pub fn message(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        // thiserror's transparent and `{source}` forms repeat the cause: say each thing once.
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}
