//! What each kind of job does, through the engine: backup (then the policy's retention),
//! restore to a folder on the server host, and garbage collection.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use vmvault_engine::{
    backup_image_vm, plan_prune, restore_disk, restore_vm, BackupOptions, Keep, RestoreOptions,
    VmDescription,
};
use vmvault_store::Vault;

use crate::app::App;
use crate::jobs::{JobProgress, Live, Params};
use crate::{catalog, Error, Result};

/// What a cancelled job's vault operations fail with.
const CANCELLED: &str = "the job was cancelled";

/// `2027-01-01` (end of that day, UTC) or a full RFC 3339 time.
/// How long an on-demand point is kept when its backup names no time (the cloud services'
/// default).
pub const ON_DEMAND_KEEP_DAYS: i64 = 30;

pub fn parse_keep_until(s: &str) -> Result<DateTime<Utc>> {
    if let Some(t) = crate::db::parse_ts(s) {
        return Ok(t);
    }
    let day = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| Error::Input(format!("'{s}' is not a date (YYYY-MM-DD or RFC 3339)")))?;
    Ok(day.and_hms_opt(23, 59, 59).expect("a valid time").and_utc())
}

impl App {
    /// The vault opened for one job, its regions wrapped so that a cancel stops the job.
    pub(crate) fn job_vault(&self, live: &Live) -> Result<Vault> {
        let mut spec = self.cfg.spec(false)?;
        spec.cancel = Some((live.cancel.clone(), CANCELLED));
        let pass = self.passphrase.clone();
        Ok(vmvault_open::reopen(&spec, &self.vault, move || Ok(pass))?)
    }

    fn job_params(&self, id: i64) -> Result<(Option<String>, Params)> {
        let (item, params): (Option<String>, String) =
            self.db
                .conn()
                .query_row("SELECT item, params FROM jobs WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        let p = serde_json::from_str(&params).map_err(|e| Error::Input(e.to_string()))?;
        Ok((item, p))
    }

    /// Runs a job; returns the point a backup made.
    pub(crate) fn run_job_kind(
        self: &Arc<App>,
        id: i64,
        kind: &str,
        live: &Live,
        progress: &JobProgress,
    ) -> Result<Option<String>> {
        let (item, params) = self.job_params(id)?;
        if let Some(hook) = self.job_hook() {
            hook(kind, item.as_deref());
        }
        match kind {
            "backup" => {
                let item = item.ok_or_else(|| Error::Input("a backup job names no VM".into()))?;
                let on_host = self
                    .relays
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&id);
                if on_host {
                    return self.run_agent_backup(id).map(Some);
                }
                self.run_backup(id, &item, &params, live, progress)
                    .map(Some)
            }
            "restore" if self.is_restore_relay(id) => {
                self.run_agent_restore(id)?;
                Ok(None)
            }
            "restore" => {
                self.run_restore(id, &params, live, progress)?;
                Ok(None)
            }
            "gc" => {
                let report = self.vault.gc(&mut |m| self.job_log(id, m))?;
                self.job_log(id, &format!("{report:?}"));
                // Points whose soft-delete window was over are gone from the vault now.
                if report.points_purged > 0 {
                    catalog::rebuild(&self.db, &self.vault_name, &self.vault)?;
                }
                Ok(None)
            }
            other => Err(Error::Input(format!("unknown job kind '{other}'"))),
        }
    }

    fn run_backup(
        &self,
        id: i64,
        item: &str,
        params: &Params,
        live: &Live,
        progress: &JobProgress,
    ) -> Result<String> {
        let (text, policy): (String, String) = self
            .db
            .conn()
            .query_row(
                "SELECT description, policy FROM protected_items WHERE name = ?1",
                [item],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|_| Error::NotFound(format!("'{item}' is not a protected item")))?;
        let mut desc = VmDescription::parse(&text).map_err(Error::Input)?;
        // Checked again now, and read by the resolved path: a symlink planted since the
        // item was protected (or after this check) cannot send the engine elsewhere.
        for d in &mut desc.disks {
            crate::confine::disk(&self.cfg, d)?;
        }
        let vault = self.job_vault(live)?;
        self.job_log(
            id,
            &format!("backing up {item} ({} disk(s))", desc.disks.len()),
        );
        let opts = BackupOptions {
            retention: self.point_retention(params, &policy)?,
            ..Default::default()
        };
        let m = backup_image_vm(&vault, &desc, &opts, progress)?;
        let point = m.id.to_hex();
        catalog::add(&self.db, &self.vault_name, &m)?;
        self.record_success(item, m.logical_bytes(), m.stats.bytes_stored);
        self.after_backup(id, item, &m);
        Ok(point)
    }

