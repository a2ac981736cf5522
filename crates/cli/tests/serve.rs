//! `vmvault serve nbd`: a recovery point's disk served over NBD and read by real clients
//! (`qemu-img compare`, `convert`, `map`, `qemu-io`) over TCP and a unix socket.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmvault_nbd::{Client, ConnectOptions, NbdError};

const K64: u64 = 65536;

/// A running `vmvault serve nbd`, stopped (SIGKILL) if the test ends early.
struct Serving {
    child: Child,
    stderr: Option<std::process::ChildStderr>,
    url: String,
}

impl Serving {
    fn start(env: &Env, args: &[&str]) -> Serving {
        let mut child = env
            .command(&[&["serve", "nbd"], args].concat())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let stderr = child.stderr.take();
        assert!(
            !line.is_empty(),
            "serve printed nothing: {:?}",
            child.wait()
        );
        Serving {
            child,
            stderr,
            url: line.trim().to_string(),
        }
    }

    /// Sends SIGTERM and returns the exit code and what was said on stderr.
    fn stop(mut self) -> (i32, String) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let started = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "serve ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut self.stderr.take().unwrap(), &mut err).unwrap();
        (status.code().unwrap_or(-1), err)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (qemu-utils) cannot run: {e}"))
}

fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let o = qemu(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A vault with one backup of VM `vm`: disk `os` of 6 MiB + 4 KiB (holes, text and random
/// runs) and a small disk `data`.
fn backed_up() -> (Env, PathBuf) {
    let env = Env::with_vault();
    let os = env.path("os.raw");
    make_image(&os, 6 * 1024 * 1024 + 4096, 7);
    make_image(&env.path("data.raw"), 1024 * 1024, 8);
    let desc = write_vm(
        env.dir.path(),
        "vm.toml",
        "vm",
        &[("os", "os.raw"), ("data", "data.raw")],
    );
    env.backup(&desc);
    (env, os)
}

/// The image's data and holes in 64 KiB chunks (the vault's chunk size), merged:
/// (start, length, holds data).
fn expected_map(image: &Path) -> Vec<(u64, u64, bool)> {
    let bytes = std::fs::read(image).unwrap();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (i, c) in bytes.chunks(K64 as usize).enumerate() {
        let data = c.iter().any(|&b| b != 0);
        match out.last_mut() {
            Some((_, len, d)) if *d == data => *len += c.len() as u64,
            _ => out.push((i as u64 * K64, c.len() as u64, data)),
        }
    }
    out
}

/// `qemu-img map --output=json` of a URL, merged the same way.
fn qemu_map(url: &str) -> Vec<(u64, u64, bool)> {
    let json: serde_json::Value = serde_json::from_str(&qemu_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", url],
    ))
    .unwrap();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in json.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["data"].as_bool().unwrap();
        assert_eq!(e["zero"].as_bool().unwrap(), !data, "{e}");
        match out.last_mut() {
            Some((_, l, d)) if *d == data => *l += len,
            _ => out.push((start, len, data)),
        }
    }
    out
}

