//! Issue 13's scale figure: one server with 200 simulated host agents heartbeating every
//! 10 s and 1,000 protected VMs. Goals: a due job reaches its agent within 2 s; the idle
//! server uses under 5% of a core and under 200 MiB.
//!
//! It starts the real `vmvault server` binary over TLS (agents talk TLS only) with a fresh
//! state dir and vault, adds and enrolls AGENTS hosts (each agent its own key and state dir,
//! as `vmvault agent enroll` makes them), each reporting VMS/AGENTS running VMs of one raw
//! disk in its heartbeat, and protects every VM under one `daily 02:00` policy (so the
//! scheduler queues nothing during the run). Each agent then runs as the real one does: one
//! client (one connection pool) shared by a heartbeat thread (every `every_secs` the server
//! answers, 10 s here) and a thread that long-polls `jobs/next?wait=20`. After a warm-up it
//! measures the server process's CPU (utime + stime) and memory while only heartbeats and
//! polls happen, then queues on-demand backups of random VMs one at a time and times each
//! until its agent's poll returned it (the agent then fails the job with its lease, so it
//! ends).
//!
//! `cargo run -p vmvault-server --example agents_bench -- PATH/TO/vmvault [AGENTS=200] [VMS=1000]`

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use vmvault_agent::client::Client;
use vmvault_agent::AgentState;
use vmvault_api::agent::{
    job_path, AgentJob, FailReport, FoundDisk, FoundVm, Heartbeat, HeartbeatAnswer, HEARTBEAT,
    NEXT_JOB,
};

const PASS: &str = "bench passphrase";
const HEARTBEAT_SECS: u64 = 10;
const POLL_WAIT_SECS: u64 = 20;
const WARMUP: Duration = Duration::from_secs(20);
const WINDOW: Duration = Duration::from_secs(60);
const TRIALS: usize = 20;

