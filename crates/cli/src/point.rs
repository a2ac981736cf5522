//! `vmvault point delete|undelete VM@ID`, `vault lock`, `vault set`: the vault's rules on a
//! vault opened directly, the same words as against a server. Every decision is the store's
//! (`Vault::delete_point` and friends), so a local command keeps the same promises.

use std::io::IsTerminal;

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;
use vmvault_engine::{select_point, Points};
use vmvault_open::storage_lock;
use vmvault_store::Deleted;

use crate::exit::InputError;
use crate::output::print_json;
use crate::Global;

#[derive(Subcommand)]
pub enum PointCommand {
    /// Delete a recovery point: soft (listed by `points --deleted`, restorable and undeletable
    /// for the vault's soft-delete days), refused in a locked vault while its retention lasts.
    Delete {
        /// VM@ID (an id prefix), VM@latest or VM@TIME.
        point: String,
    },
    /// Bring back a soft-deleted recovery point.
    Undelete {
        /// VM@ID (an id prefix).
        point: String,
    },
}

#[derive(Serialize)]
struct DeleteOutput {
    id: String,
    vm: String,
    /// Until when it can be undeleted; absent when it was removed at once (soft delete off).
    purge_after: Option<String>,
}

pub fn run(g: &Global, cmd: PointCommand) -> Result<()> {
    let vault = crate::vault::open(g)?;
    match cmd {
        PointCommand::Delete { point } => {
            let points = Points::read(&vault)?;
            let m = points.select(&point)?;
            let out = match vault.delete_point(&m.id, &crate::vault::who(), "point delete")? {
                Deleted::Until(t) => DeleteOutput {
                    id: m.id.to_hex(),
                    vm: m.vm.clone(),
                    purge_after: Some(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                },
                Deleted::Removed => DeleteOutput {
                    id: m.id.to_hex(),
                    vm: m.vm.clone(),
                    purge_after: None,
                },
            };
            if g.json {
                print_json(&out);
            } else {
                match &out.purge_after {
                    Some(t) => outln!(
                        "{}@{} deleted; restorable and undeletable until {t}",
                        out.vm,
                        &out.id[..8]
                    ),
                    None => outln!(
                        "{}@{} removed (soft delete is off in this vault)",
                        out.vm,
                        &out.id[..8]
                    ),
                }
            }
        }
        PointCommand::Undelete { point } => {
            let list = vault.list_points()?;
            let deleted: Vec<_> = list.deleted.iter().map(|(m, _)| m.clone()).collect();
            let m = select_point(&deleted, &[], &point).map_err(|_| {
                InputError(format!(
                    "{point:?} names no soft-deleted recovery point (`vmvault points --deleted` \
                     lists them)"
                ))
            })?;
            vault.undelete_point(&m.id)?;
            if g.json {
                print_json(&serde_json::json!({"id": m.id.to_hex(), "vm": m.vm}));
            } else {
                outln!("{}@{} is back", m.vm, m.id.short());
            }
        }
    }
    Ok(())
}

/// `vault set --soft-delete-days N`.
pub fn set(g: &Global, soft_delete_days: u32) -> Result<()> {
    let vault = crate::vault::open(g)?;
    let rules = vault.set_soft_delete_days(soft_delete_days)?;
    if g.json {
        print_json(&rules);
    } else if rules.soft_delete_days == 0 {
        outln!("soft delete is off: deleted points are removed at once");
    } else {
        outln!(
            "deleted points stay restorable for {} days",
            rules.soft_delete_days
        );
    }
    Ok(())
}

/// `vault lock --yes-i-understand-this-is-irreversible [--hold-days N]`.
pub fn lock(g: &Global, confirmed: bool, hold_days: u32) -> Result<()> {
    if !confirmed {
        return Err(InputError(
            "locking a vault cannot be undone: no point leaves it before the retention it was \
             taken under ends, and soft delete can only grow; give \
             --yes-i-understand-this-is-irreversible"
                .into(),
        )
        .into());
    }
    let vault = crate::vault::open(g)?;
    let rules = vault.lock_vault_holding(&crate::vault::who(), hold_days)?;
    // What was written before the lock, and chunks older than a hold, are held from now on.
    let terminal = std::io::stderr().is_terminal();
    let renewed = vault.renew_holds(&|n| {
        if terminal && n % 500 == 0 {
            eprint!("\rholding the vault's objects: {n}");
        }
    })?;
    if terminal && renewed >= 500 {
        eprintln!();
    }
    // Whether the storage keeps the promise too, said per region rather than left for the
    // user to assume.
    let (record, _) = crate::regions::record(g)?;
    let mut storage = vec![(
        "primary",
        storage_lock::words(
            &record.primary,
            false,
            storage_lock::held_days(&vault, "primary"),
        ),
    )];
    if let Some(s) = &record.secondary {
        let held = storage_lock::held_days(&vault, "secondary");
        storage.push(("secondary", storage_lock::words(s, true, held)));
    }
    if g.json {
        print_json(&serde_json::json!({
            "rules": rules,
            "storage": storage.iter().map(|(r, s)| serde_json::json!({"region": r, "lock": s})).collect::<Vec<_>>(),
            "holds_renewed": renewed,
        }));
    } else if let Some(l) = &rules.locked {
        outln!(
            "the vault is locked (immutable since {}, by {}); soft delete {} days",
            l.at,
            l.by,
            rules.soft_delete_days
        );
        for (region, s) in &storage {
            outln!("{region} region: {s}");
        }
        if renewed > 0 {
            outln!("{renewed} object(s) in the vault are held from now on");
        }
    }
    Ok(())
}
