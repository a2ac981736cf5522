//! Schedules driven by an injected clock: runs missed while the server was down run once,
//! DST changes in Europe/Berlin, and garbage collection on its own schedule.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use common::Server;
use serde_json::json;
use vmvault_server::ManualClock;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn next_run(s: &Server, item: &str) -> String {
    s.admin("GET", &format!("/api/v1/protected-items/{item}"), None)
        .body["next_run"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn missed_runs_run_once_and_dst_is_followed() {
    let clock = Arc::new(ManualClock::new(utc("2026-03-28T12:00:00Z")));
    // A long tick: the test drives the passes itself.
    let s = Server::start_with(clock.clone(), |c| c.tick_secs = 3600);
    s.policy(
        "nightly",
        "daily 02:30",
        json!({"timezone": "Europe/Berlin", "keep_daily": 7}),
    );
    s.protect("web01", "nightly");
    assert!(s.app.tick().unwrap().is_empty(), "nothing is due yet");
    // 02:30 does not exist in Berlin on 2026-03-29: the run is at 03:00 CEST (01:00 UTC).
    assert_eq!(next_run(&s, "web01"), "2026-03-29T01:00:00.000Z");
    clock.set(utc("2026-03-29T00:59:00Z"));
    assert!(s.app.tick().unwrap().is_empty());
    clock.set(utc("2026-03-29T01:00:00Z"));
    let due = s.app.tick().unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(s.wait_job(due[0])["state"], "succeeded");
    assert_eq!(
        next_run(&s, "web01"),
        "2026-03-30T00:30:00.000Z",
        "02:30 CEST"
    );

    // The server is down for three days: one run stands for the three missed.
    clock.set(utc("2026-04-02T09:00:00Z"));
    let due = s.app.tick().unwrap();
    assert_eq!(due.len(), 1, "missed runs run once");
    let j = s.wait_job(due[0]);
    assert_eq!(j["state"], "succeeded");
    assert!(
        j["log"].as_array().unwrap().iter().any(|l| l["line"]
            .as_str()
            .unwrap()
            .contains("4 scheduled runs were missed")),
        "{j}"
    );
    assert!(s.app.tick().unwrap().is_empty(), "and only once");
    assert_eq!(next_run(&s, "web01"), "2026-04-03T00:30:00.000Z");

    // Autumn: 02:30 happens twice on 2026-10-25; it runs once, at the first.
    clock.set(utc("2026-10-24T12:00:00Z"));
    // (The months since April were missed too: their one run goes first.)
    for id in s.app.tick().unwrap() {
        s.wait_job(id);
    }
    assert_eq!(next_run(&s, "web01"), "2026-10-25T00:30:00.000Z");
    clock.set(utc("2026-10-25T00:30:00Z"));
    let due = s.app.tick().unwrap();
    assert_eq!(due.len(), 1);
    s.wait_job(due[0]);
    clock.set(utc("2026-10-25T01:30:00Z"));
    assert!(
        s.app.tick().unwrap().is_empty(),
        "the second 02:30 does not run again"
    );
    assert_eq!(
        next_run(&s, "web01"),
        "2026-10-26T01:30:00.000Z",
        "02:30 CET"
    );
}

#[test]
fn hourly_retention_is_applied_after_each_backup_and_gc_runs_on_its_schedule() {
    let clock = Arc::new(ManualClock::new(utc("2026-05-01T00:30:00Z")));
    let s = Server::start_with(clock.clone(), |c| {
        c.tick_secs = 3600;
        c.gc_schedule = "daily 04:00".into();
    });
    s.policy("hourly", "hourly", json!({"keep_last": 2, "keep_daily": 0}));
    s.protect("web01", "hourly");
    s.app.tick().unwrap();
    for h in 1..=4 {
        clock.set(utc("2026-05-01T00:00:00Z") + Duration::hours(h));
        let due = s.app.tick().unwrap();
        assert_eq!(due.len(), 1, "hour {h}");
        assert_eq!(s.wait_job(due[0])["state"], "succeeded");
    }
    let points = s
        .admin("GET", "/api/v1/recovery-points?item=web01", None)
        .body;
    assert_eq!(
        points["items"].as_array().unwrap().len(),
        2,
        "keep_last 2 after each backup"
    );
    // The two older points are soft-deleted: their manifests stay for the window.
    assert_eq!(s.app.vault.point_ids().unwrap().len(), 4);
    let deleted = s
        .admin("GET", "/api/v1/recovery-points?deleted=true", None)
        .body;
    assert_eq!(deleted["items"].as_array().unwrap().len(), 2);
    // GC: due at 04:00 UTC; it is queued once and runs.
    clock.set(utc("2026-05-01T04:00:30Z"));
    s.app.tick().unwrap();
    let jobs = s.admin("GET", "/api/v1/jobs", None).body;
    let gc: Vec<_> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "gc")
        .collect();
    assert_eq!(gc.len(), 1, "{jobs}");
    assert_eq!(
        s.wait_job(gc[0]["id"].as_i64().unwrap())["state"],
        "succeeded"
    );
}

#[test]
fn a_vm_without_a_recent_backup_is_alerted_to_a_webhook() {
    use std::io::{BufRead, BufReader, Read, Write};
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/alerts", hook.local_addr().unwrap());
    let got = std::thread::spawn(move || {
        let (mut conn, _) = hook.accept().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut len = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        conn.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    });
    let clock = Arc::new(ManualClock::new(utc("2026-05-01T00:00:00Z")));
    let s = Server::start_with(clock.clone(), |c| {
        c.tick_secs = 3600;
        c.alert_webhooks = vec![url];
    });
    s.policy("daily", "daily 02:00", json!({}));
    s.protect("web01", "daily");
    s.app.tick().unwrap();
    // The VM's disk is gone, so the scheduled backups fail; after a day and an hour past
    // protection without success it is overdue.
    std::fs::remove_file(s.path("web01.raw")).unwrap();
    clock.set(utc("2026-05-02T01:30:00Z"));
    s.app.tick().unwrap();
    let alert = got.join().unwrap();
    assert_eq!(alert["kind"], "overdue", "{alert}");
    assert_eq!(alert["item"], "web01");
    let m = s.call(None, "GET", "/metrics", None).body;
    assert!(m
        .as_str()
        .unwrap()
        .contains("vmvault_recovery_points{vault=\"default\"} 0"));
}

/// A tiny SMTP sink: answers what a client needs and returns the first message's text.
fn smtp_sink() -> (u16, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        c.write_all(b"220 sink ESMTP\r\n").unwrap();
        let mut data = String::new();
        let mut in_data = false;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                return data;
            }
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    c.write_all(b"250 queued\r\n").unwrap();
                } else {
                    data.push_str(&line);
                }
                continue;
            }
            let cmd = line.to_ascii_uppercase();
            if cmd.starts_with("EHLO") || cmd.starts_with("HELO") {
                c.write_all(b"250-sink\r\n250 8BITMIME\r\n").unwrap();
            } else if cmd.starts_with("DATA") {
                in_data = true;
                c.write_all(b"354 go on\r\n").unwrap();
            } else if cmd.starts_with("QUIT") {
                c.write_all(b"221 bye\r\n").unwrap();
                return data;
            } else {
                c.write_all(b"250 ok\r\n").unwrap();
            }
        }
    });
    (port, h)
}

