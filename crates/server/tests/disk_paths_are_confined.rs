//! A protected VM's disks must lie in the directories (or match the device patterns) the
//! server's config allows, checked when the VM is protected and again when a job opens them,
//! with symlinks resolved; the server's own state directory is never allowed. Otherwise a
//! contributor and an operator together could back up and restore any file the server can
//! read: its admin token, its database, /etc/shadow.

mod common;

use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::Path;
use std::sync::Arc;

use common::{Answer, Server};
use serde_json::json;
use vmvault_server::SystemClock;

fn description(name: &str, disk: &Path) -> String {
    format!(
        "name = \"{name}\"\ncpus = 1\nmemory_mib = 512\n\n[[disks]]\nname = \"disk0\"\npath = \"{}\"\nformat = \"raw\"\n",
        disk.display()
    )
}

fn protect(s: &Server, token: &str, name: &str, disk: &Path) -> Answer {
    s.call(
        Some(token),
        "POST",
        "/api/v1/protected-items",
        Some(json!({"description": description(name, disk), "policy": "base"})),
    )
}

fn assert_confined(a: &Answer, disk: &Path) {
    assert_eq!(a.status, 403, "{}: {} {}", disk.display(), a.status, a.body);
    assert_eq!(a.body["error"]["code"], "forbidden");
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("disk_roots"), "{msg}");
}

#[test]
fn a_contributor_cannot_protect_the_servers_secrets_or_files_outside_the_roots() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    let contributor = s.user("carl", "contributor");
    let state = s.path("state");
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.raw"), vec![7u8; 4096]).unwrap();
    symlink(state.join("admin-token"), s.path("token-link.raw")).unwrap();
    symlink(
        outside.path().join("secret.raw"),
        s.path("outside-link.raw"),
    )
    .unwrap();
    for disk in [
        state.join("admin-token"),
        state.join("state.db"),
        state.join("tls/key.der"),
        s.path("state/../state/admin-token"),
        Path::new("/etc/shadow").to_path_buf(),
        Path::new("/etc/passwd").to_path_buf(),
        outside.path().join("secret.raw"),
        s.path("token-link.raw"),
        s.path("outside-link.raw"),
    ] {
        assert_confined(&protect(&s, &contributor, "evil", &disk), &disk);
    }
    // A disk missing from an allowed folder is a mistake in the description (400), said only
    // there: a missing file in the state dir above is refused like any other (403).
    let missing = s.path("does-not-exist.raw");
    let a = protect(&s, &contributor, "evil", &missing);
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{}",
        a.body
    );
    // A disk in an allowed directory is fine.
    s.vm("web01", 1);
    let a = protect(&s, &contributor, "web01", &s.path("web01.raw"));
    assert_eq!(a.status, 201, "{}", a.body);
    // Nothing was protected but that one.
    let items = s.admin("GET", "/api/v1/protected-items", None).body;
    assert_eq!(items.as_array().unwrap().len(), 1, "{items}");
}

#[test]
fn a_symlink_planted_after_protect_is_refused_when_the_job_opens_the_disk() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    let contributor = s.user("carl", "contributor");
    s.vm("web01", 1);
    let disk = s.path("web01.raw");
    assert_eq!(protect(&s, &contributor, "web01", &disk).status, 201);
    std::fs::remove_file(&disk).unwrap();
    symlink(s.path("state/admin-token"), &disk).unwrap();
    let j = s.run_backup("web01", json!({}));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("disk_roots"),
        "{}",
        j["error"]
    );
    let points = s.admin("GET", "/api/v1/recovery-points", None).body;
    assert_eq!(points["items"].as_array().unwrap().len(), 0);
}

#[test]
fn with_no_disk_roots_configured_nothing_can_be_protected() {
    let s = Server::start_with(Arc::new(SystemClock), |c| c.disk_roots.clear());
    s.policy("base", "daily 02:00", json!({}));
    s.vm("web01", 1);
    let a = protect(&s, &s.admin.clone(), "web01", &s.path("web01.raw"));
    assert_confined(&a, &s.path("web01.raw"));
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allows no disk"),
        "{}",
        a.body
    );
}

/// A device pattern allows the block devices its matches resolve to, and nothing else: not a
/// regular file a matching name links to.
#[test]
fn device_patterns_allow_block_devices_only() {
    let devs = tempfile::tempdir().unwrap();
    let s = Server::start_with(Arc::new(SystemClock), |c| {
        c.disk_roots = vec![format!("{}/vg0-*", devs.path().display())];
    });
    s.policy("base", "daily 02:00", json!({}));
    let admin = s.admin.clone();
    // A matching name that links to a regular file (here the admin token) is not a device.
    symlink(s.path("state/admin-token"), devs.path().join("vg0-evil")).unwrap();
    assert_confined(
        &protect(&s, &admin, "evil", &devs.path().join("vg0-evil")),
        Path::new("vg0-evil"),
    );
    let mut blocks: Vec<_> = std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("loop"))
        })
        .collect();
    blocks.sort();
    let [block, other, ..] = &blocks[..] else {
        eprintln!("fewer than two /dev/loop* block devices here: only the refusal was checked");
        return;
    };
    symlink(block, devs.path().join("vg0-data")).unwrap();
    // By the name the pattern matches, or by the device it resolves to.
    let a = protect(&s, &admin, "vm1", &devs.path().join("vg0-data"));
    assert_eq!(a.status, 201, "{}", a.body);
    let a = protect(&s, &admin, "vm2", block);
    assert_eq!(a.status, 201, "{}", a.body);
    // A device no match resolves to is refused.
    assert_confined(&protect(&s, &admin, "vm3", other), other);
}

/// `allow_backing` in a description widens where an image's backing files may come from; a
/// contributor who could allow `/` would have a planted qcow2 header pull any host file into
/// the vault. So each allowed folder must itself lie inside a folder of disk_roots.
#[test]
fn allow_backing_cannot_reach_outside_the_roots() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    let contributor = s.user("carl", "contributor");
    std::fs::write(s.path("web01.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::create_dir(s.path("bases")).unwrap();
    let with_allow = |dir: &str| {
        let text =
            description("web01", &s.path("web01.raw")) + &format!("allow_backing = [\"{dir}\"]\n");
        s.call(
            Some(&contributor),
            "POST",
            "/api/v1/protected-items",
            Some(json!({"description": text, "policy": "base"})),
        )
    };
    let state = s.path("state");
    for dir in ["/", "/etc", "/dev/shm", state.to_str().unwrap()] {
        let a = with_allow(dir);
        assert_eq!(a.status, 403, "{dir}: {} {}", a.status, a.body);
        let msg = a.body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("allow_backing") || msg.contains("own files"),
            "{msg}"
        );
    }
    let a = with_allow(s.path("bases").to_str().unwrap());
    assert_eq!(a.status, 201, "{}", a.body);
}
