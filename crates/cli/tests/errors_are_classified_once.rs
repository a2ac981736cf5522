//! One error classification (issue 12, item 7): the README's exit-code table is the classes'
//! table; usage errors are said like every other error; a missing disk is bad input; a
//! request waiting for a second admin has its own exit code; Ctrl-C during a backup ends
//! with one line, exit 130, no recovery point and a whole vault.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{make_image, write_vm, Env};
use vmvault_class::Class;

/// The README's exit-code table: code → meaning.
fn readme_table() -> BTreeMap<i32, String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme
        .split("### Exit codes")
        .nth(1)
        .expect("the README has an exit-code table");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            Some((cells.get(1)?.parse().ok()?, cells.get(2)?.to_string()))
        })
        .collect()
}

#[test]
fn the_readme_lists_every_exit_code_and_no_other() {
    let table = readme_table();
    let mut made: Vec<i32> = Class::ALL.iter().map(|c| c.exit_code()).collect();
    // Success, and a closed stdout (SIGPIPE's code): not errors.
    made.extend([0, 141]);
    made.sort();
    made.dedup();
    let listed: Vec<i32> = table.keys().copied().collect();
    assert_eq!(listed, made, "README codes vs the classes' codes");
    assert!(table[&7].contains("approv"), "{}", table[&7]);
    assert!(table[&130].contains("Ctrl-C"), "{}", table[&130]);
}

#[test]
fn usage_errors_and_a_missing_disk_are_bad_input_said_as_errors_are() {
    let env = Env::new();
    for args in [
        &["backup", "--no-such-flag"][..],
        &["no-such-command"],
        &["--server", "http://127.0.0.1:9", "policy", "create"],
    ] {
        let o = env.run(args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(
            o.stderr.starts_with("vmvault: error: "),
            "{args:?}: {}",
            o.stderr
        );
    }
    // Help is not an error.
    let o = env.run(&["backup", "--help"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("Usage"), "{}", o.stdout);

    let o = env.run(&["disk", "info", "no-such-disk.qcow2"]);
    common::assert_error(&o, 2, &["no-such-disk.qcow2"]);
}

#[test]
fn ctrl_c_during_a_backup_says_so_in_one_line_and_leaves_no_point() {
    let env = Env::with_vault();
    make_image(&env.path("big.raw"), 768 << 20, 5);
    let desc = write_vm(env.dir.path(), "big.toml", "big", &[("disk0", "big.raw")]);
    let child = env
        .command(&["backup", desc.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once it has stored chunks: well inside the backup.
    let started = Instant::now();
    while env.chunk_files().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no chunk stored"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("vmvault: interrupted"), "{stderr}");
    assert!(lines[0].contains("recovery point"), "{stderr}");
    let points = env.ok(&["points", "--json"]).json();
    assert_eq!(points["points"].as_array().unwrap().len(), 0, "{points}");
    env.ok(&["verify"]);
    // The next backup of the VM is not held up by the interrupted one.
    env.ok(&["backup", desc.to_str().unwrap()]);
}
