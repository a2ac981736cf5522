//! What a host agent's credential can never do (docs/design.md, "What an agent credential
//! allows, and never allows" and "Each \"can never\" and the test that proves it"), tried
//! through the real API over real TLS by a hostile agent: a `RawAgent` with its own key,
//! enrolled with a one-time code, that reports made-up VMs and writes the agent protocol by
//! hand. No QEMU is needed: the VMs are a name and a 4 MiB raw disk whose content the test
//! makes up, and the first test shows that a well-behaved run of that kind makes points that
//! restore, so that the others attack a path known to work.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmvault_api::agent::{
    base_path, disk_path, job_path, put_frame, EnrollRequest, ENROLL, RAW, ZSTD,
};
use vmvault_engine::{restore_disk, NoProgress, RestoreOptions};
use vmvault_format::{Manifest, PointId};
use vmvault_server::{Clock, ManualClock, ServerConfig, SystemClock};

use common::raw_agent::{
    add_host, chunk, commit_request, fake_vm, user_http, KeptAlive, RawAgent, Reply,
};
use common::Server;

const MIB: usize = 1 << 20;
/// Every fake VM's one disk: 4 chunks at the vault's 1 MiB.
const DISK: usize = 4 * MIB;

/// A TLS server whose failed backups are not retried (each attack is one job), and a policy.
fn start() -> Server {
    start_with(Arc::new(SystemClock), |_| {})
}

fn start_with(clock: Arc<dyn Clock>, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let s = Server::start_with(clock, |c| {
        c.insecure_http = false;
        c.backup_attempts = 1;
        tweak(c)
    });
    // A schedule that never comes due while a test runs, not even on a clock a test moves
    // a day on: the only jobs are the ones the tests queue.
    let day = (chrono::Utc::now() + chrono::Duration::days(3)).format("%a");
    let weekly = format!("weekly {} 02:00", day.to_string().to_lowercase());
    s.policy("weekly", &weekly, json!({}));
    s
}

/// A disk's content: chunk 1 all zeros, the others text that differs by `seed` and chunk.
fn data(seed: &str) -> Vec<u8> {
    let mut d = vec![0u8; DISK];
    for (i, c) in d.chunks_mut(MIB).enumerate() {
        if i == 1 {
            continue;
        }
        for (j, block) in c.chunks_mut(4096).enumerate() {
            let tag = format!("{seed} chunk {i} block {j} ");
            for (k, b) in block.iter_mut().enumerate() {
                *b = tag.as_bytes()[k % tag.len()];
            }
        }
    }
    d
}

/// Content no test stores otherwise.
fn fresh(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out[..len / 2]);
    for (i, b) in out[len / 2..].iter_mut().enumerate() {
        *b = seed.as_bytes()[i % seed.len()];
    }
    out
}

fn protect(s: &Server, host: &str, vm: &str) {
    s.ok(
        &s.admin.clone(),
        "POST",
        &format!("/api/v1/hosts/{host}/vms/{vm}/protect"),
        Some(json!({"policy": "weekly"})),
    );
}

/// An agent enrolled as `host` that reported `vms`, each protected.
fn host_with(s: &Server, host: &str, vms: &[&str]) -> RawAgent {
    let a = RawAgent::enrolled(s, host);
    let found: Vec<_> = vms.iter().map(|v| fake_vm(v, DISK as u64)).collect();
    a.heartbeat(&found).ok("heartbeat");
    for vm in vms {
        protect(s, host, vm);
    }
    a
}

/// Queues an on-demand backup; its job's id.
fn queue(s: &Server, vm: &str) -> i64 {
    let j = s.ok(
        &s.admin.clone(),
        "POST",
        &format!("/api/v1/protected-items/{vm}/backup"),
        Some(json!({})),
    );
    j["job"].as_i64().unwrap()
}

fn job_of(s: &Server, id: i64) -> Value {
    s.ok(&s.admin.clone(), "GET", &format!("/api/v1/jobs/{id}"), None)
}

