//! `/api/v1/users`: users, their tokens and roles.
//!
//! On a vault that requires approval, whatever would give one admin a second admin's voice
//! waits for another admin: creating an admin, minting a token for another user, changing a
//! role. A token always stays its minter's (see [`auth::Actor`]): one minted with a token
//! held by someone else is still theirs, so it cannot be laundered into its user's own.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use rusqlite::params;
use serde_json::json;
use vmvault_api::{ErrorBody, NewToken, NewUser, RoleChange, User};

use crate::app::App;
use crate::auth::{self, Role, TokenRow};
use crate::{Error, Result};

fn user_id(app: &App, name: &str) -> Result<i64> {
    auth::find_user(&app.db, name)?.ok_or_else(|| Error::NotFound(format!("no user '{name}'")))
}

/// What an approval request that mints a token keeps of it (never the secret).
fn token_params(row: &TokenRow, principal: i64) -> serde_json::Value {
    json!({"prefix": row.prefix, "hash": row.hash, "principal": principal})
}

#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses((status = 201, body = NewToken), (status = 202, body = ErrorBody, description = "an admin: waiting for a second admin; the token works once approved"), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn create_user(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Json(u): Json<NewUser>,
) -> Result<(StatusCode, Json<NewToken>)> {
    let actor = app.guard(&h, Role::Admin, "user.create", &u.name)?;
    auth::check_user_name(&u.name)?;
    if auth::find_user(&app.db, &u.name)?.is_some() {
        return Err(Error::Conflict(format!("user '{}' exists", u.name)));
    }
    let (token, row) = auth::mint();
    if u.role == Role::Admin && app.requires_approval()? {
        let mut params = token_params(&row, actor.principal_id);
        params["role"] = json!(u.role);
        let target = u.name.clone();
        return Err(app.request_approval(&actor, "user.create", &target, &params, Some(token))?);
    }
    // The token goes to its creator, who hands it over: it stays the creator's.
    app.audited(
        &actor,
        "user.create",
        &format!("{} ({})", u.name, u.role),
        || {
            let p = Some(actor.principal_id);
            auth::create_user(&app.db, &u.name, &app.vault_name, u.role, &row, p)
        },
    )?;
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            user: u.name,
            token,
        }),
    ))
}

#[utoipa::path(post, path = "/api/v1/users/{name}/tokens", tag = "users", params(("name" = String, Path)),
    responses((status = 201, body = NewToken), (status = 202, body = ErrorBody, description = "for another user: waiting for a second admin; the token works once approved"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn new_token(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<NewToken>)> {
    let actor = app.guard(&h, Role::Admin, "token.create", &name)?;
    let uid = user_id(&app, &name)?;
    let mua = app.requires_approval()?;
    let (token, row) = auth::mint();
    let principal = if uid == actor.user_id {
        // One's own new token is one's own, except when minted with a token someone else
        // holds on a vault that requires approval: then it is still theirs. (Before approval
        // is required, this is how a user replaces the token they were handed.)
        if actor.own_token() || !mua {
            None
        } else {
            Some(actor.principal_id)
        }
    } else if mua {
        let params = token_params(&row, actor.principal_id);
        return Err(app.request_approval(&actor, "token.create", &name, &params, Some(token))?);
    } else {
        Some(actor.principal_id)
    };
    app.audited(&actor, "token.create", &name, || {
        auth::store_token(&app.db, uid, &row, principal)
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

fn all_users(app: &App) -> Result<Vec<User>> {
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
    Ok(out)
}

#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = Vec<User>), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
pub async fn users(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<User>>> {
    app.guard(&h, Role::Admin, "user.list", "-")?;
    Ok(Json(all_users(&app)?))
}

#[utoipa::path(put, path = "/api/v1/users/{name}/role", tag = "users", params(("name" = String, Path)),
    request_body = RoleChange,
    responses((status = 200, body = User), (status = 202, body = ErrorBody, description = "waiting for a second admin"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn set_role(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(c): Json<RoleChange>,
) -> Result<Json<User>> {
    let actor = app.guard(&h, Role::Admin, "user.role", &name)?;
    user_id(&app, &name)?;
    let params = json!({"role": c.role});
    if app.requires_approval()? {
        return Err(app.request_approval(&actor, "user.role", &name, &params, None)?);
    }
    app.audited(&actor, "user.role", &format!("{name} ({})", c.role), || {
        set_role_now(&app, &name, c.role)
    })?;
    all_users(&app)?
        .into_iter()
        .find(|u| u.name == name)
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("no user '{name}'")))
}

/// The user's role becomes `role` on this server's vault (replacing every other), unless
/// that leaves no admin at all: nobody could then manage users again.
fn set_role_now(app: &App, name: &str, role: Role) -> Result<()> {
    let uid = user_id(app, name)?;
    let mut conn = app.db.conn();
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM roles WHERE user_id = ?1", [uid])?;
    tx.execute(
        "INSERT INTO roles (user_id, vault, role) VALUES (?1, ?2, ?3)",
        params![uid, app.vault_name, role.to_string()],
    )?;
    let admins: i64 = tx.query_row(
        "SELECT count(DISTINCT user_id) FROM roles WHERE role = 'admin'",
        [],
        |r| r.get(0),
    )?;
    if admins == 0 {
        return Err(Error::Conflict(format!(
            "'{name}' is the last admin: make another admin first"
        )));
    }
    tx.commit()?;
    Ok(())
}

/// Carries out an approved user.create, token.create or user.role.
pub fn execute(
    app: &App,
    action: &str,
    target: &str,
    params: &serde_json::Value,
) -> Result<serde_json::Value> {
    let field = |k: &str| {
        params[k]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Input(format!("the approved {action} request has no {k}")))
    };
    let role = || -> Result<Role> { Ok(field("role")?.parse()?) };
    let token = || -> Result<(TokenRow, i64)> {
        let principal = params["principal"]
            .as_i64()
            .ok_or_else(|| Error::Input(format!("the approved {action} has no principal")))?;
        let row = TokenRow {
            prefix: field("prefix")?,
            hash: field("hash")?,
        };
        Ok((row, principal))
    };
    match action {
        "user.create" => {
            let (row, principal) = token()?;
            let r = role()?;
            auth::create_user(&app.db, target, &app.vault_name, r, &row, Some(principal))?;
        }
        "token.create" => {
            let (row, principal) = token()?;
            auth::store_token(&app.db, user_id(app, target)?, &row, Some(principal))?;
        }
        "user.role" => set_role_now(app, target, role()?)?,
        other => return Err(Error::Input(format!("unknown action '{other}'"))),
    }
    Ok(serde_json::Value::Null)
}
