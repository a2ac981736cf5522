//! `vmvault vault create|info|replicate|status`, and opening the vault every other command
//! works on.

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;
use vmvault_open::storage_lock;
use vmvault_store::{CreateOptions, Vault};

use crate::output::{bytes, print_json};
use crate::regions::{self, Location, Use};
use crate::{password, Global};

#[derive(Subcommand)]
pub enum VaultCommand {
    /// Create a new vault: in an empty or new directory, or under an empty prefix of an S3
    /// bucket (s3://bucket/prefix) or Azure Blob container (azblob://container/prefix).
    ///
    /// S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; Azure's from
    /// AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN. A secondary region's own credentials, when
    /// they differ, go in the same variables prefixed with VMVAULT_SECONDARY_.
    Create {
        /// Where: a directory, s3://bucket/prefix or azblob://container/prefix.
        location: String,
        /// Store chunks unencrypted, with unkeyed digests. Said in `points` and `vault info`.
        #[arg(long)]
        no_encryption: bool,
        /// Chunk size: a power of two from 64K to 16M (suffix K or M).
        #[arg(long, default_value = "1M", value_parser = parse_chunk_size)]
        chunk_size: u32,
        /// A second region every backup is replicated to (a directory or a URL).
        #[arg(long, value_name = "LOCATION")]
        secondary: Option<String>,
        /// The secondary's service endpoint (S3 or Azure Blob).
        #[arg(long, value_name = "URL", requires = "secondary")]
        secondary_endpoint: Option<String>,
        /// The secondary's S3 region.
        #[arg(long, value_name = "REGION", requires = "secondary")]
        secondary_region: Option<String>,
        /// The secondary's Azure storage account.
        #[arg(long, value_name = "ACCOUNT", requires = "secondary")]
        secondary_account: Option<String>,
        /// Days a deleted point stays restorable (0: deletions are immediate).
        #[arg(long, default_value_t = vmvault_format::DEFAULT_SOFT_DELETE_DAYS, value_name = "DAYS")]
        soft_delete_days: u32,
    },
    /// Change the vault's rules: how long deleted points stay restorable (0 to 180 days; a
    /// locked vault's only grows).
    Set {
        #[arg(long, value_name = "DAYS")]
        soft_delete_days: u32,
    },
    /// Make the vault immutable: no point leaves it before the retention it was taken under
    /// ends, and soft delete can only grow. Cannot be undone. On a bucket with S3 Object Lock
    /// the storage holds every object too, so that not even its credentials can delete one
    /// early. Run again to renew those holds (gc renews them as well).
    Lock {
        #[arg(long)]
        yes_i_understand_this_is_irreversible: bool,
        /// How long the storage holds each object after it is written or renewed (S3 Object
        /// Lock, compliance mode); can be made longer later, never shorter.
        #[arg(long, value_name = "DAYS", default_value_t = vmvault_format::DEFAULT_HOLD_DAYS,
              value_parser = clap::value_parser!(u32).range(1..=vmvault_format::MAX_HOLD_DAYS as i64))]
        hold_days: u32,
    },
    /// Show a vault's settings and regions.
    Info,
    /// Copy to the secondary region whatever it lacks; safe to interrupt and run again.
    Replicate {
        /// Keep going: compare and copy again every --interval seconds.
        #[arg(long)]
        watch: bool,
        /// Seconds between passes with --watch.
        #[arg(long, default_value_t = 60, requires = "watch")]
        interval: u64,
    },
    /// Per region: objects and bytes; and how far the secondary lags behind the primary.
    Status,
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

/// Opens the vault named by --vault / VMVAULT_VAULT for reading and maintenance, asking for
/// its passphrase if it has one. Writes reach the secondary at once.
pub fn open(g: &Global) -> Result<Vault> {
    regions::open(g, Use::Read)
}

