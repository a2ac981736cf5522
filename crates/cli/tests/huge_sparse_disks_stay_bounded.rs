//! A valid image may claim any virtual size its format allows (a qcow2 of 1 PiB is a few
//! megabytes), and a backup's memory grows with the disk's chunk count (32 bytes a chunk in
//! the index). Disks up to the limit (2^24 chunks: 16 TiB at 1 MiB chunks) back up and restore
//! in bounded memory; larger ones are refused with the size and the limit, never an abort.

mod common;

use std::process::Command;

use common::*;

const TIB: u64 = 1 << 40;

fn describe(env: &Env, image: &str, format: &str) -> String {
    let text = format!(
        "name = \"huge\"\ncpus = 1\nmemory_mib = 512\n[[disks]]\nname = \"os\"\npath = \"{image}\"\nformat = \"{format}\"\n"
    );
    std::fs::write(env.path("huge.toml"), text).unwrap();
    env.path("huge.toml").display().to_string()
}

#[test]
fn a_sparse_pebibyte_qcow2_is_refused_with_its_size_and_the_limit() {
    let env = Env::new();
    env.ok(&["vault", "create", env.vault.to_str().unwrap()]);
    let image = env.path("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "1P"]);
    let desc = describe(&env, "huge.qcow2", "qcow2");
    let (code, rss, err) = measured(&env, &["backup", &desc]);
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("vmvault: error: "), "{err}");
    assert!(
        err.contains("1 PiB") || err.contains(&(1u64 << 50).to_string()),
        "{err}"
    );
    assert!(err.contains("16 TiB"), "the limit: {err}");
    assert!(rss < 256 * 1024, "refusing took {rss} KiB");
    // The limit follows the vault's chunk size: 1 TiB at 64 KiB chunks.
    let env = Env::with_vault();
    let image = env.path("two.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "2T"]);
    let desc = describe(&env, "two.qcow2", "qcow2");
    let err = env.fails(&["backup", &desc], 2);
    assert!(err.contains("2 TiB") && err.contains("1 TiB"), "{err}");
}

#[test]
fn opening_huge_sparse_images_allocates_no_table_of_their_size() {
    let env = Env::new();
    for (format, size) in [
        ("qcow2", "1P"),
        ("vhdx", "64T"),
        ("vmdk", "64T"),
        ("vpc", "2040G"),
    ] {
        let image = env.path(&format!("huge.{format}"));
        qemu_img(&["create", "-q", "-f", format, image.to_str().unwrap(), size]);
        let (code, rss, err) = measured(&env, &["disk", "info", image.to_str().unwrap()]);
        assert_eq!(code, 0, "{format}: {err}");
        assert!(
            rss < 128 * 1024,
            "{format} {size}: disk info took {rss} KiB"
        );
    }
}

#[test]
fn the_largest_allowed_sparse_qcow2_backs_up_and_restores_in_bounded_memory() {
    let env = Env::new();
    env.ok(&["vault", "create", env.vault.to_str().unwrap()]);
    let image = env.path("max.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "16T",
    ]);
    // A little data, at both ends.
    for at in ["0", "17592186040320"] {
        let o = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P 0x5a {at} 4k")])
            .arg(&image)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let desc = describe(&env, "max.qcow2", "qcow2");
    let (code, backup, err) = measured(&env, &["backup", &desc]);
    assert_eq!(code, 0, "{err}");
    eprintln!(
        "backup of a 16 TiB sparse qcow2: peak RSS {} MiB",
        backup / 1024
    );
    // The index (512 MiB at 2^24 chunks) is held three times while it is saved: as digests,
    // encoded, and sealed (vmvault_store::Vault::save_index); the chunk pipeline adds little.
    assert!(backup < 2048 * 1024, "backup peak RSS {backup} KiB");
    let (code, restore, err) = measured(
        &env,
        &[
            "restore",
            "huge@latest",
            "--disk",
            "os",
            "--to",
            "r.qcow2",
            "--format",
            "qcow2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    eprintln!("restore of it as qcow2: peak RSS {} MiB", restore / 1024);
    // Twice the index while it is loaded: opened, then decoded (vmvault_store::Vault::load_index).
    assert!(restore < 1536 * 1024, "restore peak RSS {restore} KiB");
    let j = env.ok(&["disk", "info", "r.qcow2", "--json"]).json();
    assert_eq!(j["virtual_size"], 16 * TIB);
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&image)
        .arg(env.path("r.qcow2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}
