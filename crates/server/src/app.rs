//! The server's shared state and its start: the state dir, the database, the vault, the
//! first admin token, the catalog, and the scheduler pass.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use vmvault_open::storage_lock;
use vmvault_store::{CreateOptions, Vault};

use crate::config::ServerConfig;
use crate::db::{parse_ts, ts, Db};
use crate::jobs::{Params, Runner};
use crate::schedule::{Clock, Schedule};
use crate::{auth, catalog, Error, Result};

/// Per VM: when its last backup succeeded and what it moved (for metrics and alerts).
#[derive(Default, Clone)]
pub struct VmStats {
    pub last_success: Option<DateTime<Utc>>,
    pub bytes_logical: u64,
    pub bytes_stored: u64,
}

pub struct App {
    pub cfg: ServerConfig,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    /// The vault, opened once for the API and maintenance; jobs open their own view.
    pub vault: Vault,
    pub vault_name: String,
    pub(crate) passphrase: Vec<u8>,
    pub runner: Runner,
    pub stats: Mutex<HashMap<String, VmStats>>,
    pub(crate) overdue: crate::alerts::Overdue,
    /// When the catalog was last made to match the vault.
    /// When the catalog was last checked against the vault's names, and last rebuilt.
    rebuilt: Mutex<(std::time::Instant, std::time::Instant)>,
    /// The digest of the vault's point names the catalog was last rebuilt for.
    rebuilt_names: Mutex<Option<[u8; 32]>>,
    /// Where the first admin token was written, on the start that made it.
    pub admin_token_file: std::path::PathBuf,
    /// HTTP connections open now (see `tls::serve`).
    pub(crate) http_conns: AtomicUsize,
    /// Called as each job starts, with its kind and VM: fault injection for tests.
    job_hook: Mutex<Option<JobHook>>,
    /// `STATE/server.pid`, locked for as long as this server runs (see [`lock_state`]).
    _state_lock: std::fs::File,
    /// What the storage does to keep objects (S3 Object Lock), asked once and after a lock:
    /// a request to the storage per `GET /vaults` would be too many.
    storage_lock: Mutex<Option<String>>,
    /// The TLS certificate's fingerprint, which enrollment proofs cover (none over plain HTTP).
    pub(crate) fingerprint: Mutex<Option<String>>,
    /// The agent jobs running now (crates/server/src/relay.rs).
    pub(crate) relays: crate::relay::Relays,
    pub(crate) restore_relays: crate::relay_restore::RestoreRelays,
    pub(crate) own_host_stop: Mutex<Option<Arc<std::sync::atomic::AtomicBool>>>,
    /// Wakes the agents' waiting polls when a job is queued.
    pub(crate) agent_wake: tokio::sync::Notify,
    /// Refused agent keys, by when each was last audited.
    pub(crate) refused_keys: Mutex<HashMap<String, std::time::Instant>>,
    /// Per host, the agent instances seen lately (a copied key shows as two).
    pub(crate) instance_flips: Mutex<HashMap<i64, Vec<(std::time::Instant, String)>>>,
}

impl App {
    /// The storage's own lock in words (see `vmvault_open::StorageLock`); `refresh` asks the
    /// storage again.
    pub fn storage_lock(&self, refresh: bool) -> String {
        let mut cached = self.storage_lock.lock().unwrap_or_else(|e| e.into_inner());
        if refresh || cached.is_none() {
            let said = match self.cfg.primary_location() {
                Ok(l) => {
                    storage_lock::words(&l, false, storage_lock::held_days(&self.vault, "primary"))
                }
                Err(e) => format!("unknown: {e}"),
            };
            *cached = Some(said);
        }
        cached.clone().unwrap_or_default()
    }
}

/// How often the scheduler lists the vault's point names to see whether another process
/// changed them (one listing: cheap even on object storage).
const CATALOG_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// See [`App::set_job_hook`].
pub type JobHook = Arc<dyn Fn(&str, Option<&str>) + Send + Sync>;

