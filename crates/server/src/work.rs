//! What each kind of job does, through the engine: backup (then the policy's retention),
//! restore to a folder on the server host, and garbage collection.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use chrono::{DateTime, NaiveDate, Utc};
use vmvault_engine::{
    backup_image_vm, plan_prune, restore_vm, BackupOptions, RestoreOptions, Retention,
    VmDescription,
};
use vmvault_store::{Kind, ObjectInfo, ReadBackend, StoreError, Vault, WriteBackend};

use crate::app::App;
use crate::jobs::{JobProgress, Live, Params};
use crate::{catalog, Error, Result};

/// `2027-01-01` (end of that day, UTC) or a full RFC 3339 time.
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
    fn job_vault(&self, live: &Live) -> Result<Vault> {
        let mut regions = self.cfg.regions(false);
        let flag = &live.cancel;
        regions.primary = Cancellable::wrap(regions.primary, flag);
        regions.secondary = regions.secondary.map(|b| Cancellable::wrap(b, flag));
        let pass = self.passphrase.clone();
        Ok(Vault::open(regions, move || Ok(pass))?)
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
                self.run_backup(id, &item, &params, live, progress)
                    .map(Some)
            }
            "restore" => {
                self.run_restore(id, &params, live, progress)?;
                Ok(None)
            }
            "gc" => {
                let report = self.vault.gc(&mut |m| self.job_log(id, m))?;
                self.job_log(id, &format!("{report:?}"));
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
        let m = backup_image_vm(&vault, &desc, &BackupOptions::default(), progress)?;
        let point = m.id.to_hex();
        catalog::add(&self.db, &self.vault_name, &m)?;
        self.job_log(
            id,
            &format!(
                "recovery point {item}@{} made: {} read, {} stored",
                m.id.short(),
                m.stats.bytes_read,
                m.stats.bytes_stored
            ),
        );
        if let Some(k) = &params.keep_until {
            let until = parse_keep_until(k)?;
            catalog::set_keep_until(&self.db, &point, Some(&crate::db::ts(until)))?;
        }
        self.record_success(item, m.logical_bytes(), m.stats.bytes_stored);
        match self.apply_retention(item, &policy) {
            Ok(0) => {}
            Ok(n) => self.job_log(id, &format!("retention removed {n} older point(s)")),
            // The point is made: a prune that fails is retried after the next backup.
            Err(e) => self.job_log(id, &format!("retention could not be applied: {e}")),
        }
        Ok(point)
    }

    /// The policy's retention over the item's points; points held by keep-until, and
    /// soft-deleted ones (their own clock), are left alone. Returns how many it removed.
    pub fn apply_retention(&self, item: &str, policy: &str) -> Result<usize> {
        let p = crate::api::policies::load(&self.db, policy)?;
        let retention = p.retention();
        if retention.is_empty() {
            return Ok(0);
        }
        let tz = crate::schedule::parse_tz(&p.timezone)?;
        let points = catalog::manifests_of(&self.db, &self.vault_name, item)?;
        let mut plan = plan_prune(&points, &retention, Some(item), |t| {
            t.with_timezone(&tz).naive_local()
        })?;
        let holds = catalog::holds(&self.db, &self.vault_name)?;
        let now = crate::db::ts(self.now());
        let deleted: std::collections::HashSet<String> = crate::softdelete::markers(&self.vault)?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        for d in &mut plan {
            let id = d.id.to_hex();
            if holds.get(&id).is_some_and(|until| *until > now) || deleted.contains(&id) {
                d.keep = true;
            }
        }
        let removed = vmvault_engine::prune(&self.vault, &plan)?;
        for d in plan.iter().filter(|d| !d.keep) {
            catalog::remove(&self.db, &d.id.to_hex())?;
        }
        Ok(removed)
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
            ..Default::default()
        };
        let files = restore_vm(&vault, &m, &target, &opts, progress)?;
        for f in files {
            self.job_log(id, &format!("wrote {}", f.display()));
        }
        Ok(())
    }
}

/// The policy's keep-* counts as the engine's retention.
pub fn retention(p: &crate::api::policies::Policy) -> Retention {
    Retention {
        last: p.keep_last,
        hourly: p.keep_hourly,
        daily: p.keep_daily,
        weekly: p.keep_weekly,
        monthly: p.keep_monthly,
        yearly: p.keep_yearly,
    }
}

/// A region wrapper that fails every read and write once its job is cancelled: the engine's
/// backup and restore then stop at the next chunk with an error, and a backup never writes
/// its manifest, so a cancelled backup leaves no recovery point (its chunks go at gc).
pub struct Cancellable {
    pub inner: Arc<dyn WriteBackend>,
    pub cancelled: Arc<AtomicBool>,
}

impl Cancellable {
    fn wrap(inner: Arc<dyn WriteBackend>, cancelled: &Arc<AtomicBool>) -> Arc<dyn WriteBackend> {
        Arc::new(Cancellable {
            inner,
            cancelled: cancelled.clone(),
        })
    }

    fn check(&self) -> vmvault_store::Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(StoreError::Invalid("the job was cancelled".into()));
        }
        Ok(())
    }
}

impl ReadBackend for Cancellable {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read(&self, kind: Kind, name: &str) -> vmvault_store::Result<Vec<u8>> {
        self.check()?;
        self.inner.read(kind, name)
    }
    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> vmvault_store::Result<()> {
        self.check()?;
        self.inner.read_into(kind, name, buf)
    }
    fn stat(&self, kind: Kind, name: &str) -> vmvault_store::Result<Option<ObjectInfo>> {
        self.inner.stat(kind, name)
    }
    fn list(&self, kind: Kind) -> vmvault_store::Result<Vec<ObjectInfo>> {
        self.inner.list(kind)
    }
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
}

impl WriteBackend for Cancellable {
    fn create(&self) -> vmvault_store::Result<()> {
        self.inner.create()
    }
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> vmvault_store::Result<()> {
        // Lock objects pass: releasing the backup lock must work after a cancel.
        if kind != Kind::Lock {
            self.check()?;
        }
        self.inner.write(kind, name, data)
    }
    fn remove(&self, kind: Kind, name: &str) -> vmvault_store::Result<()> {
        self.inner.remove(kind, name)
    }
    fn touch(&self, kind: Kind, name: &str) -> vmvault_store::Result<Option<u64>> {
        self.check()?;
        self.inner.touch(kind, name)
    }
    fn remove_unless_touched(
        &self,
        kind: Kind,
        name: &str,
        cutoff: SystemTime,
    ) -> vmvault_store::Result<bool> {
        self.check()?;
        self.inner.remove_unless_touched(kind, name, cutoff)
    }
    fn sync(&self) -> vmvault_store::Result<()> {
        self.inner.sync()
    }
    fn remove_temporaries(&self, older_than: SystemTime) -> vmvault_store::Result<u64> {
        self.inner.remove_temporaries(older_than)
    }
    fn atomic_touch(&self) -> bool {
        self.inner.atomic_touch()
    }
}
