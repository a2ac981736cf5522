//! Users, API tokens and roles per vault; the audit log.
//!
//! A token is `vmv_<prefix>_<secret>`: the prefix finds the row, the secret is checked
//! against its BLAKE3 hash (a random 256-bit secret needs no slow hash: it cannot be
//! guessed, only stolen, and the database holds no usable copy). The secret is shown once.

use rusqlite::{params, OptionalExtension};
pub use vmvault_api::{AuditEntry, Role};

use crate::db::{ts, Db};
use crate::{Error, Result};

/// Who made a request, once their token checked out.
///
/// `user` is whose rights the token carries; `principal` is who holds it: the user who
/// minted it. A token an admin mints for someone else (or gets when creating a user) stays
/// that admin's, so that one admin cannot become "a second administrator" by minting a
/// token for another and approving their own request with it.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user: String,
    pub user_id: i64,
    pub principal: String,
    pub principal_id: i64,
}

impl Actor {
    /// The token is the user's own (they minted it, or it is the first admin's).
    pub fn own_token(&self) -> bool {
        self.principal_id == self.user_id
    }
}

/// What the database keeps of a token: the prefix that finds it and its secret's hash.
pub struct TokenRow {
    pub prefix: String,
    pub hash: String,
}

const TOKEN_TAG: &str = "vmv_";

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    vmvault_format::random_bytes(&mut b);
    hex::encode(b)
}

fn hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// Refuses what is not a user name.
pub fn check_user_name(name: &str) -> Result<()> {
    // `.` and `..` would be steps in a path, never one user's segment of it.
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(Error::Input(format!(
            "'{name}' is not a user name (1-64 of letters, digits, - _ . @)"
        )));
    }
    Ok(())
}

/// The id of a user, if there is one by that name.
pub fn find_user(db: &Db, name: &str) -> Result<Option<i64>> {
    Ok(db
        .conn()
        .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?)
}

/// Makes a user with `role` on `vault` and stores `token` for them, held by `principal`
/// (`None`: their own). One transaction: a user never exists without their role.
pub fn create_user(
    db: &Db,
    name: &str,
    vault: &str,
    role: Role,
    token: &TokenRow,
    principal: Option<i64>,
) -> Result<()> {
    check_user_name(name)?;
    let mut conn = db.conn();
    let tx = conn.transaction()?;
    let exists: Option<i64> = tx
        .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?;
    if exists.is_some() {
        return Err(Error::Conflict(format!("user '{name}' exists")));
    }
    let now = ts(chrono::Utc::now());
    tx.execute(
        "INSERT INTO users (name, created) VALUES (?1, ?2)",
        params![name, now],
    )?;
    let id = tx.last_insert_rowid();
    tx.execute(
        "INSERT INTO roles (user_id, vault, role) VALUES (?1, ?2, ?3)",
        params![id, vault, role.to_string()],
    )?;
    tx.execute(
        "INSERT INTO tokens (user_id, prefix, hash, created, principal_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, token.prefix, token.hash, now, principal],
    )?;
    tx.commit()?;
    Ok(())
}

/// A new token: the text for its holder (shown once) and the row to store.
pub fn mint() -> (String, TokenRow) {
    let prefix = random_hex(6);
    let secret = random_hex(32);
    (
        format!("{TOKEN_TAG}{prefix}_{secret}"),
        TokenRow {
            hash: hash(&secret),
            prefix,
        },
    )
}

/// Stores a minted token for a user, held by `principal` (`None`: their own).
pub fn store_token(db: &Db, user_id: i64, t: &TokenRow, principal: Option<i64>) -> Result<()> {
    db.conn().execute(
        "INSERT INTO tokens (user_id, prefix, hash, created, principal_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user_id, t.prefix, t.hash, ts(chrono::Utc::now()), principal],
    )?;
    Ok(())
}

/// The user of that name as an actor with their own token: whose role an approved request
/// is checked against when it runs.
pub fn actor_named(db: &Db, name: &str) -> Result<Actor> {
    let id = find_user(db, name)?
        .ok_or_else(|| Error::Forbidden(format!("user '{name}' no longer exists")))?;
    Ok(Actor {
        user: name.into(),
        user_id: id,
        principal: name.into(),
        principal_id: id,
    })
}