/// One server per state directory: two would both schedule every policy (double backups,
/// double retention) and race on the catalog. The lock is an exclusive `flock` on
/// `STATE/server.pid`, which the kernel releases when the process ends however it ends, so a
/// killed server never blocks the next; the file holds the holder's PID for the message.
fn lock_state(dir: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("server.pid");
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io("opening", e))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            let holder = if pid.is_empty() {
                "another vmvault server".to_string()
            } else {
                format!("another vmvault server (pid {pid})")
            };
            return Err(Error::Config(format!(
                "{holder} is running on the state directory {}: one server per state \
                 directory; stop it first, or give this one its own --state-dir",
                dir.display()
            )));
        }
        Err(e) => return Err(io("locking", e.into())),
    }
    f.set_len(0).map_err(|e| io("writing", e))?;
    f.rewind().map_err(|e| io("writing", e))?;
    writeln!(f, "{}", std::process::id()).map_err(|e| io("writing", e))?;
    Ok(f)
}

fn create_dir_private(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

impl App {
    /// Opens (or on first start, makes) everything the server needs; `say` gets what the
    /// operator should read in the log.
    pub fn open(cfg: ServerConfig, clock: Arc<dyn Clock>, say: &dyn Fn(&str)) -> Result<Arc<App>> {
        cfg.check()?;
        create_dir_private(&cfg.state_dir)?;
        let state_lock = lock_state(&cfg.state_dir)?;
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        let (vault, passphrase) = open_vault(&cfg, say)?;
        let vault_name = cfg.vault_name.clone();
        // What vmvault server 0.1 kept as plain JSON becomes sealed vault rules and markers.
        let migrated = vault.migrate_legacy_markers()?;
        if migrated > 0 {
            say(&format!(
                "sealed {migrated} lock or soft-delete marker(s) written by an older server"
            ));
        }
        // The vault's rules are the truth; the database's copy is only for old readers.
        let rules = vault.rules()?;
        let locked = rules.locked.as_ref().map(|l| l.at.clone());
        db.conn().execute(
            "INSERT INTO vaults (name, location, soft_delete_days, locked_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET location = ?2,
             locked_at = coalesce(vaults.locked_at, ?4)",
            params![vault_name, vault.location(), rules.soft_delete_days, locked],
        )?;
        let admin_token_file = cfg.state_dir.join("admin-token");
        if auth::bootstrap_admin(&db, &admin_token_file)?.is_some() {
            say(&format!(
                "first start: the admin's API token is in {} (readable by this user only)",
                admin_token_file.display()
            ));
        }
        let app = Arc::new(App {
            cfg,
            db,
            clock,
            vault,
            vault_name,
            passphrase,
            runner: Runner::default(),
            stats: Mutex::new(HashMap::new()),
            overdue: Default::default(),
            rebuilt: Mutex::new((std::time::Instant::now(), std::time::Instant::now())),
            rebuilt_names: Mutex::new(None),
            admin_token_file,
            http_conns: AtomicUsize::new(0),
            job_hook: Mutex::new(None),
            _state_lock: state_lock,
            storage_lock: Mutex::new(None),
            fingerprint: Mutex::new(None),
            relays: Mutex::new(HashMap::new()),
            restore_relays: Mutex::new(HashMap::new()),
            own_host_stop: Mutex::new(None),
            agent_wake: tokio::sync::Notify::new(),
            refused_keys: Mutex::new(HashMap::new()),
            instance_flips: Mutex::new(HashMap::new()),
        });
        // Said at every start: after an upgrade, backups of VMs protected before the
        // allow-lists existed fail until their folders are named.
        if app.cfg.disk_roots.is_empty() {
            say(
                "no disk_roots configured: no VM can be protected or backed up until an admin \
                 names the folders (or device patterns) its disks are in (disk_roots in the \
                 config file, --disk-root)",
            );
        }
        if app.cfg.restore_roots.is_empty() {
            say(
                "no restore_roots configured: the server restores nowhere until an admin names \
                 the folders restores may write into (restore_roots, --restore-root)",
            );
        }
        let n = app.recover_jobs()?;
        if n > 0 {
            say(&format!(
                "{n} job(s) were running when the server stopped: backups with attempts left \
                 queued again, the others marked failed"
            ));
        }
        let n = crate::api::approvals::recover(&app)?;
        if n > 0 {
            say(&format!(
                "{n} approved request(s) were being carried out when the server stopped: marked failed"
            ));
        }
        let points = catalog::rebuild(&app.db, &app.vault_name, &app.vault)?;
        say(&format!(
            "catalog: {points} recovery point(s) in {}",
            app.vault.location()
        ));
        app.load_stats()?;
        Ok(app)
    }

    pub fn fingerprint(&self) -> Option<String> {
        self.fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The release key's public half (hex): the server's own key in the state dir, made on
    /// first use.
    pub fn release_public_key(&self) -> Result<String> {
        if let Some(offline) = &self.cfg.release_public_key {
            return Ok(offline.clone());
        }
        let path = self.cfg.state_dir.join("release.key");
        let key = vmvault_release::ReleaseKey::load_or_create(&path)
            .map_err(|e| Error::Config(format!("the release key {}: {e}", path.display())))?;
        Ok(key.public_hex())
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// HTTP connections open now: what the `max_connections` cap bounds.
    pub fn http_connections(&self) -> usize {
        self.http_conns.load(Ordering::Relaxed)
    }

    /// Sets (or with `None` clears) a function every job calls as it starts, on its own
    /// thread: tests make jobs fail or panic through it, as the fault-injecting backend
    /// makes storage fail.
    pub fn set_job_hook(&self, hook: Option<JobHook>) {
        *self.job_hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    pub(crate) fn job_hook(&self) -> Option<JobHook> {
        self.job_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts the job dispatcher and the scheduler on their own threads.
    pub fn start_background(self: &Arc<App>) -> Result<()> {
        let a = self.clone();
        std::thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || a.dispatch_loop())
            .map_err(|e| Error::io("starting the dispatcher", e))?;
        let a = self.clone();
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || {
                while !a.runner.stopping.load(Ordering::Relaxed) {
                    if let Err(e) = a.tick() {
                        eprintln!("vmvault server: scheduler: {e}");
                    }
                    std::thread::sleep(std::time::Duration::from_secs(a.cfg.tick_secs.max(1)));
                }
            })
            .map_err(|e| Error::io("starting the scheduler", e))?;
        Ok(())
    }

    pub fn stop(&self) {
        if let Some(s) = self
            .own_host_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.store(true, Ordering::Relaxed);
        }
        self.runner.stopping.store(true, Ordering::Relaxed);
        self.runner.wake();
    }

    /// One scheduler pass: due backups are queued (a run missed while the server was down,
    /// however many, runs once), GC when due, soft-deleted points past their time removed,
    /// overdue VMs alerted. Returns the backup jobs it queued.
    pub fn tick(&self) -> Result<Vec<i64>> {
        let now = self.now();
        let items: Vec<(String, String, String, Option<String>)> = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare(
                "SELECT i.name, p.schedule, p.timezone, i.next_run FROM protected_items i
                 JOIN policies p ON p.name = i.policy ORDER BY i.name",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        let mut queued = Vec::new();
        for (item, schedule, tz, next) in items {
            let sched = Schedule::parse(&schedule, &tz)?;
            let next = next.as_deref().and_then(parse_ts);
            match next {
                Some(at) if at <= now => {
                    let missed = count_missed(&sched, at, now);
                    let pending: bool = self.db.conn().query_row(
                        "SELECT count(*) > 0 FROM jobs WHERE item = ?1 AND kind = 'backup'
                         AND state IN ('queued', 'running')",
                        [&item],
                        |r| r.get(0),
                    )?;
                    if pending {
                        self.alert(
                            "missed_schedule",
                            &item,
                            &format!("the backup due at {} found the previous one still queued or running", ts(at)),
                        );
                    } else {
                        let id =
                            self.enqueue("backup", Some(&item), &Params::default(), "scheduler")?;
                        if missed > 1 {
                            self.job_log(id, &format!("{missed} scheduled runs were missed while the server was down (the first at {}): this one run stands for them", ts(at)));
                            self.alert(
                                "missed_schedule",
                                &item,
                                &format!("{missed} scheduled backups were missed; one runs now"),
                            );
                        }
                        queued.push(id);
                    }
                    self.set_next_run(&item, sched.next_after(now))?;
                }
                Some(_) => {}
                None => self.set_next_run(&item, sched.next_after(now))?,
            }
            self.check_overdue(&item, &sched, now);
        }
        self.tick_gc(now)?;
        self.check_hosts(now)?;
        self.refresh_catalog()?;
        Ok(queued)
    }

    /// The catalog is made to match the vault again when a listing of the vault's point names
    /// (every [`CATALOG_CHECK`]) shows another process changed them (the local CLI's backup,
    /// delete or prune on the same vault), and every ten minutes in any case.
    fn refresh_catalog(&self) -> Result<()> {
        let (check, rebuild) = {
            let mut last = self.rebuilt.lock().unwrap_or_else(|e| e.into_inner());
            let (checked, rebuilt) = &mut *last;
            let rebuild = rebuilt.elapsed() >= std::time::Duration::from_secs(600);
            let check = rebuild || checked.elapsed() >= CATALOG_CHECK;
            if check {
                *checked = std::time::Instant::now();
            }
            if rebuild {
                *rebuilt = std::time::Instant::now();
            }
            (check, rebuild)
        };
        if rebuild {
            catalog::rebuild(&self.db, &self.vault_name, &self.vault)?;
        } else if check {
            let (same, names) = catalog::matches_vault(&self.db, &self.vault_name, &self.vault)?;
            // A difference a rebuild cannot mend (a manifest that cannot be read stays out of
            // the catalog) must not read every manifest again every few seconds: only a new
            // set of names rebuilds.
            let mut last = self.rebuilt_names.lock().unwrap_or_else(|e| e.into_inner());
            if !same && *last != Some(names) {
                catalog::rebuild(&self.db, &self.vault_name, &self.vault)?;
                *last = Some(names);
            }
        }
        Ok(())
    }

    fn set_next_run(&self, item: &str, at: DateTime<Utc>) -> Result<()> {
        self.db.conn().execute(
            "UPDATE protected_items SET next_run = ?2 WHERE name = ?1",
            params![item, ts(at)],
        )?;
        Ok(())
    }

    fn tick_gc(&self, now: DateTime<Utc>) -> Result<()> {
        let sched = Schedule::parse(&self.cfg.gc_schedule, &self.cfg.timezone)?;
        let key = format!("gc_next:{}", self.vault_name);
        let next: Option<String> = self
            .db
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [&key], |r| {
                r.get(0)
            })
            .optional()?;
        let due = match next.as_deref().and_then(parse_ts) {
            Some(at) => at <= now,
            None => false,
        };
        if due {
            self.enqueue("gc", None, &Params::default(), "scheduler")?;
        }
        if due || next.is_none() {
            self.db.conn().execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = ?2",
                params![key, ts(sched.next_after(now))],
            )?;
        }
        Ok(())
    }

    /// How long deleted points stay restorable, from the vault's own rules.
    pub fn soft_delete_days(&self) -> Result<u32> {
        Ok(self.vault.rules()?.soft_delete_days)
    }

    /// When the vault was locked, from its own rules.
    pub fn locked_at(&self) -> Result<Option<String>> {
        Ok(self.vault.rules()?.locked.map(|l| l.at))
    }

    pub(crate) fn record_success(&self, vm: &str, logical: u64, stored: u64) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let e = s.entry(vm.to_string()).or_default();
        e.last_success = Some(self.now());
        e.bytes_logical += logical;
        e.bytes_stored += stored;
    }

    /// Last successful backups from the job history, so metrics survive a restart.
    fn load_stats(&self) -> Result<()> {
        let rows: Vec<(String, String)> = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare(
                "SELECT item, max(ended) FROM jobs WHERE kind = 'backup' AND state = 'succeeded'
                 GROUP BY item",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        for (vm, ended) in rows {
            s.entry(vm).or_default().last_success = parse_ts(&ended);
        }
        Ok(())
    }
}

