//! VMs whose disks are qcow2, VHD, VHDX or VMDK images made by qemu-img (the reference) are
//! backed up without converting, and restored into every output format; qemu-img checks the
//! results (`check`) and compares them with the source (`compare`).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn compare(a_fmt: &str, a: &Path, b_fmt: &str, b: &Path) {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img compare {a:?} {b:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// (description format, qemu-img -O format, qemu-img options, format as qemu-img reads it)
const SOURCES: &[(&str, &str, &str, &str)] = &[
    ("qcow2", "qcow2", "compat=1.1", "qcow2"),
    ("qcow2", "qcow2", "compat=0.10", "qcow2"),
    ("vhd", "vpc", "subformat=dynamic", "vpc"),
    ("vhd", "vpc", "subformat=fixed,force_size=on", "vpc"),
    ("vhdx", "vhdx", "subformat=dynamic", "vhdx"),
    ("vmdk", "vmdk", "subformat=monolithicSparse", "vmdk"),
    ("vmdk", "vmdk", "subformat=streamOptimized", "vmdk"),
    ("auto", "qcow2", "compat=1.1", "qcow2"),
];

/// (restore --format, qemu-img's name for it)
const OUTPUTS: &[(&str, &str)] = &[
    ("raw", "raw"),
    ("qcow2", "qcow2"),
    ("vhd", "vpc"),
    ("vhd-fixed", "vpc"),
    ("vhdx", "vhdx"),
    ("vmdk", "vmdk"),
];

#[test]
fn every_source_format_backs_up_and_restores_into_every_output_format() {
    let env = Env::with_vault();
    // 8 MiB + 1 MiB: whole MiB (VHD fixed keeps it), not a multiple of most block sizes.
    let raw = env.path("src.raw");
    make_image(&raw, 9 * 1024 * 1024, 200);
    for (i, (desc_fmt, qfmt, opts, read_as)) in SOURCES.iter().enumerate() {
        let img = format!("src{i}.img");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            qfmt,
            "-o",
            opts,
            raw.to_str().unwrap(),
            env.path(&img).to_str().unwrap(),
        ]);
        let vm = format!("vm{i}");
        let text = format!(
            "name = \"{vm}\"\ncpus = 1\nmemory_mib = 64\n[[disks]]\nname = \"os\"\npath = \"{img}\"\nformat = \"{desc_fmt}\"\n"
        );
        let desc = env.path(&format!("{vm}.toml"));
        std::fs::write(&desc, text).unwrap();
        let j = env.ok(&["backup", desc.to_str().unwrap(), "--json"]).json();
        assert!(j["stats"]["bytes_read"].as_u64().unwrap() <= 9 * 1024 * 1024);
        // The default restore writes the source's format.
        let out = env.path(&format!("default{i}"));
        let files = env
            .ok(&[
                "restore",
                &format!("{vm}@latest"),
                "--to",
                out.to_str().unwrap(),
                "--json",
            ])
            .json();
        let first = files["files"][0].as_str().unwrap().to_string();
        compare("raw", &raw, read_as, Path::new(&first));
        if i > 0 {
            continue;
        }
        for (out_fmt, q_out) in OUTPUTS {
            let target = env.path(&format!("out-{out_fmt}.img"));
            env.ok(&[
                "restore",
                &format!("{vm}@latest"),
                "--disk",
                "os",
                "--format",
                out_fmt,
                "--to",
                target.to_str().unwrap(),
            ]);
            // qemu has no checker for raw or VHD ("vpc"): those are compared only.
            if !matches!(*q_out, "raw" | "vpc") {
                qemu_img(&["check", "-f", q_out, target.to_str().unwrap()]);
            }
            compare("raw", &raw, q_out, &target);
        }
    }
}

#[test]
fn disk_info_reports_format_sizes_and_backing_chain() {
    let env = Env::new();
    let base = env.path("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", base.to_str().unwrap(), "1G"]);
    let top = env.path("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let j = env
        .ok(&["disk", "info", top.to_str().unwrap(), "--json"])
        .json();
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["virtual_size"], 1u64 << 30);
    assert_eq!(j["backing"]["format"], "qcow2");
    assert!(j["backing"]["path"]
        .as_str()
        .unwrap()
        .ends_with("base.qcow2"));
    let plain = env.ok(&["disk", "info", top.to_str().unwrap()]);
    assert!(plain.stdout.contains("backing file"), "{}", plain.stdout);
    // A chain that loops back is refused, not followed forever.
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        base.to_str().unwrap(),
    ]);
    let e = env.fails(&["disk", "info", top.to_str().unwrap()], 2);
    assert!(e.contains("loops"), "{e}");
}

#[test]
fn a_mostly_empty_100_gib_dynamic_disk_is_backed_up_without_reading_its_holes() {
    let env = Env::with_vault();
    for (fmt, qfmt) in [
        ("qcow2", "qcow2"),
        ("vhdx", "vhdx"),
        ("vhd", "vpc"),
        ("vmdk", "vmdk"),
    ] {
        let img = env.path(&format!("big.{fmt}"));
        qemu_img(&["create", "-q", "-f", qfmt, img.to_str().unwrap(), "100G"]);
        // 3 MiB of data in three places.
        for offset in ["0", "40G", "99G"] {
            let o = Command::new("qemu-io")
                .args(["-f", qfmt, "-c", &format!("write -P 0x5a {offset} 1M")])
                .arg(&img)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let vm = format!("big{fmt}");
        let text = format!(
            "name = \"{vm}\"\ncpus = 1\nmemory_mib = 64\n[[disks]]\nname = \"os\"\npath = \"big.{fmt}\"\nformat = \"{fmt}\"\n"
        );
        let desc = env.path(&format!("{vm}.toml"));
        std::fs::write(&desc, text).unwrap();
        let info = env
            .ok(&["disk", "info", img.to_str().unwrap(), "--json"])
            .json();
        let allocated = info["allocated_bytes"].as_u64().unwrap();
        assert!(allocated < 100 << 20, "{fmt}: {allocated} bytes allocated");
        let j = env.ok(&["backup", desc.to_str().unwrap(), "--json"]).json();
        let read = j["stats"]["bytes_read"].as_u64().unwrap();
        // What the image allocates (whole blocks for VHD and VHDX), rounded out to whole 1 MiB
        // chunks at each of the three places: nothing unallocated is read.
        assert!(
            read <= allocated + (6 << 20),
            "{fmt}: read {read}, allocated {allocated}"
        );
        assert!(j["logical_bytes"].as_u64().unwrap() >= 100 << 30);
        // 3 MiB of data in the test vault's 64 KiB chunks, all alike: stored once per vault.
        let data = j["stats"]["chunks_new"].as_u64().unwrap()
            + j["stats"]["chunks_reused"].as_u64().unwrap();
        assert_eq!(data, (3 << 20) / (64 << 10), "{fmt}: {}", j["stats"]);
    }
}