fn job_log(j: &Value) -> String {
    j["log"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|x| x["line"].as_str().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// A backup of `vm` by `agent`, well behaved from end to end; its point's id.
fn good_backup(s: &Server, agent: &RawAgent, vm: &str, d: &[u8], claim: &[u64]) -> String {
    let id = queue(s, vm);
    let job = agent.take_job();
    assert_eq!(job.id, id);
    let point = agent.backup(&job, d, claim);
    let j = s.wait_job(id);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["point"], point.as_str());
    point
}

/// The vault's points, as its storage holds them.
fn points(s: &Server) -> Vec<Manifest> {
    s.app.vault.points().unwrap().0
}

fn manifest(s: &Server, point: &str) -> Manifest {
    points(s)
        .into_iter()
        .find(|m| m.id.to_hex() == point)
        .unwrap_or_else(|| panic!("no point {point}"))
}

fn restored(s: &Server, point: &str) -> Vec<u8> {
    let m = manifest(s, point);
    let out = s.path(&format!("restored-{point}.raw"));
    let opts = RestoreOptions {
        overwrite: true,
        format: Some("raw".into()),
        ..RestoreOptions::default()
    };
    restore_disk(&s.app.vault, &m, &m.disks[0], &out, &opts, &NoProgress).unwrap();
    std::fs::read(out).unwrap()
}

/// The chunk ids of a point's first disk.
fn index_ids(s: &Server, point: &str) -> Vec<vmvault_format::Digest> {
    let m = manifest(s, point);
    let d = &m.disks[0];
    s.app.vault.load_index(&d.index, d.size).unwrap().chunks
}

fn vault_dir(s: &Server) -> std::path::PathBuf {
    s.dir.path().join("state").join("vault")
}

/// Every file below `dir` (by path relative to it) with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let name = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(name, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The vault's chunk objects, name and bytes (the local store keeps them under
/// `chunks/XX/NAME`).
fn chunk_files(s: &Server) -> BTreeMap<String, Vec<u8>> {
    files(&vault_dir(s).join("chunks"))
}

fn audit(s: &Server) -> Vec<Value> {
    s.ok(&s.admin.clone(), "GET", "/api/v1/audit?limit=1000", None)
        .as_array()
        .unwrap()
        .clone()
}

fn host_state(s: &Server, host: &str) -> String {
    let hosts = s.ok(&s.admin.clone(), "GET", "/api/v1/hosts", None);
    hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host)
        .map(|h| h["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no host {host}: {hosts}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not happen in 30 s");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn zstd_frame(content: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(content, 3).unwrap()
}

fn refused(r: &Reply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
}

#[test]
fn a_well_behaved_raw_agent_makes_points_that_restore() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let d1 = data("first");
    let p1 = good_backup(&s, &a, "web-a", &d1, &[]);
    let m = manifest(&s, &p1);
    assert_eq!(m.vm, "web-a");
    assert_eq!(m.host, "a");
    assert_eq!(m.disks[0].stats.chunks_new, 3, "{:?}", m.disks[0].stats);
    assert_eq!(m.disks[0].stats.chunks_zero, 1);
    assert!(restored(&s, &p1) == d1, "the point is the data sent");

    // Incremental: chunks 0 and 3 (and the zero chunk 1) claimed from the base, 2 sent anew.
    let mut d2 = d1.clone();
    d2[2 * MIB..3 * MIB].copy_from_slice(&fresh("changed", MIB));
    let p2 = good_backup(&s, &a, "web-a", &d2, &[0, 1, 3]);
    let m2 = manifest(&s, &p2);
    assert_eq!(m2.host, "a");
    let st = m2.disks[0].stats;
    assert_eq!(
        (st.chunks_new, st.chunks_reused, st.chunks_zero),
        (1, 2, 1),
        "{st:?}"
    );
    assert!(
        restored(&s, &p2) == d2,
        "the incremental point is the new data"
    );
    assert!(restored(&s, &p1) == d1);
}

/// The right proof for `code` (ID-SECRET) and `public`, as `vmvault_agent::enroll` makes it,
/// or one from another secret.
fn enroll_request(s: &Server, code: &str, public: &[u8; 32], wrong: bool) -> EnrollRequest {
    let (id, secret) = code.split_once('-').unwrap();
    let secret = if wrong {
        "WRONGWRONGWRONGWRONGWRONG0".to_string()
    } else {
        secret.to_string()
    };
    let verifier = blake3::derive_key("vmvault host enrollment 1", secret.as_bytes());
    let mut h = blake3::Hasher::new_keyed(&verifier);
    h.update(b"agent");
    h.update(s.fingerprint().as_bytes());
    h.update(id.as_bytes());
    h.update(public);
    EnrollRequest {
        id: id.to_string(),
        public_key: hex::encode(public),
        version: vmvault_agent::VERSION.into(),
        proof: hex::encode(h.finalize().as_bytes()),
    }
}

/// Audit lines of enrollment refusals for the code `id`.
fn enroll_refusals(s: &Server, id: &str) -> Vec<String> {
    audit(s)
        .into_iter()
        .filter(|e| e["action"] == "host.enroll" && e["target"] == id)
        .map(|e| e["outcome"].as_str().unwrap().to_string())
        .filter(|o| o.starts_with("denied: "))
        .collect()
}

#[test]
fn a_code_enrolls_once_and_never_after_it_expires() {
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let s = start_with(clock.clone(), |_| {});

    // Once: a second key with the same code is refused, and the host keeps the first key.
    let code = add_host(&s, "c1");
    let first = RawAgent::new(&s, "c1");
    first.enroll(&code).unwrap();
    let second = RawAgent::new(&s, "c1");
    let err = second.enroll(&code).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let id1 = code.split_once('-').unwrap().0;
    let why = enroll_refusals(&s, id1);
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].contains("no enrollment code has that id"), "{why:?}");
    first.heartbeat(&[]).ok("the enrolled key works");
    refused(&second.heartbeat(&[]), 401, "the second key is no host's");

    // Until its expiry on the server's clock, and never after.
    let before = add_host(&s, "c2");
    let after = add_host(&s, "c3");
    clock.advance(chrono::Duration::minutes(59));
    RawAgent::new(&s, "c2").enroll(&before).unwrap();
    clock.advance(chrono::Duration::minutes(2));
    let late = RawAgent::new(&s, "c3");
    let err = late.enroll(&after).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let id3 = after.split_once('-').unwrap().0;
    let why = enroll_refusals(&s, id3);
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].contains("expired"), "{why:?}");
    assert_eq!(host_state(&s, "c3"), "pending");

    // Wrong proofs: each refused and audited; five void the code, even for the right proof.
    let code = add_host(&s, "c4");
    let id4 = code.split_once('-').unwrap().0;
    let guesser = RawAgent::new(&s, "c4");
    for i in 0..6 {
        let req = enroll_request(&s, &code, &guesser.public_key(), true);
        refused(
            &guesser.post(ENROLL, None, &req),
            401,
            &format!("wrong proof {i}"),
        );
    }
    let right = enroll_request(&s, &code, &guesser.public_key(), false);
    refused(
        &guesser.post(ENROLL, None, &right),
        401,
        "the right proof after five wrong ones",
    );
    let err = guesser.enroll(&code).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let why = enroll_refusals(&s, id4);
    assert_eq!(why.len(), 8, "{why:?}");
    let wrong = why.iter().filter(|w| w.contains("is wrong")).count();
    let void = why.iter().filter(|w| w.contains("voided")).count();
    assert_eq!((wrong, void), (5, 3), "{why:?}");
    assert_eq!(host_state(&s, "c4"), "pending");
    refused(&guesser.heartbeat(&[]), 401, "no key enrolled");

    // An id that is no code's is refused and audited too, but the record of it is bounded:
    // anyone with any key may send one, as long as they like.
    let junk = format!("{}\n{}", "X".repeat(100_000), "forged line");
    let req = EnrollRequest {
        id: junk,
        ..enroll_request(&s, &code, &guesser.public_key(), true)
    };
    refused(&guesser.post(ENROLL, None, &req), 401, "a junk id");
    let last = audit(&s)
        .into_iter()
        .find(|e| e["action"] == "host.enroll")
        .unwrap();
    let target = last["target"].as_str().unwrap();
    assert!(
        last["outcome"]
            .as_str()
            .unwrap()
            .contains("no enrollment code"),
        "{last}"
    );
    assert!(target.starts_with("XXXX"), "{target}");
    assert!(
        target.len() <= 64 && !target.contains('\n'),
        "{} chars",
        target.len()
    );

    // A new code for the pending host is a new count; the voided one stays void.
    let fresh_code = add_host(&s, "c4");
    let err = RawAgent::new(&s, "c4").enroll(&code).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    guesser.enroll(&fresh_code).unwrap();
    assert_eq!(host_state(&s, "c4"), "enrolled");
}

