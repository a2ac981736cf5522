//! The job runner: jobs are rows in the database (the queue survives a restart); a
//! dispatcher starts queued ones on threads, at most `max_jobs` at once and one per VM, and
//! records how each ended. A failed backup is queued again with a doubling delay until its
//! attempts are used up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
pub use vmvault_api::{CancelState, Job, JobDetail, JobState, LogLine};
use vmvault_engine::Progress;

use crate::app::App;
use crate::db::ts;
use crate::{Error, Result};

/// A running job's progress and its cancel switch, kept in memory while it runs.
pub struct Live {
    pub cancel: Arc<AtomicBool>,
    pub(crate) done: AtomicU64,
    pub(crate) total: AtomicU64,
    started: Instant,
}

#[derive(Default)]
pub struct Runner {
    live: Mutex<HashMap<i64, Arc<Live>>>,
    wake: (Mutex<bool>, Condvar),
    pub stopping: AtomicBool,
}

/// What a job is asked to do beyond its kind and item.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Params {
    /// Backup: asked for by someone, not by a schedule; its point keeps its own retention
    /// and never counts toward the policy's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand: bool,
    /// Backup: keep the new point at least until this date (RFC 3339 or YYYY-MM-DD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_until: Option<String>,
    /// Restore: the point and the folder on the server host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
    /// Restore: one disk only, into the target as an image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Restore: the image format to write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

const JOB_COLUMNS: &str = "id, kind, item, state, attempt, created, started, ended, error, \
                           bytes_done, bytes_total, point, requested_by, error_code";

fn job_row(r: &rusqlite::Row) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        kind: r.get(1)?,
        item: r.get(2)?,
        state: JobState::from(r.get::<_, String>(3)?),
        attempt: r.get(4)?,
        created: r.get(5)?,
        started: r.get(6)?,
        ended: r.get(7)?,
        error: r.get(8)?,
        bytes_done: r.get::<_, i64>(9)? as u64,
        bytes_total: r.get::<_, i64>(10)? as u64,
        rate: None,
        eta_secs: None,
        point: r.get(11)?,
        requested_by: r.get(12)?,
        error_code: r.get(13)?,
    })
}

impl Runner {
    pub fn wake(&self) {
        let (m, c) = &self.wake;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        c.notify_all();
    }