    /// After a point is made: its log line, then the policy's retention over the VM's points.
    pub(crate) fn after_backup(&self, id: i64, item: &str, m: &vmvault_format::Manifest) {
        self.job_log(
            id,
            &format!(
                "recovery point {item}@{} made: {} read, {} stored",
                m.id.short(),
                m.stats.bytes_read,
                m.stats.bytes_stored
            ),
        );
        let policy: String = match self.db.conn().query_row(
            "SELECT policy FROM protected_items WHERE name = ?1",
            [item],
            |r| r.get(0),
        ) {
            Ok(p) => p,
            // Unprotected while the backup ran: no policy to apply any more.
            Err(_) => return,
        };
        match self.apply_retention(item, &policy) {
            Ok(0) => {}
            Ok(n) => self.job_log(
                id,
                &format!(
                    "retention soft-deleted {n} older point(s) (`points --deleted` lists them)"
                ),
            ),
            // The point is made: a prune that fails is retried after the next backup.
            Err(e) => self.job_log(id, &format!("retention could not be applied: {e}")),
        }
    }

    /// The retention a new point records: an on-demand backup's own keep-until (30 days
    /// unless asked otherwise), or the policy's rules and time zone for a scheduled one.
    pub(crate) fn point_retention(
        &self,
        params: &Params,
        policy: &str,
    ) -> Result<vmvault_format::PointRetention> {
        if params.on_demand || params.keep_until.is_some() {
            let until = match &params.keep_until {
                Some(k) => parse_keep_until(k)?,
                None => self.now() + chrono::Duration::days(ON_DEMAND_KEEP_DAYS),
            };
            return Ok(vmvault_format::PointRetention::Until {
                until: crate::db::ts(until),
            });
        }
        let p = crate::api::policies::load(&self.db, policy)?;
        Ok(vmvault_format::PointRetention::Policy {
            policy: policy.to_string(),
            keep: retention(&p),
            time_zone: p.timezone.clone(),
        })
    }

    /// The policy's retention over the item's points, applied through the vault's rules:
    /// what it no longer keeps is soft-deleted and audited with the rule; on-demand points
    /// go only when their own time is over, and a locked vault refuses whatever the
    /// retention recorded in a point still keeps. Returns how many it deleted.
    pub fn apply_retention(&self, item: &str, policy: &str) -> Result<usize> {
        let p = crate::api::policies::load(&self.db, policy)?;
        let keep = retention(&p);
        if keep.is_empty() {
            return Ok(0);
        }
        let tz = crate::schedule::parse_tz(&p.timezone)?;
        let (points, _) = self.vault.points()?;
        let plan = plan_prune(&points, &keep, Some(item), self.now(), |t| {
            t.with_timezone(&tz).naive_local()
        })?;
        let reason = format!("retention: policy '{policy}' ({})", keep.describe());
        let outcome = vmvault_engine::prune(&self.vault, &plan, "server", &reason)?;
        let now = crate::db::ts(self.now());
        for d in &outcome.deleted {
            let id = d.id.to_hex();
            match d.purge_after {
                Some(_) => catalog::set_deleted(&self.db, &id, Some(&now))?,
                None => catalog::remove(&self.db, &id)?,
            }
            crate::auth::audit(
                &self.db,
                "server",
                "point.delete",
                &id,
                &format!("ok: {reason}"),
            );
        }
        for (id, why) in &outcome.refused {
            crate::auth::audit(
                &self.db,
                "server",
                "point.delete",
                &id.to_hex(),
                &format!("denied: {reason}: {why}"),
            );
        }
        Ok(outcome.deleted.len())
    }

    fn run_restore(
        &self,
        id: i64,
        params: &Params,
        live: &Live,
        progress: &JobProgress,
    ) -> Result<()> {
        let point = params
            .point
            .as_deref()
            .ok_or_else(|| Error::Input("a restore names no point".into()))?;
        let asked = params
            .target
            .as_deref()
            .ok_or_else(|| Error::Input("a restore names no target folder".into()))?;
        let target = crate::confine::restore_target(&self.cfg, Path::new(asked), params.overwrite)?;
        let vault = self.job_vault(live)?;
        let pid = point
            .parse()
            .map_err(|_| Error::Input(format!("'{point}' is not a point id")))?;
        let m = vault.load_manifest(&pid)?;
        // A new folder (0700), made by the engine only now, so that nothing planted at its
        // name since the check is written through, and removed again if the restore fails.
        let opts = RestoreOptions {
            overwrite: params.overwrite,
            new_folder: !params.overwrite,
            format: params.format.clone(),
            ..Default::default()
        };
        if let Some(name) = &params.disk {
            // One disk: the target is its new image file (made under a temporary name and
            // renamed into place by the engine).
            let disk = vmvault_engine::select_disk(&m, name)?;
            restore_disk(&vault, &m, disk, &target, &opts, progress)?;
            self.job_log(id, &format!("wrote {}", target.display()));
            return Ok(());
        }
        let files = restore_vm(&vault, &m, &target, &opts, progress)?;
        for f in files {
            self.job_log(id, &format!("wrote {}", f.display()));
        }
        Ok(())
    }
}

/// The policy's keep-* counts as the engine's retention.
pub fn retention(p: &crate::api::policies::Policy) -> Keep {
    Keep {
        last: p.keep_last,
        hourly: p.keep_hourly,
        daily: p.keep_daily,
        weekly: p.keep_weekly,
        monthly: p.keep_monthly,
        yearly: p.keep_yearly,
    }
}
