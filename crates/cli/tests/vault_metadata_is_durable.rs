//! Fault matrix: a vault's config and key are durable when the command that wrote them ends:
//! the file is synced, renamed into place, and then its folder is synced, without which a
//! crash can bring back the old key after `key passwd` said it was done. Seen through
//! `strace`, since no crash on this machine loses a folder's entries on demand.

mod common;

use std::process::Command;

use common::*;

/// Runs vmvault under strace; returns its log of renames and syncs, with paths for fds.
fn traced(env: &Env, args: &[&str], extra_env: &[(&str, &str)]) -> String {
    let log = env.path("strace.log");
    let mut c = Command::new("strace");
    c.args([
        "-f",
        "-y",
        "-qq",
        "-e",
        "trace=rename,renameat,renameat2,fsync,fdatasync",
    ])
    .arg("-o")
    .arg(&log)
    .arg(env!("CARGO_BIN_EXE_vmvault"))
    .args(args)
    .env("VMVAULT_PASSWORD", PASS)
    .env("VMVAULT_STATE_DIR", env.path("state"))
    .current_dir(env.dir.path());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let o = c.output().expect("strace runs (scripts/test installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(log).unwrap()
}

/// Some rename onto `target` is followed by an fsync of `folder`.
fn folder_synced_after_rename(log: &str, target: &str, folder: &str) -> bool {
    let lines: Vec<&str> = log.lines().collect();
    let Some(at) = lines
        .iter()
        .rposition(|l| l.contains("rename") && l.contains(&format!("\"{target}\"")))
    else {
        panic!("no rename onto {target} in:\n{log}");
    };
    lines[at..]
        .iter()
        .any(|l| l.contains("fsync(") && l.contains(&format!("<{folder}>")))
}

#[test]
fn config_and_key_survive_a_crash_once_written() {
    let env = Env::new();
    let vault = env.vault.to_str().unwrap().to_string();
    let log = traced(&env, &["vault", "create", &vault], &[]);
    assert!(
        folder_synced_after_rename(&log, &format!("{vault}/config"), &vault),
        "the vault folder is synced after the config lands:\n{log}"
    );
    let keys = format!("{vault}/keys");
    assert!(folder_synced_after_rename(
        &log,
        &format!("{keys}/default"),
        &keys
    ));

    let log = traced(
        &env,
        &["key", "passwd", "--vault", &vault],
        &[("VMVAULT_NEW_PASSWORD", "another passphrase")],
    );
    assert!(
        folder_synced_after_rename(&log, &format!("{keys}/default"), &keys),
        "the new key is durable:\n{log}"
    );
}