    fn wait(&self, max: Duration) {
        let (m, c) = &self.wake;
        let guard = m.lock().unwrap_or_else(|e| e.into_inner());
        let (mut woken, _) = c
            .wait_timeout_while(guard, max, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }

    fn live(&self, id: i64) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// A job's live figures, from its start until [`Runner::unregister`].
    pub(crate) fn register(&self, id: i64) -> Arc<Live> {
        let live = Arc::new(Live {
            cancel: Arc::new(AtomicBool::new(false)),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, live.clone());
        live
    }

    pub(crate) fn unregister(&self, id: i64) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    pub fn running_count(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl App {
    /// Queues a job; returns its id.
    /// A backup of a host's VM is that host's job: its agent takes it.
    pub fn enqueue(&self, kind: &str, item: Option<&str>, p: &Params, by: &str) -> Result<i64> {
        self.enqueue_on(kind, item, p, by, None)
    }

    /// [`App::enqueue`], for the agent of `on` when given.
    pub fn enqueue_on(
        &self,
        kind: &str,
        item: Option<&str>,
        p: &Params,
        by: &str,
        on: Option<&str>,
    ) -> Result<i64> {
        let now = ts(self.now());
        let params_json = serde_json::to_string(p).map_err(|e| Error::Input(e.to_string()))?;
        let conn = self.db.conn();
        let host: Option<String> = match (kind, item, on) {
            (_, _, Some(on)) => Some(on.to_string()),
            ("backup", Some(item), None) => conn
                .query_row(
                    "SELECT host FROM protected_items WHERE name = ?1",
                    [item],
                    |r| r.get(0),
                )
                .optional()?
                .flatten(),
            _ => None,
        };
        conn.execute(
            "INSERT INTO jobs (kind, vault, item, state, not_before, created, params, requested_by,
             host) VALUES (?1, ?2, ?3, 'queued', ?4, ?4, ?5, ?6, ?7)",
            params![kind, self.vault_name, item, now, params_json, by, host],
        )?;
        let id = conn.last_insert_rowid();
        drop(conn);
        self.runner.wake();
        if host.is_some() {
            self.agent_wake.notify_waiters();
        }
        Ok(id)
    }

    pub fn job_log(&self, id: i64, line: &str) {
        let r = self.db.conn().execute(
            "INSERT INTO job_log (job_id, time, line) VALUES (?1, ?2, ?3)",
            params![id, ts(self.now()), line],
        );
        if let Err(e) = r {
            eprintln!("vmvault server: job {id}: could not log '{line}': {e}");
        }
    }

    /// Jobs, newest first, `limit` after the id `before`, of one state when asked.
    pub fn jobs(
        &self,
        state: Option<&JobState>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<Job>> {
        if let Some(s) = state.filter(|s| !s.is_known()) {
            return Err(Error::Input(format!(
                "'{s}' is not a job state ({})",
                JobState::known_list()
            )));
        }
        let rows = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR state = ?1) AND id < ?2
                 ORDER BY id DESC LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(
                    params![
                        state.map(JobState::as_str),
                        before.unwrap_or(i64::MAX),
                        limit
                    ],
                    job_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        Ok(rows.into_iter().map(|j| self.with_progress(j)).collect())
    }

    pub fn job(&self, id: i64) -> Result<JobDetail> {
        let job = self
            .db
            .conn()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                job_row,
            )
            .optional()?
            .ok_or_else(|| Error::NotFound(format!("no job {id}")))?;
        let log = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare_cached(
                "SELECT time, line FROM job_log WHERE job_id = ?1 ORDER BY rowid",
            )?;
            let rows = stmt
                .query_map([id], |r| {
                    Ok(LogLine {
                        time: r.get(0)?,
                        line: r.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        Ok(JobDetail {
            job: self.with_progress(job),
            log,
        })
    }

    /// Fills a running job's figures from memory, an ended one's rate from its times.
    fn with_progress(&self, mut j: Job) -> Job {
        if let Some(live) = self.runner.live(j.id) {
            j.bytes_done = live.done.load(Ordering::Relaxed);
            j.bytes_total = live.total.load(Ordering::Relaxed);
            let secs = live.started.elapsed().as_secs_f64();
            if secs > 0.0 && j.bytes_done > 0 {
                let rate = j.bytes_done as f64 / secs;
                j.rate = Some(rate);
                j.eta_secs = Some(j.bytes_total.saturating_sub(j.bytes_done) as f64 / rate);
            }
        } else if let (Some(s), Some(e)) = (&j.started, &j.ended) {
            if let (Some(s), Some(e)) = (crate::db::parse_ts(s), crate::db::parse_ts(e)) {
                let secs = (e - s).num_milliseconds() as f64 / 1000.0;
                if secs > 0.0 {
                    j.rate = Some(j.bytes_done as f64 / secs);
                }
            }
        }
        j
    }

    /// Cancels a queued job at once, a running one at its next chunk.
    pub fn cancel_job(&self, id: i64) -> Result<CancelState> {
        let state: String = self
            .db
            .conn()
            .query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| Error::NotFound(format!("no job {id}")))?;
        match JobState::from(state) {
            JobState::Queued => {
                self.db.conn().execute(
                    "UPDATE jobs SET state = 'cancelled', ended = ?2 WHERE id = ?1 AND state = 'queued'",
                    params![id, ts(self.now())],
                )?;
                self.job_log(id, "cancelled before it started");
                Ok(CancelState::Cancelled)
            }
            JobState::Running => match self.runner.live(id) {
                Some(live) => {
                    live.cancel.store(true, Ordering::Relaxed);
                    self.job_log(id, "cancel requested");
                    Ok(CancelState::Cancelling)
                }
                None => Ok(CancelState::Running),
            },
            state => Err(Error::Conflict(format!(
                "job {id} has already ended ({state})"
            ))),
        }
    }

    /// On start: a job the database says is running was cut off by a stop of the server
    /// (a kill, a crash). A backup with attempts left is queued again, as a failed one is
    /// (a host's agent, told its lease is gone, rolls its instant back and takes the retry);
    /// anything else ends failed, with the reason. The vault is fine either way: a point
    /// exists only once its manifest is written.
    pub fn recover_jobs(&self) -> Result<usize> {
        let now = ts(self.now());
        let ids: Vec<(i64, String, u32)> = {
            let conn = self.db.conn();
            let mut stmt =
                conn.prepare("SELECT id, kind, attempt FROM jobs WHERE state = 'running'")?;
            let ids = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            ids
        };
        for &(id, ref kind, attempt) in &ids {
            if kind == "backup" && attempt + 1 < self.cfg.backup_attempts {
                self.db.conn().execute(
                    "UPDATE jobs SET state = 'queued', attempt = ?2, not_before = ?3,
                     error = 'the server stopped while the job ran' WHERE id = ?1",
                    params![id, attempt + 1, now],
                )?;
                self.job_log(
                    id,
                    &format!(
                        "the server stopped while this job ran: queued again (attempt {})",
                        attempt + 2
                    ),
                );
                continue;
            }
            self.db.conn().execute(
                "UPDATE jobs SET state = 'failed', ended = ?2,
                 error = 'the server stopped while the job ran; no recovery point was made by it'
                 WHERE id = ?1",
                params![id, now],
            )?;
            self.job_log(
                id,
                "the server stopped while this job ran: marked failed at restart",
            );
        }
        Ok(ids.len())
    }

    /// The dispatcher: runs until the server stops.
    pub fn dispatch_loop(self: &Arc<App>) {
        while !self.runner.stopping.load(Ordering::Relaxed) {
            if let Err(e) = self.dispatch_once() {
                eprintln!("vmvault server: job dispatch: {e}");
            }
            self.runner.wait(Duration::from_millis(500));
        }
    }

    /// Starts what may start now.
    pub fn dispatch_once(self: &Arc<App>) -> Result<()> {
        let now = ts(self.now());
        let queued: Vec<(i64, String, Option<String>)> = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare_cached(
                "SELECT id, kind, item FROM jobs WHERE state = 'queued' AND not_before <= ?1
                 AND host IS NULL ORDER BY id",
            )?;
            let rows = stmt
                .query_map([&now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        for (id, kind, item) in queued {
            // An agent's job runs on its host: it takes none of this server's slots.
            let agents = self.relays.lock().unwrap_or_else(|e| e.into_inner()).len();
            if self.runner.running_count().saturating_sub(agents) >= self.cfg.max_jobs {
                break;
            }
            if let Some(item) = &item {
                let busy: bool = self.db.conn().query_row(
                    "SELECT count(*) > 0 FROM jobs WHERE item = ?1 AND state = 'running'",
                    [item],
                    |r| r.get(0),
                )?;
                if busy {
                    continue;
                }
            }
            let took = self.db.conn().execute(
                "UPDATE jobs SET state = 'running', started = ?2, ended = NULL, error = NULL
                 WHERE id = ?1 AND state = 'queued'",
                params![id, now],
            )?;
            if took == 0 {
                continue;
            }
            let live = self.runner.register(id);
            let app = self.clone();
            std::thread::Builder::new()
                .name(format!("job-{id}"))
                .spawn(move || app.run_job(id, &kind, live))
                .map_err(|e| Error::io("starting a job thread", e))?;
        }
        Ok(())
    }

    pub(crate) fn run_job(self: &Arc<App>, id: i64, kind: &str, live: Arc<Live>) {
        let progress = JobProgress {
            app: self,
            id,
            live: &live,
        };
        // A panic ends this job, not its thread's bookkeeping: without the catch the job
        // would stay `running` and its VM busy (no further backup of it) until a restart.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_job_kind(id, kind, &live, &progress)
        }))
        .unwrap_or_else(|p| Err(Error::Panicked(panic_message(p.as_ref()))));
        let cancelled = live.cancel.load(Ordering::Relaxed);
        let done = live.done.load(Ordering::Relaxed) as i64;
        let total = live.total.load(Ordering::Relaxed) as i64;
        let now = self.now();
        let r = match (&outcome, cancelled) {
            (_, true) => {
                self.job_log(id, "cancelled");
                self.db.conn().execute(
                    "UPDATE jobs SET state = 'cancelled', ended = ?2, bytes_done = ?3,
                     bytes_total = ?4 WHERE id = ?1",
                    params![id, ts(now), done, total],
                )
            }
            (Ok(point), false) => {
                self.job_log(id, "succeeded");
                self.db.conn().execute(
                    "UPDATE jobs SET state = 'succeeded', ended = ?2, bytes_done = ?3,
                     bytes_total = ?4, point = ?5 WHERE id = ?1",
                    params![id, ts(now), done, total, point],
                )
            }
            (Err(e), false) => self.job_failed(id, kind, e, done, total),
        };
        if let Err(e) = r {
            eprintln!("vmvault server: job {id}: recording its end: {e}");
        }
        self.runner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.runner.wake();
    }

    /// A failed backup with attempts left is queued again after a doubling delay; the error's
    /// class is kept with the job, so that a client waiting for it exits as locally.
    fn job_failed(
        &self,
        id: i64,
        kind: &str,
        failure: &Error,
        done: i64,
        total: i64,
    ) -> rusqlite::Result<usize> {
        // A bug fails the same way every time: no retry for a panic.
        let retry = !matches!(failure, Error::Panicked(_));
        let code = vmvault_class::Classify::class(failure).api_code();
        let error = &failure.to_string();
        let attempt: u32 =
            self.db
                .conn()
                .query_row("SELECT attempt FROM jobs WHERE id = ?1", [id], |r| r.get(0))?;
        let now = self.now();
        if retry && kind == "backup" && attempt + 1 < self.cfg.backup_attempts {
            let delay = self
                .cfg
                .retry_backoff_secs
                .saturating_mul(1 << attempt.min(16));
            self.job_log(
                id,
                &format!(
                    "attempt {} failed: {error}; retrying in {delay} s",
                    attempt + 1
                ),
            );
            let at = now + chrono::Duration::seconds(delay as i64);
            return self.db.conn().execute(
                "UPDATE jobs SET state = 'queued', attempt = ?2, not_before = ?3, error = ?4
                 WHERE id = ?1",
                params![id, attempt + 1, ts(at), error],
            );
        }
        self.job_log(id, &format!("failed: {error}"));
        self.alert_job_failed(id, kind, error);
        self.db.conn().execute(
            "UPDATE jobs SET state = 'failed', ended = ?2, error = ?3, bytes_done = ?4,
             bytes_total = ?5, error_code = ?6 WHERE id = ?1",
            params![id, ts(now), error, done, total, code],
        )
    }
}

/// What a panic said: its message when it gave one (`panic!("...")` makes a `&str` or a
/// `String`).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Feeds the engine's progress into the job's live figures and log.
pub struct JobProgress<'a> {
    app: &'a App,
    id: i64,
    live: &'a Live,
}

impl Progress for JobProgress<'_> {
    fn start(&self, what: &str, total: u64) {
        self.live.total.fetch_add(total, Ordering::Relaxed);
        self.app.job_log(self.id, what);
    }
    fn advance(&self, bytes: u64) {
        self.live.done.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finish(&self) {}
    fn message(&self, text: &str) {
        self.app.job_log(self.id, text);
    }
}
