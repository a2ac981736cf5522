//! The catalog: every recovery point of the vault as a row in SQLite, so that listings are
//! indexed queries instead of reads of every manifest. The vault is the truth: the catalog
//! is rebuilt from it at start and updated after each backup, prune and delete.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, OptionalExtension};
pub use vmvault_api::PointRow;
use vmvault_format::Manifest;
use vmvault_store::Vault;

use crate::db::Db;
use crate::{Error, Result};

fn insert(conn: &rusqlite::Connection, vault: &str, m: &Manifest) -> Result<()> {
    let json = serde_json::to_string(m).map_err(|e| Error::Input(e.to_string()))?;
    conn.prepare_cached(
        "INSERT OR IGNORE INTO points (id, vault, vm, time, bytes_logical, bytes_stored, manifest,
         keep_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        m.id.to_hex(),
        vault,
        m.vm,
        m.time,
        m.logical_bytes() as i64,
        m.stats.bytes_stored as i64,
        json,
        // An on-demand point's own retention, as its manifest records it.
        match &m.retention {
            vmvault_format::PointRetention::Until { until } => Some(until.as_str()),
            _ => None,
        }
    ])?;
    Ok(())
}

pub fn add(db: &Db, vault: &str, m: &Manifest) -> Result<()> {
    insert(&db.conn(), vault, m)
}

pub fn remove(db: &Db, id: &str) -> Result<()> {
    db.conn()
        .execute("DELETE FROM points WHERE id = ?1", [id])?;
    Ok(())
}

/// Makes the catalog match the vault: new points added, vanished ones dropped, and the
/// soft-delete state taken from the vault's markers. Keep-until dates of points still
/// there stay.
pub fn rebuild(db: &Db, vault_name: &str, vault: &Vault) -> Result<usize> {
    // One listing gives the points and the soft-delete state, from the vault's sealed markers.
    let list = vault.list_points()?;
    for (id, e) in &list.unreadable {
        eprintln!("vmvault server: recovery point {id} cannot be read: {e}");
    }
    let ids: HashSet<String> = list
        .live
        .iter()
        .chain(list.deleted.iter().map(|(m, _)| m))
        .map(|m| m.id.to_hex())
        .collect();
    let known: HashSet<String> = {
        let conn = db.conn();
        let mut stmt = conn.prepare("SELECT id FROM points WHERE vault = ?1")?;
        let rows = stmt
            .query_map([vault_name], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<HashSet<_>>>()?;
        rows
    };
    let new: Vec<&Manifest> = list
        .live
        .iter()
        .chain(list.deleted.iter().map(|(m, _)| m))
        .filter(|m| !known.contains(&m.id.to_hex()))
        .collect();
    let deleted: Vec<(String, String)> = list
        .deleted
        .iter()
        .map(|(m, d)| (m.id.to_hex(), d.deleted_at.clone()))
        .collect();
    let mut conn = db.conn();
    let tx = conn.transaction()?;
    for id in known.difference(&ids) {
        tx.execute("DELETE FROM points WHERE id = ?1", [id])?;
    }
    for m in new {
        insert(&tx, vault_name, m)?;
    }
    tx.execute(
        "UPDATE points SET deleted_at = NULL WHERE vault = ?1",
        [vault_name],
    )?;
    for (id, at) in &deleted {
        tx.execute(
            "UPDATE points SET deleted_at = ?2 WHERE id = ?1",
            params![id, at],
        )?;
    }
    tx.commit()?;
    Ok(ids.len())
}

/// Whether the catalog still names what the vault has: the same manifests, and a deletion
/// marker beside exactly the points it says are soft-deleted. One listing of names, no manifest
/// read, so that changes another process made to the vault (the CLI's delete, backup or prune
/// on the same vault) are noticed within seconds without reading every manifest.
/// Also returns a digest of the names listed, so that a caller can tell "the same difference
/// as last time" (a manifest that cannot be read is never in the catalog) from a new one.
pub fn matches_vault(db: &Db, vault_name: &str, vault: &Vault) -> Result<(bool, [u8; 32])> {
    let mut points = HashSet::new();
    let mut markers = HashSet::new();
    let mut listed: Vec<String> = Vec::new();
    for o in vault.backend().list(vmvault_store::Kind::Point)? {
        listed.push(o.name.clone());
        match o.name.strip_suffix(".deleted") {
            Some(id) => markers.insert(id.to_string()),
            None => points.insert(o.name),
        };
    }
    let conn = db.conn();
    let mut stmt =
        conn.prepare_cached("SELECT id, deleted_at IS NOT NULL FROM points WHERE vault = ?1")?;
    let rows = stmt.query_map([vault_name], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
    })?;
    let (mut live, mut deleted) = (HashSet::new(), HashSet::new());
    for row in rows {
        let (id, is_deleted) = row?;
        if is_deleted {
            deleted.insert(id.clone());
        }
        live.insert(id);
    }
    // A marker whose manifest is gone (a purge half done) is not the catalog's business.
    markers.retain(|m| points.contains(m));
    listed.sort_unstable();
    let digest = *blake3::hash(listed.join("\n").as_bytes()).as_bytes();
    Ok((live == points && deleted == markers, digest))
}

