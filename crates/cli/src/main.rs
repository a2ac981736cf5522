//! The `vmvault` command.

/// `println!` for what a command prints on stdout: a reader that went away
/// (`vmvault points | head -1`) ends the command quietly, as SIGPIPE ends a Unix tool, where
/// `println!` would panic.
macro_rules! outln {
    () => {
        $crate::output::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::stdout_line(format_args!($($arg)*))
    };
}

mod agent_cmd;
mod backup;
mod disk;
mod exit;
mod files;
mod hosts_cmd;
mod interrupt;
mod key;
mod live;
mod maintenance;
mod output;
mod password;
mod point;
mod points;
mod qemu;
mod quiesce;
mod regions;
mod release_cmd;
mod remote;
mod remote_cmd;
mod remote_show;
mod replicate;
mod restore;
mod serve;
mod server_cmd;
mod vault;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Back up and restore virtual machines into a deduplicated, compressed, encrypted vault.
#[derive(Parser)]
#[command(name = "vmvault", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes. Listed apart from each command's own under "Vault options"
/// so that `--help` of a command shows what is its own first.
#[derive(clap::Args, Clone)]
#[command(next_help_heading = "Vault options (every command)")]
pub struct Global {
    /// The vault: a directory, s3://bucket/prefix or azblob://container/prefix.
    #[arg(long, global = true, env = "VMVAULT_VAULT", value_name = "LOCATION")]
    pub vault: Option<String>,
    /// The object store's endpoint, for an s3:// or azblob:// vault not on AWS or Azure.
    #[arg(long, global = true, env = "VMVAULT_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// The S3 region of an s3:// vault (else AWS_REGION, else us-east-1).
    #[arg(long, global = true, env = "VMVAULT_REGION", value_name = "REGION")]
    pub region: Option<String>,
    /// The Azure storage account of an azblob:// vault (else AZURE_STORAGE_ACCOUNT).
    #[arg(long, global = true, env = "VMVAULT_ACCOUNT", value_name = "ACCOUNT")]
    pub account: Option<String>,
    /// Work with one region only: the secondary (when the primary is lost) or the primary.
    #[arg(long, global = true, value_enum, value_name = "REGION")]
    pub from_region: Option<regions::FromRegion>,
    /// Replicate synchronously: a backup's writes return only once both regions have them.
    #[arg(long, global = true, env = "VMVAULT_SYNC_REPLICATION")]
    pub sync: bool,
    /// Seconds a backup keeps waiting for a secondary region that makes no progress before it
    /// leaves the rest to the replication queue (kept for the next run).
    #[arg(
        long,
        global = true,
        env = "VMVAULT_REPLICATION_WAIT",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub replication_wait: u64,
    /// Read the vault's passphrase from this file (else VMVAULT_PASSWORD, else a prompt).
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Create a vault or show what one is.
    #[command(subcommand)]
    Vault(vault::VaultCommand),
    /// Back up a VM described by a TOML file; prints the new recovery point's id.
    Backup(backup::BackupArgs),
    /// List recovery points.
    Points(points::PointsArgs),
    /// Delete (soft) or undelete a recovery point: VM@ID.
    #[command(subcommand)]
    Point(point::PointCommand),
    /// Restore a whole VM, or one disk, from a recovery point.
    Restore(restore::RestoreArgs),
    /// Check that every recovery point is whole; --read-data reads every chunk.
    Verify(maintenance::VerifyArgs),
    /// Remove recovery points that a retention policy does not keep.
    Prune(maintenance::PruneArgs),
    /// Remove chunks that no recovery point references.
    Gc,
    /// Manage the vault's passphrase.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Inspect disk images.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Serve a recovery point's disk to other programs: `serve nbd` (read-only NBD).
    #[command(subcommand)]
    Serve(serve::ServeCommand),
    /// Single files from a recovery point: list, extract (to a folder, tar or zip), find.
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// Run the vault server: REST API, schedules, jobs. `vmvault --server URL --help` lists the
    /// commands that talk to one (policy, protect, backup, host, hosts, vms, jobs, points, ...).
    Server(server_cmd::ServerArgs),
    /// The host agent, on a hypervisor host: enroll it with a server once (`vmvault host
    /// add` makes the code), then run it (the vmvault-agent systemd unit does).
    #[command(subcommand)]
    Agent(agent_cmd::AgentCommand),
    /// Offline release keys: make one, sign an agent binary with it (`--server URL release
    /// add` adds a release to a server).
    #[command(subcommand)]
    Release(release_cmd::LocalReleaseCommand),
}

/// When this command started, for figures that count from it (live restore's first read).
pub static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn main() {
    quiesce::intercept();
    STARTED.get_or_init(std::time::Instant::now);
    let args: Vec<String> = std::env::args().collect();
    if remote_cmd::wanted(&args) {
        let cli: remote_cmd::RemoteCli = parse();
        if let Err(e) = remote_cmd::run(cli) {
            fail(&e);
        }
        return;
    }
    let cli: Cli = parse();
    let g = &cli.global;
    // A server, an NBD export and an agent run until a signal and stop cleanly on it
    // themselves.
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Server(_) | Command::Agent(_)
    ) {
        interrupt::install();
    }
    let result = match cli.command {
        Command::Vault(c) => vault::run(g, c),
        Command::Backup(a) => backup::run(g, a),
        Command::Points(a) => points::run(g, a),
        Command::Point(c) => point::run(g, c),
        Command::Restore(a) => restore::run(g, a),
        Command::Verify(a) => maintenance::verify(g, a),
        Command::Prune(a) => maintenance::prune(g, a),
        Command::Gc => maintenance::gc(g),
        Command::Key(c) => key::run(g, c),
        Command::Disk(c) => disk::run(g, c),
        Command::Serve(c) => serve::run(g, c),
        Command::Files(c) => files::run(g, c),
        Command::Server(a) => server_cmd::run(g, a),
        Command::Agent(c) => agent_cmd::run(g.json, c),
        Command::Release(c) => release_cmd::local(g.json, c),
    };
    if let Err(e) = result {
        fail(&e);
    }
}

/// The command line, or exit 2 with clap's message as every other error is said:
/// `vmvault: error: ...` (help and version go to stdout with exit 0, as clap does).
fn parse<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprint!("vmvault: error: {text}");
            std::process::exit(vmvault_class::Class::Input.exit_code());
        }
    }
}

/// One line for the error, and the exit code of its class.
fn fail(e: &anyhow::Error) -> ! {
    let class = exit::class(e);
    let message = exit::message(e);
    if class == vmvault_class::Class::Pending {
        // Said as the server says it: which approval it waits for.
        let said = e
            .downcast_ref::<remote::ApiError>()
            .map_or(message, |a| a.message.clone());
        eprintln!("vmvault: {said}");
    } else if class == vmvault_class::Class::Cancelled {
        // The cause says what was kept; the context before it (what was being done) is
        // noise after a Ctrl-C.
        let why = e.chain().last().map(|c| c.to_string()).unwrap_or(message);
        eprintln!("vmvault: {why}");
    } else {
        eprintln!("vmvault: error: {message}");
    }
    std::process::exit(class.exit_code());
}
