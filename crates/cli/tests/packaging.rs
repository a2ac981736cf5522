//! The .deb (scripts/make-deb), built from this test's binary: its control fields, the files
//! it installs where, the binary runs from it, and both systemd units pass
//! `systemd-analyze verify` (pointed at the extracted binary, since this machine has none in
//! /usr/bin).

use std::path::Path;
use std::process::Command;

fn tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_installs_the_binary_and_units_that_systemd_accepts() {
    if !tool("dpkg-deb") || !tool("systemd-analyze") {
        // Both are installed by scripts/test, under which a missing one fails the test.
        assert!(
            !vmvault_testkit::servers_required(),
            "dpkg-deb and systemd-analyze are needed: apt-get install dpkg systemd"
        );
        eprintln!("skipped: dpkg-deb or systemd-analyze is not installed");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tempfile::tempdir().unwrap();
    let said = run(Command::new(repo.join("scripts/make-deb"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_vmvault"))
        .arg("--out")
        .arg(out.path())
        .arg("--fast"));
    let deb = Path::new(said.trim());
    let info = run(Command::new("dpkg-deb").arg("--info").arg(deb));
    for field in [
        "Package: vmvault",
        &format!("Version: {}", env!("CARGO_PKG_VERSION")),
        "Depends: libc6",
    ] {
        assert!(info.contains(field), "{field} in:\n{info}");
    }
    let files = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    for path in [
        "./usr/bin/vmvault",
        "./lib/systemd/system/vmvault-server.service",
        "./lib/systemd/system/vmvault-agent.service",
        "./etc/vmvault/server.toml",
    ] {
        assert!(files.contains(path), "{path} in:\n{files}");
    }
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    let bin = root.path().join("usr/bin/vmvault");
    let version = run(Command::new(&bin).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let conffiles = run(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/vmvault/server.toml");

    let units = root.path().join("lib/systemd/system");
    let mut checked = Vec::new();
    for unit in ["vmvault-server.service", "vmvault-agent.service"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(
            text.contains("ExecStart=/usr/bin/vmvault "),
            "{unit}: {text}"
        );
        let here = text.replace("/usr/bin/vmvault", &bin.display().to_string());
        let path = units.join(unit);
        std::fs::write(&path, here).unwrap();
        checked.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&checked)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}
