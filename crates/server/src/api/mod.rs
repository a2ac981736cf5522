//! The HTTP API under `/api/v1`, its OpenAPI document, and the checks every handler makes:
//! who is asking (401), may they (403, with the reason), and the audit record.

pub mod admin;
pub mod agent;
pub mod approvals;
pub mod hosts;
pub mod items;
pub mod jobs;
pub mod points;
pub mod policies;
pub mod releases;
pub mod users;

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rusqlite::params;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::app::App;
use crate::auth::{self, Actor, Role};
use crate::db::ts;
use crate::{Error, Result};

/// Names of policies (and the like): what fits in a URL path segment and a table cell. A
/// name of `.` or `..` would be a step in the path instead, and could never be addressed.
pub fn check_name(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(Error::Input(format!(
            "'{name}' is not a {what} name (1-64 of letters, digits, - _ .)"
        )))
    }
}

impl App {
    /// Authenticates the request and checks the role `action` needs; a refusal is audited.
    pub fn guard(&self, h: &HeaderMap, need: Role, action: &str, target: &str) -> Result<Actor> {
        let header = h
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let actor = match auth::authenticate(&self.db, header) {
            Ok(a) => a,
            Err(e) => {
                auth::audit(&self.db, "-", action, target, &format!("denied: {e}"));
                return Err(e);
            }
        };
        if let Err(e) = auth::require(&self.db, &actor, &self.vault_name, need, action) {
            auth::audit(
                &self.db,
                &actor.user,
                action,
                target,
                &format!("denied: {e}"),
            );
            return Err(e);
        }
        Ok(actor)
    }

    /// Runs a change and records its outcome in the audit log.
    pub fn audited<T>(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let r = f();
        let outcome = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        auth::audit(&self.db, &actor.user, action, target, &outcome);
        r
    }

    /// Whether destructive actions wait for a second admin on this vault.
    pub fn requires_approval(&self) -> Result<bool> {
        Ok(self.db.conn().query_row(
            "SELECT require_approval FROM vaults WHERE name = ?1",
            [&self.vault_name],
            |r| r.get(0),
        )?)
    }

