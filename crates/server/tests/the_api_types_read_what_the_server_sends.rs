//! The API crate's types (crates/api) against the real server: every request a client sends
//! is one of them, serialized; every answer reads into its type and writes back to the very
//! JSON the server sent (no field lost, renamed or defaulted), which is what the CLI's
//! `--json` prints. Paths come from the crate's builders, so names with characters a path
//! or query would misread reach the resource they name.

mod common;

use std::sync::Arc;

use common::{Answer, Server};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use vmvault_api::{
    approvals, audit, items, jobs, points, policies, users, vaults, Approval, ApprovalState,
    AuditEntry, AuditQuery, BackupRequest, Cancelled, Decision, Deleted, ErrorBody, Item, Job,
    JobDetail, JobQuery, JobRef, JobState, NewToken, NewUser, PointPage, PointQuery, PointRow,
    Policy, ProtectRequest, RestoreRequest, Role, RoleChange, User, VaultInfo, VaultSettings, BASE,
};
use vmvault_server::SystemClock;

/// The answer as `T`, checked to write back to exactly what the server sent. No content
/// (204) is `()`, as the client reads it.
fn typed<T: DeserializeOwned + Serialize>(what: &str, a: &Answer) -> T {
    let body = if a.status == 204 {
        assert_eq!(a.body, Value::String(String::new()), "{what}");
        Value::Null
    } else {
        a.body.clone()
    };
    let t: T =
        serde_json::from_value(body.clone()).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert_eq!(
        serde_json::to_value(&t).unwrap(),
        body,
        "{what}: written back, the answer differs"
    );
    t
}

struct Client<'a> {
    s: &'a Server,
    token: String,
}

impl Client<'_> {
    /// `method path` with `body` (a request type), expecting `status`; the answer as `T`.
    fn call<T: DeserializeOwned + Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&dyn erased::Body>,
        status: u16,
    ) -> T {
        let body = body.map(|b| b.json());
        let a = self
            .s
            .call(Some(&self.token), method, &format!("{BASE}{path}"), body);
        assert_eq!(a.status, status, "{method} {path}: {}", a.body);
        typed(&format!("{method} {path}"), &a)
    }

    fn get<T: DeserializeOwned + Serialize>(&self, path: &str) -> T {
        self.call("GET", path, None, 200)
    }
}

