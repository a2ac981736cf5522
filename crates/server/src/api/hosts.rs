//! `/api/v1/hosts` and `/api/v1/vms`: enrollment codes, revocation, and the VMs agents found.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use rusqlite::params;
use vmvault_api::{
    AddHostRequest, EnrollmentCode, ErrorBody, Host, HostState, Item, ProtectVmRequest, Vm, VmQuery,
};

use crate::app::{item_exists, App};
use crate::auth::Role;
use crate::db::ts;
use crate::{Error, Result};

#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    responses((status = 200, body = Vec<Host>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(State(app): State<Arc<App>>, h: HeaderMap) -> Result<Json<Vec<Host>>> {
    app.guard(&h, Role::Reader, "host.list", "-")?;
    Ok(Json(app.hosts()?))
}

#[utoipa::path(post, path = "/api/v1/hosts", tag = "hosts", request_body = AddHostRequest,
    responses((status = 201, body = EnrollmentCode), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn add(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Json(req): Json<AddHostRequest>,
) -> Result<(StatusCode, Json<EnrollmentCode>)> {
    let actor = app.guard(&h, Role::Admin, "host.add", &req.name)?;
    let code = app.audited(&actor, "host.add", &req.name, || {
        app.add_host(&req.name, req.expires.as_deref(), req.replace)
    })?;
    Ok((StatusCode::CREATED, Json(code)))
}

/// Revokes at once, even on a vault that requires approval: it deletes nothing, and waiting
/// would leave a stolen key working.
#[utoipa::path(delete, path = "/api/v1/hosts/{name}", tag = "hosts", params(("name" = String, Path)),
    responses((status = 204, description = "revoked; its VMs' items and points stay"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
pub async fn remove(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let actor = app.guard(&h, Role::Admin, "host.remove", &name)?;
    app.audited(&actor, "host.remove", &name, || app.remove_host(&name))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "hosts", params(VmQuery),
    responses((status = 200, body = Vec<Vm>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn vms(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Query(q): Query<VmQuery>,
) -> Result<Json<Vec<Vm>>> {
    app.guard(&h, Role::Reader, "vm.list", "-")?;
    Ok(Json(app.vms(q.host.as_deref())?))
}

/// Protects a VM an agent found: an item of that host, backed up by its agent.
#[utoipa::path(post, path = "/api/v1/hosts/{host}/vms/{vm}/protect", tag = "hosts",
    params(("host" = String, Path), ("vm" = String, Path)), request_body = ProtectVmRequest,
    responses((status = 201, body = Item), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
pub async fn protect(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path((host, vm)): Path<(String, String)>,
    Json(req): Json<ProtectVmRequest>,
) -> Result<(StatusCode, Json<Item>)> {
    let target = format!("{host}/{vm}");
    let actor = app.guard(&h, Role::Contributor, "item.protect", &target)?;
    let item =
        app.audited(&actor, "item.protect", &target, || {
            crate::api::policies::load(&app.db, &req.policy)?;
            let state = app
                .hosts()?
                .into_iter()
                .find(|x| x.name == host)
                .map(|x| x.state)
                .ok_or_else(|| Error::NotFound(format!("no host '{host}' (`host add {host}`)")))?;
            if state == HostState::Revoked {
                return Err(Error::Conflict(format!("host '{host}' was removed")));
            }
            let found = app.found_vm(&host, &vm)?;
            if let Some(s) = &req.scripts {
                // Checked when it is given, not when the first backup needs it.
                vmvault_qemu::Scripts::parse(s)
                    .map_err(|e| Error::Input(format!("the scripts file: {e}")))?;
            }
            if item_exists(&app.db, &vm)? {
                return Err(Error::Conflict(format!(
                    "a VM named '{vm}' is protected already (its recovery points are by VM name)"
                )));
            }
            // The description records what the agent reported; its jobs go to the agent, which
            // reads the disks QEMU has open.
            let description = describe(&found);
            let now = ts(app.now());
            app.db.conn().execute(
            "INSERT INTO protected_items (name, vault, policy, description, created, host, scripts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![vm, app.vault_name, req.policy, description, now, host, req.scripts],
        )?;
            Ok(Item {
                name: vm.clone(),
                policy: req.policy.clone(),
                next_run: None,
                created: now,
                description,
            })
        })?;
    Ok((StatusCode::CREATED, Json(item)))
}

/// The VM as a description (the TOML `vmvault backup` reads), from the agent's report.
fn describe(vm: &vmvault_api::agent::FoundVm) -> String {
    let mut out = format!("name = {:?}\nsource = \"qemu\"\n", vm.name);
    for d in &vm.disks {
        out.push_str(&format!(
            "\n[[disk]]\nname = {:?}\npath = {:?}\nformat = {:?}\n",
            d.name,
            d.file.as_deref().unwrap_or(""),
            d.format
        ));
    }
    out
}
