//! `/api/v1/policies`: schedules and retention.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use rusqlite::{params, OptionalExtension};
use vmvault_api::ErrorBody;
pub use vmvault_api::Policy;

use crate::app::App;
use crate::auth::Role;
use crate::db::{ts, Db};
use crate::schedule::Schedule;
use crate::{Error, Result};

/// A policy the server can run: a name that fits a path, a schedule that parses, retention
/// that keeps something, counts the database and the planner handle.
fn check(p: &Policy) -> Result<()> {
    crate::api::check_name(&p.name, "policy")?;
    Schedule::parse(&p.schedule, &p.timezone)?;
    if crate::work::retention(p).is_empty() {
        return Err(Error::Input(
            "give at least one keep_* count: a policy keeps its recovery points".into(),
        ));
    }
    let counts = [
        p.keep_last,
        p.keep_hourly,
        p.keep_daily,
        p.keep_weekly,
        p.keep_monthly,
        p.keep_yearly,
    ];
    if counts.iter().any(|c| *c > 100_000) {
        return Err(Error::Input("keep_* counts are at most 100000".into()));
    }
    Ok(())
}

pub fn load(db: &Db, name: &str) -> Result<Policy> {
    db.conn()
        .query_row(
            "SELECT name, schedule, timezone, keep_last, keep_hourly, keep_daily, keep_weekly,
             keep_monthly, keep_yearly FROM policies WHERE name = ?1",
            [name],
            |r| {
                Ok(Policy {
                    name: r.get(0)?,
                    schedule: r.get(1)?,
                    timezone: r.get(2)?,
                    keep_last: r.get(3)?,
                    keep_hourly: r.get(4)?,
                    keep_daily: r.get(5)?,
                    keep_weekly: r.get(6)?,
                    keep_monthly: r.get(7)?,
                    keep_yearly: r.get(8)?,
                })
            },
        )
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("no policy '{name}'")))
}

#[utoipa::path(get, path = "/api/v1/policies", tag = "policies",
    responses((status = 200, body = Vec<Policy>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<Policy>>> {
    app.guard(&h, Role::Reader, "policy.list", "-")?;
    let names: Vec<String> = {
        let conn = app.db.conn();
        let mut stmt = conn.prepare("SELECT name FROM policies ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    let mut out = Vec::new();
    for n in names {
        out.push(load(&app.db, &n)?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path)),
    responses((status = 200, body = Policy), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn show(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Policy>> {
    app.guard(&h, Role::Reader, "policy.show", &name)?;
    Ok(Json(load(&app.db, &name)?))
}

#[utoipa::path(post, path = "/api/v1/policies", tag = "policies", request_body = Policy,
    responses((status = 201, body = Policy), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn create(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Json(p): Json<Policy>,
) -> Result<(StatusCode, Json<Policy>)> {
    let actor = app.guard(&h, Role::Contributor, "policy.create", &p.name)?;
    app.audited(&actor, "policy.create", &p.name, || {
        check(&p)?;
        let n = app.db.conn().execute(
            "INSERT OR IGNORE INTO policies (name, vault, schedule, timezone, keep_last, keep_hourly,
             keep_daily, keep_weekly, keep_monthly, keep_yearly, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![p.name, app.vault_name, p.schedule, p.timezone, p.keep_last, p.keep_hourly,
                p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly, ts(app.now())],
        )?;
        if n == 0 {
            return Err(Error::Conflict(format!("policy '{}' exists", p.name)));
        }
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(p)))
}

#[utoipa::path(put, path = "/api/v1/policies/{name}", tag = "policies", request_body = Policy,
    params(("name" = String, Path)),
    responses((status = 200, body = Policy), (status = 202, body = ErrorBody, description = "waiting for a second admin"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn update(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(mut p): Json<Policy>,
) -> Result<Json<Policy>> {
    let actor = app.guard(&h, Role::Contributor, "policy.update", &name)?;
    p.name = name.clone();
    check(&p)?;
    let old = load(&app.db, &name)?;
    if old.shortened_by(&p) {
        if let Some(at) = app.locked_at()? {
            let e = Error::Forbidden(format!(
                "the vault is locked (immutable since {at}): no policy's retention can be shortened"
            ));
            crate::auth::audit(
                &app.db,
                &actor.user,
                "policy.update",
                &name,
                &format!("denied: {e}"),
            );
            return Err(e);
        }
        let params = serde_json::to_value(&p).map_err(|e| Error::Input(e.to_string()))?;
        app.destructive(&actor, "policy.shorten", &name, params)?;
        return Ok(Json(p));
    }
    app.audited(&actor, "policy.update", &name, || save(&app, &p))?;
    Ok(Json(p))
}

/// Writes a policy's new schedule and retention; items recompute their next run.
pub fn save(app: &App, p: &Policy) -> Result<()> {
    app.db.conn().execute(
        "UPDATE policies SET schedule = ?2, timezone = ?3, keep_last = ?4, keep_hourly = ?5,
         keep_daily = ?6, keep_weekly = ?7, keep_monthly = ?8, keep_yearly = ?9 WHERE name = ?1",
        params![
            p.name,
            p.schedule,
            p.timezone,
            p.keep_last,
            p.keep_hourly,
            p.keep_daily,
            p.keep_weekly,
            p.keep_monthly,
            p.keep_yearly
        ],
    )?;
    app.db.conn().execute(
        "UPDATE protected_items SET next_run = NULL WHERE policy = ?1",
        [&p.name],
    )?;
    Ok(())
}

#[utoipa::path(delete, path = "/api/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn delete(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let actor = app.guard(&h, Role::Contributor, "policy.delete", &name)?;
    app.audited(&actor, "policy.delete", &name, || {
        load(&app.db, &name)?;
        let used: i64 = app.db.conn().query_row(
            "SELECT count(*) FROM protected_items WHERE policy = ?1",
            [&name],
            |r| r.get(0),
        )?;
        if used > 0 {
            return Err(Error::Conflict(format!(
                "policy '{name}' protects {used} item(s): unprotect them or move them first"
            )));
        }
        app.db
            .conn()
            .execute("DELETE FROM policies WHERE name = ?1", [&name])?;
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}