/// The admin's side trusts the server's certificate by its fingerprint, as the CLI does.
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if vmvault_agent::client::fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the server's certificate".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The admin's API client (bearer token over TLS).
struct Admin {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Admin {
    fn new(url: &str, fingerprint: &str, token: String) -> Admin {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                fingerprint: fingerprint.to_string(),
                provider,
            }))
            .with_no_client_auth();
        Admin {
            agent: ureq::AgentBuilder::new()
                .tls_config(Arc::new(config))
                .build(),
            base: url.trim_end_matches('/').to_string(),
            token,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let r = match &body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        match r {
            Ok(resp) if resp.status() == 204 => Value::Null,
            Ok(resp) => resp.into_json().unwrap(),
            Err(ureq::Error::Status(s, resp)) => panic!(
                "{method} {path}: {s} {}",
                resp.into_string().unwrap_or_default()
            ),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
}

/// A small xorshift: which VMs get a backup, and the pauses between them.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).unwrap();
        Rng(u64::from_le_bytes(b) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The server process's CPU time so far, in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it are fixed.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The whole machine's busy and total jiffies (/proc/stat's first line).
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    (total - idle, total)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The heartbeat of agent `i`: its VMs, running, one raw disk each.
fn heartbeat(i: usize, vms: &[String]) -> Heartbeat {
    Heartbeat {
        version: env!("CARGO_PKG_VERSION").into(),
        target: vmvault_release::this_target(),
        rolled_back: None,
        instance: format!("bench-{i}"),
        vms: vms
            .iter()
            .map(|name| FoundVm {
                name: name.clone(),
                kind: "qemu".into(),
                state: "running".into(),
                qmp: Some(format!("/run/vmvault/qmp/{name}.sock")),
                qga: None,
                disks: vec![FoundDisk {
                    name: "os".into(),
                    file: Some(format!("/var/lib/vms/{name}/os.raw")),
                    format: "raw".into(),
                    size: 20 << 30,
                }],
            })
            .collect(),
    }
}

/// What the agents' threads count, and the jobs their polls returned.
#[derive(Default)]
struct Counts {
    heartbeats: AtomicU64,
    heartbeat_errors: AtomicU64,
    polls: AtomicU64,
    poll_errors: AtomicU64,
    /// Microseconds of heartbeat round trips, summed, and the longest.
    heartbeat_us: AtomicU64,
    heartbeat_max_us: AtomicU64,
    /// Job id -> when the poll returned it, and which agent got it.
    taken: Mutex<HashMap<i64, (Instant, usize, String)>>,
    taken_cv: Condvar,
    /// Every error, with when it came (seconds since the agents started).
    errors: Mutex<Vec<(f64, String)>>,
}

impl Counts {
    fn error(&self, since: Instant, what: String) {
        self.errors
            .lock()
            .unwrap()
            .push((since.elapsed().as_secs_f64(), what));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .expect("give the path of the vmvault binary")
        .clone();
    let agents: usize = args.get(2).map_or(200, |s| s.parse().unwrap());
    let vm_count: usize = args.get(3).map_or(1_000, |s| s.parse().unwrap());
    assert!(
        agents > 0 && vm_count >= agents,
        "at least one VM per agent"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "agent_heartbeat_secs = {HEARTBEAT_SECS}\n\
             # A job its agent fails stays failed: no retry comes back during the run.\n\
             backup_attempts = 1\n"
        ),
    )
    .unwrap();

    // The server, over TLS, on a port of its choosing.
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--no-own-host",
            "--config",
        ])
        .arg(&config)
        .env("VMVAULT_SERVER_STATE", dir.path().join("state"))
        .env("VMVAULT_VAULT", dir.path().join("vault"))
        .env("VMVAULT_PASSWORD", PASS)
        .env_remove("VMVAULT_SERVER_LISTEN")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut url, mut fingerprint) = (String::new(), String::new());
    while url.is_empty() || fingerprint.is_empty() {
        let Some(Ok(line)) = lines.next() else {
            panic!("the server stopped before listening");
        };
        if let Some(u) = line.strip_prefix("vmvault server: listening on ") {
            url = u.to_string();
        }
        if let Some(f) = line.strip_prefix("vmvault server: certificate fingerprint (SHA-256) ") {
            fingerprint = f.to_string();
        }
    }
    let start_secs = started.elapsed().as_secs_f64();
    // Its log, kept: what it said during the run is shown if it says anything odd.
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
    }
    assert!(url.starts_with("https://"), "{url}");
    let token = std::fs::read_to_string(dir.path().join("state/admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let admin = Admin::new(&url, &fingerprint, token);
    eprintln!("server at {url} (pid {pid}), ready in {start_secs:.2} s");

    // Hosts, enrolled agents, and their first heartbeats (so that their VMs are known).
    let t = Instant::now();
    let mut clients = Vec::new();
    let mut vm_names: Vec<(usize, String)> = Vec::new();
    for i in 0..agents {
        let host = format!("kvm{i:03}");
        let code = admin.call("POST", "/api/v1/hosts", Some(json!({ "name": host })));
        let state = AgentState::open(&dir.path().join("agents").join(&host)).unwrap();
        let pins = vmvault_agent::enroll(
            &state,
            &url,
            code["code"].as_str().unwrap(),
            Some(&fingerprint),
        )
        .unwrap();
        let client = Client::new(&url, &state.identity().unwrap(), Some(pins.fingerprint)).unwrap();
        // VMs spread evenly: agent i has every AGENTS-th.
        let vms: Vec<String> = (i..vm_count)
            .step_by(agents)
            .map(|v| format!("{host}-vm{v:04}"))
            .collect();
        let a: HeartbeatAnswer = client.post(HEARTBEAT, None, &heartbeat(i, &vms)).unwrap();
        assert_eq!(a.every_secs, HEARTBEAT_SECS);
        vm_names.extend(vms.iter().map(|v| (i, v.clone())));
        clients.push((host, Arc::new(client), vms));
    }
    let enroll_secs = t.elapsed().as_secs_f64();
    eprintln!("{agents} agents enrolled and heard from in {enroll_secs:.1} s");
    let t = Instant::now();
    admin.call(
        "POST",
        "/api/v1/policies",
        Some(json!({"name": "daily", "schedule": "daily 02:00", "keep_last": 7})),
    );
    for (i, vm) in &vm_names {
        admin.call(
            "POST",
            &format!("/api/v1/hosts/{}/vms/{vm}/protect", clients[*i].0),
            Some(json!({"policy": "daily"})),
        );
    }
    let protect_secs = t.elapsed().as_secs_f64();
    eprintln!("{} VMs protected in {protect_secs:.1} s", vm_names.len());

    // The agents: a heartbeat thread (spread over the first interval, as agents started at
    // different times are) and a long-poll thread each, sharing the agent's client.
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    for (i, (_, client, vms)) in clients.iter().enumerate() {
        let hb = heartbeat(i, vms);
        let (c, n, stop2) = (client.clone(), counts.clone(), stop.clone());
        let offset = Duration::from_millis(HEARTBEAT_SECS * 1000 * i as u64 / agents as u64);
        std::thread::spawn(move || {
            let mut due = Instant::now() + offset;
            while !stop2.load(Ordering::Relaxed) {
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let t = Instant::now();
                match c.post::<HeartbeatAnswer>(HEARTBEAT, None, &hb) {
                    Ok(a) => {
                        let us = t.elapsed().as_micros() as u64;
                        n.heartbeats.fetch_add(1, Ordering::Relaxed);
                        n.heartbeat_us.fetch_add(us, Ordering::Relaxed);
                        n.heartbeat_max_us.fetch_max(us, Ordering::Relaxed);
                        // As the real agent: the pause starts once the answer is in.
                        due = Instant::now() + Duration::from_secs(a.every_secs.clamp(1, 3600));
                    }
                    Err(e) => {
                        n.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                        n.error(began, format!("{i} heartbeat: {e}"));
                        // As the real agent: again in 5 s.
                        due = Instant::now() + Duration::from_secs(5);
                    }
                }
            }
        });
        let (c, n, stop2) = (client.clone(), counts.clone(), stop.clone());
        // The first poll is shorter, so that the polls' ends are spread too.
        let first = 1 + POLL_WAIT_SECS * i as u64 / agents as u64;
        std::thread::spawn(move || {
            let mut path = format!("{NEXT_JOB}?wait={first}");
            while !stop2.load(Ordering::Relaxed) {
                let r = c.get::<AgentJob>(&path, None);
                path = format!("{NEXT_JOB}?wait={POLL_WAIT_SECS}");
                match r {
                    Ok(Some(job)) => {
                        let got = Instant::now();
                        n.polls.fetch_add(1, Ordering::Relaxed);
                        n.taken
                            .lock()
                            .unwrap()
                            .insert(job.id, (got, i, job.vm.clone()));
                        n.taken_cv.notify_all();
                        let fail = FailReport {
                            error: "agents_bench: a simulated agent backs nothing up".into(),
                        };
                        if let Err(e) = c.tell(&job_path(job.id, "fail"), Some(&job.lease), &fail) {
                            n.error(began, format!("{i} fail {}: {e}", job.id));
                        }
                    }
                    Ok(None) => {
                        n.polls.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        n.poll_errors.fetch_add(1, Ordering::Relaxed);
                        n.error(began, format!("{i} poll: {e}"));
                        // As the real agent (crates/agent/src/run.rs): a pause, then again.
                        std::thread::sleep(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    // Idle: only heartbeats and polls.
    eprintln!("warming up for {} s", WARMUP.as_secs());
    std::thread::sleep(WARMUP);
    let hz = clock_ticks_per_sec();
    let (hb0, hbe0, p0, pe0, hbus0) = (
        counts.heartbeats.load(Ordering::Relaxed),
        counts.heartbeat_errors.load(Ordering::Relaxed),
        counts.polls.load(Ordering::Relaxed),
        counts.poll_errors.load(Ordering::Relaxed),
        counts.heartbeat_us.load(Ordering::Relaxed),
    );
    counts.heartbeat_max_us.store(0, Ordering::Relaxed);
    let (cpu0, self0, m0, t0) = (
        cpu_ticks(pid),
        cpu_ticks(std::process::id()),
        machine_ticks(),
        Instant::now(),
    );
    eprintln!("measuring the idle server for {} s", WINDOW.as_secs());
    // The share of each 10 s, to show whether it is steady.
    let mut slices = Vec::new();
    let mut last = (cpu0, Instant::now());
    while t0.elapsed() < WINDOW {
        std::thread::sleep(Duration::from_secs(10).min(WINDOW.saturating_sub(t0.elapsed())));
        let (c, now) = (cpu_ticks(pid), Instant::now());
        slices.push((c - last.0) as f64 / hz / now.duration_since(last.1).as_secs_f64() * 100.0);
        last = (c, now);
    }
    let secs = t0.elapsed().as_secs_f64();
    let (cpu1, self1, m1) = (
        cpu_ticks(pid),
        cpu_ticks(std::process::id()),
        machine_ticks(),
    );
    let server_cpu = (cpu1 - cpu0) as f64 / hz / secs * 100.0;
    let bench_cpu = (self1 - self0) as f64 / hz / secs * 100.0;
    let machine_busy = (m1.0 - m0.0) as f64 / (m1.1 - m0.1) as f64 * 100.0;
    let rss = status_kib(pid, "VmRSS:") as f64 / 1024.0;
    let hwm = status_kib(pid, "VmHWM:") as f64 / 1024.0;
    let threads = status_kib(pid, "Threads:");
    let heartbeats = counts.heartbeats.load(Ordering::Relaxed) - hb0;
    let heartbeat_errors = counts.heartbeat_errors.load(Ordering::Relaxed) - hbe0;
    let polls = counts.polls.load(Ordering::Relaxed) - p0;
    let poll_errors = counts.poll_errors.load(Ordering::Relaxed) - pe0;
    let heartbeat_ms = if heartbeats > 0 {
        (counts.heartbeat_us.load(Ordering::Relaxed) - hbus0) as f64 / heartbeats as f64 / 1000.0
    } else {
        0.0
    };
    let heartbeat_max_ms = counts.heartbeat_max_us.load(Ordering::Relaxed) as f64 / 1000.0;

    // Due jobs: on-demand backups of random VMs, one at a time, at random moments.
    let mut rng = Rng::new();
    let mut order: Vec<usize> = (0..vm_names.len()).collect();
    for k in (1..order.len()).rev() {
        order.swap(k, rng.below(k as u64 + 1) as usize);
    }
    let trials_began = began.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut queue_ms = Vec::new();
    for &k in order.iter().take(TRIALS.min(order.len())) {
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        let (agent, vm) = &vm_names[k];
        let sent = Instant::now();
        let job = admin.call(
            "POST",
            &format!("/api/v1/protected-items/{vm}/backup"),
            Some(json!({})),
        );
        let answered = Instant::now();
        let id = job["job"].as_i64().unwrap();
        let taken = counts.taken.lock().unwrap();
        let (taken, _) = counts
            .taken_cv
            .wait_timeout_while(taken, Duration::from_secs(60), |m| !m.contains_key(&id))
            .unwrap();
        let Some((got, by, got_vm)) = taken.get(&id).cloned() else {
            panic!("job {id} ({vm}) reached no agent in 60 s");
        };
        drop(taken);
        assert_eq!(
            (by, &got_vm),
            (*agent, vm),
            "job {id} went to the wrong agent"
        );
        latencies.push(got.duration_since(sent).as_secs_f64() * 1000.0);
        queue_ms.push(answered.duration_since(sent).as_secs_f64() * 1000.0);
        // The job ends (failed by its agent) before the next one.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let j = admin.call("GET", &format!("/api/v1/jobs/{id}"), None);
            if j["state"] == "failed" {
                break;
            }
            assert!(Instant::now() < until, "job {id} never ended: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let rss_after = status_kib(pid, "VmRSS:") as f64 / 1024.0;
    stop.store(true, Ordering::Relaxed);
    // Before the server goes: its end breaks every poll.
    let errors = counts.errors.lock().unwrap().clone();
    let _ = child.kill();
    let _ = child.wait();

    let lat_median = median(&latencies);
    let lat_max = latencies.iter().copied().fold(0.0, f64::max);
    let q_median = median(&queue_ms);
    let trial_errors = errors.iter().filter(|(t, _)| *t >= trials_began).count();
    let log = log.lock().unwrap().clone();
    let profile = if bin.contains("/release/") {
        "release"
    } else if bin.contains("/debug/") {
        "debug"
    } else {
        "?"
    };

    println!(
        "{agents} agents (heartbeat every {HEARTBEAT_SECS} s, poll wait {POLL_WAIT_SECS} s), {} protected VMs, {profile} server",
        vm_names.len()
    );
    println!("setup: server ready {start_secs:.2} s, enroll + first heartbeats {enroll_secs:.1} s, protect {protect_secs:.1} s");
    println!("| what | figure | goal |");
    println!("|---|---:|---:|");
    println!("| idle server CPU over {secs:.0} s (% of one core) | {server_cpu:.2}% | < 5% |");
    println!(
        "| its 10 s slices | {} | |",
        slices
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("| idle resident memory (VmRSS) | {rss:.1} MiB | < 200 MiB |");
    println!("| peak resident memory (VmHWM) | {hwm:.1} MiB | |");
    println!(
        "| due job to its agent, median of {} | {lat_median:.1} ms | < 2000 ms |",
        latencies.len()
    );
    println!("| due job to its agent, max | {lat_max:.1} ms | < 2000 ms |");
    println!("| POST .../backup answered, median | {q_median:.1} ms | |");
    println!(
        "| heartbeats in the window ({:.1}/s), mean / max round trip | {heartbeats}, {heartbeat_ms:.1} / {heartbeat_max_ms:.1} ms | |",
        heartbeats as f64 / secs
    );
    println!("| polls ended in the window | {polls} | |");
    println!("| errors in the window (heartbeat, poll) | {heartbeat_errors}, {poll_errors} | 0 |");
    println!("| server threads | {threads} | |");
    println!(
        "| machine load in the window: all CPUs busy, this bench's own CPU | {machine_busy:.1}% of {} cores, {bench_cpu:.1}% of a core | |",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| agents' errors over the whole run (during the jobs) | {} ({trial_errors}) | 0 |",
        errors.len()
    );
    for (t, e) in errors.iter().take(10) {
        println!("  at {t:.1} s: agent {e}");
    }
    let odd: Vec<&String> = log
        .iter()
        .filter(|l| !l.contains("listening on") && !l.contains("fingerprint"))
        .take(10)
        .collect();
    if !odd.is_empty() {
        println!("server log during the run (first 10 lines):");
        for l in odd {
            println!("  {l}");
        }
    }
    println!(
        "{}",
        json!({
            "bench": "agents",
            "profile": profile,
            "agents": agents,
            "vms": vm_names.len(),
            "heartbeat_secs": HEARTBEAT_SECS,
            "poll_wait_secs": POLL_WAIT_SECS,
            "server_start_s": start_secs,
            "enroll_s": enroll_secs,
            "protect_s": protect_secs,
            "idle_window_s": secs,
            "idle_cpu_pct": server_cpu,
            "idle_cpu_slices_pct": slices,
            "idle_rss_mib": rss,
            "peak_rss_mib": hwm,
            "rss_after_jobs_mib": rss_after,
            "job_latency_ms": latencies,
            "job_latency_median_ms": lat_median,
            "job_latency_max_ms": lat_max,
            "backup_post_median_ms": q_median,
            "heartbeats": heartbeats,
            "heartbeat_mean_ms": heartbeat_ms,
            "heartbeat_max_ms": heartbeat_max_ms,
            "heartbeat_errors": heartbeat_errors,
            "polls": polls,
            "poll_errors": poll_errors,
            "errors_whole_run": errors.len(),
            "errors_during_jobs": trial_errors,
            "server_threads": threads,
            "machine_busy_pct": machine_busy,
            "bench_cpu_pct": bench_cpu,
            "goals_met": {
                "cpu_under_5pct": server_cpu < 5.0,
                "rss_under_200mib": rss < 200.0,
                "job_within_2s": lat_max < 2000.0,
            },
        })
    );
    // The agents' threads may be in a long poll: they end with the process.
    std::process::exit(0);
}
