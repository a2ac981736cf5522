//! `vmvault vault create|info`, and opening the vault every other command works on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;
use vmvault_store::{CreateOptions, LocalBackend, Vault, WriteBackend};

use crate::exit::InputError;
use crate::output::{bytes, print_json};
use crate::{password, Global};

#[derive(Subcommand)]
pub enum VaultCommand {
    /// Create a new vault in an empty or new directory.
    Create {
        /// Where: a directory (it must be empty or not exist).
        path: PathBuf,
        /// Store chunks unencrypted, with unkeyed digests. Said in `points` and `vault info`.
        #[arg(long)]
        no_encryption: bool,
        /// Chunk size: a power of two from 64K to 16M (suffix K or M).
        #[arg(long, default_value = "1M", value_parser = parse_chunk_size)]
        chunk_size: u32,
    },
    /// Show a vault's settings.
    Info,
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1024),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    let n: u32 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub fn backend(path: &Path) -> Arc<dyn WriteBackend> {
    Arc::new(LocalBackend::new(path))
}

fn vault_path(g: &Global) -> Result<&Path> {
    g.vault.as_deref().ok_or_else(|| {
        InputError("no vault given: pass --vault PATH or set VMVAULT_VAULT".into()).into()
    })
}

/// Opens the vault named by --vault / VMVAULT_VAULT, asking for its passphrase if it has one.
pub fn open(g: &Global) -> Result<Vault> {
    let path = vault_path(g)?;
    let file = g.password_file.clone();
    Ok(Vault::open(backend(path), || {
        password::existing(file.as_deref())
    })?)
}

#[derive(Serialize)]
struct Info {
    location: String,
    vault_id: String,
    encrypted: bool,
    chunk_size: u32,
    zstd_level: i32,
    created: String,
}

fn info_of(location: String, c: &vmvault_format::VaultConfig) -> Info {
    Info {
        location,
        vault_id: hex_id(&c.vault_id),
        encrypted: c.encrypted,
        chunk_size: c.chunk_size,
        zstd_level: c.zstd_level,
        created: chrono::DateTime::from_timestamp(c.created, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    }
}

fn hex_id(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn encryption_words(encrypted: bool) -> &'static str {
    if encrypted {
        "encrypted (AES-256-GCM, keyed BLAKE3 chunk ids)"
    } else {
        "NOT ENCRYPTED: anyone who can read the vault's storage can read its data"
    }
}

fn print_info(g: &Global, info: &Info) {
    if g.json {
        print_json(info);
        return;
    }
    println!("vault       {}", info.location);
    println!("id          {}", info.vault_id);
    println!("encryption  {}", encryption_words(info.encrypted));
    println!("chunk size  {}", bytes(info.chunk_size as u64));
    println!("compression zstd level {}", info.zstd_level);
    println!("created     {}", info.created);
}

pub fn run(g: &Global, cmd: VaultCommand) -> Result<()> {
    match cmd {
        VaultCommand::Create {
            path,
            no_encryption,
            chunk_size,
        } => {
            let passphrase = if no_encryption {
                None
            } else {
                Some(password::new(
                    g.password_file.as_deref(),
                    "VMVAULT_PASSWORD",
                    "new vault passphrase: ",
                )?)
            };
            let opts = CreateOptions {
                chunk_size,
                passphrase,
                ..CreateOptions::default()
            };
            let vault = Vault::create(backend(&path), opts)
                .with_context(|| format!("creating a vault at {}", path.display()))?;
            let info = info_of(vault.location(), vault.config());
            if g.json {
                print_json(&info);
            } else {
                eprintln!(
                    "created vault {} ({})",
                    info.location,
                    encryption_words(info.encrypted)
                );
            }
            Ok(())
        }
        VaultCommand::Info => {
            let path = vault_path(g)?;
            let backend = backend(path);
            let config = Vault::read_config(&*backend)?;
            print_info(g, &info_of(backend.location(), &config));
            Ok(())
        }
    }
}
