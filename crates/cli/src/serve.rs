//! `vmvault serve nbd VM@POINT --disk NAME (--listen ADDR | --socket PATH)`: one disk of a
//! recovery point, read-only, over NBD, until SIGINT or SIGTERM.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmvault_engine::PointExport;
use vmvault_nbd::Server;

use crate::exit::InputError;
use crate::output::bytes;
use crate::Global;

#[derive(Subcommand)]
pub enum ServeCommand {
    /// Serve one disk of a recovery point over NBD, read-only, until interrupted. Prints the
    /// NBD URL (nbd://HOST:PORT/DISK or nbd+unix:///DISK?socket=PATH) on stdout; with --json,
    /// one line of JSON.
    Nbd(NbdArgs),
}

#[derive(Args)]
pub struct NbdArgs {
    /// The recovery point: VM@latest, VM@ID (or a unique prefix), or VM@TIME (RFC 3339).
    point: String,
    /// The disk to serve; it is also the export's name.
    #[arg(long)]
    disk: String,
    /// Listen on this TCP address, e.g. 127.0.0.1:10809 (port 0: any free port).
    #[arg(
        long,
        value_name = "ADDR",
        required_unless_present = "socket",
        conflicts_with = "socket"
    )]
    listen: Option<String>,
    /// Listen on this unix socket (a stale socket left there is replaced).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Let --listen take an address other than loopback. NBD has no authentication and the
    /// disk is served decrypted: anyone who can reach the address can read it.
    #[arg(long, requires = "listen")]
    allow_remote: bool,
}

#[derive(Serialize)]
struct Serving {
    url: String,
    export: String,
    vm: String,
    id: String,
    time: String,
    disk: String,
    size: u64,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

pub fn run(g: &Global, c: ServeCommand) -> Result<()> {
    match c {
        ServeCommand::Nbd(a) => nbd(g, a),
    }
}

fn nbd(g: &Global, args: NbdArgs) -> Result<()> {
    let vault = Arc::new(crate::vault::open(g)?);
    let points = vmvault_engine::Points::read(&vault)?;
    let m = points.select(&args.point)?.clone();
    let export = Arc::new(PointExport::open(vault, &m, &args.disk)?);
    // Signals are caught before the socket exists, so that one arriving at any moment after
    // it still removes it.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("catching SIGINT and SIGTERM")?;
    let listener = match (&args.listen, &args.socket) {
        (Some(addr), _) => Listener::Tcp(bind_tcp(addr, args.allow_remote)?),
        (None, Some(path)) => Listener::Unix(bind_unix(path)?, path.clone()),
        (None, None) => unreachable!("clap requires --listen or --socket"),
    };
    let url = match &listener {
        Listener::Tcp(l) => format!("nbd://{}/{}", l.local_addr()?, args.disk),
        Listener::Unix(_, path) => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            format!("nbd+unix:///{}?socket={}", args.disk, path.display())
        }
    };
    let out = Serving {
        url: url.clone(),
        export: args.disk.clone(),
        vm: m.vm.clone(),
        id: m.id.to_hex(),
        time: m.time.clone(),
        disk: args.disk.clone(),
        size: export.disk().size,
    };
    let mut stdout = std::io::stdout().lock();
    if g.json {
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        writeln!(stdout, "{url}")?;
    }
    stdout.flush()?;
    drop(stdout);
    eprintln!(
        "serving disk {} ({}) of {}@{} read-only over NBD; stop with Ctrl-C",
        args.disk,
        bytes(out.size),
        m.vm,
        m.id.short()
    );
    if let Listener::Tcp(l) = &listener {
        if !l.local_addr()?.ip().to_canonical().is_loopback() {
            eprintln!(
                "WARNING: disk {} of {}@{} is served decrypted, with no authentication, to \
                 anyone who can reach {}",
                args.disk,
                m.vm,
                m.id.short(),
                l.local_addr()?
            );
        }
    }

    let server = Arc::new(
        Server::new(args.disk.clone(), export.clone())
            .with_description(format!(
                "vmvault {}@{} disk {}",
                m.vm,
                m.id.short(),
                args.disk
            ))
            .with_log(|line| eprintln!("nbd: {line}")),
    );
    let (done_tx, done_rx) = mpsc::channel::<Result<()>>();
    let accept_done = done_tx.clone();
    let socket_path = match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };
    std::thread::spawn(move || {
        let r = match listener {
            Listener::Tcp(l) => server.serve_tcp(l),
            Listener::Unix(l, _) => server.serve_unix(l),
        };
        let _ = accept_done.send(r.context("accepting NBD clients"));
    });
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let name = if signal == SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            eprintln!("{name}: stopping");
            let _ = done_tx.send(Ok(()));
        }
    });
    let result = done_rx
        .recv()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the NBD server stopped")));
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    eprintln!(
        "fetched {} chunk(s) from the vault while serving",
        export.fetches()
    );
    result
}

/// Binds `addr` (HOST:PORT), refusing an address other than loopback unless `allow_remote`:
/// whoever connects reads the decrypted disk, with nothing to prove who they are.
fn bind_tcp(addr: &str, allow_remote: bool) -> Result<TcpListener> {
    let mut addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| InputError(format!("--listen {addr}: {e}")))?
        .collect();
    if !allow_remote {
        if let Some(a) = addrs.iter().find(|a| !a.ip().to_canonical().is_loopback()) {
            return Err(InputError(format!(
                "--listen {addr}: {} is not a loopback address, and serve nbd gives the \
                 decrypted disk to anyone who connects (NBD has no authentication): listen on \
                 127.0.0.1 or a --socket, or pass --allow-remote to expose it",
                a.ip()
            ))
            .into());
        }
    }
    // IPv4 first ("localhost" may resolve to ::1 first): the URL printed then works for
    // clients without IPv6.
    addrs.sort_by_key(|a| !a.is_ipv4());
    TcpListener::bind(&addrs[..]).with_context(|| format!("listening on {addr}"))
}

/// Binds a unix socket at `path`, replacing a stale socket that nothing listens on.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let stale = meta.file_type().is_socket() && UnixStream::connect(path).is_err();
        if !stale {
            return Err(InputError(format!(
                "{} exists{}",
                path.display(),
                if meta.file_type().is_socket() {
                    " and a server listens on it"
                } else {
                    ""
                }
            ))
            .into());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}