fn row(r: &rusqlite::Row) -> rusqlite::Result<PointRow> {
    let manifest: String = r.get(6)?;
    Ok(PointRow {
        id: r.get(0)?,
        vm: r.get(1)?,
        time: r.get(2)?,
        bytes_logical: r.get::<_, i64>(3)? as u64,
        bytes_stored: r.get::<_, i64>(4)? as u64,
        deleted_at: r.get(5)?,
        keep_until: r.get(7)?,
        manifest: serde_json::from_str(&manifest).unwrap_or(serde_json::Value::Null),
    })
}

const COLUMNS: &str = "id, vm, time, bytes_logical, bytes_stored, deleted_at, manifest, keep_until";

/// One page of points, oldest first, after `cursor` (the last page's last `time/id`).
pub fn list(
    db: &Db,
    vault: &str,
    vm: Option<&str>,
    deleted: bool,
    limit: u32,
    cursor: Option<&str>,
) -> Result<(Vec<PointRow>, Option<String>)> {
    let (after_time, after_id) = match cursor {
        Some(c) => {
            let (t, i) = c
                .split_once('/')
                .ok_or_else(|| Error::Input(format!("'{c}' is not a cursor from this API")))?;
            (t.to_string(), i.to_string())
        }
        None => (String::new(), String::new()),
    };
    let deleted_clause = if deleted {
        "deleted_at IS NOT NULL"
    } else {
        "deleted_at IS NULL"
    };
    let vm_clause = if vm.is_some() {
        "AND vm = ?5"
    } else {
        "AND ?5 IS NULL"
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM points WHERE vault = ?1 AND {deleted_clause} {vm_clause}
         AND (time, id) > (?2, ?3) ORDER BY time, id LIMIT ?4"
    );
    let conn = db.conn();
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params![vault, after_time, after_id, limit + 1, vm], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut rows = rows;
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| format!("{}/{}", r.time, r.id))
    } else {
        None
    };
    Ok((rows, next))
}

/// A point by its full id or by a unique prefix of it, for `VM@ID` names.
pub fn find(db: &Db, vault: &str, vm: Option<&str>, id: &str) -> Result<PointRow> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Input(format!("'{id}' is not a recovery point id")));
    }
    let conn = db.conn();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM points WHERE vault = ?1 AND id >= ?2 AND id < ?3
         AND (?4 IS NULL OR vm = ?4) LIMIT 2"
    ))?;
    let lo = id.to_ascii_lowercase();
    let hi = format!("{lo}\u{7f}");
    let rows = stmt
        .query_map(params![vault, lo, hi, vm], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    match rows.len() {
        0 => Err(Error::NotFound(format!("no recovery point {id}"))),
        1 => Ok(rows.into_iter().next().expect("one row")),
        _ => Err(Error::Input(format!(
            "'{id}' names more than one recovery point: give more of the id"
        ))),
    }
}