/// A plausible value for each parameter of an OpenAPI path, taken from the segment before it.
fn fill(path: &str, v: &BTreeMap<&str, String>) -> String {
    let mut out = Vec::new();
    let mut prev = "";
    for seg in path.split('/') {
        if seg.starts_with('{') {
            let val = v
                .get(seg)
                .or_else(|| v.get(prev))
                .cloned()
                .unwrap_or_else(|| panic!("no value for {seg} after {prev} in {path}"));
            out.push(val);
        } else {
            out.push(seg.to_string());
            prev = seg;
        }
    }
    out.join("/")
}

#[test]
fn no_user_route_takes_a_host_credential_and_no_agent_route_takes_a_token() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let b = host_with(&s, "b", &["web-b"]);
    let pa = good_backup(&s, &a, "web-a", &data("a"), &[]);
    // A running job of b's, begun, for the agent routes.
    let bid = queue(&s, "web-b");
    let bjob = b.take_job();
    b.begin(&bjob, &[("disk0", DISK as u64)]);
    let user = user_http(&s.fingerprint());

    // The document is open, also over an agent's connection.
    let doc = a.get("/openapi.json", None).ok("openapi");
    let mut values = BTreeMap::new();
    values.insert("vaults", "default".to_string());
    values.insert("users", "admin".to_string());
    values.insert("policies", "weekly".to_string());
    values.insert("protected-items", "web-a".to_string());
    values.insert("recovery-points", pa.clone());
    values.insert("jobs", bid.to_string());
    values.insert("approvals", "1".to_string());
    values.insert("hosts", "b".to_string());
    values.insert("vms", "web-b".to_string());
    values.insert("base", "0".to_string());
    values.insert("disks", "0".to_string());
    values.insert("{disk}", "0".to_string());
    values.insert("{position}", "0".to_string());
    values.insert("{version}", vmvault_agent::VERSION.to_string());
    let (mut users, mut agents) = (Vec::new(), Vec::new());
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let method = method.to_ascii_uppercase();
            if !matches!(method.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
                continue;
            }
            let url = fill(path, &values);
            if path.starts_with("/api/v1/agent/") {
                agents.push((method, url));
            } else if path != "/api/v1/openapi.json" && path != "/metrics" {
                users.push((method, url));
            }
        }
    }
    let walked: Vec<String> = users.iter().map(|(m, u)| format!("{m} {u}")).collect();
    for must in [
        format!("DELETE /api/v1/recovery-points/{pa}"),
        format!("POST /api/v1/jobs/{bid}/cancel"),
        "POST /api/v1/hosts/b/vms/web-b/protect".to_string(),
        "POST /api/v1/protected-items/web-a/backup".to_string(),
        "DELETE /api/v1/hosts/b".to_string(),
        "PATCH /api/v1/vaults/default".to_string(),
        "DELETE /api/v1/policies/weekly".to_string(),
        "POST /api/v1/users".to_string(),
    ] {
        assert!(
            walked.contains(&must),
            "{must} is not in the walk: {walked:?}"
        );
    }
    assert!(agents.len() >= 12, "{agents:?}");

    // Every user route over a's connection, with a's certificate and no token: 401.
    for (method, url) in &users {
        let body =
            (method != "GET" && method != "DELETE").then_some(("application/json", &b"{}"[..]));
        let r = a.request(method, url, Some(&bjob.lease), body);
        assert_eq!(
            r.status,
            401,
            "{method} {url} over an agent's connection: {}",
            r.text()
        );
    }
    // A path no route has is refused before routing too (nothing of the API's shape shows).
    refused(
        &a.request("GET", "/api/v1/nothing-here", None, None),
        401,
        "an unknown path",
    );

    // Every agent route with the admin's token and no certificate (and b's lease): 401.
    for (method, url) in &agents {
        let mut r = user
            .request(method, &format!("{}{url}", s.base))
            .set("Authorization", &format!("Bearer {}", s.admin))
            .set(vmvault_api::agent::LEASE_HEADER, &bjob.lease);
        r = r.set("Content-Type", "application/json");
        let res = if method == "GET" {
            r.call()
        } else {
            r.send_bytes(b"{}")
        };
        let status = match res {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        assert_eq!(
            status, 401,
            "{method} {url} with a token and no certificate"
        );
    }

    // Nothing of it took effect: b is enrolled, a's point is there, b's job still runs and
    // can still make its point.
    assert_eq!(host_state(&s, "b"), "enrolled");
    assert!(points(&s).iter().any(|m| m.id.to_hex() == pa));
    assert_eq!(job_of(&s, bid)["state"], "running");
    let d = data("b");
    let mut body = Vec::new();
    for p in [0u64, 2, 3] {
        let c = chunk(&d, MIB, p);
        put_frame(&mut body, p, ZSTD, c.len() as u32, &zstd_frame(c));
    }
    b.zero(&bjob, 0, &[(1, 1)]).ok("zero");
    b.chunks(&bjob, 0, &body).ok("chunks");
    let pb = b.commit(&bjob, &commit_request("web-b")).ok("commit");
    assert_eq!(s.wait_job(bid)["state"], "succeeded");
    assert!(restored(&s, pb["point"].as_str().unwrap()) == d);
}

/// Every job route, called by `agent` on `job` with `lease`: the answers.
fn every_job_route(agent: &RawAgent, job: i64, lease: &str) -> Vec<(String, Reply)> {
    let l = Some(lease);
    let d = fresh("intruder", MIB);
    let mut frame = Vec::new();
    put_frame(&mut frame, 0, ZSTD, MIB as u32, &zstd_frame(&d));
    vec![
        (
            "begin".into(),
            agent.post(
                &job_path(job, "begin"),
                l,
                &json!({"disks": [{"name": "disk0", "size": DISK, "format": "raw"}]}),
            ),
        ),
        ("base".into(), agent.get(&base_path(job, 0), l)),
        (
            "reuse".into(),
            agent.post(&disk_path(job, 0, "reuse"), l, &json!({"claims": []})),
        ),
        (
            "chunks".into(),
            agent.post_bytes(&disk_path(job, 0, "chunks"), l, &frame),
        ),
        (
            "zero".into(),
            agent.post(&disk_path(job, 0, "zero"), l, &json!({"runs": [[1, 1]]})),
        ),
        (
            "commit".into(),
            agent.post(&job_path(job, "commit"), l, &commit_request("web-b")),
        ),
        (
            "progress".into(),
            agent.post(
                &job_path(job, "progress"),
                l,
                &json!({"stage": "x", "done": 0, "total": 1}),
            ),
        ),
        (
            "log".into(),
            agent.post(&job_path(job, "log"), l, &json!({"line": "hijacked"})),
        ),
        (
            "restore".into(),
            agent.get(&vmvault_api::agent::restore_path(job), l),
        ),
        (
            "restore chunk".into(),
            agent.get(&vmvault_api::agent::restore_chunk_path(job, 0, 0), l),
        ),
        (
            "done".into(),
            agent.post(&job_path(job, "done"), l, &json!({"wrote": ["hijacked"]})),
        ),
        (
            "fail".into(),
            agent.post(&job_path(job, "fail"), l, &json!({"error": "hijacked"})),
        ),
    ]
}