    /// A destructive action: run at once, or, on a vault that requires multi-user
    /// authorization, recorded as a request a second admin must approve (202).
    pub fn destructive(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value> {
        if !self.requires_approval()? {
            return self.audited(actor, action, target, || {
                self.execute(action, target, &params, &actor.user)
            });
        }
        Err(self.request_approval(actor, action, target, &params, None)?)
    }

    /// Records a request for a second admin's approval; returns the 202 answer. It is the
    /// token's holder's request (who may not approve it) made with the user's rights (which
    /// must still hold when it runs).
    pub fn request_approval(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        params: &serde_json::Value,
        token: Option<String>,
    ) -> Result<Error> {
        let id = {
            let conn = self.db.conn();
            conn.execute(
                "INSERT INTO approvals (vault, action, target, params, requested_by, requested_as,
                 requested_at, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending')",
                params![
                    self.vault_name,
                    action,
                    target,
                    params.to_string(),
                    actor.principal,
                    actor.user,
                    ts(self.now())
                ],
            )?;
            conn.last_insert_rowid()
        };
        auth::audit(
            &self.db,
            &actor.user,
            action,
            target,
            &format!("pending approval {id}"),
        );
        Ok(Error::PendingApproval {
            message: format!(
                "{action} {target} needs a second administrator's approval: request {id} \
                 (POST /api/v1/approvals/{id})"
            ),
            approval: id,
            token,
        })
    }

    /// Carries out a destructive action (directly, or once approved), checking the rules
    /// of this moment (the vault lock), not those of when it was asked for.
    pub fn execute(
        &self,
        action: &str,
        target: &str,
        params: &serde_json::Value,
        by: &str,
    ) -> Result<serde_json::Value> {
        match action {
            "point.delete" => self
                .do_delete_point(target, by)
                .and_then(|d| serde_json::to_value(d).map_err(|e| Error::Input(e.to_string()))),
            "item.unprotect" => items::do_unprotect(self, target).map(|_| serde_json::Value::Null),
            "policy.shorten" => {
                let p: policies::Policy = serde_json::from_value(params.clone())
                    .map_err(|e| Error::Input(e.to_string()))?;
                if let Some(at) = self.locked_at()? {
                    return Err(Error::Forbidden(format!(
                        "the vault is locked (immutable since {at}): no policy's retention can \
                         be shortened"
                    )));
                }
                policies::save(self, &p).map(|_| serde_json::Value::Null)
            }
            "vault.settings" => admin::apply_settings(self, params),
            "user.create" | "token.create" | "user.role" => {
                users::execute(self, action, target, params)
            }
            other => Err(Error::Input(format!("unknown action '{other}'"))),
        }
    }

    /// The role an approved action's requester must still hold when it runs: the one its
    /// route asks for.
    pub fn role_for(action: &str) -> Role {
        match action {
            "point.delete" | "item.unprotect" | "policy.shorten" => Role::Contributor,
            _ => Role::Admin,
        }
    }
}

struct TokenAuth;

impl Modify for TokenAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let comps = doc.components.get_or_insert_with(Default::default);
        comps.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "vmvault server", description = "Vaults, policies, protected items, recovery points, jobs and restores."),
    paths(
        admin::list, admin::show, admin::settings, admin::lock,
        users::create_user, users::users, users::new_token, users::revoke_tokens, users::set_role, admin::audit, approvals::approvals, approvals::decide,
        policies::list, policies::show, policies::create, policies::update, policies::delete,
        items::list, items::show, items::protect, items::unprotect, items::backup,
        points::list, points::show, points::delete, points::undelete, points::restore,
        jobs::list, jobs::show, jobs::cancel,
        hosts::list, hosts::add, hosts::remove, hosts::vms, hosts::protect,
        agent::enroll, agent::heartbeat, agent::next, agent::begin, agent::base, agent::reuse,
        agent::chunks, agent::zero, agent::commit, agent::progress, agent::log, agent::fail,
        agent::release, agent::restore_plan, agent::restore_chunk, agent::done, releases::list, releases::add, releases::upgrade, releases::settings,
    ),
    modifiers(&TokenAuth)
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Answers that axum makes itself (a body that is not the JSON asked for, a path parameter
/// that does not parse, a method the path does not have) get the same JSON error shape as
/// the handlers' own.
async fn json_errors(mut resp: axum::response::Response) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = resp.status();
    // A body refused unread leaves the connection mid-request: the client must not send the
    // next request on it.
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let code = match status.as_u16() {
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "too_large",
        415 => "unsupported_media_type",
        s if s >= 500 => "internal",
        _ => "bad_request",
    };
    let text = String::from_utf8_lossy(&body).trim().to_string();
    // axum's rejection of a body that does not fit the request type (422): bad input, said
    // as the field and what it expected, not as the deserializer's words.
    let (status, message) = match text.split_once(": ") {
        Some((head, rest)) if head.starts_with("Failed to deserialize the JSON body") => (
            axum::http::StatusCode::BAD_REQUEST,
            format!("the request body: {rest}"),
        ),
        _ => (status, text),
    };
    let body = crate::ErrorBody {
        error: crate::ErrorDetail {
            code: code.into(),
            message,
            approval: None,
            token: None,
        },
    };
    let mut out = (status, Json(body)).into_response();
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        out.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    out
}

/// Paths anyone may read: the API's description and the metrics scrape.
const OPEN_PATHS: [&str; 2] = ["/api/v1/openapi.json", "/metrics"];

/// Where the agent routes are: only an agent's certificate opens them, never a token.
const AGENT_PREFIX: &str = "/api/v1/agent/";

