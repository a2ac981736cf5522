//! `vmvault verify`, `vmvault prune`, `vmvault gc`.

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vmvault_engine::{
    plan_prune, prune as apply_prune, verify as run_verify, Retention, VerifyOptions,
};

use crate::exit::DamageFound;
use crate::output::{bytes, print_json, table, Bar};
use crate::points::local_time;
use crate::Global;

#[derive(Args)]
pub struct VerifyArgs {
    /// Also read, decrypt and re-hash every chunk the recovery points reference.
    #[arg(long)]
    read_data: bool,
    /// In a vault with a secondary region: rewrite a copy missing or damaged in one region
    /// from the other region's good copy.
    #[arg(long)]
    repair: bool,
}

pub fn verify(g: &Global, args: VerifyArgs) -> Result<()> {
    let vault = crate::vault::open(g)?;
    let opts = VerifyOptions {
        read_data: args.read_data,
        repair: args.repair,
    };
    if args.repair && vault.regions().len() < 2 {
        return Err(crate::exit::InputError(format!(
            "--repair needs a second region to copy from, and {} has none here",
            vault.location()
        ))
        .into());
    }
    let report = run_verify(&vault, &opts, &Bar::new())?;
    if g.json {
        print_json(&report);
    } else {
        let describe = |p: &vmvault_engine::Problem| {
            let mut at = Vec::new();
            if let Some(r) = &p.region {
                at.push(format!("{r} region"));
            }
            if let Some(vm) = &p.vm {
                at.push(format!("VM {vm}"));
            }
            if let Some(id) = &p.point {
                at.push(format!("recovery point {id}"));
            }
            if let Some(d) = &p.disk {
                at.push(format!("disk {d}"));
            }
            format!("{}: {}", at.join(", "), p.detail)
        };
        for p in &report.mended {
            outln!("REPAIRED {}", describe(p));
        }
        for p in &report.problems {
            outln!("DAMAGED {}", describe(p));
        }
        eprintln!(
            "checked {} recovery point(s), {} disk(s), {} chunk(s){}: {}",
            report.points,
            report.disks,
            report.chunks_referenced,
            if args.read_data {
                format!(", read {}", bytes(report.bytes_read))
            } else {
                " (existence only; --read-data reads them)".into()
            },
            match (report.is_clean(), report.repaired) {
                (true, 0) => "no problems".to_string(),
                (true, n) =>
                    format!("repaired {n} object(s) from the other region; no problems left"),
                (false, n) => format!(
                    "{} problem(s){}",
                    report.problems.len(),
                    if n > 0 {
                        format!(" left after repairing {n} object(s)")
                    } else {
                        String::new()
                    }
                ),
            }
        );
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(DamageFound(report.problems.len()).into())
    }
}

#[derive(Args)]
pub struct PruneArgs {
    /// Only this VM's points (default: every VM, each on its own).
    #[arg(long)]
    vm: Option<String>,
    /// Keep the N newest points.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_last: u32,
    /// Keep the newest point of each of the last N hours that have points.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_hourly: u32,
    /// Keep the newest point of each of the last N days that have points.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_daily: u32,
    /// Keep the newest point of each of the last N ISO weeks that have points.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_weekly: u32,
    /// Keep the newest point of each of the last N months that have points.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_monthly: u32,
    /// Keep the newest point of each of the last N years that have points.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_yearly: u32,
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Serialize)]
struct PruneOutput {
    dry_run: bool,
    retention: Retention,
    kept: usize,
    removed: usize,
    points: Vec<vmvault_engine::PruneDecision>,
}

pub fn prune(g: &Global, a: PruneArgs) -> Result<()> {
    let vault = crate::vault::open(g)?;
    // The server's lock makes the vault immutable: only the server knows each point's
    // retention, so a local prune could delete what must stay.
    if let Some(at) = vmvault_server::softdelete::read_lock(&vault)? {
        return Err(crate::exit::InputError(format!(
            "the vault is locked (immutable since {at}): its points are pruned by its server, \
             which keeps each until its retention ends"
        ))
        .into());
    }
    let retention = Retention {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let (points, _) = vault.points()?;
    let plan = plan_prune(&points, &retention, a.vm.as_deref(), |t| {
        t.with_timezone(&chrono::Local).naive_local()
    })?;
    let removed = if a.dry_run {
        plan.iter().filter(|d| !d.keep).count()
    } else {
        apply_prune(&vault, &plan)?
    };
    let kept = plan.len() - plan.iter().filter(|d| !d.keep).count();
    if g.json {
        print_json(&PruneOutput {
            dry_run: a.dry_run,
            retention,
            kept,
            removed,
            points: plan,
        });
        return Ok(());
    }
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|d| {
            vec![
                d.id.short(),
                local_time(&d.time),
                d.vm.clone(),
                if d.keep { "keep" } else { "remove" }.into(),
                d.reasons.join(","),
            ]
        })
        .collect();
    table(&["ID", "TIME", "VM", "ACTION", "KEPT BY"], &rows);
    eprintln!(
        "{}{kept} kept, {removed} {}; run `vmvault gc` to free the space of removed points",
        if a.dry_run { "dry run: " } else { "" },
        if a.dry_run {
            "would be removed"
        } else {
            "removed"
        }
    );
    Ok(())
}

pub fn gc(g: &Global) -> Result<()> {
    let vault = crate::vault::open(g)?;
    let report = vault.gc(&mut |msg| eprintln!("{msg}"))?;
    if g.json {
        print_json(&report);
    } else {
        eprintln!(
            "gc: {} recovery point(s) referenced; removed {} of {} chunk(s) ({}), {} index(es), {} \
             temporary file(s); spared {} young chunk(s) a running backup may use",
            report.points,
            report.chunks_removed,
            report.chunks_total,
            bytes(report.bytes_removed),
            report.indexes_removed,
            report.temporaries_removed,
            report.chunks_spared
        );
    }
    Ok(())
}
