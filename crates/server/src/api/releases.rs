//! `/api/v1/releases` and host upgrades: admins add signed agent releases and say which
//! version a host runs; the agents learn it from their heartbeats.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use vmvault_api::releases::SIGNATURE_HEADER;
use vmvault_api::{AddRelease, ErrorBody, Host, HostSettings, ReleaseInfo, UpgradeRequest};

use crate::app::App;
use crate::auth::Role;
use crate::{Error, Result};

#[utoipa::path(get, path = "/api/v1/releases", tag = "releases",
    responses((status = 200, body = Vec<ReleaseInfo>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<ReleaseInfo>>> {
    app.guard(&h, Role::Reader, "release.list", "-")?;
    Ok(Json(app.releases()?))
}

/// Whoever adds a release can run code as root on every host that upgrades to it: admins
/// only, and audited.
#[utoipa::path(post, path = "/api/v1/releases", tag = "releases", params(AddRelease),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the agent binary"),
    responses((status = 201, body = ReleaseInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
pub async fn add(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Query(q): Query<AddRelease>,
    body: Bytes,
) -> Result<(StatusCode, Json<ReleaseInfo>)> {
    let actor = app.guard(&h, Role::Admin, "release.add", &q.version)?;
    let signature = match h.get(SIGNATURE_HEADER) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| hex::decode(s).ok())
                .ok_or_else(|| Error::Input(format!("{SIGNATURE_HEADER} is not hex")))?,
        ),
        None => None,
    };
    let app2 = app.clone();
    let info = tokio::task::spawn_blocking(move || {
        app2.audited(&actor, "release.add", &q.version, || {
            app2.add_release(&q.version, q.target.as_deref(), &body, signature.as_deref())
        })
    })
    .await
    .map_err(|e| Error::Panicked(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(info)))
}

fn host(app: &App, name: &str) -> Result<Host> {
    app.hosts()?
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| Error::NotFound(format!("no host '{name}'")))
}

#[utoipa::path(post, path = "/api/v1/hosts/{name}/upgrade", tag = "releases", params(("name" = String, Path)), request_body = UpgradeRequest,
    responses((status = 200, body = Host), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn upgrade(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Option<Json<UpgradeRequest>>,
) -> Result<Json<Host>> {
    let actor = app.guard(&h, Role::Admin, "host.upgrade", &name)?;
    let req = body.map(|Json(b)| b).unwrap_or_default();
    app.audited(&actor, "host.upgrade", &name, || {
        app.upgrade_host(&name, req.version.as_deref())
    })?;
    Ok(Json(host(&app, &name)?))
}

#[utoipa::path(patch, path = "/api/v1/hosts/{name}", tag = "releases", params(("name" = String, Path)), request_body = HostSettings,
    responses((status = 200, body = Host), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn settings(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(req): Json<HostSettings>,
) -> Result<Json<Host>> {
    let actor = app.guard(&h, Role::Admin, "host.settings", &name)?;
    if let Some(on) = req.auto_upgrade {
        app.audited(&actor, "host.settings", &name, || {
            app.set_auto_upgrade(&name, on)
        })?;
    }
    Ok(Json(host(&app, &name)?))
}
