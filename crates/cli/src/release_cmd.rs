//! Agent releases: `release sign` and `release key` on the machine that holds an offline
//! release key, and, against a server, `release add` and `releases` (docs/design.md,
//! "Releases and the keys they touch"). `host upgrade` and `host set --auto-upgrade` say which
//! release each host runs (crates/cli/src/hosts_cmd.rs).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use vmvault_api::releases::{RELEASES, SIGNATURE_HEADER};
use vmvault_api::ReleaseInfo;
use vmvault_release::{ReleaseKey, Version};

use crate::exit::InputError;
use crate::remote::Client;
use crate::remote_show::emit;

/// Against a server.
#[derive(Subcommand)]
pub enum ReleaseCommand {
    /// Add an agent binary as a release: the server signs it with its release key, or, if it
    /// holds only an offline key's public half, checks the signature given.
    Add {
        file: PathBuf,
        /// Its version, MAJOR.MINOR.PATCH (from the signature when one is given).
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        /// The target triple it runs on (default: this machine's).
        #[arg(long, value_name = "TRIPLE")]
        target: Option<String>,
        /// A detached signature made by `vmvault release sign` (FILE.sig).
        #[arg(long, value_name = "SIG")]
        signature: Option<PathBuf>,
    },
}

/// Here, with an offline release key.
#[derive(Subcommand)]
pub enum LocalReleaseCommand {
    /// Make an offline release key (0600); prints its public half for the server's
    /// `release_public_key`.
    Key {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Sign an agent binary with an offline release key: writes FILE.sig.
    Sign {
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "VERSION")]
        version: String,
        /// The target triple it runs on (default: this machine's).
        #[arg(long, value_name = "TRIPLE")]
        target: Option<String>,
    },
}

fn version(v: &str) -> Result<Version> {
    v.parse()
        .map_err(|e| InputError(format!("version {v:?}: {e}")).into())
}

pub fn local(json: bool, cmd: LocalReleaseCommand) -> Result<()> {
    match cmd {
        LocalReleaseCommand::Key { out } => {
            if out.exists() {
                return Err(InputError(format!(
                    "{} exists: a release key is never replaced",
                    out.display()
                ))
                .into());
            }
            let key = ReleaseKey::load_or_create(&out)
                .map_err(|e| InputError(format!("{}: {e}", out.display())))?;
            let public = key.public_hex();
            emit(json, &serde_json::json!({ "public_key": public }), |_| {
                outln!("{public}");
            });
            eprintln!("vmvault: give the server this line: release_public_key = \"{public}\"");
        }
        LocalReleaseCommand::Sign {
            file,
            key,
            version: v,
            target,
        } => {
            if !key.exists() {
                return Err(InputError(format!(
                    "{}: no such release key (`vmvault release key --out FILE` makes one)",
                    key.display()
                ))
                .into());
            }
            let key = ReleaseKey::load_or_create(&key)
                .map_err(|e| InputError(format!("{}: {e}", key.display())))?;
            let target = target.unwrap_or_else(vmvault_release::this_target);
            let signed = vmvault_release::sign(&key, &file, version(&v)?, &target)
                .map_err(|e| InputError(format!("{}: {e}", file.display())))?;
            let sig = sig_path(&file);
            std::fs::write(&sig, signed.to_json())
                .with_context(|| format!("writing {}", sig.display()))?;
            emit(json, &serde_json::json!({ "signature": sig }), |_| {
                outln!("{}", sig.display());
            });
        }
    }
    Ok(())
}

fn sig_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

pub fn remote(c: &Client, json: bool, cmd: ReleaseCommand) -> Result<()> {
    match cmd {
        ReleaseCommand::Add {
            file,
            version: v,
            target,
            signature,
        } => {
            let sig = match &signature {
                Some(p) => {
                    Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
                }
                None => None,
            };
            let v = match (&v, &sig) {
                (Some(v), _) => v.clone(),
                (None, Some(s)) => vmvault_release::SignedRelease::from_json(s)
                    .map_err(|e| InputError(format!("the signature: {e}")))?
                    .release
                    .version
                    .to_string(),
                (None, None) => {
                    return Err(InputError(
                        "give the release's --version (or its --signature)".into(),
                    )
                    .into())
                }
            };
            version(&v)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut path = format!("{RELEASES}?version={}", vmvault_api::path::segment(&v)?);
            if let Some(t) = &target {
                path.push_str(&format!("&target={}", vmvault_api::path::segment(t)?));
            }
            let headers: Vec<(&str, String)> = sig
                .iter()
                .map(|s| (SIGNATURE_HEADER, hex::encode(s)))
                .collect();
            let info: ReleaseInfo = c.send_bytes(&path, &bytes, &headers)?;
            emit(json, &info, |i| {
                outln!(
                    "release {} for {} added ({} bytes, sha256 {})",
                    i.version,
                    i.target,
                    i.size,
                    i.sha256
                );
            });
        }
    }
    Ok(())
}

pub fn list(c: &Client, json: bool) -> Result<()> {
    let list: Vec<ReleaseInfo> = c.get(RELEASES)?;
    emit(json, &list, |l| {
        if l.is_empty() {
            eprintln!("no releases yet (`release add FILE --version V`)");
        }
        for r in l {
            outln!(
                "{:<10} {:<28} {:>12}  {}",
                r.version,
                r.target,
                r.size,
                r.added
            );
        }
    });
    Ok(())
}