/// The live point a name means, in the grammar the CLI uses locally: an id or a unique prefix
/// of one, or `VM@latest`, `VM@ID-PREFIX`, `VM@RFC3339-TIME` (the newest at or before it),
/// or `VM` alone (its latest). Soft-deleted points are reached by id only.
pub fn resolve(db: &Db, vault: &str, spec: &str) -> Result<PointRow> {
    if !spec.contains('@') && !spec.is_empty() && spec.chars().all(|c| c.is_ascii_hexdigit()) {
        return find(db, vault, None, spec);
    }
    let vm = spec.split_once('@').map_or(spec, |(vm, _)| vm);
    let live = manifests(db, vault, vm, true)?;
    if live.is_empty() {
        return Err(Error::NotFound(format!("no recovery point of {vm:?}")));
    }
    let m = vmvault_engine::select_point(&live, &[], spec)?;
    find(db, vault, Some(vm), &m.id.to_hex())
}

/// The manifests of one VM's points (soft-deleted ones too), from the catalog: what retention
/// plans over, without reading every manifest in the vault.
pub fn manifests_of(db: &Db, vault: &str, vm: &str) -> Result<Vec<Manifest>> {
    manifests(db, vault, vm, false)
}

/// One VM's manifests from the catalog, oldest first; `live_only` leaves out deleted ones.
fn manifests(db: &Db, vault: &str, vm: &str, live_only: bool) -> Result<Vec<Manifest>> {
    let conn = db.conn();
    let mut stmt = conn.prepare_cached(
        "SELECT manifest FROM points WHERE vault = ?1 AND vm = ?2
         AND (?3 = 0 OR deleted_at IS NULL) ORDER BY time, id",
    )?;
    let texts = stmt
        .query_map(params![vault, vm, live_only], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    texts
        .iter()
        .map(|t| {
            serde_json::from_str(t)
                .map_err(|e| Error::Input(format!("a manifest in the catalog: {e}")))
        })
        .collect()
}

pub fn set_keep_until(db: &Db, id: &str, until: Option<&str>) -> Result<()> {
    db.conn().execute(
        "UPDATE points SET keep_until = ?2 WHERE id = ?1",
        params![id, until],
    )?;
    Ok(())
}

pub fn set_deleted(db: &Db, id: &str, at: Option<&str>) -> Result<()> {
    db.conn().execute(
        "UPDATE points SET deleted_at = ?2 WHERE id = ?1",
        params![id, at],
    )?;
    Ok(())
}

/// Keep-until dates by point id, for prune.
pub fn holds(db: &Db, vault: &str) -> Result<HashMap<String, String>> {
    let conn = db.conn();
    let mut stmt = conn
        .prepare("SELECT id, keep_until FROM points WHERE vault = ?1 AND keep_until IS NOT NULL")?;
    let rows = stmt
        .query_map([vault], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<HashMap<_, _>>>()?;
    Ok(rows)
}

/// Points deleted before `cutoff`: their soft-delete time is over.
pub fn expired_deletions(db: &Db, vault: &str, cutoff: &str) -> Result<Vec<String>> {
    let conn = db.conn();
    let mut stmt = conn.prepare("SELECT id FROM points WHERE vault = ?1 AND deleted_at < ?2")?;
    let rows = stmt
        .query_map(params![vault, cutoff], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

pub fn count(db: &Db, vault: &str) -> Result<(i64, i64)> {
    Ok(db.conn().query_row(
        "SELECT count(*), coalesce(sum(bytes_stored), 0) FROM points WHERE vault = ?1",
        [vault],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

pub fn exists(db: &Db, id: &str) -> Result<bool> {
    Ok(db
        .conn()
        .query_row("SELECT 1 FROM points WHERE id = ?1", [id], |_| Ok(()))
        .optional()?
        .is_some())
}
