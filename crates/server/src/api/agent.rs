//! `/api/v1/agent/*`: the routes only an enrolled host agent's certificate opens (the
//! middleware checks it before routing). The work is in crates/server/src/relay.rs; vault
//! reads and writes run on the blocking pool.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use vmvault_api::agent::{
    Accepted, BeginAnswer, BeginRequest, CommitAnswer, CommitRequest, EnrollAnswer, EnrollRequest,
    FailReport, Heartbeat, HeartbeatAnswer, LogReport, ProgressReport, ReuseAnswer, ReuseRequest,
    ZeroRequest, LEASE_HEADER,
};
use vmvault_api::ErrorBody;

use crate::app::App;
use crate::hosts::HostRow;
use crate::peer::Peer;
use crate::relay::Caller;
use crate::relay_restore::RestoreReport;
use crate::{Error, Result};

/// Runs `f` on the blocking pool with the caller's host and lease.
async fn blocking<T: Send + 'static>(
    app: Arc<App>,
    peer: Peer,
    h: &HeaderMap,
    f: impl FnOnce(&Arc<App>, &Caller<'_>) -> Result<T> + Send + 'static,
) -> Result<T> {
    let host = app.agent_host(&peer)?;
    let lease = h
        .get(LEASE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let caller = Caller {
            host: &host,
            lease: lease.as_deref(),
        };
        f(&app, &caller)
    })
    .await
    .map_err(|e| Error::Panicked(e.to_string()))?
}

#[utoipa::path(post, path = "/api/v1/agent/enroll", tag = "agent", request_body = EnrollRequest,
    responses((status = 200, body = EnrollAnswer), (status = 401, body = ErrorBody)))]
pub async fn enroll(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollAnswer>> {
    Ok(Json(app.enroll(&peer, &req)?))
}

#[utoipa::path(post, path = "/api/v1/agent/heartbeat", tag = "agent", request_body = Heartbeat,
    responses((status = 200, body = HeartbeatAnswer), (status = 401, body = ErrorBody)))]
