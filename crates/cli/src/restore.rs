//! `vmvault restore VM@POINT --to PATH [--disk NAME]`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vmvault_engine::{restore_disk, restore_vm, RestoreOptions};

use crate::output::{bytes, print_json, Bar};
use crate::Global;

#[derive(Args)]
pub struct RestoreArgs {
    /// The recovery point: VM@latest, VM@ID (or a unique prefix), or VM@TIME (RFC 3339).
    point: String,
    /// Where: a folder for a whole VM, a file (or block device) for one disk.
    #[arg(long)]
    to: PathBuf,
    /// Restore only this disk, to the file given with --to.
    #[arg(long)]
    disk: Option<String>,
    /// Overwrite files that exist at the target.
    #[arg(long)]
    force: bool,
    /// Image format to write: raw, qcow2, vhd (dynamic), vhd-fixed (size rounded up to whole
    /// MiB, as Azure requires), vhdx or vmdk (streamOptimized). Default: each disk's source format.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(vmvault_disk::WRITE_FORMATS))]
    format: Option<String>,
    /// Live restore into a running or paused QEMU VM: the disk (--disk, written to --to as
    /// qcow2) is attached at once, served from the vault, and copied in while the VM runs.
    #[arg(long, requires_all = ["qmp", "disk"], conflicts_with = "format")]
    live: bool,
    /// The VM's QMP socket, for --live.
    #[arg(long, value_name = "SOCKET", requires = "live")]
    qmp: Option<PathBuf>,
    /// The guest device id to give the disk, for --live.
    #[arg(long, value_name = "ID", default_value = "vmvault0", requires = "live")]
    device: String,
    /// The bus to plug it into, for --live (a free pcie-root-port on q35).
    #[arg(long, value_name = "BUS", requires = "live")]
    bus: Option<String>,
}

#[derive(Serialize)]
struct Restored {
    id: String,
    vm: String,
    time: String,
    files: Vec<String>,
    bytes: u64,
    seconds: f64,
}

pub fn run(g: &Global, args: RestoreArgs) -> Result<()> {
    let vault = crate::vault::open(g)?;
    let points = vmvault_engine::Points::read(&vault)?;
    let m = points.select(&args.point)?;
    if args.live {
        let m = m.clone();
        let live = crate::live::LiveArgs {
            qmp: args.qmp.clone().expect("clap requires --qmp"),
            device: args.device.clone(),
            bus: args.bus.clone(),
            disk: args.disk.as_deref().expect("clap requires --disk"),
            to: args.to.clone(),
            overwrite: args.force,
        };
        return crate::live::run(g, vault, &m, live);
    }
    let opts = RestoreOptions {
        overwrite: args.force,
        format: args.format.clone(),
        ..RestoreOptions::default()
    };
    let started = std::time::Instant::now();
    let bar = Bar::new();
    let (files, size) = match &args.disk {
        Some(name) => {
            let disk = vmvault_engine::select_disk(m, name)?;
            restore_disk(&vault, m, disk, &args.to, &opts, &bar)?;
            (vec![args.to.display().to_string()], disk.size)
        }
        None => {
            let files = restore_vm(&vault, m, &args.to, &opts, &bar)?;
            let files = files.iter().map(|f| f.display().to_string()).collect();
            (files, m.logical_bytes())
        }
    };
    let out = Restored {
        id: m.id.to_hex(),
        vm: m.vm.clone(),
        time: m.time.clone(),
        files,
        bytes: size,
        seconds: started.elapsed().as_secs_f64(),
    };
    if g.json {
        print_json(&out);
    } else {
        for f in &out.files {
            outln!("{f}");
        }
        eprintln!(
            "restored {} of {} from recovery point {} in {:.1} s",
            bytes(out.bytes),
            out.vm,
            m.id.short(),
            out.seconds
        );
    }
    Ok(())
}