/// A request body of any API type, as the JSON a client sends.
mod erased {
    pub trait Body {
        fn json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Body for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

fn wait(c: &Client, id: i64) -> JobDetail {
    for _ in 0..600 {
        let d: JobDetail = c.get(&jobs::job_path(id));
        if d.job.ended() {
            return d;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("job {id} did not end");
}

#[test]
fn every_answer_reads_into_its_type_and_writes_back_unchanged() {
    let s = Server::start(Arc::new(SystemClock));
    let second = s.independent_admin("second");
    let c = Client {
        s: &s,
        token: s.admin.clone(),
    };

    let all: Vec<VaultInfo> = c.get(vaults::COLLECTION);
    let vault = vaults::vault_path(&all[0].name).unwrap();
    let _: VaultInfo = c.get(&vault);

    let policy = Policy {
        name: "daily".into(),
        schedule: "daily 02:00".into(),
        timezone: "Europe/Berlin".into(),
        keep_last: 0,
        keep_hourly: 0,
        keep_daily: 7,
        keep_weekly: 4,
        keep_monthly: 0,
        keep_yearly: 0,
    };
    let p: Policy = c.call("POST", policies::COLLECTION, Some(&policy), 201);
    assert_eq!(p, policy);
    let path = policies::policy_path("daily").unwrap();
    assert_eq!(c.get::<Policy>(&path), policy);
    let longer = Policy {
        keep_daily: 14,
        ..policy.clone()
    };
    let _: Policy = c.call("PUT", &path, Some(&longer), 200);
    assert_eq!(c.get::<Vec<Policy>>(policies::COLLECTION), vec![longer]);

    let protect = ProtectRequest {
        description: s.vm("web01", 2),
        policy: "daily".into(),
    };
    let item: Item = c.call("POST", items::COLLECTION, Some(&protect), 201);
    assert_eq!(c.get::<Item>(&items::item_path("web01").unwrap()), item);
    assert_eq!(c.get::<Vec<Item>>(items::COLLECTION), vec![item]);

    let backup = items::backup_path("web01").unwrap();
    let mut made = Vec::new();
    for keep_until in [None, Some("2999-01-01".to_string())] {
        let r: JobRef = c.call("POST", &backup, Some(&BackupRequest { keep_until }), 202);
        let d = wait(&c, r.job);
        assert_eq!(d.job.state, JobState::Succeeded, "{d:?}");
        assert!(d.job.rate.is_some() && !d.log.is_empty(), "{d:?}");
        made.push(d.job.point.unwrap());
    }
    let q = JobQuery {
        state: Some(JobState::Succeeded),
        limit: Some(1),
        before: None,
    };
    let page: Vec<Job> = c.get(&jobs::list_path(&q).unwrap());
    assert_eq!(page.len(), 1);
    // A state the server does not know is refused as before the states were an enum: 400,
    // naming the ones it knows.
    let q = JobQuery {
        state: Some(JobState::Unknown("paused".into())),
        ..JobQuery::default()
    };
    let e: ErrorBody = c.call("GET", &jobs::list_path(&q).unwrap(), None, 400);
    assert_eq!(
        e.error.message,
        "'paused' is not a job state (queued, running, succeeded, failed, cancelled)"
    );

    // Two pages of one point each: the cursor goes back as the server gave it.
    let mut q = PointQuery {
        item: Some("web01".into()),
        limit: Some(1),
        cursor: None,
        deleted: false,
    };
    let first: PointPage = c.get(&points::list_path(&q).unwrap());
    q.cursor = first.next_cursor.clone();
    assert!(q.cursor.is_some(), "{first:?}");
    let second_page: PointPage = c.get(&points::list_path(&q).unwrap());
    let ids: Vec<&str> = [&first, &second_page]
        .iter()
        .flat_map(|p| p.items.iter().map(|r| r.id.as_str()))
        .collect();
    assert_eq!(ids, made);
    assert_eq!(second_page.next_cursor, None);
    let row = &first.items[0];
    let m: vmvault_format::Manifest = row.read_manifest().unwrap();
    assert_eq!(m.id.to_hex(), row.id);
    // A point named by its time: `:` and `+` go encoded and arrive as they were.
    let at = m.time.replace('Z', "+00:00");
    let named: PointRow = c.get(&points::point_path(&format!("web01@{at}")).unwrap());
    assert_eq!(named.id, row.id);

    let point = points::point_path(&row.id).unwrap();
    let d: Deleted = c.call("DELETE", &point, None, 200);
    assert_eq!(d.id, row.id);
    let q = PointQuery {
        deleted: true,
        ..PointQuery::default()
    };
    let gone: PointPage = c.get(&points::list_path(&q).unwrap());
    assert_eq!(gone.items.len(), 1);
    let back: PointRow = c.call("POST", &points::undelete_path(&row.id).unwrap(), None, 200);
    assert_eq!(back.deleted_at, None);

    let restore = RestoreRequest {
        point: "web01@latest".into(),
        target: s.path("restored").display().to_string(),
        overwrite: false,
        disk: Some("disk0".into()),
        format: Some("qcow2".into()),
        host: None,
    };
    let r: JobRef = c.call("POST", points::RESTORES, Some(&restore), 202);
    assert_eq!(wait(&c, r.job).job.state, JobState::Succeeded);
    // A job that ended cannot be cancelled: the error shape, typed.
    let e: ErrorBody = c.call("POST", &jobs::cancel_path(r.job), None, 409);
    assert_eq!(e.error.code, "conflict");
    // One that has not ended can: queued or running, whichever it is by then.
    let r: JobRef = c.call("POST", &backup, Some(&BackupRequest::default()), 202);
    let cancel = jobs::cancel_path(r.job);
    let a = s.call(Some(&c.token), "POST", &format!("{BASE}{cancel}"), None);
    if a.status == 200 {
        let _: Cancelled = typed("cancel", &a);
    } else {
        assert_eq!(a.status, 409, "{}", a.body);
        let _: ErrorBody = typed("cancel", &a);
    }
    wait(&c, r.job);

    // A user whose name a path must encode (`@`).
    let name = "ops@example.org";
    let new = NewUser {
        name: name.into(),
        role: Role::Reader,
    };
    let t: NewToken = c.call("POST", users::COLLECTION, Some(&new), 201);
    assert_eq!(t.user, name);
    let tokens = users::tokens_path(name).unwrap();
    let _: NewToken = c.call("POST", &tokens, None, 201);
    let change = RoleChange {
        role: Role::Operator,
    };
    let u: User = c.call("PUT", &users::role_path(name).unwrap(), Some(&change), 200);
    assert_eq!(u.roles, vec![("default".to_string(), Role::Operator)]);
    assert!(c.get::<Vec<User>>(users::COLLECTION).contains(&u));
    let () = c.call("DELETE", &tokens, None, 204);

    let q = AuditQuery {
        limit: Some(3),
        before: None,
    };
    let log: Vec<AuditEntry> = c.get(&audit::list_path(&q).unwrap());
    assert_eq!(log.len(), 3);

    // Multi-user authorization: the 202 error shape (with a token, when one is minted), the
    // requests, and a second admin's decision.
    let mua = VaultSettings {
        soft_delete_days: None,
        require_approval: Some(true),
    };
    let v: VaultInfo = c.call("PATCH", &vault, Some(&mua), 200);
    assert!(v.require_approval);
    let pending: ErrorBody = c.call("DELETE", &point, None, 202);
    assert_eq!(pending.error.code, "approval_required");
    let id = pending.error.approval.expect("the approval request");
    let admin = NewUser {
        name: "third".into(),
        role: Role::Admin,
    };
    let minted: ErrorBody = c.call("POST", users::COLLECTION, Some(&admin), 202);
    assert!(minted.error.token.is_some(), "{minted:?}");
    let waiting: Vec<Approval> = c.get(approvals::COLLECTION);
    assert_eq!(waiting.len(), 2);
    let by_second = Client {
        s: &s,
        token: second,
    };
    let decided: Approval = by_second.call(
        "POST",
        &approvals::approval_path(id),
        Some(&Decision { approve: true }),
        200,
    );
    assert_eq!(decided.state, ApprovalState::Approved);

    let locked: VaultInfo = c.call("POST", &vaults::lock_path(&all[0].name).unwrap(), None, 200);
    assert!(locked.locked_at.is_some());
}

/// A name with characters a path would misread is one segment: the server is asked for
/// the resource of that whole name, never for another one its pieces would spell.
#[test]
fn a_name_reaches_the_resource_it_names() {
    let s = Server::start(Arc::new(SystemClock));
    let c = Client {
        s: &s,
        token: s.admin.clone(),
    };
    s.policy("daily", "daily 02:00", serde_json::json!({}));
    for name in [
        "daily/../../vaults/default",
        "daily?x=1",
        "daily#x",
        "daily 2",
        "100%",
        "%64aily",
    ] {
        let path = policies::policy_path(name).unwrap();
        let e: ErrorBody = c.call("GET", &path, None, 404);
        assert_eq!(e.error.message, format!("no policy '{name}'"), "{path}");
    }
    // A name of dots would be a step in the path: the server makes no such policy, and
    // the client builds no such path.
    for name in [".", ".."] {
        let p = Policy {
            name: name.into(),
            schedule: "hourly".into(),
            timezone: "UTC".into(),
            keep_last: 1,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
        };
        let e: ErrorBody = c.call("POST", policies::COLLECTION, Some(&p), 400);
        assert!(e.error.message.contains("not a policy name"), "{e:?}");
        assert!(policies::policy_path(name).is_err());
    }
    let body: Value = serde_json::json!({"name": "..", "role": "reader"});
    let a = s.admin("POST", &format!("{BASE}{}", users::COLLECTION), Some(body));
    assert_eq!(a.status, 400, "{}", a.body);
}