#[test]
fn qemu_img_reads_the_disk_over_tcp_byte_for_byte_with_its_holes() {
    let (env, os) = backed_up();
    let served = Serving::start(
        &env,
        &["vm@latest", "--disk", "os", "--listen", "127.0.0.1:0"],
    );
    assert!(served.url.starts_with("nbd://127.0.0.1:"), "{}", served.url);
    assert!(served.url.ends_with("/os"), "{}", served.url);
    let url = served.url.clone();
    let os_s = os.to_str().unwrap();
    qemu_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", os_s, &url],
    );
    let copy = env.path("copy.raw");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            copy.to_str().unwrap(),
        ],
    );
    assert!(same_bytes(&os, &copy));
    assert_eq!(qemu_map(&url), expected_map(&os));
    assert!(
        expected_map(&os).iter().any(|e| !e.2),
        "the image has holes"
    );

    // Two clients at once: one stays connected while qemu-img converts through another.
    let addr = url
        .trim_start_matches("nbd://")
        .trim_end_matches("/os")
        .to_string();
    let opts = ConnectOptions {
        export: "os".into(),
        meta_contexts: vec!["base:allocation".into()],
    };
    let mut held = Client::connect_tcp(addr.as_str(), &opts).unwrap();
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let (url, out) = (url.clone(), env.path(&format!("parallel{i}.raw")));
            std::thread::spawn(move || {
                qemu_ok(
                    "qemu-img",
                    &[
                        "convert",
                        "-f",
                        "raw",
                        "-O",
                        "raw",
                        &url,
                        out.to_str().unwrap(),
                    ],
                );
                out
            })
        })
        .collect();
    let mut head = vec![0u8; 3 * K64 as usize + 17];
    held.read_at(K64 - 9, &mut head).unwrap();
    assert_eq!(
        head,
        std::fs::read(&os).unwrap()[K64 as usize - 9..4 * K64 as usize + 8]
    );
    for t in threads {
        assert!(same_bytes(&os, &t.join().unwrap()));
    }

    // Writes are refused: qemu-io will not open it for writing, and a WRITE sent anyway gets
    // EPERM; the disk is unchanged.
    let o = qemu("qemu-io", &["-f", "raw", "-c", "write -P 0x55 0 4k", &url]);
    assert!(!o.status.success());
    let said = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(
        said.contains("permission denied") || said.contains("read-only"),
        "{said}"
    );
    assert!(matches!(
        held.write_at(0, &[0x55; 4096]),
        Err(NbdError::Command {
            errno: vmvault_nbd::proto::EPERM,
            ..
        })
    ));
    held.disconnect().unwrap();
    qemu_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", os_s, &url],
    );

    let (code, stderr) = served.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("SIGTERM: stopping"), "{stderr}");
}

#[test]
fn unix_socket_json_and_a_clean_stop() {
    let (env, _) = backed_up();
    let data = env.path("data.raw");
    let sock = env.path("nbd.sock");
    let served = Serving::start(
        &env,
        &[
            "vm",
            "--disk",
            "data",
            "--socket",
            sock.to_str().unwrap(),
            "--json",
        ],
    );
    let out: serde_json::Value = serde_json::from_str(&served.url).unwrap();
    let url = out["url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("nbd+unix:///data?socket={}", sock.display()));
    assert_eq!(out["vm"], "vm");
    assert_eq!(out["disk"], "data");
    assert_eq!(out["size"], 1024 * 1024);
    qemu_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            data.to_str().unwrap(),
            &url,
        ],
    );
    assert_eq!(qemu_map(&url), expected_map(&data));
    let copy = env.path("copy.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &url,
            copy.to_str().unwrap(),
        ],
    );
    qemu_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            data.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    );
    let (code, stderr) = served.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(!sock.exists(), "the socket is removed on stop");
    assert!(stderr.contains("chunk(s) from the vault"), "{stderr}");
}

#[test]
fn bad_requests_fail_before_serving() {
    let (env, _) = backed_up();
    let e = env.fails(
        &[
            "serve",
            "nbd",
            "vm",
            "--disk",
            "nope",
            "--listen",
            "127.0.0.1:0",
        ],
        2,
    );
    assert!(
        e.contains("no disk \"nope\"") && e.contains("os, data"),
        "{e}"
    );
    env.fails(
        &[
            "serve",
            "nbd",
            "other",
            "--disk",
            "os",
            "--listen",
            "127.0.0.1:0",
        ],
        2,
    );
    let busy = env.path("file");
    std::fs::write(&busy, b"not a socket").unwrap();
    let e = env.fails(
        &[
            "serve",
            "nbd",
            "vm",
            "--disk",
            "os",
            "--socket",
            busy.to_str().unwrap(),
        ],
        2,
    );
    assert!(e.contains("exists"), "{e}");
    // Neither --listen nor --socket: a usage error.
    let o = env.run(&["serve", "nbd", "vm", "--disk", "os"]);
    assert_eq!(o.code, 2);
}