/// Queues a restore of `point` on `host`'s agent; the job's id.
fn queue_restore(s: &Server, point: &str, host: &str) -> i64 {
    let j = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/restores",
        Some(json!({"point": point, "target": "/restores/vm", "host": host})),
    );
    j["job"].as_i64().unwrap()
}

#[test]
fn host_a_can_never_work_on_host_bs_job() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let b = host_with(&s, "b", &["web-b"]);
    let bid = queue(&s, "web-b");
    let bjob = b.take_job();

    // Before b begins (a begin would take the job over) and after.
    let mut tried = 0;
    for round in ["leased", "begun"] {
        for (route, r) in every_job_route(&a, bjob.id, &bjob.lease) {
            assert_eq!(
                r.status,
                403,
                "{round}: a's {route} on b's job: {}",
                r.text()
            );
            tried += 1;
        }
        if round == "leased" {
            b.begin(&bjob, &[("disk0", DISK as u64)]);
        }
    }
    let denied = |job: i64| {
        let target = job.to_string();
        audit(&s)
            .into_iter()
            .filter(|e| {
                e["user"] == "host:a"
                    && e["target"].as_str() == Some(target.as_str())
                    && e["outcome"] == "denied: not this host's job"
            })
            .count()
    };
    assert_eq!(denied(bid), tried, "each attempt is audited");
    assert!(!job_log(&job_of(&s, bid)).contains("hijacked"));

    // b's job is untouched: it still commits, with b's data only.
    let d = data("b");
    let mut body = Vec::new();
    for p in [0u64, 2, 3] {
        let c = chunk(&d, MIB, p);
        put_frame(&mut body, p, ZSTD, c.len() as u32, &zstd_frame(c));
    }
    b.zero(&bjob, 0, &[(1, 1)]).ok("zero");
    b.chunks(&bjob, 0, &body).ok("chunks");
    let pb = b.commit(&bjob, &commit_request("web-b")).ok("commit");
    let pb = pb["point"].as_str().unwrap().to_string();
    assert_eq!(s.wait_job(bid)["state"], "succeeded");
    assert_eq!(manifest(&s, &pb).host, "b");
    assert!(restored(&s, &pb) == d);

    // Nor on b's restore: neither its point's plan nor its chunks, nor its end.
    let rid = queue_restore(&s, &pb, "b");
    let rjob = b.take_job();
    assert_eq!(rjob.id, rid);
    let mut tried = 0;
    for (route, r) in every_job_route(&a, rid, &rjob.lease) {
        assert_eq!(r.status, 403, "a's {route} on b's restore: {}", r.text());
        assert!(
            !contains(&r.body, pb.as_bytes()),
            "a's {route} heard b's point"
        );
        tried += 1;
    }
    assert_eq!(denied(rid), tried, "each attempt is audited");
    assert_eq!(job_of(&s, rid)["state"], "running");
    let plan = b
        .get(&vmvault_api::agent::restore_path(rid), Some(&rjob.lease))
        .ok("b's plan");
    assert_eq!(plan["manifest"]["id"], pb.as_str());
    b.post(
        &job_path(rid, "done"),
        Some(&rjob.lease),
        &json!({"wrote": ["/restores/vm"]}),
    )
    .ok("done");
    assert_eq!(s.wait_job(rid)["state"], "succeeded");

    // a's heartbeat listing b's VMs as its own gives it no job of theirs.
    a.heartbeat(&[fake_vm("web-a", DISK as u64), fake_vm("web-b", DISK as u64)])
        .ok("heartbeat");
    let bid2 = queue(&s, "web-b");
    assert!(a.take_job_within(2).is_none(), "a took a job of b's VM");
    let again = b.take_job();
    assert_eq!(again.id, bid2, "the job was there, for b");
}

#[test]
fn an_agent_can_never_claim_a_chunk_it_did_not_send() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let b = host_with(&s, "b", &["web-b"]);
    let pa = good_backup(&s, &a, "web-a", &data("a"), &[]);
    let pb = good_backup(&s, &b, "web-b", &data("b"), &[]);
    let b_ids = index_ids(&s, &pb);
    let indexes = files(&vault_dir(&s).join("indexes"));

    // (what is claimed at position 0, what the audit and the job say)
    let a_base = index_ids(&s, &pa);
    let cases = [
        ("another position's id of the base", a_base[2].to_hex()),
        ("b's point's id at that position", b_ids[0].to_hex()),
        ("an id no index has", hex::encode([7u8; 32])),
    ];
    for (what, id) in cases {
        let jid = queue(&s, "web-a");
        let job = a.take_job();
        a.begin(&job, &[("disk0", DISK as u64)]);
        let base = a.base_ids(&job, 0);
        assert_eq!(base.len(), 4);
        assert_eq!(base[2], a_base[2].0);
        let r = a.reuse(&job, 0, &[(0, id.clone())]);
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        let j = s.wait_job(jid);
        assert_eq!(j["state"], "failed", "{what}: {j}");
        assert!(
            j["error"]
                .as_str()
                .unwrap()
                .contains("claimed a chunk at position 0"),
            "{what}: {j}"
        );
        let target = jid.to_string();
        let audited = audit(&s).into_iter().any(|e| {
            e["action"] == "agent.reuse"
                && e["target"].as_str() == Some(target.as_str())
                && e["outcome"]
                    .as_str()
                    .unwrap()
                    .contains("claimed a chunk at position 0")
        });
        assert!(audited, "{what}: the refusal is audited");
        // The job is over for this lease.
        refused(&a.reuse(&job, 0, &[(3, a_base[3].to_hex())]), 409, what);
    }
    assert_eq!(points(&s).len(), 2, "no new point");
    assert_eq!(
        files(&vault_dir(&s).join("indexes")),
        indexes,
        "no index was written"
    );
    // The right claim still works: a's own id at its own position.
    let d = data("a");
    let p = good_backup(&s, &a, "web-a", &d, &[0, 1, 2, 3]);
    assert!(restored(&s, &p) == d);
}

