//! A newer server may send a job or approval state this CLI does not know. It is not an
//! error: the tables show the word, `--json` prints it as the server sent it, and `--wait`
//! ends when the server gives the job an end time (a failure, with the server's reason),
//! instead of waiting forever. The server here is a stand-in that answers with such states.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, Out};
use serde_json::{json, Value};

fn job(id: i64, state: &str, ended: Option<&str>, error: Option<&str>) -> Value {
    json!({
        "id": id, "kind": "backup", "item": "web01", "state": state, "attempt": 0,
        "created": "2031-05-01T02:00:00.000Z", "started": "2031-05-01T02:00:01.000Z",
        "ended": ended, "error": error, "bytes_done": 1024, "bytes_total": 4096,
        "rate": null, "eta_secs": null, "point": null, "requested_by": "admin",
        "error_code": null,
    })
}

/// Answers `METHOD PATH` (under /api/v1) with the JSON given for it, on a loopback port;
/// anything else is 404. Returns the server's URL.
fn stand_in(routes: HashMap<String, (u16, Value)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut length = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap();
                    }
                }
            }
            r.read_exact(&mut vec![0; length]).unwrap();
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap(), words.next().unwrap());
            let key = format!("{method} {}", path.trim_start_matches("/api/v1"));
            let (status, body) = routes
                .get(&key)
                .cloned()
                .unwrap_or((404, json!({"error": {"code": "not_found", "message": key}})));
            let body = body.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// The CLI against `url`; a run past 30 s (waiting forever) fails the test.
fn cli(env: &Env, url: &str, args: &[&str]) -> Out {
    let mut all = vec!["--server", url, "--token", "vmv_test"];
    all.extend_from_slice(args);
    let mut child = env
        .command(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("vmvault {args:?} still runs after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    common::out(child.wait_with_output().unwrap())
}

#[test]
fn states_this_cli_does_not_know_are_shown_not_refused() {
    let env = Env::new();
    let jobs = json!([
        job(
            2,
            "expired",
            Some("2031-05-01T03:00:00.000Z"),
            Some("its window closed")
        ),
        job(1, "paused", None, None),
    ]);
    let approvals = json!([{
        "id": 1, "action": "point.delete", "target": "web01@0123abcd", "requested_by": "ops",
        "requested_at": "2031-05-01T02:00:00.000Z", "state": "withdrawn",
        "decided_by": null, "decided_at": null,
    }]);
    let detail = |j: &Value| {
        let mut d = j.clone();
        d["log"] = json!([{"time": "2031-05-01T02:00:01.000Z", "line": "reading disk0"}]);
        d
    };
    let routes: HashMap<String, (u16, Value)> = [
        ("GET /jobs?limit=50", (200, jobs.clone())),
        ("GET /jobs/1", (200, detail(&jobs[1]))),
        ("GET /jobs/2", (200, detail(&jobs[0]))),
        (
            "POST /jobs/1/cancel",
            (200, json!({"id": 1, "state": "pausing"})),
        ),
        ("GET /approvals", (200, approvals.clone())),
        (
            "POST /protected-items/web01/backup",
            (202, json!({"job": 2})),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let url = stand_in(routes);
    let ok = |args: &[&str]| {
        let o = cli(&env, &url, args);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        o
    };

    let table = ok(&["jobs"]).stdout;
    assert!(
        table.contains("expired") && table.contains("paused"),
        "{table}"
    );
    assert_eq!(ok(&["--json", "jobs"]).json(), jobs);
    let shown = ok(&["job", "show", "1"]).stdout;
    assert!(shown.contains("state        paused"), "{shown}");
    assert_eq!(ok(&["--json", "job", "show", "2"]).json(), detail(&jobs[0]));
    assert!(ok(&["job", "cancel", "1"])
        .stdout
        .contains("job 1: pausing"));
    assert!(ok(&["approval", "list"]).stdout.contains("withdrawn"));
    assert_eq!(ok(&["--json", "approval", "list"]).json(), approvals);

    // Waiting: the job is over (it has an end time) in a state that is not success.
    let o = cli(&env, &url, &["backup", "web01", "--wait"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr
            .lines()
            .last()
            .is_some_and(|l| l == "vmvault: error: job 2 expired: its window closed"),
        "{}",
        o.stderr
    );
}
