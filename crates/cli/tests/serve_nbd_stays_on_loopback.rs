//! `serve nbd` hands out decrypted disks to anyone who connects: NBD has no authentication
//! and vmvault no TLS. It listens on loopback (or a unix socket) unless told `--allow-remote`,
//! and then says plainly what it exposes.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

fn vault_with_a_point() -> Env {
    web01_point(&[("os", 1 << 20, 5)])
}

/// Starts `serve nbd` and waits for its first line of stdout (the URL) or its exit.
/// Returns the child (still running) and the URL, or the exit code and stderr.
fn start(env: &Env, extra: &[&str]) -> Result<(Child, String), (i32, String)> {
    let mut args = vec!["serve", "nbd", "web01@latest", "--disk", "os"];
    args.extend_from_slice(extra);
    let mut child = env
        .command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    if line.is_empty() {
        let status = child.wait().unwrap();
        return Err((status.code().unwrap_or(-1), stderr_of(child)));
    }
    Ok((child, line.trim().to_string()))
}

/// Stops a server and returns what it said on stderr.
fn stop(mut child: Child) -> String {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    stderr_of(child)
}

/// All a stopped child wrote on stderr.
fn stderr_of(mut child: Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

#[test]
fn a_non_loopback_address_is_refused_without_allow_remote() {
    let env = vault_with_a_point();
    for addr in ["0.0.0.0:0", "[::]:0"] {
        match start(&env, &["--listen", addr]) {
            Ok((child, url)) => {
                stop(child);
                panic!("{addr}: serving decrypted disks to the network at {url}");
            }
            Err((code, err)) => {
                assert_eq!(code, 2, "{addr}: {err}");
                let lines: Vec<&str> = err.lines().collect();
                assert_eq!(lines.len(), 1, "{err}");
                assert!(lines[0].starts_with("vmvault: error: "), "{err}");
                assert!(err.contains("--allow-remote"), "{err}");
                assert!(err.contains(addr), "{err}");
            }
        }
    }
}

#[test]
fn loopback_needs_no_flag() {
    let env = vault_with_a_point();
    for addr in ["127.0.0.1:0", "localhost:0"] {
        let (child, url) = start(&env, &["--listen", addr])
            .unwrap_or_else(|(c, e)| panic!("{addr}: exit {c}: {e}"));
        assert!(url.starts_with("nbd://127.0.0.1:"), "{url}");
        let err = stop(child);
        assert!(!err.contains("WARNING"), "{err}");
    }
}

#[test]
fn allow_remote_serves_and_says_what_it_exposes() {
    let env = vault_with_a_point();
    let (child, url) = start(&env, &["--listen", "0.0.0.0:0", "--allow-remote"])
        .unwrap_or_else(|(c, e)| panic!("exit {c}: {e}"));
    assert!(url.starts_with("nbd://0.0.0.0:"), "{url}");
    let err = stop(child);
    for said in ["decrypted", "no authentication", "anyone"] {
        assert!(err.contains(said), "stderr should say {said:?}: {err}");
    }
}
