//! `/api/v1/recovery-points` (paged, by item), soft delete and undelete; `/api/v1/restores`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use vmvault_api::{Deleted, ErrorBody, JobRef, PointPage, PointQuery, PointRow, RestoreRequest};

use crate::app::App;
use crate::auth::Role;
use crate::catalog;
use crate::db::ts;
use crate::jobs::Params;
use crate::{Error, Result};
use vmvault_format::PointId;

pub fn limit(l: Option<u32>) -> Result<u32> {
    match l {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(Error::Input(format!("limit {n}: give 1 to 1000"))),
    }
}

#[utoipa::path(get, path = "/api/v1/recovery-points", tag = "recovery-points", params(PointQuery),
    responses((status = 200, body = PointPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Query(q): Query<PointQuery>,
) -> Result<Json<PointPage>> {
    app.guard(&h, Role::Reader, "point.list", "-")?;
    let limit = limit(q.limit)?;
    let (items, next_cursor) = catalog::list(
        &app.db,
        &app.vault_name,
        q.item.as_deref(),
        q.deleted,
        limit,
        q.cursor.as_deref(),
    )?;
    Ok(Json(PointPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/recovery-points/{id}", tag = "recovery-points",
    params(("id" = String, Path, description = "the id or a unique prefix of it, or VM@latest, VM@ID-PREFIX, VM@RFC3339-TIME, VM")),
    responses((status = 200, body = PointRow), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn show(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<PointRow>> {
    app.guard(&h, Role::Reader, "point.show", &id)?;
    Ok(Json(catalog::resolve(&app.db, &app.vault_name, &id)?))
}

#[utoipa::path(delete, path = "/api/v1/recovery-points/{id}", tag = "recovery-points",
    params(("id" = String, Path)),
    responses((status = 200, body = Deleted), (status = 202, body = ErrorBody, description = "waiting for a second admin"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn delete(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Deleted>> {
    let actor = app.guard(&h, Role::Contributor, "point.delete", &id)?;
    let p = catalog::resolve(&app.db, &app.vault_name, &id)?;
    if p.deleted_at.is_some() {
        return Err(Error::Conflict(format!(
            "recovery point {} is deleted already",
            p.id
        )));
    }
    if let Err(e) = app.check_lock_allows_delete(&p) {
        crate::auth::audit(
            &app.db,
            &actor.user,
            "point.delete",
            &p.id,
            &format!("denied: {e}"),
        );
        return Err(e);
    }
    let out = app.destructive(&actor, "point.delete", &p.id, serde_json::Value::Null)?;
    serde_json::from_value(out)
        .map(Json)
        .map_err(|e| Error::Input(e.to_string()))
}

impl App {
    /// Deletes through the vault's rules: soft (a sealed marker; the point stays restorable)
    /// unless soft delete is off, refused while a locked vault's retention keeps the point.
    pub fn do_delete_point(&self, id: &str, by: &str) -> Result<Deleted> {
        let p = catalog::find(&self.db, &self.vault_name, None, id)?;
        let pid = point_id(&p.id)?;
        let deleted = self.vault.delete_point(&pid, by, "point delete")?;
        let now = self.now();
        let purge_after = match deleted {
            vmvault_store::Deleted::Until(t) => {
                catalog::set_deleted(&self.db, &p.id, Some(&ts(now)))?;
                ts(t)
            }
            vmvault_store::Deleted::Removed => {
                catalog::remove(&self.db, &p.id)?;
                ts(now)
            }
        };
        Ok(Deleted {
            id: p.id,
            deleted_at: ts(now),
            purge_after,
        })
    }

    /// The vault's answer to "may this point go now?", asked before a delete waits for
    /// approval, so that nobody approves what the lock will refuse anyway.
    fn check_lock_allows_delete(&self, p: &PointRow) -> Result<()> {
        match self.vault.deletion_refused(&point_id(&p.id)?)? {
            Some(why) => Err(Error::Forbidden(why)),
            None => Ok(()),
        }
    }
}

fn point_id(id: &str) -> Result<PointId> {
    id.parse()
        .map_err(|_| Error::Input(format!("'{id}' is not a recovery point id")))
}

#[utoipa::path(post, path = "/api/v1/recovery-points/{id}/undelete", tag = "recovery-points",
    params(("id" = String, Path)),
    responses((status = 200, body = PointRow), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn undelete(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<PointRow>> {
    let actor = app.guard(&h, Role::Contributor, "point.undelete", &id)?;
    let row = app.audited(&actor, "point.undelete", &id, || {
        let p = catalog::find(&app.db, &app.vault_name, None, &id)?;
        if p.deleted_at.is_none() {
            return Err(Error::Conflict(format!(
                "recovery point {} is not deleted",
                p.id
            )));
        }
        app.vault.undelete_point(&point_id(&p.id)?)?;
        catalog::set_deleted(&app.db, &p.id, None)?;
        catalog::find(&app.db, &app.vault_name, None, &p.id)
    })?;
    Ok(Json(row))
}

#[utoipa::path(post, path = "/api/v1/restores", tag = "restores", request_body = RestoreRequest,
    responses((status = 202, body = JobRef), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn restore(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Json(req): Json<RestoreRequest>,
) -> Result<(StatusCode, Json<JobRef>)> {
    // Overwriting files on the server's host is an admin's call; an operator restores into
    // places that do not exist yet.
    let need = if req.overwrite {
        Role::Admin
    } else {
        Role::Operator
    };
    let actor = app.guard(&h, need, "restore.start", &req.point)?;
    let job = app.audited(&actor, "restore.start", &req.point, || {
        let p = catalog::resolve(&app.db, &app.vault_name, &req.point)?;
        if let Some(d) = &req.disk {
            let m: vmvault_format::Manifest = p
                .read_manifest()
                .map_err(|e| Error::Input(format!("a manifest in the catalog: {e}")))?;
            vmvault_engine::select_disk(&m, d)?;
        }
        if let Some(f) = &req.format {
            if !vmvault_disk::WRITE_FORMATS.contains(&f.as_str()) {
                return Err(Error::Input(format!(
                    "cannot write disk images in format {f:?}: choose one of {}",
                    vmvault_disk::WRITE_FORMATS.join(", ")
                )));
            }
        }
        // On a host, its agent confines the target to its restore roots; on this host, the
        // server's roots do.
        if let Some(host) = &req.host {
            let enrolled = app
                .hosts()?
                .into_iter()
                .any(|h| h.name == *host && h.state == vmvault_api::HostState::Enrolled);
            if !enrolled {
                return Err(Error::NotFound(format!("no enrolled host '{host}'")));
            }
        } else {
            crate::confine::restore_target(
                &app.cfg,
                std::path::Path::new(&req.target),
                req.overwrite,
            )?;
        }
        let params = Params {
            point: Some(p.id),
            target: Some(req.target.clone()),
            overwrite: req.overwrite,
            disk: req.disk.clone(),
            format: req.format.clone(),
            ..Default::default()
        };
        app.enqueue_on(
            "restore",
            Some(&p.vm),
            &params,
            &actor.user,
            req.host.as_deref(),
        )
    })?;
    Ok((StatusCode::ACCEPTED, Json(JobRef { job })))
}