#[test]
fn a_forged_or_hostile_chunk_is_never_stored() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let d = data("a");
    good_backup(&s, &a, "web-a", &d, &[]);
    let before = chunk_files(&s);
    assert_eq!(before.len(), 3);

    let new = fresh("hostile", MIB);
    let held = chunk(&d, MIB, 0).to_vec();
    let frame = |pos: u64, compression: u8, plain: u32, body: &[u8]| {
        let mut b = Vec::new();
        put_frame(&mut b, pos, compression, plain, body);
        b
    };
    let m = MIB as u32;
    let two_frames = [zstd_frame(&new[..MIB / 2]), zstd_frame(&new[MIB / 2..])].concat();
    let good = frame(0, ZSTD, m, &zstd_frame(&new));
    let mut padded = good.clone();
    padded[9] = 1;
    let mut many = Vec::new();
    for i in 0..33u64 {
        put_frame(&mut many, i % 4, RAW, m, &new);
    }
    // (what, body, the job error's words)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a plain_len one short",
            frame(0, ZSTD, m - 1, &zstd_frame(&new[..MIB - 1])),
            "says",
        ),
        (
            "a plain_len one long",
            frame(0, RAW, m + 1, &[new.clone(), vec![1]].concat()),
            "says",
        ),
        (
            "zstd that decompresses to more",
            frame(
                0,
                ZSTD,
                m,
                &zstd_frame(&[new.clone(), vec![9; 4096]].concat()),
            ),
            "not one zstd frame",
        ),
        (
            "zstd that decompresses to less",
            frame(0, ZSTD, m, &zstd_frame(&new[..MIB - 4096])),
            "not one zstd frame",
        ),
        (
            "two zstd frames that make the length together",
            frame(0, ZSTD, m, &two_frames),
            "not one zstd frame",
        ),
        (
            "zstd and trailing bytes",
            frame(0, ZSTD, m, &[zstd_frame(&new), vec![0; 3]].concat()),
            "not one zstd frame",
        ),
        (
            "a raw body one short",
            frame(0, RAW, m, &new[..MIB - 1]),
            "wrong length",
        ),
        (
            "a raw body of another length than said",
            frame(0, RAW, m, &[new.clone(), vec![1]].concat()),
            "wrong length",
        ),
        (
            "an unknown encoding",
            frame(0, 7, m, &new),
            "unknown encoding",
        ),
        (
            "a position past the disk",
            frame(4, ZSTD, m, &zstd_frame(&new)),
            "past the end",
        ),
        (
            "the last position there could be",
            frame(u64::MAX, ZSTD, m, &zstd_frame(&new)),
            "past the end",
        ),
        (
            "a frame cut short",
            good[..good.len() - 1].to_vec(),
            "cut short",
        ),
        ("a header cut short", good[..12].to_vec(), "cut short"),
        ("nonzero padding", padded, "cut short or malformed"),
        ("33 frames", many, "at most 32"),
        (
            "a chunk the vault holds, then a hostile one",
            [
                frame(0, ZSTD, m, &zstd_frame(&held)),
                frame(2, ZSTD, m, &zstd_frame(&new[..MIB - 1])),
            ]
            .concat(),
            "not one zstd frame",
        ),
    ];
    for (what, body, words) in cases {
        let jid = queue(&s, "web-a");
        let job = a.take_job();
        a.begin(&job, &[("disk0", DISK as u64)]);
        let r = a.chunks(&job, 0, &body);
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        let j = s.wait_job(jid);
        assert_eq!(j["state"], "failed", "{what}: {j}");
        let error = j["error"].as_str().unwrap_or("");
        assert!(error.contains(words), "{what}: {error}");
        assert!(chunk_files(&s) == before, "{what}: a chunk was stored");
    }

    // A body over the upload limit is refused before the handler sees it (413); the job
    // itself goes on, and no chunk is stored.
    let jid = queue(&s, "web-a");
    let job = a.take_job();
    a.begin(&job, &[("disk0", DISK as u64)]);
    let limit = vmvault_api::agent::MAX_UPLOAD
        + vmvault_api::agent::MAX_FRAMES * vmvault_api::agent::FRAME_HEADER;
    let mut big = Vec::new();
    for i in 0..=(limit / MIB) as u64 {
        put_frame(&mut big, i % 4, RAW, m, &new);
    }
    assert!(big.len() > limit);
    let r = a.chunks(&job, 0, &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(job_of(&s, jid)["state"], "running");
    assert!(
        chunk_files(&s) == before,
        "an oversized upload stored a chunk"
    );
    a.post(
        &job_path(job.id, "fail"),
        Some(&job.lease),
        &json!({"error": "giving up"}),
    )
    .ok("fail");
    assert_eq!(s.wait_job(jid)["state"], "failed");
    assert_eq!(points(&s).len(), 1);
}

#[test]
fn an_agent_can_never_overwrite_a_chunk_or_name_a_point() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let _b = host_with(&s, "b", &["web-b"]);
    let d = data("a");
    good_backup(&s, &a, "web-a", &d, &[]);
    let before = chunk_files(&s);

    let jid = queue(&s, "web-a");
    let job = a.take_job();
    // The begin names no point either.
    let mut begin = json!({"disks": [{"name": "disk0", "size": DISK, "format": "raw"}]});
    begin["point"] = json!(PointId::generate().to_hex());
    refused(
        &a.post(&job_path(job.id, "begin"), Some(&job.lease), &begin),
        400,
        "a begin naming a point",
    );
    let begun = a.begin(&job, &[("disk0", DISK as u64)]);
    // Content the vault holds, sent again (at its own position, and at another): the stored
    // objects keep their bytes (a rewrite would seal anew, under a new nonce).
    let mut body = Vec::new();
    put_frame(
        &mut body,
        0,
        ZSTD,
        MIB as u32,
        &zstd_frame(chunk(&d, MIB, 0)),
    );
    put_frame(&mut body, 3, RAW, MIB as u32, chunk(&d, MIB, 2));
    a.chunks(&job, 0, &body).ok("chunks");
    let mut body = Vec::new();
    put_frame(&mut body, 2, RAW, MIB as u32, chunk(&d, MIB, 2));
    a.chunks(&job, 0, &body).ok("chunks");
    a.zero(&job, 0, &[(1, 1)]).ok("zero");
    assert!(chunk_files(&s) == before, "a held chunk was written again");

    // A commit naming the point, its VM or its host: refused as unknown fields.
    let good = serde_json::to_value(commit_request("web-a")).unwrap();
    for (field, value) in [
        ("id", json!(PointId::generate().to_hex())),
        ("vm", json!("web-b")),
        ("host", json!("b")),
    ] {
        let mut c = good.clone();
        c[field] = value;
        refused(&a.commit(&job, &c), 400, field);
    }
    assert_eq!(job_of(&s, jid)["state"], "running");
    // What the agent does say is its word only where it concerns its own VM: the VM
    // configuration's name is the job's.
    let mut c = commit_request("web-b");
    c.vm_config = c.vm_config.replace("web-a", "web-b");
    let point = a.commit(&job, &c).ok("commit")["point"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        point, begun.point,
        "the point's id is the one the server gave"
    );
    assert_eq!(s.wait_job(jid)["state"], "succeeded");
    let m = manifest(&s, &point);
    assert_eq!((m.vm.as_str(), m.host.as_str()), ("web-a", "a"));
    assert_eq!(m.vm_config.name, "web-a");
    assert!(restored(&s, &point) == [&d[..3 * MIB], chunk(&d, MIB, 2)].concat());
    assert!(chunk_files(&s) == before);
}

