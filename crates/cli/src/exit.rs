//! Exit codes, documented in the README:
//! 0 success; 1 failure (I/O, full storage, damage found while working); 2 bad input (usage,
//! description file, point name, not a vault, a guest path that does not exist); 3 verify
//! found damage, a point a name means cannot be read, garbage collection stopped by damage, or
//! a guest filesystem is damaged or uses what vmvault does not read;
//! 4 wrong passphrase; 5 busy (another backup of the VM, or a garbage collection, is running);
//! 6 refused: by the server (401: no or bad token; 403: the role does not allow it) or by a
//! vault rule (a locked vault keeps the point, a locked vault's soft delete only grows).

use vmvault_class::{Class, Classify};
use vmvault_disk::DiskError;
use vmvault_engine::EngineError;
use vmvault_files::FilesError;
use vmvault_store::StoreError;

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

/// The class of an error: the first cause in its chain that knows its class.
pub fn class(e: &anyhow::Error) -> Class {
    for cause in e.chain() {
        if cause.downcast_ref::<DamageFound>().is_some() {
            return Class::Damage;
        }
        if cause.downcast_ref::<InputError>().is_some() {
            return Class::Input;
        }
        let known: Option<&dyn Classify> = if let Some(e) = cause.downcast_ref::<StoreError>() {
            Some(e)
        } else if let Some(e) = cause.downcast_ref::<vmvault_open::Error>() {
            Some(e)
        } else if let Some(e) = cause.downcast_ref::<EngineError>() {
            Some(e)
        } else if let Some(e) = cause.downcast_ref::<FilesError>() {
            Some(e)
        } else if let Some(e) = cause.downcast_ref::<vmvault_server::Error>() {
            Some(e)
        } else if let Some(e) = cause.downcast_ref::<DiskError>() {
            Some(e)
        } else {
            None
        };
        if let Some(k) = known {
            return k.class();
        }
        if let Some(e) = cause.downcast_ref::<crate::remote_show::JobEnded>() {
            return e.class();
        }
        if let Some(e) = cause.downcast_ref::<crate::remote::ApiError>() {
            // The server's code names the class, so a failure exits as it would locally.
            return Class::from_api_code(&e.code)
                .unwrap_or_else(|| Class::from_http_status(e.status));
        }
    }
    Class::Failure
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
