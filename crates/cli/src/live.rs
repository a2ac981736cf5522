//! `vmvault restore VM@POINT --disk NAME --to FILE.qcow2 --live --qmp SOCKET`: the VM runs on
//! the recovery point at once, and ends on a normal local disk.
//!
//! vmvault serves the disk over NBD on a private unix socket; QEMU gets it as the backing of
//! `FILE.qcow2` (an empty overlay vmvault creates), plugged into the guest; a paused VM is
//! resumed; `block-stream` copies the rest in while the guest runs (the `vmvault_qemu::live`
//! module has the QEMU side). The command ends when the overlay stands alone.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use vmvault_engine::{PointExport, Progress};
use vmvault_format::Manifest;
use vmvault_nbd::{Export, Server};
use vmvault_qemu::{live, Qmp};
use vmvault_store::Vault;

use crate::output::{print_json, Bar};
use crate::Global;

/// The export, noting when the VM's first read arrived.
struct FirstRead {
    inner: PointExport,
    started: Instant,
    first: OnceLock<f64>,
}

impl Export for FirstRead {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.first
            .get_or_init(|| self.started.elapsed().as_secs_f64());
        self.inner.read_at(off, buf)
    }
    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.inner.extents(off, len)
    }
}

#[derive(Serialize)]
struct LiveResult {
    id: String,
    vm: String,
    disk: String,
    to: String,
    /// Seconds from the command's start until the disk was attached and the VM running: from
    /// then on every read the guest makes is served.
    attached_seconds: f64,
    /// Seconds from the command's start to the first read of the disk being served (the
    /// guest's, or the copy job's if it came first).
    first_read_seconds: Option<f64>,
    /// Seconds until the disk was all local.
    seconds: f64,
    chunks_fetched: u64,
}

pub struct LiveArgs<'a> {
    pub qmp: PathBuf,
    pub device: String,
    pub bus: Option<String>,
    pub disk: &'a str,
    pub to: PathBuf,
    pub overwrite: bool,
}

pub fn run(g: &Global, vault: Vault, m: &Manifest, args: LiveArgs) -> Result<()> {
    let started = *crate::STARTED.get_or_init(Instant::now);
    let record = vmvault_engine::select_disk(m, args.disk)?;
    // The overlay: an empty qcow2 of the disk's size (QEMU gives it its backing at run time).
    let overlay = vmvault_disk::create(&args.to, "qcow2", record.size, args.overwrite)?;
    overlay.finish()?;
    let vault = Arc::new(vault);
    let export = Arc::new(FirstRead {
        inner: PointExport::open(vault, m, args.disk)?,
        started,
        first: OnceLock::new(),
    });
    let sockdir = tempfile::tempdir().context("a folder for the NBD socket")?;
    let socket = sockdir.path().join("nbd.sock");
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    let server = Arc::new(Server::new(args.disk, export.clone() as Arc<dyn Export>));
    std::thread::spawn(move || server.serve_unix(listener));

    let mut qmp = Qmp::connect(&args.qmp)?;
    let plan = live::Plan {
        nbd_socket: socket,
        export: args.disk.to_string(),
        overlay: std::path::absolute(&args.to)?,
        device: args.device,
        bus: args.bus,
    };
    live::attach(&mut qmp, &plan)?;
    let resumed = live::start_if_paused(&mut qmp)?;
    let attached_seconds = started.elapsed().as_secs_f64();
    if !g.json {
        eprintln!(
            "{}: disk {} attached to the VM as {}{}; copying it in",
            m.vm,
            args.disk,
            plan.device,
            if resumed { ", VM resumed" } else { "" }
        );
    }
    let bar = Bar::new();
    let mut shown: Option<u64> = None;
    live::stream(&mut qmp, &plan, &mut |done, total| {
        if shown.is_none() && total > 0 {
            bar.start(&format!("{} disk {} (live)", m.vm, args.disk), total);
            shown = Some(0);
        }
        if let Some(last) = shown.as_mut() {
            bar.advance(done.saturating_sub(*last));
            *last = done.max(*last);
        }
    })?;
    bar.finish();
    let result = LiveResult {
        id: m.id.to_hex(),
        vm: m.vm.clone(),
        disk: args.disk.to_string(),
        to: args.to.display().to_string(),
        attached_seconds,
        first_read_seconds: export.first.get().copied(),
        seconds: started.elapsed().as_secs_f64(),
        chunks_fetched: export.inner.fetches(),
    };
    if g.json {
        print_json(&result);
    } else {
        eprintln!(
            "{}: disk {} is local in {} ({:.1} s; the VM ran on it after {:.2} s, its first read \
             was served after {})",
            m.vm,
            args.disk,
            result.to,
            result.seconds,
            result.attached_seconds,
            result
                .first_read_seconds
                .map_or("none yet".to_string(), |s| format!("{s:.2} s"))
        );
    }
    Ok(())
}