/// How many runs of `sched` fell in `[first, now]` (bounded: it is only for the message).
fn count_missed(sched: &Schedule, first: DateTime<Utc>, now: DateTime<Utc>) -> u32 {
    let mut n = 1;
    let mut t = first;
    while n < 10_000 {
        t = sched.next_after(t);
        if t > now {
            break;
        }
        n += 1;
    }
    n
}

/// Opens the configured vault, making it (and, without a configured passphrase, a random
/// passphrase kept in the state dir) on first start. The vault may be anywhere
/// crates/open reaches (a directory, S3, Azure Blob); its secondary is the one its regions
/// record names, or the configured one, which a vault without a record then records.
fn open_vault(cfg: &ServerConfig, say: &dyn Fn(&str)) -> Result<(Vault, Vec<u8>)> {
    let primary = cfg.primary_location()?;
    let configured_secondary = cfg.secondary_location()?;
    let generated = cfg.state_dir.join("vault-passphrase");
    // The file first, then the environment: the rule crates/open gives the CLI too.
    let configured = match (&cfg.passphrase_file, &cfg.passphrase) {
        (Some(f), _) => vmvault_open::passphrase(Some(f))?,
        (None, Some(p)) => Some(p.as_bytes().to_vec()),
        (None, None) if generated.exists() => vmvault_open::passphrase(Some(&generated))?,
        (None, None) => None,
    };
    let backend = primary.backend(false)?;
    // Only "no vault there" makes one: storage that cannot be read now (a region down, bad
    // credentials) stops the start with its own error instead of a confusing create.
    let exists = match Vault::read_config(&*backend) {
        Ok(_) => true,
        Err(vmvault_store::StoreError::NotAVault { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    if let Some(local) = primary.local_path().filter(|_| !exists) {
        std::fs::create_dir_all(&local)
            .map_err(|e| Error::io(format!("creating {}", local.display()), e))?;
    }
    if let Some(local) = configured_secondary.as_ref().and_then(|s| s.local_path()) {
        std::fs::create_dir_all(&local)
            .map_err(|e| Error::io(format!("creating {}", local.display()), e))?;
    }
    if exists {
        let pass = configured.clone().unwrap_or_default();
        let spec = cfg.spec(true)?;
        let (vault, record) = vmvault_open::open_recorded(&spec, move || {
            configured.ok_or_else(|| {
                "the vault is encrypted: give its passphrase (passphrase_file, VMVAULT_PASSWORD)"
                    .to_string()
            })
        })?;
        let vault = adopt_secondary(&spec, vault, &record, configured_secondary, say)?;
        return Ok((vault, pass));
    }
    let pass = match configured {
        Some(p) => p,
        None => {
            let mut b = [0u8; 24];
            vmvault_format::random_bytes(&mut b);
            let p = hex::encode(b);
            auth::write_secret(&generated, &format!("{p}\n"))?;
            say(&format!(
                "made a passphrase for the new vault: {} (keep a copy elsewhere: without it the vault cannot be read)",
                generated.display()
            ));
            p.into_bytes()
        }
    };
    let described = primary.describe();
    vmvault_open::create(
        primary,
        configured_secondary,
        CreateOptions {
            passphrase: Some(pass.clone()),
            soft_delete_days: cfg.soft_delete_days,
            ..Default::default()
        },
        &cfg.state_dir,
        cfg.spec(true)?.notify,
    )?;
    say(&format!("created the vault {described}"));
    // Reopened as every later start opens it: with the replication queue.
    let again = pass.clone();
    let vault = vmvault_open::open(&cfg.spec(true)?, move || Ok(again))?;
    Ok((vault, pass))
}

/// Reconciles the configured secondary with the vault's regions record, as the open read it
/// (sealed, so only a holder of the vault's key can have written it): a vault without a
/// recorded secondary records the configured one, sealed (so the CLI replicates there too),
/// and is given it; one that records another refuses to start rather than replicate to two
/// places.
fn adopt_secondary(
    spec: &vmvault_open::Spec,
    vault: Vault,
    recorded: &vmvault_open::Record,
    configured: Option<vmvault_open::Location>,
    say: &dyn Fn(&str),
) -> Result<Vault> {
    match (configured, &recorded.secondary) {
        (None, _) => Ok(vault),
        (Some(c), Some(r)) if c.location == r.location => Ok(vault),
        (Some(c), Some(r)) => Err(Error::Config(format!(
            "secondary: the vault records its secondary region as {}, not {}; remove \
             `secondary` from the configuration or name that one",
            r.describe(),
            c.describe()
        ))),
        (Some(c), None) => {
            let described = c.describe();
            let vault = vmvault_open::add_secondary(spec, vault, c)?;
            say(&format!("the vault now replicates to {described}"));
            Ok(vault)
        }
    }
}

/// A protected item's existence, for handlers.
pub fn item_exists(db: &Db, name: &str) -> Result<bool> {
    Ok(db
        .conn()
        .query_row(
            "SELECT 1 FROM protected_items WHERE name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}
