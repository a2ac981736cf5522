//! `vmvault points [VM]`.

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vmvault_format::Manifest;

use crate::output::{bytes, print_json, table};
use crate::vault::encryption_words;
use crate::Global;

#[derive(Args)]
pub struct PointsArgs {
    /// Only this VM's points.
    vm: Option<String>,
    /// Soft-deleted points instead (restorable with `point undelete` until their window ends).
    #[arg(long)]
    deleted: bool,
}

#[derive(Serialize)]
struct PointsOutput<'a> {
    vault: String,
    encrypted: bool,
    points: Vec<&'a Manifest>,
    unreadable: Vec<Unreadable>,
}

#[derive(Serialize)]
struct Unreadable {
    id: String,
    error: String,
}

/// A point's time in the local zone, to the second, as people read it.
pub fn local_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S %z")
                .to_string()
        })
        .unwrap_or_else(|_| rfc3339.to_string())
}

pub fn run(g: &Global, args: PointsArgs) -> Result<()> {
    let vault = crate::vault::open(g)?;
    let list = vault.list_points()?;
    // A VM the vault has never held a point of is a typo, not an empty history (unless a
    // point that cannot be read might be its).
    if let Some(vm) = &args.vm {
        let mut known: Vec<&str> = list
            .live
            .iter()
            .chain(list.deleted.iter().map(|(m, _)| m))
            .map(|m| m.vm.as_str())
            .collect();
        known.sort_unstable();
        known.dedup();
        if !known.contains(&vm.as_str()) && list.unreadable.is_empty() {
            return Err(crate::exit::InputError(format!(
                "no recovery point of VM {vm:?} in {}{}",
                vault.location(),
                if known.is_empty() {
                    String::new()
                } else {
                    format!(" (its VMs: {})", known.join(", "))
                }
            ))
            .into());
        }
    }
    let (points, bad) = if args.deleted {
        (
            list.deleted.into_iter().map(|(m, _)| m).collect(),
            Vec::new(),
        )
    } else {
        (list.live, list.unreadable)
    };
    let shown: Vec<&Manifest> = points
        .iter()
        .filter(|m| args.vm.as_deref().is_none_or(|v| m.vm == v))
        .collect();
    let bad: Vec<(String, String)> = bad
        .iter()
        .map(|(id, e)| (id.to_hex(), e.to_string()))
        .collect();
    show(
        g.json,
        vault.location(),
        vault.config().encrypted,
        shown,
        &bad,
    );
    Ok(())
}

/// Prints points as a table (or JSON): the same for a local vault and a server's.
pub fn show(
    json: bool,
    location: String,
    encrypted: bool,
    shown: Vec<&Manifest>,
    bad: &[(String, String)],
) {
    if json {
        print_json(&PointsOutput {
            vault: location,
            encrypted,
            points: shown,
            unreadable: bad
                .iter()
                .map(|(id, e)| Unreadable {
                    id: id.clone(),
                    error: e.clone(),
                })
                .collect(),
        });
        return;
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|m| {
            vec![
                m.id.short(),
                local_time(&m.time),
                m.vm.clone(),
                m.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                bytes(m.logical_bytes()),
                bytes(m.stats.bytes_stored),
                m.consistency.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "TIME",
            "VM",
            "DISKS",
            "LOGICAL",
            "STORED",
            "CONSISTENCY",
        ],
        &rows,
    );
    for m in &shown {
        if m.consistency != vmvault_format::Consistency::Application {
            eprintln!(
                "{} {}: {}-consistent: {}",
                m.vm,
                m.id.short(),
                m.consistency,
                m.consistency_reason
            );
        }
    }
    for (id, e) in bad {
        eprintln!("recovery point {id} cannot be read: {e}");
    }
    eprintln!(
        "{} recovery point(s); STORED is what each added to the vault; vault is {}",
        shown.len(),
        encryption_words(encrypted)
    );
}