pub async fn heartbeat(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Json(hb): Json<Heartbeat>,
) -> Result<Json<HeartbeatAnswer>> {
    let host = app.agent_host(&peer)?;
    Ok(Json(app.heartbeat(&host, &hb)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct Wait {
    /// Seconds to wait for a job (at most 60).
    #[serde(default)]
    pub wait: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/agent/jobs/next", tag = "agent", params(Wait),
    responses((status = 200, body = vmvault_api::agent::AgentJob), (status = 204, description = "no job came in the time"), (status = 401, body = ErrorBody)))]
pub async fn next(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Query(q): Query<Wait>,
) -> Result<Response> {
    let host: HostRow = app.agent_host(&peer)?;
    let until =
        std::time::Instant::now() + std::time::Duration::from_secs(q.wait.unwrap_or(0).min(60));
    loop {
        // Armed before the look, so that a job queued between the look and the wait wakes it.
        let woken = app.agent_wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (a, h) = (app.clone(), host.clone());
        let job = tokio::task::spawn_blocking(move || a.take_agent_job(&h))
            .await
            .map_err(|e| Error::Panicked(e.to_string()))??;
        if let Some(job) = job {
            return Ok(Json(job).into_response());
        }
        let now = std::time::Instant::now();
        if now >= until {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        // Woken when a job is queued; a retry whose time comes is seen within a second.
        let nap = (until - now).min(std::time::Duration::from_secs(1));
        let _ = tokio::time::timeout(nap, woken).await;
        // A host removed while it waits gets no job.
        app.agent_host(&peer)?;
    }
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/begin", tag = "agent", params(("id" = i64, Path)), request_body = BeginRequest,
    responses((status = 200, body = BeginAnswer), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn begin(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Json(req): Json<BeginRequest>,
) -> Result<Json<BeginAnswer>> {
    blocking(app, peer, &h, move |app, c| app.agent_begin(id, c, &req))
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/api/v1/agent/jobs/{id}/base/{disk}", tag = "agent", params(("id" = i64, Path), ("disk" = usize, Path)),
    responses((status = 200, description = "the base point's chunk ids, 32 bytes each", content_type = "application/octet-stream"), (status = 404, body = ErrorBody)))]
pub async fn base(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path((id, disk)): Path<(i64, usize)>,
) -> Result<Vec<u8>> {
    blocking(app, peer, &h, move |app, c| app.agent_base(id, c, disk)).await
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/disks/{disk}/reuse", tag = "agent", params(("id" = i64, Path), ("disk" = usize, Path)), request_body = ReuseRequest,
    responses((status = 200, body = ReuseAnswer), (status = 403, body = ErrorBody)))]
pub async fn reuse(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path((id, disk)): Path<(i64, usize)>,
    Json(req): Json<ReuseRequest>,
) -> Result<Json<ReuseAnswer>> {
    blocking(app, peer, &h, move |app, c| {
        app.agent_reuse(id, c, disk, &req.claims)
    })
    .await
    .map(Json)
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/disks/{disk}/chunks", tag = "agent", params(("id" = i64, Path), ("disk" = usize, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "frames: position u64, compression u8, 3 zero bytes, plain length u32, body length u32, body"),
    responses((status = 200, body = Accepted), (status = 403, body = ErrorBody)))]
pub async fn chunks(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path((id, disk)): Path<(i64, usize)>,
    body: Bytes,
) -> Result<Json<Accepted>> {
    blocking(app, peer, &h, move |app, c| {
        app.agent_chunks(id, c, disk, &body)
    })
    .await
    .map(|accepted| Json(Accepted { accepted }))
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/disks/{disk}/zero", tag = "agent", params(("id" = i64, Path), ("disk" = usize, Path)), request_body = ZeroRequest,
    responses((status = 200, body = Accepted), (status = 403, body = ErrorBody)))]
pub async fn zero(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path((id, disk)): Path<(i64, usize)>,
    Json(req): Json<ZeroRequest>,
) -> Result<Json<Accepted>> {
    blocking(app, peer, &h, move |app, c| {
        app.agent_zero(id, c, disk, &req.runs)
    })
    .await
    .map(|accepted| Json(Accepted { accepted }))
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/commit", tag = "agent", params(("id" = i64, Path)), request_body = CommitRequest,
    responses((status = 200, body = CommitAnswer), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn commit(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Json(req): Json<CommitRequest>,
) -> Result<Json<CommitAnswer>> {
    blocking(app, peer, &h, move |app, c| app.agent_commit(id, c, &req))
        .await
        .map(|point| Json(CommitAnswer { point }))
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/progress", tag = "agent", params(("id" = i64, Path)), request_body = ProgressReport,
    responses((status = 204, description = "noted: the job is alive"), (status = 409, body = ErrorBody)))]
pub async fn progress(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Json(p): Json<ProgressReport>,
) -> Result<StatusCode> {
    blocking(app, peer, &h, move |app, c| {
        if app.restore_report(id, c, RestoreReport::Alive)? {
            return Ok(());
        }
        app.agent_progress(id, c, &p)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/log", tag = "agent", params(("id" = i64, Path)), request_body = LogReport,
    responses((status = 204, description = "logged"), (status = 409, body = ErrorBody)))]
pub async fn log(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Json(l): Json<LogReport>,
) -> Result<StatusCode> {
    blocking(app, peer, &h, move |app, c| {
        if app.restore_report(id, c, RestoreReport::Log(&l.line))? {
            return Ok(());
        }
        app.agent_log(id, c, &l.line)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/fail", tag = "agent", params(("id" = i64, Path)), request_body = FailReport,
    responses((status = 204, description = "the job fails; no point"), (status = 409, body = ErrorBody)))]
pub async fn fail(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Json(f): Json<FailReport>,
) -> Result<StatusCode> {
    blocking(app, peer, &h, move |app, c| {
        if app.restore_report(id, c, RestoreReport::Failed(&f.error))? {
            return Ok(());
        }
        app.agent_fail(id, c, &f.error)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/agent/releases/{version}", tag = "agent", params(("version" = String, Path)),
    responses((status = 200, description = "the release's binary for this host's target", content_type = "application/octet-stream"), (status = 404, body = ErrorBody)))]
pub async fn release(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(version): Path<String>,
) -> Result<Vec<u8>> {
    let host = app.agent_host(&peer)?;
    tokio::task::spawn_blocking(move || app.release_binary(&host, &version))
        .await
        .map_err(|e| Error::Panicked(e.to_string()))?
}

#[utoipa::path(get, path = "/api/v1/agent/jobs/{id}/restore", tag = "agent", params(("id" = i64, Path)),
    responses((status = 200, body = vmvault_api::agent::RestorePlan), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn restore_plan(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<vmvault_api::agent::RestorePlan>> {
    blocking(app, peer, &h, move |app, c| app.agent_restore_plan(id, c))
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/api/v1/agent/jobs/{id}/restore/{disk}/{position}", tag = "agent",
    params(("id" = i64, Path), ("disk" = usize, Path), ("position" = u64, Path)),
    responses((status = 200, description = "one frame: the chunk (zstd, raw, or zero)", content_type = "application/octet-stream"), (status = 404, body = ErrorBody)))]
pub async fn restore_chunk(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path((id, disk, position)): Path<(i64, usize, u64)>,
) -> Result<Vec<u8>> {
    blocking(app, peer, &h, move |app, c| {
        app.agent_restore_chunk(id, c, disk, position)
    })
    .await
}

#[derive(Debug, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreDone {
    /// The files written, for the job's log.
    pub wrote: Vec<String>,
}

#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/done", tag = "agent", params(("id" = i64, Path)), request_body = RestoreDone,
    responses((status = 204, description = "the restore succeeded"), (status = 409, body = ErrorBody)))]
pub async fn done(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Json(d): Json<RestoreDone>,
) -> Result<StatusCode> {
    blocking(app, peer, &h, move |app, c| {
        app.agent_restore_done(id, c, &d.wrote)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