/// Checks the token before routing, so that nothing of a request from someone unknown is
/// read (no JSON or TOML parser sees its body) and an unknown client learns nothing of the
/// API's shape (a wrong path or method is 401 too). Handlers check roles themselves.
async fn authenticate_first(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    // Agent routes look at the connection's certificate only; user routes at the token
    // only: a host is not a user and holds no role, and a user token opens no agent route.
    if req.uri().path().starts_with(AGENT_PREFIX) {
        let peer = req
            .extensions()
            .get::<crate::peer::Peer>()
            .cloned()
            .unwrap_or_default();
        let checked = if req.uri().path() == "/api/v1/agent/enroll" {
            match peer.agent {
                Some(_) => Ok(()),
                None => Err(crate::Error::Unauthorized(
                    "enrollment needs the agent's TLS client certificate".into(),
                )),
            }
        } else {
            // A job route (`jobs/{id}/...`, the id parsed as its route's `Path<i64>` parses
            // it) is its job's host's alone, whichever kind of job it serves.
            let job = req
                .uri()
                .path()
                .strip_prefix("/api/v1/agent/jobs/")
                .and_then(|rest| rest.split('/').next())
                .and_then(|id| id.parse::<i64>().ok());
            app.agent_host(&peer).and_then(|host| match job {
                Some(job) => app.check_job_host(job, &host),
                None => Ok(()),
            })
        };
        if let Err(e) = checked {
            if matches!(e, crate::Error::Forbidden(_)) {
                // An enrolled host's request for a job not its own: its body is read (no
                // more than its own jobs' uploads may be), so that its agent hears the 403
                // instead of a reset; nothing of an unknown client's is ever read.
                let limit = vmvault_api::agent::MAX_UPLOAD
                    + vmvault_api::agent::MAX_FRAMES * vmvault_api::agent::FRAME_HEADER;
                let _ = axum::body::to_bytes(req.into_body(), limit).await;
            }
            return e.into_response();
        }
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = auth::authenticate(&app.db, header) {
        let action = format!("{} {}", req.method(), req.uri().path());
        auth::audit(&app.db, "-", &action, "-", &format!("denied: {e}"));
        return e.into_response();
    }
    next.run(req).await
}

async fn not_found() -> Error {
    Error::NotFound("no such API path".into())
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/vaults", get(admin::list))
        .route(
            "/api/v1/vaults/{name}",
            get(admin::show).patch(admin::settings),
        )
        .route("/api/v1/vaults/{name}/lock", post(admin::lock))
        .route("/api/v1/users", get(users::users).post(users::create_user))
        .route(
            "/api/v1/users/{name}/tokens",
            post(users::new_token).delete(users::revoke_tokens),
        )
        .route("/api/v1/users/{name}/role", put(users::set_role))
        .route("/api/v1/audit", get(admin::audit))
        .route("/api/v1/approvals", get(approvals::approvals))
        .route("/api/v1/approvals/{id}", post(approvals::decide))
        .route(
            "/api/v1/policies",
            get(policies::list).post(policies::create),
        )
        .route(
            "/api/v1/policies/{name}",
            get(policies::show)
                .put(policies::update)
                .delete(policies::delete),
        )
        .route(
            "/api/v1/protected-items",
            get(items::list).post(items::protect),
        )
        .route(
            "/api/v1/protected-items/{name}",
            get(items::show).delete(items::unprotect),
        )
        .route("/api/v1/protected-items/{name}/backup", post(items::backup))
        .route("/api/v1/recovery-points", get(points::list))
        .route(
            "/api/v1/recovery-points/{id}",
            get(points::show).delete(points::delete),
        )
        .route(
            "/api/v1/recovery-points/{id}/undelete",
            post(points::undelete),
        )
        .route("/api/v1/restores", post(points::restore))
        .route("/api/v1/jobs", get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::show))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/hosts", get(hosts::list).post(hosts::add))
        .route(
            "/api/v1/hosts/{name}",
            axum::routing::delete(hosts::remove).patch(releases::settings),
        )
        .route("/api/v1/hosts/{name}/upgrade", post(releases::upgrade))
        .route(
            "/api/v1/releases",
            get(releases::list)
                .post(releases::add)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::releases::MAX_RELEASE,
                )),
        )
        .route("/api/v1/agent/releases/{version}", get(agent::release))
        .route("/api/v1/agent/jobs/{id}/restore", get(agent::restore_plan))
        .route(
            "/api/v1/agent/jobs/{id}/restore/{disk}/{position}",
            get(agent::restore_chunk),
        )
        .route("/api/v1/agent/jobs/{id}/done", post(agent::done))
        .route(
            "/api/v1/hosts/{host}/vms/{vm}/protect",
            post(hosts::protect),
        )
        .route("/api/v1/vms", get(hosts::vms))
        .route("/api/v1/agent/enroll", post(agent::enroll))
        .route("/api/v1/agent/heartbeat", post(agent::heartbeat))
        .route("/api/v1/agent/jobs/next", get(agent::next))
        .route("/api/v1/agent/jobs/{id}/begin", post(agent::begin))
        .route("/api/v1/agent/jobs/{id}/base/{disk}", get(agent::base))
        .route(
            "/api/v1/agent/jobs/{id}/disks/{disk}/reuse",
            post(agent::reuse),
        )
        .route(
            "/api/v1/agent/jobs/{id}/disks/{disk}/chunks",
            post(agent::chunks).layer(axum::extract::DefaultBodyLimit::max(
                vmvault_api::agent::MAX_UPLOAD
                    + vmvault_api::agent::MAX_FRAMES * vmvault_api::agent::FRAME_HEADER,
            )),
        )
        .route(
            "/api/v1/agent/jobs/{id}/disks/{disk}/zero",
            post(agent::zero),
        )
        .route("/api/v1/agent/jobs/{id}/commit", post(agent::commit))
        .route("/api/v1/agent/jobs/{id}/progress", post(agent::progress))
        .route("/api/v1/agent/jobs/{id}/log", post(agent::log))
        .route("/api/v1/agent/jobs/{id}/fail", post(agent::fail))
        .route("/metrics", get(crate::metrics::metrics))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate_first,
        ))
        .with_state(app)
}
