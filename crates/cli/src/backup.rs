//! `vmvault backup DESCRIPTION`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vmvault_engine::{backup_image_vm, BackupOptions, VmDescription};
use vmvault_format::{Consistency, TransferStats};

use crate::output::{bytes, print_json, Bar};
use crate::Global;

#[derive(Args)]
pub struct BackupArgs {
    /// The VM description (TOML) naming the VM's disk images.
    description: PathBuf,
}

#[derive(Serialize)]
struct BackupResult {
    id: String,
    vm: String,
    time: String,
    consistency: Consistency,
    consistency_reason: String,
    logical_bytes: u64,
    seconds: f64,
    stats: TransferStats,
}

pub fn run(g: &Global, args: BackupArgs) -> Result<()> {
    // The description is checked before the vault is opened: bad input fails fast.
    let desc = VmDescription::load(&args.description)?;
    let vault = crate::vault::open(g)?;
    let started = Instant::now();
    let m = backup_image_vm(&vault, &desc, &BackupOptions::default(), &Bar::new())?;
    let seconds = started.elapsed().as_secs_f64();
    let result = BackupResult {
        id: m.id.to_hex(),
        vm: m.vm.clone(),
        time: m.time.clone(),
        consistency: m.consistency,
        consistency_reason: m.consistency_reason.clone(),
        logical_bytes: m.logical_bytes(),
        seconds,
        stats: m.stats,
    };
    if g.json {
        print_json(&result);
        return Ok(());
    }
    println!("{}", result.id);
    let s = &m.stats;
    eprintln!(
        "{}: recovery point {} ({}-consistent) of {} in {:.1} s: read {}, new {}, stored {} \
         ({} chunks new, {} reused, {} zero)",
        m.vm,
        m.id.short(),
        m.consistency,
        bytes(result.logical_bytes),
        seconds,
        bytes(s.bytes_read),
        bytes(s.bytes_new),
        bytes(s.bytes_stored),
        s.chunks_new,
        s.chunks_reused,
        s.chunks_zero
    );
    Ok(())
}
