//! Every bad input gets a one-line error and its documented exit code, never a panic.

mod common;

use common::*;

fn vm(env: &Env) -> std::path::PathBuf {
    make_image(&env.path("os.raw"), 1024 * 1024 + 7, 5);
    write_vm(env.dir.path(), "vm.toml", "web01", &[("os", "os.raw")])
}

#[test]
fn wrong_or_missing_passphrase() {
    let env = Env::with_vault();
    let o = env.run_env(&["points"], &[("VMVAULT_PASSWORD", "not it")]);
    assert_error(&o, 4, &["points with a wrong passphrase"]);
    assert!(o.stderr.contains("wrong passphrase"), "{}", o.stderr);
    // No terminal, no variable, no file: a clear error rather than a hang.
    let mut c = env.command(&["points"]);
    c.env_remove("VMVAULT_PASSWORD")
        .stdin(std::process::Stdio::null());
    let o = out(c.output().unwrap());
    assert_error(&o, 2, &["points without a passphrase"]);
    assert!(o.stderr.contains("VMVAULT_PASSWORD"), "{}", o.stderr);
    // A passphrase file works, its trailing newline ignored.
    std::fs::write(env.path("pw"), format!("{PASS}\n")).unwrap();
    let mut c = env.command(&["points", "--password-file", "pw"]);
    c.env_remove("VMVAULT_PASSWORD");
    assert_eq!(out(c.output().unwrap()).code, 0);
}

