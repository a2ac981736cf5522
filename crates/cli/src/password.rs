//! Where passphrases come from: a file or the environment (the rule crates/open shares with
//! the server), else a prompt on the terminal.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result};

use crate::exit::InputError;

/// The passphrase of an existing vault.
pub fn existing(file: Option<&Path>) -> Result<Vec<u8>, String> {
    get(file, "VMVAULT_PASSWORD", "vault passphrase: ", false).map_err(|e| format!("{e:#}"))
}

/// A passphrase for a new key: asked twice on a terminal.
pub fn new(file: Option<&Path>, env: &str, prompt: &str) -> Result<Vec<u8>> {
    get(file, env, prompt, true)
}

fn get(file: Option<&Path>, env: &str, prompt: &str, confirm: bool) -> Result<Vec<u8>> {
    let pass = if let Some(p) = vmvault_open::passphrase_from(file, env)? {
        p
    } else if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(prompt).context("reading the passphrase")?;
        if confirm {
            let again = rpassword::prompt_password("again: ").context("reading the passphrase")?;
            if again != p {
                return Err(InputError("the two passphrases differ".into()).into());
            }
        }
        p.into_bytes()
    } else {
        return Err(InputError(format!(
            "no passphrase: set {env}, pass a --password-file, or run on a terminal"
        ))
        .into());
    };
    if pass.is_empty() {
        return Err(InputError("the passphrase is empty".into()).into());
    }
    Ok(pass)
}