#[test]
fn a_revoked_host_is_refused_on_its_open_connection() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let jid = queue(&s, "web-a");
    let job = a.take_job();
    a.begin(&job, &[("disk0", DISK as u64)]);
    let d = data("a");
    let mut body = Vec::new();
    put_frame(
        &mut body,
        0,
        ZSTD,
        MIB as u32,
        &zstd_frame(chunk(&d, MIB, 0)),
    );
    a.chunks(&job, 0, &body).ok("chunks");

    let progress = json!({"stage": "reading", "done": 1, "total": 4});
    let path = RawAgent::api(&job_path(job.id, "progress"));
    let mut conn = KeptAlive::open(&a);
    let r = conn
        .request("POST", &path, Some(&job.lease), Some(&progress))
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text());

    s.ok(&s.admin.clone(), "DELETE", "/api/v1/hosts/a", None);
    assert_eq!(host_state(&s, "a"), "revoked");
    // The next request on the same connection is refused (or finds it closed).
    match conn.request("POST", &path, Some(&job.lease), Some(&progress)) {
        Some(r) => assert_eq!(r.status, 401, "{}", r.text()),
        None => eprintln!("the server closed the revoked host's connection"),
    }
    // A new connection handshakes (any Ed25519 key does) and is refused at its request.
    let mut fresh_conn = KeptAlive::open(&a);
    let r = fresh_conn
        .request(
            "GET",
            &RawAgent::api(vmvault_api::agent::NEXT_JOB),
            None,
            None,
        )
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let client =
        vmvault_agent::client::Client::new(&s.base, &a.identity, Some(s.fingerprint())).unwrap();
    let err = client
        .get_raw(vmvault_api::agent::NEXT_JOB, None)
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");

    // The job ends without a point.
    let j = s.wait_job(jid);
    assert!(
        matches!(j["state"].as_str(), Some("cancelled" | "failed")),
        "{j}"
    );
    assert!(points(&s).is_empty());

    // The old key stays refused, even with a new code for the host's name.
    let code = add_host(&s, "a");
    let old = RawAgent::with_key_of(&s, &a);
    assert_eq!(old.public_key(), a.public_key());
    let err = old.enroll(&code).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert_eq!(host_state(&s, "a"), "pending");

    // The VM's backup lock was released: the host, enrolled again with a new key, backs
    // the same VM up.
    let a2 = RawAgent::new(&s, "a");
    a2.enroll(&code).unwrap();
    a2.heartbeat(&[fake_vm("web-a", DISK as u64)])
        .ok("heartbeat");
    let p = good_backup(&s, &a2, "web-a", &d, &[]);
    assert!(restored(&s, &p) == d);
}

#[test]
fn a_stale_lease_is_refused() {
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let s = start_with(clock.clone(), |c| {
        c.agent_job_silence_secs = 1;
        c.backup_attempts = 2;
        c.retry_backoff_secs = 60;
    });
    let a = host_with(&s, "a", &["web-a"]);
    let jid = queue(&s, "web-a");
    let first = a.take_job();
    a.begin(&first, &[("disk0", DISK as u64)]);

    // The agent goes silent: past the limit (the server's own wall-clock timer), the attempt
    // fails and the job is queued again, on the server's clock.
    wait_for("the silent attempt's failure", || {
        let j = job_of(&s, jid);
        j["state"] == "queued" && j["attempt"] == 1
    });
    assert!(
        job_log(&job_of(&s, jid)).contains("silent"),
        "{}",
        job_log(&job_of(&s, jid))
    );
    refused(
        &a.post(
            &job_path(jid, "progress"),
            Some(&first.lease),
            &json!({"stage": "x", "done": 0, "total": 1}),
        ),
        409,
        "the failed attempt's lease",
    );
    assert!(
        a.take_job_within(0).is_none(),
        "the retry waits for its backoff"
    );
    clock.advance(chrono::Duration::seconds(61));
    let second = a.take_job();
    assert_eq!(second.id, jid);
    assert_ne!(second.lease, first.lease);

    // Every route refuses the old lease (409); the new one works.
    for (route, r) in every_job_route(&a, jid, &first.lease) {
        assert_eq!(r.status, 409, "{route} with the old lease: {}", r.text());
    }
    let d = data("a");
    let p = a.backup(&second, &d, &[]);
    let j = s.wait_job(jid);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(points(&s).len(), 1, "the silent attempt made no point");
    assert!(restored(&s, &p) == d);
}

