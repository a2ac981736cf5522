//! Where passphrases come from: a file, the environment, or a prompt on the terminal.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result};

use crate::exit::InputError;

fn from_file(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read(path)
        .with_context(|| format!("reading passphrase file {}", path.display()))?;
    // A file written by `echo` ends in a newline that is not part of the passphrase.
    let end = text
        .iter()
        .rposition(|&b| b != b'\n' && b != b'\r')
        .map_or(0, |p| p + 1);
    Ok(text[..end].to_vec())
}

/// The passphrase of an existing vault.
pub fn existing(file: Option<&Path>) -> Result<Vec<u8>, String> {
    get(file, "VMVAULT_PASSWORD", "vault passphrase: ", false).map_err(|e| format!("{e:#}"))
}

/// A passphrase for a new key: asked twice on a terminal.
pub fn new(file: Option<&Path>, env: &str, prompt: &str) -> Result<Vec<u8>> {
    get(file, env, prompt, true)
}

fn get(file: Option<&Path>, env: &str, prompt: &str, confirm: bool) -> Result<Vec<u8>> {
    let pass = if let Some(f) = file {
        from_file(f)?
    } else if let Some(v) = std::env::var_os(env) {
        v.into_encoded_bytes()
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