#[test]
fn disks_that_cannot_be_read() {
    let env = Env::with_vault();
    let desc = write_vm(env.dir.path(), "vm.toml", "web01", &[("os", "missing.raw")]);
    let e = env.fails(&["backup", desc.to_str().unwrap()], 2);
    assert!(e.contains("missing.raw"), "{e}");
    std::fs::create_dir(env.path("adir")).unwrap();
    let desc = write_vm(env.dir.path(), "vm2.toml", "web01", &[("os", "adir")]);
    env.fails(&["backup", desc.to_str().unwrap()], 2);
    let desc = env.path("vm3.toml");
    std::fs::write(
        &desc,
        "name = \"x\"\ncpus = 1\nmemory_mib = 1\n[[disks]]\nname = \"os\"\npath = \"os.qcow2\"\nformat = \"qcow2\"\n",
    )
    .unwrap();
    // A qcow2 image cut short after its magic number.
    std::fs::write(env.path("os.qcow2"), b"QFI\xfb").unwrap();
    let e = env.fails(&["backup", desc.to_str().unwrap()], 2);
    assert!(e.contains("not a valid qcow2 image"), "{e}");
    // A real image of a format the description misnames is refused, not read as garbage.
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx"])
        .arg(env.path("os.qcow2"))
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let e = env.fails(&["backup", desc.to_str().unwrap()], 2);
    assert!(e.contains("qcow2"), "{e}");
    assert_eq!(
        env.ok(&["points", "--json"]).json()["points"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn bad_descriptions() {
    let env = Env::with_vault();
    let desc = vm(&env);
    let good = std::fs::read_to_string(&desc).unwrap();
    let cases = [
        (
            good.replace("cpus = 2", "cpus = 2\ncolour = \"red\""),
            "unknown field",
        ),
        (
            good.clone() + "\n[[disks]]\nname = \"os\"\npath = \"other.raw\"\n",
            "listed twice",
        ),
        (
            good.clone() + "\n[[disks]]\nname = \"os2\"\npath = \"os.raw\"\n",
            "listed twice",
        ),
        (good.replace("memory_mib", "memory"), "memory"),
        ("this is not toml".to_string(), "vm.toml"),
    ];
    for (text, want) in cases {
        std::fs::write(&desc, &text).unwrap();
        let e = env.fails(&["backup", desc.to_str().unwrap()], 2);
        assert!(e.contains(want), "{e:?} should contain {want:?}");
    }
    let e = env.fails(&["backup", "nowhere.toml"], 2);
    assert!(e.contains("nowhere.toml"), "{e}");
}

#[test]
fn vaults_that_are_not_vaults() {
    let env = Env::new();
    std::fs::create_dir(&env.vault).unwrap();
    let e = env.fails(&["points"], 2);
    assert!(e.contains("not a vmvault vault"), "{e}");
    let e = env.fails(&["vault", "info"], 2);
    assert!(e.contains("not a vmvault vault"), "{e}");
    std::fs::write(env.vault.join("config"), b"hello").unwrap();
    env.fails(&["points"], 2);
    // Creating over something that is not empty is refused.
    let e = env.fails(&["vault", "create", env.vault.to_str().unwrap()], 2);
    assert!(e.contains("not empty"), "{e}");
    let mut c = env.command(&["points"]);
    c.env_remove("VMVAULT_VAULT");
    let o = out(c.output().unwrap());
    assert_error(&o, 2, &["points without a vault"]);
    let e = env.fails(&["vault", "create", "v2", "--chunk-size", "3M"], 2);
    assert!(e.contains("power of two"), "{e}");
}

#[test]
fn point_names_that_match_nothing_or_several() {
    let env = Env::with_vault();
    let desc = vm(&env);
    let e = env.fails(&["restore", "web01@latest", "--to", "o"], 2);
    assert!(e.contains("no recovery point"), "{e}");
    // 17 points: by pigeonhole two share their first hex digit.
    let ids: Vec<String> = (0..17).map(|_| env.backup(&desc)).collect();
    let digit = (0..16)
        .map(|d| format!("{d:x}"))
        .find(|d| ids.iter().filter(|i| i.starts_with(d.as_str())).count() > 1)
        .unwrap();
    let e = env.fails(&["restore", &format!("web01@{digit}"), "--to", "o"], 2);
    assert!(e.contains("give more digits"), "{e}");
    let e = env.fails(&["restore", "web01@zz", "--to", "o"], 2);
    assert!(e.contains("RFC 3339"), "{e}");
    let e = env.fails(&["restore", "nosuchvm@latest", "--to", "o"], 2);
    assert!(e.contains("nosuchvm"), "{e}");
    let e = env.fails(
        &["restore", "web01@latest", "--disk", "nope", "--to", "o"],
        2,
    );
    assert!(e.contains("has no disk"), "{e}");
    let missing = (0..16)
        .map(|d| format!("{d:x}"))
        .find(|d| !ids.iter().any(|i| i.starts_with(d.as_str())));
    if let Some(d) = missing {
        let e = env.fails(&["restore", &format!("web01@{d}"), "--to", "o"], 2);
        assert!(e.contains("starting with"), "{e}");
    }
}

#[test]
fn two_backups_of_one_vm_at_once() {
    let env = Env::with_vault();
    let desc = vm(&env);
    // Hold a backup lock of web01 the way a running backup does (this process is alive).
    let backend: std::sync::Arc<dyn vmvault_store::WriteBackend> =
        std::sync::Arc::new(vmvault_store::LocalBackend::new(&env.vault));
    let vault = vmvault_store::Vault::open(backend, || Ok(PASS.as_bytes().to_vec())).unwrap();
    let guard = vault.lock_backup("web01", &mut |_| {}).unwrap();
    let e = env.fails(&["backup", desc.to_str().unwrap()], 5);
    assert!(e.contains("already being backed up"), "{e}");
    // Another VM is not held up.
    let other = write_vm(env.dir.path(), "other.toml", "db01", &[("os", "os.raw")]);
    env.backup(&other);
    drop(guard);
    env.backup(&desc);
}

#[test]
fn a_reader_that_goes_away_ends_the_command_without_a_panic() {
    let env = Env::with_vault();
    let desc = vm(&env);
    env.backup(&desc);
    // The pipe's reading end is closed before vmvault (busy opening the vault) writes.
    let mut child = env
        .command(&["points", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = out(child.wait_with_output().unwrap());
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert_eq!(o.code, 141, "as SIGPIPE would end it: {}", o.stderr);
}

#[test]
fn a_restore_target_in_a_missing_folder_is_named_as_given() {
    let env = web01_point(&[("os", 1 << 20, 4)]);
    let args = [
        "restore",
        "web01@latest",
        "--disk",
        "os",
        "--to",
        "nodir/os.raw",
    ];
    let err = env.fails(&args, 2);
    // The image is written under a temporary name beside its target: that name means
    // nothing to the user, the target does.
    assert!(err.contains("nodir/os.raw:"), "{err}");
    assert!(!err.contains(".vmvault-"), "{err}");
}
