//! `/api/v1/vaults` (settings, lock), `/api/v1/users`, `/api/v1/audit`, `/api/v1/approvals`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use rusqlite::params;
use vmvault_api::{AuditEntry, AuditQuery, ErrorBody, LockRequest, VaultInfo, VaultSettings};

use crate::app::App;
use crate::auth::{self, Role};
use crate::{catalog, Error, Result};

fn vault_info(app: &App) -> Result<VaultInfo> {
    let (points, bytes) = catalog::count(&app.db, &app.vault_name)?;
    let mua: bool = app.db.conn().query_row(
        "SELECT require_approval FROM vaults WHERE name = ?1",
        [&app.vault_name],
        |r| r.get(0),
    )?;
    let rules = app.vault.rules()?;
    let (days, locked) = (rules.soft_delete_days, rules.locked.map(|l| l.at));
    Ok(VaultInfo {
        name: app.vault_name.clone(),
        location: app.vault.location(),
        encrypted: app.vault.config().encrypted,
        chunk_size: app.vault.config().chunk_size,
        recovery_points: points,
        bytes_stored: bytes,
        soft_delete_days: days,
        locked_at: locked,
        require_approval: mua,
        storage_lock: app.storage_lock(false),
        schema_version: crate::db::schema_version(),
    })
}

fn check_vault(app: &App, name: &str) -> Result<()> {
    if name != app.vault_name {
        return Err(Error::NotFound(format!(
            "no vault '{name}' (this server has '{}')",
            app.vault_name
        )));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/vaults", tag = "vaults",
    responses((status = 200, body = Vec<VaultInfo>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<VaultInfo>>> {
    app.guard(&h, Role::Reader, "vault.list", "-")?;
    Ok(Json(vec![vault_info(&app)?]))
}

#[utoipa::path(get, path = "/api/v1/vaults/{name}", tag = "vaults", params(("name" = String, Path)),
    responses((status = 200, body = VaultInfo), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn show(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<VaultInfo>> {
    app.guard(&h, Role::Reader, "vault.show", &name)?;
    check_vault(&app, &name)?;
    Ok(Json(vault_info(&app)?))
}

#[utoipa::path(patch, path = "/api/v1/vaults/{name}", tag = "vaults", params(("name" = String, Path)),
    request_body = VaultSettings,
    responses((status = 200, body = VaultInfo), (status = 202, body = ErrorBody, description = "waiting for a second admin"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
pub async fn settings(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(s): Json<VaultSettings>,
) -> Result<Json<VaultInfo>> {
    let actor = app.guard(&h, Role::Admin, "vault.settings", &name)?;
    check_vault(&app, &name)?;
    if let Some(d) = s.soft_delete_days {
        if !(1..=180).contains(&d) {
            return Err(Error::Input(format!("soft_delete_days {d}: give 1 to 180")));
        }
    }
    let info = vault_info(&app)?;
    let shortens = s
        .soft_delete_days
        .is_some_and(|d| d < info.soft_delete_days);
    let weakens = s.require_approval == Some(false) && info.require_approval;
    if let Err(e) = check_lock_allows(&app, &s) {
        auth::audit(
            &app.db,
            &actor.user,
            "vault.settings",
            &name,
            &format!("denied: {e}"),
        );
        return Err(e);
    }
    let params = serde_json::to_value(&s).map_err(|e| Error::Input(e.to_string()))?;
    if shortens || weakens {
        app.destructive(&actor, "vault.settings", &name, params)?;
    } else {
        app.audited(&actor, "vault.settings", &name, || {
            apply_settings(&app, &params)
        })?;
    }
    Ok(Json(vault_info(&app)?))
}

/// A locked vault's soft delete is never shortened: checked when a change is asked for and
/// again when it runs (an approval may come after the lock).
fn check_lock_allows(app: &App, s: &VaultSettings) -> Result<()> {
    let shortens = match s.soft_delete_days {
        Some(d) => d < app.soft_delete_days()?,
        None => false,
    };
    match app.locked_at()? {
        Some(at) if shortens => Err(Error::Forbidden(format!(
            "the vault is locked (immutable since {at}): soft delete cannot be shortened"
        ))),
        _ => Ok(()),
    }
}

pub fn apply_settings(app: &App, params: &serde_json::Value) -> Result<serde_json::Value> {
    let s: VaultSettings =
        serde_json::from_value(params.clone()).map_err(|e| Error::Input(e.to_string()))?;
    check_lock_allows(app, &s)?;
    if let Some(d) = s.soft_delete_days {
        // The vault refuses a shorter window once locked, whoever asks.
        app.vault.set_soft_delete_days(d)?;
        app.db.conn().execute(
            "UPDATE vaults SET soft_delete_days = ?2 WHERE name = ?1",
            params![app.vault_name, d],
        )?;
    }
    if let Some(m) = s.require_approval {
        app.db.conn().execute(
            "UPDATE vaults SET require_approval = ?2 WHERE name = ?1",
            params![app.vault_name, m],
        )?;
    }
    Ok(serde_json::Value::Null)
}

#[utoipa::path(post, path = "/api/v1/vaults/{name}/lock", tag = "vaults", params(("name" = String, Path)),
    request_body(content = Option<LockRequest>, description = "optional: the storage hold's days"),
    responses((status = 200, body = VaultInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn lock(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Option<Json<LockRequest>>,
) -> Result<Json<VaultInfo>> {
    let actor = app.guard(&h, Role::Admin, "vault.lock", &name)?;
    check_vault(&app, &name)?;
    let asked = body.and_then(|Json(b)| b.hold_days);
    let app2 = app.clone();
    // Renewing every object's hold is one storage request per object: off the async workers.
    tokio::task::spawn_blocking(move || lock_and_hold(&app2, &actor, &name, asked))
        .await
        .map_err(|e| Error::Panicked(e.to_string()))??;
    // `storage_lock` in the answer says whether the storage keeps the promise too.
    app.storage_lock(true);
    Ok(Json(vault_info(&app)?))
}

/// Locks the vault in its own rules (from then on every path to it honours the lock) and has
/// the storage hold what the vault already has, as `vault lock` does from the CLI. Locking a
/// locked vault again is a conflict unless it asks for a longer hold.
fn lock_and_hold(app: &App, actor: &auth::Actor, name: &str, asked: Option<u32>) -> Result<()> {
    let days = asked.unwrap_or(vmvault_format::DEFAULT_HOLD_DAYS);
    app.audited(actor, "vault.lock", name, || {
        if let Some(at) = app.locked_at()? {
            let held = app.vault.rules()?.locked.and_then(|l| l.hold_days);
            if asked.is_none() || held.is_some_and(|h| h >= days) {
                return Err(Error::Conflict(format!(
                    "the vault is locked already (since {at}{}); a longer hold_days lengthens \
                     the storage's hold",
                    held.map(|h| format!(", held {h} day(s)"))
                        .unwrap_or_default()
                )));
            }
        }
        let rules = app.vault.lock_vault_holding(&actor.user, days)?;
        app.db.conn().execute(
            "UPDATE vaults SET locked_at = ?2 WHERE name = ?1",
            params![app.vault_name, rules.locked.map(|l| l.at)],
        )?;
        // What was written before the lock, and chunks older than a hold, are held from now on.
        app.vault.renew_holds(&|_| {})?;
        Ok(())
    })
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = Vec<AuditEntry>), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
pub async fn audit(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>> {
    app.guard(&h, Role::Admin, "audit.list", "-")?;
    let limit = crate::api::points::limit(q.limit)?;
    Ok(Json(auth::audit_entries(&app.db, limit, q.before)?))
}
