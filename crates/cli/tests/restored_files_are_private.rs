//! A restored disk holds everything the VM held: it is created readable by its owner only
//! (0600), whatever the umask, in every format, and so is the VM description beside it (in
//! a folder of its owner's only, 0700, when the restore makes it).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs vmvault under umask 022, the usual default that makes new files world-readable.
fn run_with_umask(env: &Env, args: &[&str]) -> Out {
    let c = env.command(args);
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(c.get_program())
        .args(c.get_args())
        .current_dir(env.dir.path());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let o = out(sh.output().unwrap());
    assert_eq!(o.code, 0, "vmvault {args:?}: {}{}", o.stdout, o.stderr);
    o
}

#[test]
fn restored_disks_and_descriptions_are_owner_only() {
    let env = web01_point(&[("os", 1 << 20, 3)]);
    run_with_umask(&env, &["restore", "web01@latest", "--to", "out"]);
    for f in ["out/os.raw", "out/web01.toml"] {
        assert_eq!(mode(&env.path(f)), 0o600, "{f}");
    }
    // The folder the restore made for them, too.
    assert_eq!(mode(&env.path("out")), 0o700, "out");
    // Replaced files too: --force makes new ones, not ones with the old file's mode.
    std::fs::set_permissions(env.path("out/os.raw"), PermissionsExt::from_mode(0o644)).unwrap();
    run_with_umask(&env, &["restore", "web01@latest", "--to", "out", "--force"]);
    assert_eq!(mode(&env.path("out/os.raw")), 0o600);
    for format in ["raw", "qcow2", "vhd", "vhd-fixed", "vhdx", "vmdk"] {
        let to = format!("one.{format}");
        run_with_umask(
            &env,
            &[
                "restore",
                "web01@latest",
                "--disk",
                "os",
                "--to",
                &to,
                "--format",
                format,
            ],
        );
        assert_eq!(mode(&env.path(&to)), 0o600, "{format}");
    }
}
