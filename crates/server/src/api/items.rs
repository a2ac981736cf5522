//! `/api/v1/protected-items`: VMs under a policy, and on-demand backups of them.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use rusqlite::params;
use vmvault_api::{BackupRequest, ErrorBody, Item, JobRef, ProtectRequest};
use vmvault_engine::VmDescription;

use crate::app::{item_exists, App};
use crate::auth::Role;
use crate::db::ts;
use crate::jobs::Params;
use crate::{Error, Result};

fn item_row(r: &rusqlite::Row) -> rusqlite::Result<Item> {
    Ok(Item {
        name: r.get(0)?,
        policy: r.get(1)?,
        next_run: r.get(2)?,
        created: r.get(3)?,
        description: r.get(4)?,
    })
}

#[utoipa::path(get, path = "/api/v1/protected-items", tag = "protected-items",
    responses((status = 200, body = Vec<Item>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<Item>>> {
    app.guard(&h, Role::Reader, "item.list", "-")?;
    let conn = app.db.conn();
    let mut stmt = conn.prepare(
        "SELECT name, policy, next_run, created, description FROM protected_items ORDER BY name",
    )?;
    let rows = stmt
        .query_map([], item_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Json(rows))
}

#[utoipa::path(get, path = "/api/v1/protected-items/{name}", tag = "protected-items",
    params(("name" = String, Path)),
    responses((status = 200, body = Item), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn show(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Item>> {
    app.guard(&h, Role::Reader, "item.show", &name)?;
    let conn = app.db.conn();
    let r = conn.query_row(
        "SELECT name, policy, next_run, created, description FROM protected_items WHERE name = ?1",
        [&name],
        item_row,
    );
    match r {
        Ok(i) => Ok(Json(i)),
        Err(rusqlite::Error::QueryReturnedNoRows) => {
            Err(Error::NotFound(format!("'{name}' is not a protected item")))
        }
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(post, path = "/api/v1/protected-items", tag = "protected-items", request_body = ProtectRequest,
    responses((status = 201, body = Item), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn protect(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Json(req): Json<ProtectRequest>,
) -> Result<(StatusCode, Json<Item>)> {
    let actor = app.guard(&h, Role::Contributor, "item.protect", "-")?;
    let desc = VmDescription::parse(&req.description)
        .map_err(|e| Error::Input(format!("the VM description: {e}")))?;
    if desc.source != "image" {
        // Its jobs would read the image files under a running guest: not a point in time.
        return Err(Error::Input(format!(
            "'{}' is a {} VM: the server backs up VMs from their image files only so far; back \
             it up on its host with `vmvault backup --qmp`",
            desc.name, desc.source
        )));
    }
    // Checked on a copy: the item keeps its description as given.
    for d in desc.disks.clone().iter_mut() {
        if let Err(e) = crate::confine::disk(&app.cfg, d) {
            let outcome = format!("denied: {e}");
            crate::auth::audit(&app.db, &actor.user, "item.protect", &desc.name, &outcome);
            return Err(e);
        }
        // Opened as its backups will open it, so that a wrong format, a damaged image or a
        // missing backing file shows now rather than as the first scheduled backup failing.
        vmvault_disk::open_allowing(&d.path, &d.format, &d.allow_backing).map_err(|e| {
            Error::Input(format!(
                "disk {} of '{}' cannot be opened: {e}",
                d.name, desc.name
            ))
        })?;
    }
    let item = app.audited(&actor, "item.protect", &desc.name, || {
        crate::api::policies::load(&app.db, &req.policy)?;
        if item_exists(&app.db, &desc.name)? {
            return Err(Error::Conflict(format!(
                "'{}' is protected already",
                desc.name
            )));
        }
        let now = ts(app.now());
        app.db.conn().execute(
            "INSERT INTO protected_items (name, vault, policy, description, created)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![desc.name, app.vault_name, req.policy, req.description, now],
        )?;
        Ok(Item {
            name: desc.name.clone(),
            policy: req.policy.clone(),
            next_run: None,
            created: now,
            description: req.description.clone(),
        })
    })?;
    Ok((StatusCode::CREATED, Json(item)))
}

#[utoipa::path(delete, path = "/api/v1/protected-items/{name}", tag = "protected-items",
    params(("name" = String, Path)),
    responses((status = 204, description = "unprotected; its recovery points stay"), (status = 202, body = ErrorBody, description = "waiting for a second admin"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn unprotect(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let actor = app.guard(&h, Role::Contributor, "item.unprotect", &name)?;
    if !item_exists(&app.db, &name)? {
        return Err(Error::NotFound(format!("'{name}' is not a protected item")));
    }
    app.destructive(&actor, "item.unprotect", &name, serde_json::Value::Null)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes an item (its points stay in the vault and the catalog).
pub fn do_unprotect(app: &App, name: &str) -> Result<()> {
    let n = app
        .db
        .conn()
        .execute("DELETE FROM protected_items WHERE name = ?1", [name])?;
    if n == 0 {
        return Err(Error::NotFound(format!("'{name}' is not a protected item")));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/protected-items/{name}/backup", tag = "protected-items",
    params(("name" = String, Path)), request_body = BackupRequest,
    responses((status = 202, body = JobRef), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn backup(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Option<Json<BackupRequest>>,
) -> Result<(StatusCode, Json<JobRef>)> {
    let actor = app.guard(&h, Role::Operator, "item.backup", &name)?;
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let id = app.audited(&actor, "item.backup", &name, || {
        if !item_exists(&app.db, &name)? {
            return Err(Error::NotFound(format!("'{name}' is not a protected item")));
        }
        if let Some(k) = &req.keep_until {
            let until = crate::work::parse_keep_until(k)?;
            if until <= app.now() {
                return Err(Error::Input(format!("--keep-until {k} is in the past")));
            }
        }
        let p = Params {
            keep_until: req.keep_until.clone(),
            on_demand: true,
            ..Default::default()
        };
        app.enqueue("backup", Some(&name), &p, &actor.user)
    })?;
    Ok((StatusCode::ACCEPTED, Json(JobRef { job: id })))
}
