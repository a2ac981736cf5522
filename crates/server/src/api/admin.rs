//! `/api/v1/vaults` (settings, lock), `/api/v1/users`, `/api/v1/audit`, `/api/v1/approvals`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::auth::{self, AuditEntry, Role};
use crate::db::ts;
use crate::error::ErrorBody;
use crate::{catalog, softdelete, Error, Result};

#[derive(Serialize, ToSchema)]
pub struct VaultInfo {
    pub name: String,
    pub location: String,
    pub encrypted: bool,
    pub chunk_size: u32,
    pub recovery_points: i64,
    pub bytes_stored: i64,
    /// Days a deleted point stays restorable.
    pub soft_delete_days: u32,
    /// When the vault was made immutable (irreversible), if it was.
    pub locked_at: Option<String>,
    /// Destructive actions wait for a second admin's approval.
    pub require_approval: bool,
    pub schema_version: usize,
}

fn vault_info(app: &App) -> Result<VaultInfo> {
    let (points, bytes) = catalog::count(&app.db, &app.vault_name)?;
    let (days, locked, mua): (u32, Option<String>, bool) = app.db.conn().query_row(
        "SELECT soft_delete_days, locked_at, require_approval FROM vaults WHERE name = ?1",
        [&app.vault_name],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
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

#[derive(Deserialize, Serialize, ToSchema)]
pub struct VaultSettings {
    /// 1..=180.
    pub soft_delete_days: Option<u32>,
    pub require_approval: Option<bool>,
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
    if shortens {
        if let Some(at) = &info.locked_at {
            let e = Error::Forbidden(format!(
                "the vault is locked (immutable since {at}): soft delete cannot be shortened"
            ));
            auth::audit(
                &app.db,
                &actor.user,
                "vault.settings",
                &name,
                &format!("denied: {e}"),
            );
            return Err(e);
        }
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

pub fn apply_settings(app: &App, params: &serde_json::Value) -> Result<serde_json::Value> {
    let s: VaultSettings =
        serde_json::from_value(params.clone()).map_err(|e| Error::Input(e.to_string()))?;
    if let Some(d) = s.soft_delete_days {
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
    responses((status = 200, body = VaultInfo), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn lock(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<VaultInfo>> {
    let actor = app.guard(&h, Role::Admin, "vault.lock", &name)?;
    check_vault(&app, &name)?;
    app.audited(&actor, "vault.lock", &name, || {
        if let Some(at) = app.locked_at()? {
            return Err(Error::Conflict(format!(
                "the vault is locked already (since {at})"
            )));
        }
        let now = ts(app.now());
        // The vault's own marker first: from then on a rebuilt catalog knows it too.
        softdelete::write_lock(&app.vault, &now, &actor.user)?;
        app.db.conn().execute(
            "UPDATE vaults SET locked_at = ?2 WHERE name = ?1",
            params![app.vault_name, now],
        )?;
        Ok(())
    })?;
    Ok(Json(vault_info(&app)?))
}

#[derive(Deserialize, ToSchema)]
pub struct NewUser {
    pub name: String,
    pub role: Role,
}

#[derive(Serialize, ToSchema)]
pub struct NewToken {
    pub user: String,
    /// Shown this once: only its hash is kept.
    pub token: String,
}

#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses((status = 201, body = NewToken), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn create_user(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Json(u): Json<NewUser>,
) -> Result<(StatusCode, Json<NewToken>)> {
    let actor = app.guard(&h, Role::Admin, "user.create", &u.name)?;
    let token = app.audited(
        &actor,
        "user.create",
        &format!("{} ({})", u.name, u.role),
        || auth::create_user(&app.db, &u.name, &app.vault_name, u.role),
    )?;
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            user: u.name,
            token,
        }),
    ))
}

fn user_id(app: &App, name: &str) -> Result<i64> {
    app.db
        .conn()
        .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("no user '{name}'")))
}

#[utoipa::path(post, path = "/api/v1/users/{name}/tokens", tag = "users", params(("name" = String, Path)),
    responses((status = 201, body = NewToken), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn new_token(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<NewToken>)> {
    let actor = app.guard(&h, Role::Admin, "token.create", &name)?;
    let token = app.audited(&actor, "token.create", &name, || {
        auth::new_token(&app.db, user_id(&app, &name)?)
    })?;
    Ok((StatusCode::CREATED, Json(NewToken { user: name, token })))
}

#[utoipa::path(delete, path = "/api/v1/users/{name}/tokens", tag = "users", params(("name" = String, Path)),
    responses((status = 204, description = "every token of the user revoked"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn revoke_tokens(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let actor = app.guard(&h, Role::Admin, "token.revoke", &name)?;
    app.audited(&actor, "token.revoke", &name, || {
        let id = user_id(&app, &name)?;
        app.db
            .conn()
            .execute("DELETE FROM tokens WHERE user_id = ?1", [id])?;
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct User {
    pub name: String,
    /// Role per vault (`*`: every vault).
    pub roles: Vec<(String, Role)>,
}

#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = Vec<User>), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
pub async fn users(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<User>>> {
    app.guard(&h, Role::Admin, "user.list", "-")?;
    let rows: Vec<(String, String, String)> = {
        let conn = app.db.conn();
        let mut stmt = conn.prepare(
            "SELECT u.name, r.vault, r.role FROM users u JOIN roles r ON r.user_id = u.id ORDER BY u.name",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    let mut out: Vec<User> = Vec::new();
    for (name, vault, role) in rows {
        let role: Role = role.parse()?;
        match out.last_mut() {
            Some(u) if u.name == name => u.roles.push((vault, role)),
            _ => out.push(User {
                name,
                roles: vec![(vault, role)],
            }),
        }
    }
    Ok(Json(out))
}

#[derive(Deserialize, IntoParams)]
pub struct AuditQuery {
    pub limit: Option<u32>,
    /// Entries older than this id.
    pub before: Option<i64>,
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

#[derive(Serialize, ToSchema)]
pub struct Approval {
    pub id: i64,
    /// point.delete, item.unprotect, policy.shorten or vault.settings.
    pub action: String,
    pub target: String,
    pub requested_by: String,
    pub requested_at: String,
    /// pending, approved, rejected or failed.
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<String>,
}

fn approval_row(r: &rusqlite::Row) -> rusqlite::Result<Approval> {
    Ok(Approval {
        id: r.get(0)?,
        action: r.get(1)?,
        target: r.get(2)?,
        requested_by: r.get(3)?,
        requested_at: r.get(4)?,
        state: r.get(5)?,
        decided_by: r.get(6)?,
        decided_at: r.get(7)?,
    })
}

const APPROVAL_COLUMNS: &str =
    "id, action, target, requested_by, requested_at, state, decided_by, decided_at";

#[utoipa::path(get, path = "/api/v1/approvals", tag = "approvals",
    responses((status = 200, body = Vec<Approval>), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
pub async fn approvals(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<Approval>>> {
    app.guard(&h, Role::Admin, "approval.list", "-")?;
    let conn = app.db.conn();
    let mut stmt = conn.prepare(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals ORDER BY id DESC LIMIT 1000"
    ))?;
    let rows = stmt
        .query_map([], approval_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Json(rows))
}

#[derive(Deserialize, ToSchema)]
pub struct Decision {
    /// true grants and runs the action; false rejects it.
    pub approve: bool,
}

#[utoipa::path(post, path = "/api/v1/approvals/{id}", tag = "approvals", params(("id" = i64, Path)),
    request_body = Decision,
    responses((status = 200, body = Approval), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn decide(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Json(d): Json<Decision>,
) -> Result<Json<Approval>> {
    let actor = app.guard(&h, Role::Admin, "approval.decide", &id.to_string())?;
    let row: Option<(String, String, String, String, String)> = app
        .db
        .conn()
        .query_row(
            "SELECT action, target, params, requested_by, state FROM approvals WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let (action, target, params, by, state) =
        row.ok_or_else(|| Error::NotFound(format!("no approval request {id}")))?;
    if state != "pending" {
        return Err(Error::Conflict(format!(
            "approval request {id} is {state} already"
        )));
    }
    if by == actor.user {
        let e = Error::Forbidden(format!(
            "approval request {id} was made by '{by}': a second administrator must decide it"
        ));
        auth::audit(
            &app.db,
            &actor.user,
            "approval.decide",
            &id.to_string(),
            &format!("denied: {e}"),
        );
        return Err(e);
    }
    let now = ts(app.now());
    let new_state = if d.approve {
        let params: serde_json::Value =
            serde_json::from_str(&params).map_err(|e| Error::Input(e.to_string()))?;
        match app.execute(&action, &target, &params, &by) {
            Ok(_) => "approved".to_string(),
            Err(e) => {
                auth::audit(
                    &app.db,
                    &actor.user,
                    &action,
                    &target,
                    &format!("failed after approval {id}: {e}"),
                );
                "failed".to_string()
            }
        }
    } else {
        "rejected".to_string()
    };
    app.db.conn().execute(
        "UPDATE approvals SET state = ?2, decided_by = ?3, decided_at = ?4 WHERE id = ?1",
        params![id, new_state, actor.user, now],
    )?;
    auth::audit(
        &app.db,
        &actor.user,
        "approval.decide",
        &format!("{id} {action} {target}"),
        &new_state,
    );
    let conn = app.db.conn();
    Ok(Json(conn.query_row(
        &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?1"),
        [id],
        approval_row,
    )?))
}
