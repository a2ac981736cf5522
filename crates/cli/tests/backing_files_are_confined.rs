//! A backup never copies a host file an image merely names (a qcow2 backing file, a VMDK
//! extent) unless the VM description allows its folder; `disk info` shows every file an image
//! pulls in and takes the same allowance.

mod common;

use std::path::Path;

use common::*;

/// A 1 MiB qcow2 at `image` whose backing file is `backing` (of `format`), written as given,
/// unchecked, as whoever makes a hostile image would.
fn qcow2_over(image: &Path, backing: &str, format: &str) {
    let image = image.to_str().unwrap();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", format, image, "1M",
    ]);
}

/// A VM description with one disk "os" of `format` at `path`, plus `extra` lines in its
/// [[disks]] entry.
fn describe(env: &Env, path: &str, format: &str, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "name = \"web01\"\ncpus = 1\nmemory_mib = 512\n\n[[disks]]\nname = \"os\"\npath = \"{path}\"\nformat = \"{format}\"\n{extra}\n"
    );
    let p = env.path("web01.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A folder outside the VM's with a "secret" file of recognisable bytes.
fn secret(env: &Env) -> std::path::PathBuf {
    let dir = env.path("elsewhere");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("secret");
    std::fs::write(&f, vec![0x5a; 1 << 20]).unwrap();
    f
}

fn points(env: &Env) -> usize {
    env.ok(&["points", "--json"]).json()["points"]
        .as_array()
        .map_or(0, |a| a.len())
}

#[test]
fn a_backup_refuses_a_backing_file_outside_the_images_folder() {
    let env = Env::with_vault();
    let secret = secret(&env);
    std::fs::create_dir(env.path("vm")).unwrap();
    let image = env.path("vm/os.qcow2");
    for backing in [
        secret.to_str().unwrap().to_string(),
        "../elsewhere/secret".to_string(),
        "/etc/passwd".to_string(),
    ] {
        qcow2_over(&image, &backing, "raw");
        for format in ["qcow2", "auto"] {
            let desc = describe(&env, "vm/os.qcow2", format, "");
            let err = env.fails(&["backup", desc.to_str().unwrap()], 2);
            let named = if backing == "/etc/passwd" {
                "/etc/passwd"
            } else {
                "secret"
            };
            assert!(err.contains(named), "{err}");
            assert!(err.contains("allow_backing"), "{err}");
            assert_eq!(points(&env), 0, "a point was written");
        }
    }
}

#[test]
fn a_backup_refuses_a_vmdk_extent_outside_the_images_folder() {
    let env = Env::with_vault();
    let secret = secret(&env);
    std::fs::create_dir(env.path("vm")).unwrap();
    std::fs::write(
        env.path("vm/os.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{}\" 0\n",
            secret.display()
        ),
    )
    .unwrap();
    let desc = describe(&env, "vm/os.vmdk", "vmdk", "");
    let err = env.fails(&["backup", desc.to_str().unwrap()], 2);
    assert!(
        err.contains("secret") && err.contains("allow_backing"),
        "{err}"
    );
    assert_eq!(points(&env), 0);
}

#[test]
fn allow_backing_in_the_description_lets_a_backup_read_that_folder() {
    let env = Env::with_vault();
    let secret = secret(&env);
    std::fs::create_dir(env.path("vm")).unwrap();
    let image = env.path("vm/os.qcow2");
    qcow2_over(&image, secret.to_str().unwrap(), "raw");
    // Relative to the description, as disk paths are.
    let desc = describe(
        &env,
        "vm/os.qcow2",
        "qcow2",
        "allow_backing = [\"elsewhere\"]",
    );
    env.backup(&desc);
    // As raw: a disk restores in its source format (qcow2) unless told.
    env.ok(&[
        "restore",
        "web01@latest",
        "--disk",
        "os",
        "--to",
        "os.raw",
        "--format",
        "raw",
    ]);
    assert!(same_bytes(&env.path("os.raw"), &secret));
    // An allowance that names a missing folder is a mistake in the description.
    let desc = describe(
        &env,
        "vm/os.qcow2",
        "qcow2",
        "allow_backing = [\"nowhere\"]",
    );
    let err = env.fails(&["backup", desc.to_str().unwrap()], 2);
    assert!(err.contains("nowhere"), "{err}");
}

#[test]
fn disk_info_lists_every_file_and_takes_the_same_allowance() {
    let env = Env::new();
    let secret = secret(&env);
    std::fs::create_dir(env.path("vm")).unwrap();
    let base = env.path("vm/base.qcow2");
    qcow2_over(&base, secret.to_str().unwrap(), "raw");
    let top = env.path("vm/top.qcow2");
    qcow2_over(&top, "base.qcow2", "qcow2");
    let top_s = top.to_str().unwrap();
    let err = env.fails(&["disk", "info", top_s], 2);
    assert!(
        err.contains("secret") && err.contains("--allow-backing"),
        "{err}"
    );
    let elsewhere = env.path("elsewhere");
    let allow = elsewhere.to_str().unwrap();
    let o = env.ok(&["disk", "info", top_s, "--allow-backing", allow]);
    for f in [&top, &base, &secret] {
        let f = f.canonicalize().unwrap();
        assert!(o.stdout.contains(f.to_str().unwrap()), "{}", o.stdout);
    }
    let j = env
        .ok(&["disk", "info", top_s, "--allow-backing", allow, "--json"])
        .json();
    let files: Vec<&str> = j["files"]
        .as_array()
        .expect("a files list")
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let want: Vec<String> = [&top, &base, &secret]
        .iter()
        .map(|p| p.canonicalize().unwrap().display().to_string())
        .collect();
    assert_eq!(files, want);
    // A VMDK's extents are files it pulls in too.
    std::fs::write(env.path("vm/flat.bin"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(
        env.path("vm/d.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"flat.bin\" 0\n",
    )
    .unwrap();
    let j = env
        .ok(&[
            "disk",
            "info",
            env.path("vm/d.vmdk").to_str().unwrap(),
            "--json",
        ])
        .json();
    let files = j["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{j}");
    assert!(
        Path::new(files[1].as_str().unwrap()).ends_with("flat.bin"),
        "{j}"
    );
}
