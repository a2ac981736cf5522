//! `vmvault key passwd`.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

use crate::{password, Global};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Change the vault's passphrase. No data is rewritten.
    Passwd {
        /// Read the new passphrase from this file (else VMVAULT_NEW_PASSWORD, else a prompt).
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
}

pub fn run(g: &Global, cmd: KeyCommand) -> Result<()> {
    match cmd {
        KeyCommand::Passwd { new_password_file } => {
            let vault = crate::vault::open(g)?;
            let new = password::new(
                new_password_file.as_deref(),
                "VMVAULT_NEW_PASSWORD",
                "new passphrase: ",
            )?;
            vault.change_passphrase(&new)?;
            eprintln!("passphrase of vault {} changed", vault.location());
            Ok(())
        }
    }
}
