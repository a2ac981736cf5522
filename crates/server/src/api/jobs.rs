//! `/api/v1/jobs`: list (by state), show (with log and progress), cancel.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use vmvault_api::{Cancelled, ErrorBody, Job, JobDetail, JobQuery};

use crate::app::App;
use crate::auth::Role;
use crate::Result;

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(JobQuery),
    responses((status = 200, body = Vec<Job>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Query(q): Query<JobQuery>,
) -> Result<Json<Vec<Job>>> {
    app.guard(&h, Role::Reader, "job.list", "-")?;
    let limit = crate::api::points::limit(q.limit)?;
    Ok(Json(app.jobs(q.state.as_ref(), limit, q.before)?))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = i64, Path)),
    responses((status = 200, body = JobDetail), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn show(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JobDetail>> {
    app.guard(&h, Role::Reader, "job.show", &id.to_string())?;
    Ok(Json(app.job(id)?))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = i64, Path)),
    responses((status = 200, body = Cancelled), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn cancel(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Cancelled>> {
    let actor = app.guard(&h, Role::Operator, "job.cancel", &id.to_string())?;
    let state = app.audited(&actor, "job.cancel", &id.to_string(), || app.cancel_job(id))?;
    Ok(Json(Cancelled { id, state }))
}