#[test]
fn an_agent_never_hears_of_other_hosts_vms() {
    let s = start();
    let b = host_with(&s, "kvm-bravo", &["web-bravo", "db-bravo"]);
    let pb = good_backup(&s, &b, "web-bravo", &data("bravo"), &[]);
    let b_ids = index_ids(&s, &pb);
    let b_index = manifest(&s, &pb).disks[0].index;
    // b has a job waiting too.
    queue(&s, "db-bravo");

    let a = host_with(&s, "kvm-alpha", &["web-alpha"]);
    let d = data("alpha");
    assert!(a.take_job_within(1).is_none());
    good_backup(&s, &a, "web-alpha", &d, &[]);
    let mut d2 = d.clone();
    d2[3 * MIB..].copy_from_slice(&fresh("alpha again", MIB));
    let pa2 = good_backup(&s, &a, "web-alpha", &d2, &[0, 1, 2]);
    assert!(restore_by(&s, &a, &pa2) == d2);
    a.heartbeat(&[fake_vm("web-alpha", DISK as u64)])
        .ok("heartbeat");
    // Refusals say nothing of b either.
    refused(
        &a.get(&base_path(999, 0), Some("0")),
        403,
        "a job that does not exist",
    );

    let heard = a.received();
    assert!(heard.len() > 1000, "the record holds the answers");
    assert!(
        contains(&heard, b"web-alpha"),
        "the record holds a's own names"
    );
    let pid: PointId = pb.parse().unwrap();
    let mut never: Vec<(String, Vec<u8>)> = vec![
        ("b's host name".into(), b"kvm-bravo".to_vec()),
        ("b's VM".into(), b"web-bravo".to_vec()),
        ("b's other VM".into(), b"db-bravo".to_vec()),
        ("b's point id".into(), pb.as_bytes().to_vec()),
        ("b's point id, short".into(), pid.short().into_bytes()),
        ("b's index".into(), b_index.to_hex().into_bytes()),
        ("b's index, raw".into(), b_index.0.to_vec()),
    ];
    for (i, id) in b_ids.iter().enumerate() {
        if *id != vmvault_format::Digest::ZERO_CHUNK {
            never.push((format!("b's chunk {i}"), id.0.to_vec()));
            never.push((format!("b's chunk {i}, hex"), id.to_hex().into_bytes()));
        }
    }
    for (what, bytes) in never {
        assert!(!contains(&heard, &bytes), "a heard {what}");
    }
}

#[test]
fn the_agent_never_receives_a_vault_secret() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let d = data("a");
    let p1 = good_backup(&s, &a, "web-a", &d, &[]);
    let mut d2 = d.clone();
    d2[..MIB].copy_from_slice(&fresh("again", MIB));
    let p2 = good_backup(&s, &a, "web-a", &d2, &[1, 2, 3]);
    assert!(restore_by(&s, &a, &p2) == d2);

    let state = s.dir.path().join("state");
    let key_file = std::fs::read(vault_dir(&s).join("keys").join("default")).unwrap();
    let wrapped = vmvault_format::KeyFile::decode(&key_file).unwrap();
    let keys = wrapped.unwrap_keys(b"test passphrase").unwrap();
    // They are the vault's keys: the id key names its chunks.
    let codec = vmvault_format::Codec::encrypted(&keys, 3);
    assert_eq!(codec.digest(chunk(&d, MIB, 0)), index_ids(&s, &p1)[0]);

    let mut secrets: Vec<(&str, Vec<u8>)> = vec![
        ("the passphrase", b"test passphrase".to_vec()),
        ("the key file", key_file.clone()),
        ("the key file's wrapped keys", wrapped.wrapped.to_vec()),
        ("the admin's token", s.admin.as_bytes().to_vec()),
        (
            "the server's TLS key",
            std::fs::read(state.join("tls").join("key.der")).unwrap(),
        ),
    ];
    for (what, key) in [("the data key", keys.data), ("the id key", keys.id)] {
        secrets.push((what, key.to_vec()));
        secrets.push((what, hex::encode(key).into_bytes()));
        secrets.push((what, hex::encode_upper(key).into_bytes()));
    }
    if let Ok(k) = std::fs::read(state.join("release.key")) {
        secrets.push(("the release signing key", k));
    }
    let heard = a.received();
    let kept = files(a.dir.path());
    assert!(
        kept.keys().any(|k| k.ends_with("host.key")),
        "{:?}",
        kept.keys()
    );
    for (what, secret) in &secrets {
        assert!(!contains(&heard, secret), "a received {what}");
        for (name, bytes) in &kept {
            assert!(!contains(bytes, secret), "a's {name} holds {what}");
        }
    }
}

#[test]
fn five_wrong_proofs_void_a_code_even_when_sent_at_once() {
    let s = start();
    let code = add_host(&s, "c5");
    let id = code.split_once('-').unwrap().0.to_string();
    let guessers: Vec<RawAgent> = (0..12).map(|_| RawAgent::new(&s, "c5")).collect();
    // Connected first (the handshakes would spread them out), then all at once.
    for g in &guessers {
        g.get("/openapi.json", None).ok("connecting");
    }
    let go = std::sync::Barrier::new(guessers.len());
    std::thread::scope(|t| {
        for g in &guessers {
            let req = enroll_request(&s, &code, &g.public_key(), true);
            let go = &go;
            t.spawn(move || {
                go.wait();
                refused(&g.post(ENROLL, None, &req), 401, "a wrong proof")
            });
        }
    });
    let why = enroll_refusals(&s, &id);
    assert_eq!(why.len(), 12, "{why:?}");
    let wrong = why.iter().filter(|w| w.contains("is wrong")).count();
    assert!(wrong <= 5, "{wrong} wrong proofs were checked: {why:?}");
    let err = guessers[0].enroll(&code).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert_eq!(host_state(&s, "c5"), "pending");
}

#[test]
fn an_agent_can_never_make_the_server_hold_or_loop_over_more_than_its_disks() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    // The server keeps a job's indexes in memory until its commit: a begin declaring disks
    // of more chunks in all than the largest disk has is refused before anything is
    // reserved (two of the largest: 1 GiB; 64 of them would be 33 GiB).
    let largest = vmvault_format::max_disk_size(MIB as u32);
    let jid = queue(&s, "web-a");
    let job = a.take_job();
    let r = a.post(
        &job_path(job.id, "begin"),
        Some(&job.lease),
        &json!({"disks": [
            {"name": "d0", "size": largest, "format": "raw"},
            {"name": "d1", "size": largest, "format": "raw"},
        ]}),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let j = s.wait_job(jid);
    assert_eq!(j["state"], "failed", "{j}");

    // A zero request covers at most its disk: runs that overlap, each position again and
    // again, would otherwise make one small request loop for hours over a large disk.
    let jid = queue(&s, "web-a");
    let job = a.take_job();
    a.begin(&job, &[("disk0", DISK as u64)]);
    let r = a.zero(&job, 0, &[(0, 4), (0, 4), (0, 4)]);
    assert_eq!(r.status, 403, "{}", r.text());
    let j = s.wait_job(jid);
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("zero"), "{j}");

    // The well-behaved forms still work.
    let d = vec![0u8; DISK];
    let jid = queue(&s, "web-a");
    let job = a.take_job();
    a.begin(&job, &[("disk0", DISK as u64)]);
    a.zero(&job, 0, &[(0, 2), (2, 2)]).ok("zero runs");
    let p = a.commit(&job, &commit_request("web-a")).ok("commit");
    assert_eq!(s.wait_job(jid)["state"], "succeeded");
    assert!(restored(&s, p["point"].as_str().unwrap()) == d);
}

