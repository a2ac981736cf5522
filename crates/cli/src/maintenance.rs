//! `vmvault verify`, `vmvault prune`, `vmvault gc`.

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vmvault_engine::{plan_prune, prune as apply_prune, verify as run_verify, Keep, VerifyOptions};

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
    retention: Keep,
    kept: usize,
    deleted: usize,
    /// Points the plan would delete that the vault's lock keeps, with why.
    refused: Vec<Refused>,
    points: Vec<vmvault_engine::PruneDecision>,
}

#[derive(Serialize)]
struct Refused {
    id: String,
    why: String,
}

pub fn prune(g: &Global, a: PruneArgs) -> Result<()> {
    let vault = crate::vault::open(g)?;
    let keep = Keep {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let (points, _) = vault.points()?;
    let plan = plan_prune(&points, &keep, a.vm.as_deref(), chrono::Utc::now(), |t| {
        t.with_timezone(&chrono::Local).naive_local()
    })?;
    let outcome = if a.dry_run {
        vmvault_engine::PruneOutcome::default()
    } else {
        let reason = format!("prune (keep {})", keep.describe());
        apply_prune(&vault, &plan, &crate::vault::who(), &reason)?
    };
    let deleted = if a.dry_run {
        plan.iter().filter(|d| !d.keep).count()
    } else {
        outcome.deleted.len()
    };
    let kept = plan.len() - deleted;
    let refused: Vec<Refused> = outcome
        .refused
        .iter()
        .map(|(id, why)| Refused {
            id: id.to_hex(),
            why: why.clone(),
        })
        .collect();
    if g.json {
        print_json(&PruneOutput {
            dry_run: a.dry_run,
            retention: keep,
            kept,
            deleted,
            refused,
            points: plan,
        });
        return Ok(());
    }
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|d| {
            let locked = outcome.refused.iter().any(|(id, _)| *id == d.id);
            vec![
                d.id.short(),
                local_time(&d.time),
                d.vm.clone(),
                if d.keep || locked { "keep" } else { "delete" }.into(),
                if locked {
                    "vault lock".into()
                } else {
                    d.reasons.join(",")
                },
            ]
        })
        .collect();
    table(&["ID", "TIME", "VM", "ACTION", "KEPT BY"], &rows);
    for r in &refused {
        eprintln!("kept: {}", r.why);
    }
    let days = vault.rules()?.soft_delete_days;
    let after = if days == 0 {
        "; run `vmvault gc` to free their space".to_string()
    } else {
        format!(
            " (soft delete: `points --deleted` lists them, `point undelete` brings one back for \
             {days} days; the first `vmvault gc` after that frees their space)"
        )
    };
    eprintln!(
        "{}{kept} kept, {deleted} {}{after}",
        if a.dry_run { "dry run: " } else { "" },
        if a.dry_run {
            "would be deleted"
        } else {
            "deleted"
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
            "gc: {} soft-deleted point(s) past their window removed; {} recovery point(s) \
             referenced; removed {} of {} chunk(s) ({}), {} index(es), {} temporary file(s); \
             spared {} young chunk(s) a running backup may use",
            report.points_purged,
            report.points,
            report.chunks_removed,
            report.chunks_total,
            bytes(report.bytes_removed),
            report.indexes_removed,
            report.temporaries_removed,
            report.chunks_spared
        );
        if report.holds_renewed > 0 {
            eprintln!(
                "gc: the storage's hold renewed on {} object(s)",
                report.holds_renewed
            );
        }
    }
    Ok(())
}
