//! `/api/v1/approvals`: multi-user authorization. A destructive request on a vault that
//! requires approval waits here for a second administrator: a different person from the
//! requester (compared by who holds the tokens, not whose name they carry), decided once
//! (two admins deciding at once: one wins, the other gets 409), and checked again when it
//! runs (the requester must still hold the role; the vault lock of that moment applies).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use rusqlite::{params, OptionalExtension};
use vmvault_api::{Approval, ApprovalState, Decision, ErrorBody};

use crate::app::App;
use crate::auth::{self, Actor, Role};
use crate::db::ts;
use crate::{Error, Result};

fn approval_row(r: &rusqlite::Row) -> rusqlite::Result<Approval> {
    Ok(Approval {
        id: r.get(0)?,
        action: r.get(1)?,
        target: r.get(2)?,
        requested_by: r.get(3)?,
        requested_at: r.get(4)?,
        state: ApprovalState::from(r.get::<_, String>(5)?),
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

/// A request as stored.
struct Request {
    action: String,
    target: String,
    params: String,
    /// The holder of the token it was made with.
    by: String,
    /// The user whose rights it was made with.
    user: String,
    state: ApprovalState,
}

fn load(app: &App, id: i64) -> Result<Request> {
    app.db
        .conn()
        .query_row(
            "SELECT action, target, params, requested_by, coalesce(requested_as, requested_by),
             state FROM approvals WHERE id = ?1",
            [id],
            |r| {
                Ok(Request {
                    action: r.get(0)?,
                    target: r.get(1)?,
                    params: r.get(2)?,
                    by: r.get(3)?,
                    user: r.get(4)?,
                    state: ApprovalState::from(r.get::<_, String>(5)?),
                })
            },
        )
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("no approval request {id}")))
}

/// The decider must be someone else than the requester: neither the holder of the
/// requester's token nor the user it acted as.
fn check_second(id: i64, req: &Request, actor: &Actor) -> Result<()> {
    if actor.principal != req.by && actor.user != req.user {
        return Ok(());
    }
    let whose = if actor.own_token() {
        String::new()
    } else {
        format!(
            " (the token used is '{}''s, minted by them for '{}')",
            actor.principal, actor.user
        )
    };
    Err(Error::Forbidden(format!(
        "approval request {id} was made by '{}' as '{}'{whose}: a second administrator must \
         decide it",
        req.by, req.user
    )))
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
    let req = load(&app, id)?;
    if req.state != ApprovalState::Pending {
        return Err(Error::Conflict(format!(
            "approval request {id} is {} already",
            req.state
        )));
    }
    if let Err(e) = check_second(id, &req, &actor) {
        let outcome = format!("denied: {e}");
        auth::audit(
            &app.db,
            &actor.user,
            "approval.decide",
            &id.to_string(),
            &outcome,
        );
        return Err(e);
    }
    // The claim is one conditional update: of two admins deciding at once, exactly one
    // finds the request pending, and only that one carries it out.
    let claimed = app.db.conn().execute(
        "UPDATE approvals SET state = 'deciding', decided_by = ?2, decided_at = ?3
         WHERE id = ?1 AND state = 'pending'",
        params![id, actor.user, ts(app.now())],
    )?;
    if claimed == 0 {
        return Err(Error::Conflict(format!(
            "approval request {id} was decided meanwhile by another administrator"
        )));
    }
    let outcome = if d.approve { run(&app, &req) } else { Ok(()) };
    let state = match (&outcome, d.approve) {
        (Err(_), _) => ApprovalState::Failed,
        (Ok(()), true) => ApprovalState::Approved,
        (Ok(()), false) => ApprovalState::Rejected,
    };
    app.db.conn().execute(
        "UPDATE approvals SET state = ?2 WHERE id = ?1",
        params![id, state.as_str()],
    )?;
    let what = format!("{id} {} {}", req.action, req.target);
    match outcome {
        Ok(()) => auth::audit(
            &app.db,
            &actor.user,
            "approval.decide",
            &what,
            state.as_str(),
        ),
        Err(e) => {
            let outcome = format!("failed after approval: {e}");
            auth::audit(&app.db, &actor.user, "approval.decide", &what, &outcome);
            return Err(e);
        }
    }
    let conn = app.db.conn();
    Ok(Json(conn.query_row(
        &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?1"),
        [id],
        approval_row,
    )?))
}

/// Carries out an approved request as its requester, with the rules of now: the role it
/// needs must still be theirs, and the action checks the vault lock itself.
fn run(app: &App, req: &Request) -> Result<()> {
    let requester = auth::actor_named(&app.db, &req.user)?;
    auth::require(
        &app.db,
        &requester,
        &app.vault_name,
        App::role_for(&req.action),
        &req.action,
    )?;
    let params: serde_json::Value =
        serde_json::from_str(&req.params).map_err(|e| Error::Input(e.to_string()))?;
    app.execute(&req.action, &req.target, &params, &req.user)?;
    Ok(())
}

/// On start: a request being carried out when the server stopped ends failed (its action
/// may or may not have run; it is never run twice).
pub fn recover(app: &App) -> Result<usize> {
    Ok(app.db.conn().execute(
        "UPDATE approvals SET state = 'failed' WHERE state = 'deciding'",
        [],
    )?)
}