#[test]
fn a_failed_backup_is_mailed() {
    let (port, mail) = smtp_sink();
    let s = Server::start_with(Arc::new(vmvault_server::SystemClock), |c| {
        c.backup_attempts = 1;
        c.alert_smtp = Some(vmvault_server::config::SmtpAlerts {
            host: "127.0.0.1".into(),
            port,
            from: "vmvault@backup01.test".into(),
            to: vec!["ops@example.test".into()],
        });
    });
    s.policy("daily", "daily 02:00", json!({}));
    s.protect("web01", "daily");
    std::fs::remove_file(s.path("web01.raw")).unwrap();
    assert_eq!(s.run_backup("web01", json!({}))["state"], "failed");
    let text = mail.join().unwrap();
    assert!(
        text.contains("Subject: vmvault: backup_failed web01 (default)"),
        "{text}"
    );
    assert!(text.contains("To: ops@example.test"), "{text}");
}

#[test]
fn a_vault_with_a_secondary_region_replicates_and_reports_its_lag() {
    let s = Server::start_with(Arc::new(vmvault_server::SystemClock), |c| {
        c.secondary = Some(
            c.state_dir
                .parent()
                .unwrap()
                .join("secondary")
                .display()
                .to_string(),
        );
    });
    s.policy("daily", "daily 02:00", json!({}));
    s.protect("web01", "daily");
    let p = s.backup("web01");
    assert!(
        s.path("secondary/points").join(&p).exists(),
        "the point is in the secondary"
    );
    let m = s.call(None, "GET", "/metrics", None).body;
    assert!(
        m.as_str()
            .unwrap()
            .contains("vmvault_replication_lag_objects{vault=\"default\"}"),
        "{m}"
    );
    // A deleted point's marker reaches the secondary through the queue.
    s.admin("DELETE", &format!("/api/v1/recovery-points/{p}"), None);
    let marker = s.path("secondary/points").join(format!("{p}.deleted"));
    for _ in 0..100 {
        if marker.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the soft-delete marker did not reach the secondary");
}