/// The user a bearer token belongs to.
pub fn authenticate(db: &Db, header: Option<&str>) -> Result<Actor> {
    let Some(header) = header else {
        return Err(Error::Unauthorized(
            "no API token: send 'Authorization: Bearer vmv_...'".into(),
        ));
    };
    let token = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| {
            Error::Unauthorized("the Authorization header is not 'Bearer TOKEN'".into())
        })?
        .trim();
    let bad = || Error::Unauthorized("the API token is not valid".into());
    let rest = token.strip_prefix(TOKEN_TAG).ok_or_else(bad)?;
    let (prefix, secret) = rest.split_once('_').ok_or_else(bad)?;
    let row: Option<(String, i64, String, i64, String)> = db
        .conn()
        .query_row(
            "SELECT t.hash, u.id, u.name, p.id, p.name FROM tokens t
             JOIN users u ON u.id = t.user_id
             JOIN users p ON p.id = coalesce(t.principal_id, t.user_id)
             WHERE t.prefix = ?1",
            [prefix],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let (stored, user_id, user, principal_id, principal) = row.ok_or_else(bad)?;
    // blake3::Hash compares in constant time: the comparison must not tell how much of a
    // guess was right.
    let stored = blake3::Hash::from_hex(&stored).map_err(|_| bad())?;
    if stored != blake3::hash(secret.as_bytes()) {
        return Err(bad());
    }
    Ok(Actor {
        user,
        user_id,
        principal,
        principal_id,
    })
}

/// The user's role on `vault` (a role on `*` holds for every vault).
pub fn role_of(db: &Db, actor: &Actor, vault: &str) -> Result<Option<Role>> {
    let conn = db.conn();
    let mut stmt =
        conn.prepare_cached("SELECT role FROM roles WHERE user_id = ?1 AND vault IN (?2, '*')")?;
    let roles = stmt
        .query_map(params![actor.user_id, vault], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut best = None;
    for r in roles {
        let r: Role = r.parse()?;
        best = best.max(Some(r));
    }
    Ok(best)
}

/// Refuses (403, with the reason) unless the actor holds `need` on `vault`.
pub fn require(db: &Db, actor: &Actor, vault: &str, need: Role, action: &str) -> Result<()> {
    match role_of(db, actor, vault)? {
        Some(r) if r >= need => Ok(()),
        have => {
            let have = have.map_or_else(|| "no role".to_string(), |r| format!("role {r}"));
            Err(Error::Forbidden(format!(
                "{action} needs role {need} on vault '{vault}'; user '{}' has {have}",
                actor.user
            )))
        }
    }
}

/// Records who did what, and how it ended.
pub fn audit(db: &Db, user: &str, action: &str, target: &str, outcome: &str) {
    // The audit write must not turn a done action into an error answer; a failure to
    // record is printed for the operator instead.
    if let Err(e) = db.conn().execute(
        "INSERT INTO audit (time, user, action, target, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![ts(chrono::Utc::now()), user, action, target, outcome],
    ) {
        eprintln!("vmvault server: could not write the audit log: {e}");
    }
}

pub fn audit_entries(db: &Db, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
    let conn = db.conn();
    let mut stmt = conn.prepare(
        "SELECT id, time, user, action, target, outcome FROM audit
         WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![before.unwrap_or(i64::MAX), limit], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                time: r.get(1)?,
                user: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                outcome: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// On first start: the `admin` user with a token, written to `path` (0600).
pub fn bootstrap_admin(db: &Db, path: &std::path::Path) -> Result<Option<String>> {
    let users: i64 = db
        .conn()
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))?;
    if users > 0 {
        return Ok(None);
    }
    let (token, row) = mint();
    create_user(db, "admin", "*", Role::Admin, &row, None)?;
    write_secret(path, &format!("{token}\n"))?;
    Ok(Some(token))
}

/// Writes a file only its owner can read, created that way (never briefly world-readable).
pub fn write_secret(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(())
}