#[test]
fn an_agent_can_never_hold_a_job_past_its_time_limit() {
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let s = start_with(clock.clone(), |_| {});
    let a = host_with(&s, "a", &["web-a"]);
    let jid = queue(&s, "web-a");
    let job = a.take_job();
    a.begin(&job, &[("disk0", DISK as u64)]);
    let alive = json!({"stage": "reading", "done": 0, "total": 1});
    let progress = job_path(job.id, "progress");
    a.post(&progress, Some(&job.lease), &alive).ok("progress");
    // Never silent, but past the 24 hours a job may run (on the server's clock).
    clock.advance(chrono::Duration::hours(23));
    std::thread::sleep(Duration::from_millis(600));
    a.post(&progress, Some(&job.lease), &alive)
        .ok("progress within the limit");
    assert_eq!(job_of(&s, jid)["state"], "running");
    clock.advance(chrono::Duration::hours(2));
    wait_for("the job's end", || {
        let _ = a.post(&progress, Some(&job.lease), &alive);
        job_of(&s, jid)["state"] != "running"
    });
    let j = job_of(&s, jid);
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("24 h"), "{j}");
    refused(
        &a.post(&progress, Some(&job.lease), &alive),
        409,
        "the ended job's lease",
    );
    assert!(points(&s).is_empty());
    // Its lock went with it.
    let d = data("a");
    let p = good_backup(&s, &a, "web-a", &d, &[]);
    assert!(restored(&s, &p) == d);
}

/// The content of one restore frame (the whole answer of a restore chunk route).
fn restore_frame(r: &Reply, len: usize) -> Vec<u8> {
    let frames = vmvault_api::agent::frames(&r.body).expect("one frame");
    assert_eq!(frames.len(), 1);
    let (_, compression, plain, body) = frames[0];
    assert_eq!(plain as usize, len);
    match compression {
        vmvault_api::agent::ZERO => vec![0; len],
        RAW => body.to_vec(),
        ZSTD => zstd::bulk::decompress(body, len).unwrap(),
        c => panic!("compression {c}"),
    }
}

/// A whole restore of `point` (one disk of DISK bytes) by `agent`, read by hand: the data.
fn restore_by(s: &Server, agent: &RawAgent, point: &str) -> Vec<u8> {
    let rid = queue_restore(s, point, &agent.host);
    let job = agent.take_job();
    assert_eq!(job.id, rid);
    agent
        .get(&vmvault_api::agent::restore_path(rid), Some(&job.lease))
        .ok("plan");
    let mut got = Vec::new();
    for pos in 0..(DISK / MIB) as u64 {
        let r = agent.get(
            &vmvault_api::agent::restore_chunk_path(rid, 0, pos),
            Some(&job.lease),
        );
        r.ok("a restore chunk");
        got.extend(restore_frame(&r, MIB));
    }
    agent
        .post(
            &job_path(rid, "done"),
            Some(&job.lease),
            &json!({"wrote": ["/restores/vm"]}),
        )
        .ok("done");
    assert_eq!(s.wait_job(rid)["state"], "succeeded");
    got
}

#[test]
fn an_agent_reads_only_its_restore_jobs_point_while_the_job_runs() {
    let s = start();
    let a = host_with(&s, "a", &["web-a"]);
    let b = host_with(&s, "b", &["web-b"]);
    let d1 = data("first");
    let p1 = good_backup(&s, &a, "web-a", &d1, &[]);
    let d2 = data("second");
    let p2 = good_backup(&s, &a, "web-a", &d2, &[]);
    let pb = good_backup(&s, &b, "web-b", &data("b"), &[]);

    let rid = queue_restore(&s, &p1, "a");
    let job = a.take_job();
    assert_eq!(job.id, rid);
    let plan = a
        .get(&vmvault_api::agent::restore_path(rid), Some(&job.lease))
        .ok("plan");
    assert_eq!(plan["manifest"]["id"], p1.as_str());
    let chunk_at = |disk: usize, pos: u64| {
        a.get(
            &vmvault_api::agent::restore_chunk_path(rid, disk, pos),
            Some(&job.lease),
        )
    };
    // The job's point, and only it: the chunks are p1's, never the newer p2's.
    let mut got = Vec::new();
    for pos in 0..4 {
        let r = chunk_at(0, pos);
        r.ok("a chunk of the job's point");
        got.extend(restore_frame(&r, MIB));
    }
    assert!(got == d1, "the job's point is what is read");
    // Another disk, a position past the end: refused.
    for (disk, pos) in [(1, 0), (0, 4), (0, u64::MAX)] {
        let r = chunk_at(disk, pos);
        assert_eq!(r.status, 404, "disk {disk} position {pos}: {}", r.text());
    }
    refused(
        &a.get(
            &vmvault_api::agent::restore_chunk_path(rid, 0, 0),
            Some("not the lease"),
        ),
        409,
        "another lease",
    );
    a.post(
        &job_path(rid, "done"),
        Some(&job.lease),
        &json!({"wrote": ["/restores/vm"]}),
    )
    .ok("done");
    assert_eq!(s.wait_job(rid)["state"], "succeeded");
    // After the job: nothing.
    refused(&chunk_at(0, 0), 409, "a read after the job ended");
    refused(
        &a.get(&vmvault_api::agent::restore_path(rid), Some(&job.lease)),
        409,
        "the plan after the job ended",
    );
    // Nothing a heard names the other points.
    let heard = a.received();
    assert!(!contains(&heard, pb.as_bytes()), "a heard b's point");
    assert!(
        !contains(&plan.to_string().into_bytes(), p2.as_bytes()),
        "the plan names another point"
    );
}

/// A VM name protected again on another host: the new host's backups never build on the
/// first host's points, so it can claim none of their chunks.
#[test]
fn a_vm_protected_again_on_another_host_gets_no_base_from_the_first() {
    let s = start();
    let a = host_with(&s, "a", &["web01"]);
    good_backup(&s, &a, "web01", &data("a"), &[]);
    s.ok(
        &s.admin.clone(),
        "DELETE",
        "/api/v1/protected-items/web01",
        None,
    );
    let b = host_with(&s, "b", &["web01"]);
    let id = queue(&s, "web01");
    let job = b.take_job();
    assert_eq!(job.id, id);
    let begun = b.begin(&job, &[("disk0", DISK as u64)]);
    assert!(begun.base.is_none(), "b sees no base of a's: {begun:?}");
    let r = b.get(&vmvault_api::agent::base_path(job.id, 0), Some(&job.lease));
    assert_eq!(r.status, 404, "{}", r.text());
}