#[derive(Serialize)]
struct Info {
    location: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secondary: Option<String>,
    vault_id: String,
    encrypted: bool,
    chunk_size: u32,
    zstd_level: i32,
    created: String,
    /// Whether the storage itself keeps objects against deletion (S3 Object Lock).
    #[serde(skip_serializing_if = "Option::is_none")]
    storage_lock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secondary_storage_lock: Option<String>,
}

fn info_of(location: String, secondary: Option<String>, c: &vmvault_format::VaultConfig) -> Info {
    Info {
        location,
        secondary,
        vault_id: hex_id(&c.vault_id),
        encrypted: c.encrypted,
        chunk_size: c.chunk_size,
        zstd_level: c.zstd_level,
        created: chrono::DateTime::from_timestamp(c.created, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        storage_lock: None,
        secondary_storage_lock: None,
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
    outln!("vault       {}", info.location);
    if let Some(s) = &info.secondary {
        outln!("secondary   {s}");
    }
    outln!("id          {}", info.vault_id);
    outln!("encryption  {}", encryption_words(info.encrypted));
    outln!("chunk size  {}", bytes(info.chunk_size as u64));
    outln!("compression zstd level {}", info.zstd_level);
    outln!("created     {}", info.created);
    if let Some(s) = &info.storage_lock {
        outln!("storage     {s}");
    }
    if let Some(s) = &info.secondary_storage_lock {
        outln!("secondary storage {s}");
    }
}

pub fn run(g: &Global, cmd: VaultCommand) -> Result<()> {
    match cmd {
        VaultCommand::Create {
            location,
            no_encryption,
            chunk_size,
            secondary,
            secondary_endpoint,
            secondary_region,
            secondary_account,
            soft_delete_days,
        } => {
            let primary = Location::new(
                &location,
                g.endpoint.clone(),
                g.region.clone(),
                g.account.clone(),
            )?;
            let secondary = secondary
                .map(|s| Location::new(&s, secondary_endpoint, secondary_region, secondary_account))
                .transpose()?;
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
                soft_delete_days,
                ..CreateOptions::default()
            };
            let described = primary.describe();
            let secondary_described = secondary.as_ref().map(|s| s.describe());
            let vault = regions::create(primary, secondary, opts)
                .with_context(|| format!("creating a vault at {described}"))?;
            let info = info_of(described, secondary_described, vault.config());
            if g.json {
                print_json(&info);
            } else {
                eprintln!(
                    "created vault {}{} ({})",
                    info.location,
                    info.secondary
                        .as_ref()
                        .map(|s| format!(", replicated to {s}"))
                        .unwrap_or_default(),
                    encryption_words(info.encrypted)
                );
            }
            Ok(())
        }
        VaultCommand::Info => {
            let (record, backend) = regions::record(g)?;
            let config = Vault::read_config(&*backend).or_else(|e| match &record.secondary {
                Some(s) => Vault::read_config(&*s.backend(true)?).map_err(|_| e.into()),
                None => Err(anyhow::Error::from(e)),
            })?;
            let mut info = info_of(
                record.primary.describe(),
                record.secondary.as_ref().map(|s| s.describe()),
                &config,
            );
            info.storage_lock = Some(storage_lock::words(&record.primary, false, None));
            info.secondary_storage_lock = record
                .secondary
                .as_ref()
                .map(|s| storage_lock::words(s, true, None));
            print_info(g, &info);
            Ok(())
        }
        VaultCommand::Replicate { watch, interval } => {
            crate::replicate::replicate(g, watch, interval)
        }
        VaultCommand::Status => crate::replicate::status(g),
        VaultCommand::Set { soft_delete_days } => crate::point::set(g, soft_delete_days),
        VaultCommand::Lock {
            yes_i_understand_this_is_irreversible,
            hold_days,
        } => crate::point::lock(g, yes_i_understand_this_is_irreversible, hold_days),
    }
}

/// Who a local deletion is recorded as: the user and the host, as `points --deleted` shows.
pub fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", vmvault_store::locks::hostname())
}
