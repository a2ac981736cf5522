//! The server's speed figures (docs/benchmarks.md, "Server"): a vault with 10,000 recovery
//! points of 1,000 VMs, the real `vmvault server` binary on it, then
//! - the start (catalog rebuilt from the vault's manifests),
//! - API listings: a first page, one VM's points, every page of all 10,000,
//! - the server's resident memory once idle.
//!
//! `cargo run -p vmvault-server --example bench -- PATH/TO/vmvault [POINTS] [VMS]`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmvault_format::{Consistency, Manifest, PointId, TransferStats, VmConfig, MANIFEST_VERSION};
use vmvault_store::{CreateOptions, LocalBackend, Regions, Vault, WriteBackend};

const PASS: &str = "bench passphrase";

fn manifest(vm: &str, i: usize) -> Manifest {
    let t = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap()
        + chrono::Duration::hours(i as i64);
    Manifest {
        version: MANIFEST_VERSION,
        id: PointId::generate(),
        vm: vm.into(),
        time: t
            .to_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        source: "image".into(),
        consistency: Consistency::Crash,
        consistency_reason: "bench".into(),
        host: "bench".into(),
        program: "vmvault bench".into(),
        chunk_size: 1 << 20,
        vm_config: VmConfig {
            name: vm.into(),
            cpus: 2,
            memory_mib: 2048,
            firmware: "uefi".into(),
            disks: vec![],
            nics: vec![],
        },
        disks: vec![],
        stats: TransferStats::default(),
        retention: Default::default(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time_get(agent: &ureq::Agent, url: &str, token: &str, runs: usize) -> (f64, f64) {
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let body = agent
            .get(url)
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes = body.len();
    }
    (median(times), bytes as f64)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .expect("give the path of the vmvault binary")
        .clone();
    let points: usize = args.get(2).map_or(10_000, |s| s.parse().unwrap());
    let vms: usize = args.get(3).map_or(1_000, |s| s.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let vault_dir = dir.path().join("vault");
    std::fs::create_dir_all(&vault_dir).unwrap();
    let backend: Arc<dyn WriteBackend> = Arc::new(LocalBackend::new(&vault_dir));
    let vault = Vault::create(
        Regions::single(backend),
        CreateOptions {
            passphrase: Some(PASS.as_bytes().to_vec()),
            ..Default::default()
        },
    )
    .unwrap();
    let t = Instant::now();
    for i in 0..points {
        vault
            .save_manifest(&manifest(&format!("vm{:04}", i % vms), i))
            .unwrap();
    }
    vault.backend().sync().unwrap();
    eprintln!(
        "wrote {points} manifests of {vms} VMs in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args([
            "server",
            "--insecure-http",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("VMVAULT_SERVER_STATE", dir.path().join("state"))
        .env("VMVAULT_VAULT", &vault_dir)
        .env("VMVAULT_PASSWORD", PASS)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("listening on") {
            break;
        }
    }
    let start_secs = started.elapsed().as_secs_f64();
    std::thread::spawn(move || for _ in lines {});
    let token = std::fs::read_to_string(dir.path().join("state/admin-token")).unwrap();
    let token = token.trim();
    let base = format!("http://127.0.0.1:{port}/api/v1");
    let agent = ureq::AgentBuilder::new().build();
    let (first, first_bytes) = time_get(
        &agent,
        &format!("{base}/recovery-points?limit=100"),
        token,
        21,
    );
    let (one_vm, _) = time_get(
        &agent,
        &format!("{base}/recovery-points?item=vm0500"),
        token,
        21,
    );
    // One page of the listing: how many points it held, and the cursor of the next.
    let page = |cursor: &str| -> (usize, Option<String>) {
        let mut url = format!("{base}/recovery-points?limit=1000");
        if !cursor.is_empty() {
            url += &format!("&cursor={}", cursor.replace(':', "%3A"));
        }
        let v: serde_json::Value = agent
            .get(&url)
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        let n = v["items"].as_array().unwrap().len();
        (n, v["next_cursor"].as_str().map(str::to_string))
    };
    let (deep, _) = {
        // A page deep in the listing: the cursor of point 9,000.
        let mut cursor = String::new();
        let mut n = 0;
        while n < points * 9 / 10 {
            let (got, next) = page(&cursor);
            n += got;
            cursor = next.unwrap_or_default();
        }
        time_get(
            &agent,
            &format!(
                "{base}/recovery-points?limit=100&cursor={}",
                cursor.replace(':', "%3A")
            ),
            token,
            21,
        )
    };
    let walk = {
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let mut cursor = String::new();
            let mut n = 0;
            loop {
                let (got, next) = page(&cursor);
                n += got;
                match next {
                    Some(c) => cursor = c,
                    None => break,
                }
            }
            assert_eq!(n, points);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        median(times)
    };
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_kib(child.id(), "VmRSS:");
    let hwm = rss_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    println!("points {points}, VMs {vms}");
    println!("server start (catalog rebuilt from the vault): {start_secs:.2} s");
    println!(
        "first page (100 points, {:.0} KiB): median {first:.1} ms",
        first_bytes / 1024.0
    );
    println!(
        "one VM's points ({} points): median {one_vm:.1} ms",
        points / vms
    );
    println!(
        "a page at point {} (100 points): median {deep:.1} ms",
        points * 9 / 10
    );
    println!("every page (limit 1000) of all {points}: median {walk:.0} ms");
    println!(
        "idle RSS: {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}
