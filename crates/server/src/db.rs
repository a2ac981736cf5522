//! The server's own state in SQLite: numbered migrations, applied in order at open, each in
//! one transaction, the schema's number kept in `PRAGMA user_version`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use crate::Result;

/// Migration N+1 is `MIGRATIONS[N]`. Never edit one that shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: users, tokens, roles, policies, protected items, jobs, catalog, audit.
    "CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created TEXT NOT NULL
    );
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        prefix TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE TABLE roles (
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        vault TEXT NOT NULL,
        role TEXT NOT NULL,
        PRIMARY KEY (user_id, vault)
    );
    CREATE TABLE vaults (
        name TEXT PRIMARY KEY,
        location TEXT NOT NULL,
        soft_delete_days INTEGER NOT NULL,
        locked_at TEXT,
        require_approval INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE policies (
        name TEXT PRIMARY KEY,
        vault TEXT NOT NULL,
        schedule TEXT NOT NULL,
        timezone TEXT NOT NULL,
        keep_last INTEGER NOT NULL DEFAULT 0,
        keep_hourly INTEGER NOT NULL DEFAULT 0,
        keep_daily INTEGER NOT NULL DEFAULT 0,
        keep_weekly INTEGER NOT NULL DEFAULT 0,
        keep_monthly INTEGER NOT NULL DEFAULT 0,
        keep_yearly INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL
    );
    CREATE TABLE protected_items (
        name TEXT PRIMARY KEY,
        vault TEXT NOT NULL,
        policy TEXT NOT NULL REFERENCES policies(name),
        description TEXT NOT NULL,
        next_run TEXT,
        created TEXT NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        vault TEXT NOT NULL,
        item TEXT,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        not_before TEXT NOT NULL,
        created TEXT NOT NULL,
        started TEXT,
        ended TEXT,
        error TEXT,
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0,
        point TEXT,
        params TEXT NOT NULL DEFAULT '{}',
        requested_by TEXT NOT NULL
    );
    CREATE INDEX jobs_state ON jobs (state, id);
    CREATE INDEX jobs_item ON jobs (item, state);
    CREATE TABLE job_log (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        time TEXT NOT NULL,
        line TEXT NOT NULL
    );
    CREATE INDEX job_log_job ON job_log (job_id);
    CREATE TABLE points (
        id TEXT PRIMARY KEY,
        vault TEXT NOT NULL,
        vm TEXT NOT NULL,
        time TEXT NOT NULL,
        bytes_logical INTEGER NOT NULL,
        bytes_stored INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        deleted_at TEXT,
        keep_until TEXT
    );
    CREATE INDEX points_vm_time ON points (vault, vm, time, id);
    CREATE INDEX points_time ON points (vault, time, id);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        user TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL
    );",
    // 2: multi-user authorization: destructive requests waiting for a second admin.
    "CREATE TABLE approvals (
        id INTEGER PRIMARY KEY,
        vault TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        params TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        state TEXT NOT NULL,
        decided_by TEXT,
        decided_at TEXT
    );
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // 3: who holds a token (its minter; NULL: the user it is for) and whose rights a request
    // for approval was made with, so that approvals compare people, not token names.
    "ALTER TABLE tokens ADD COLUMN principal_id INTEGER REFERENCES users(id) ON DELETE CASCADE;
    ALTER TABLE approvals ADD COLUMN requested_as TEXT;",
    // 4: the class of the error that ended a failed job (crates/class's API code), so that a
    // client waiting for it exits as the same failure would locally.
    "ALTER TABLE jobs ADD COLUMN error_code TEXT;",
    // 5: hypervisor hosts and their agents (docs/design.md, "Host agents"): a host's key is
    // the SHA-256 of its certificate's public key; an enrollment code is kept only as its
    // verifier. The VMs each agent last reported, items and jobs that belong to a host.
    "CREATE TABLE hosts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        key TEXT UNIQUE,
        public_key TEXT,
        code_id TEXT UNIQUE,
        verifier TEXT,
        code_expires TEXT,
        code_failures INTEGER NOT NULL DEFAULT 0,
        agent_version TEXT,
        instance TEXT,
        last_heartbeat TEXT,
        silent_alerted INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL
    );
    CREATE TABLE revoked_keys (
        key TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        revoked TEXT NOT NULL
    );
    CREATE TABLE host_vms (
        host_id INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        info TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        PRIMARY KEY (host_id, name)
    );
    ALTER TABLE protected_items ADD COLUMN host TEXT;
    ALTER TABLE protected_items ADD COLUMN scripts TEXT;
    ALTER TABLE jobs ADD COLUMN host TEXT;
    CREATE INDEX jobs_host ON jobs (host, state, id);",
    // 6: agent releases (the binaries and their signatures are files in STATE/releases) and
    // each host's upgrade: the version wanted, automatic upgrades, versions rolled back there.
    "CREATE TABLE releases (
        version TEXT NOT NULL,
        target TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        added TEXT NOT NULL,
        PRIMARY KEY (version, target)
    );
    ALTER TABLE hosts ADD COLUMN wanted_version TEXT;
    ALTER TABLE hosts ADD COLUMN auto_upgrade INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hosts ADD COLUMN target TEXT;
    CREATE TABLE host_bad_versions (
        host_id INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        version TEXT NOT NULL,
        reason TEXT NOT NULL,
        time TEXT NOT NULL,
        PRIMARY KEY (host_id, version)
    );",
];

/// The database behind one lock: every statement is short, and the catalog's reads are
/// indexed, so one connection serves the API and the job runner.
pub struct Db(Mutex<Connection>);

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn in_memory() -> Result<Db> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Db> {
        // WAL: a crash (even SIGKILL) never leaves the database half-written, and readers do
        // not block the writer.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Db(Mutex::new(conn)))
    }

    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (statements are
        // atomic), so the connection stays usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let have: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// The current schema number, for `GET /api/v1/vaults` diagnostics and tests.
pub fn schema_version() -> usize {
    MIGRATIONS.len()
}

/// Now as stored: RFC 3339 in UTC to the millisecond, which sorts as text.
pub fn ts(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn parse_ts(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_apply_once_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(super::Db::open(&path).unwrap());
        let db = super::Db::open(&path).unwrap();
        let v: i64 = db
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, super::schema_version());
    }
}
