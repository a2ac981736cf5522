//! Fixtures for end-to-end tests of the `vmvault` binary: a temporary folder with a vault, disk
//! images made by the test (sparse, random, compressible), and a runner for the binary.
#![allow(dead_code)]

pub mod server;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmvault_cloud::Credentials;

pub const PASS: &str = "test passphrase";

/// The environment variables that give `c` to vmvault (the names crates/cloud reads).
pub fn credential_env(c: &Credentials) -> Vec<(String, String)> {
    let var = |k: &str, v: &String| (k.to_string(), v.clone());
    match c {
        Credentials::S3 {
            access_key_id,
            secret_access_key,
            session_token,
        } => {
            let mut vars = vec![
                var("AWS_ACCESS_KEY_ID", access_key_id),
                var("AWS_SECRET_ACCESS_KEY", secret_access_key),
            ];
            vars.extend(session_token.iter().map(|t| var("AWS_SESSION_TOKEN", t)));
            vars
        }
        Credentials::AzureKey { key } => vec![var("AZURE_STORAGE_KEY", key)],
        Credentials::AzureSas { token } => vec![var("AZURE_STORAGE_SAS_TOKEN", token)],
    }
}

/// [`credential_env`] for a secondary region: the same names prefixed with
/// `VMVAULT_SECONDARY_`.
pub fn secondary_credential_env(c: &Credentials) -> Vec<(String, String)> {
    credential_env(c)
        .into_iter()
        .map(|(k, v)| (format!("VMVAULT_SECONDARY_{k}"), v))
        .collect()
}

/// The part of `c` that no output may show.
pub fn secret(c: &Credentials) -> &str {
    match c {
        Credentials::S3 {
            secret_access_key, ..
        } => secret_access_key,
        Credentials::AzureKey { key } => key,
        Credentials::AzureSas { token } => token,
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub vault: PathBuf,
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let vault = dir.path().join("vault");
        Env { dir, vault }
    }

    /// A new encrypted vault with small chunks, so that small images have many.
    pub fn with_vault() -> Env {
        let env = Env::new();
        env.ok(&[
            "vault",
            "create",
            env.vault.to_str().unwrap(),
            "--chunk-size",
            "64K",
        ]);
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmvault"));
        c.args(args)
            .env("VMVAULT_PASSWORD", PASS)
            .env("VMVAULT_VAULT", &self.vault)
            .env("TZ", "UTC")
            // Replication queues and remembered regions stay in the test's folder.
            .env("VMVAULT_STATE_DIR", self.dir.path().join("state"))
            .env_remove("VMVAULT_NEW_PASSWORD")
            .current_dir(self.dir.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Out {
        out(self.command(args).output().unwrap())
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        out(c.output().unwrap())
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> Out {
        let o = self.run(args);
        assert_eq!(
            o.code, 0,
            "vmvault {args:?} failed: {}{}",
            o.stdout, o.stderr
        );
        o
    }

    /// Runs, asserts the exit code, a one-line error without a panic, and returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        assert_error(&o, code, args);
        o.stderr
    }

    /// Backs up a VM description; returns the new point's id.
    pub fn backup(&self, desc: &Path) -> String {
        let o = self.ok(&["backup", desc.to_str().unwrap(), "--json"]);
        o.json()["id"].as_str().unwrap().to_string()
    }

    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.vault.join("chunks")).unwrap() {
            for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                if !p.file_name().unwrap().to_str().unwrap().starts_with('.') {
                    out.push(p);
                }
            }
        }
        out
    }
}

pub fn out(o: Output) -> Out {
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

pub fn assert_error(o: &Out, code: i32, what: &[&str]) {
    assert_eq!(
        o.code, code,
        "vmvault {what:?}: expected exit {code}: {}{}",
        o.stdout, o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error: {:?}", o.stderr);
    assert!(lines[0].starts_with("vmvault: error: "), "{:?}", lines[0]);
}

/// splitmix64: a small deterministic generator, so images are the same on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// Text-like bytes: compress about 2x.
    pub fn fill_text(&mut self, buf: &mut [u8]) {
        const ALPHABET: &[u8] = b"etaoinshrdlucmfw      \n";
        self.fill(buf);
        for b in buf.iter_mut() {
            *b = ALPHABET[*b as usize % ALPHABET.len()];
        }
    }
}

/// A sparse raw image of `size` bytes in runs of 64 KiB to 1 MiB: holes, text and random data.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mut f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut pos = 0u64;
    let mut buf = Vec::new();
    while pos < size {
        let run = ((rng.below(16) + 1) * 65536).min(size - pos);
        let kind = rng.below(3);
        if kind > 0 {
            buf.resize(run as usize, 0);
            if kind == 1 {
                rng.fill_text(&mut buf);
            } else {
                rng.fill(&mut buf);
            }
            f.seek(SeekFrom::Start(pos)).unwrap();
            f.write_all(&buf).unwrap();
        }
        pos += run;
    }
}

/// Overwrites about `percent` of the image's 4 KiB blocks with random data, in small clusters.
pub fn mutate_image(path: &Path, percent: f64, seed: u64) {
    let mut rng = Rng(seed);
    let size = std::fs::metadata(path).unwrap().len();
    let blocks = size / 4096;
    let target = ((blocks as f64) * percent / 100.0).max(1.0) as u64;
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    let mut done = 0;
    while done < target {
        let n = (rng.below(8) + 1).min(target - done);
        let start = rng.below(blocks.saturating_sub(n).max(1));
        let mut buf = vec![0u8; (n * 4096) as usize];
        rng.fill(&mut buf);
        f.seek(SeekFrom::Start(start * 4096)).unwrap();
        f.write_all(&buf).unwrap();
        done += n;
    }
}

/// Writes a VM description for disks given as (name, image path relative to `dir`).
pub fn write_vm(dir: &Path, file: &str, name: &str, disks: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        "name = \"{name}\"\ncpus = 2\nmemory_mib = 1024\nfirmware = \"uefi\"\n\n[[nics]]\nmac = \"52:54:00:00:00:01\"\nnetwork = \"br0\"\n"
    );
    for (disk, path) in disks {
        text.push_str(&format!(
            "\n[[disks]]\nname = \"{disk}\"\npath = \"{path}\"\nformat = \"raw\"\nbus = \"virtio\"\n"
        ));
    }
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

pub fn is_sparse(p: &Path) -> bool {
    let m = std::fs::metadata(p).unwrap();
    m.blocks() * 512 < m.len()
}

/// Env with a vault holding one point of VM web01 whose disks are `(name, size, seed)`, each
/// a sparse raw image `NAME.raw` in the test's folder made by [`make_image`].
pub fn web01_point(disks: &[(&str, u64, u64)]) -> Env {
    let env = Env::with_vault();
    let mut listed = Vec::new();
    for &(name, size, seed) in disks {
        let file = format!("{name}.raw");
        make_image(&env.path(&file), size, seed);
        listed.push((name, file));
    }
    let listed: Vec<(&str, &str)> = listed.iter().map(|(n, f)| (*n, f.as_str())).collect();
    let desc = write_vm(env.dir.path(), "web01.toml", "web01", &listed);
    env.backup(&desc);
    env
}

/// Runs qemu-img and asserts it succeeded.
pub fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Exit code, peak RSS in KiB and stderr of a vmvault run (Python's getrusage on its child:
/// the kernel's own figure, with no sampling to miss a peak).
pub fn measured(env: &Env, args: &[&str]) -> (i32, u64, String) {
    let script = "import resource,subprocess,sys\n\
                  r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE)\n\
                  sys.stderr.write(r.stderr.decode())\n\
                  print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let mut c = Command::new("python3");
    c.args(["-c", script, env!("CARGO_BIN_EXE_vmvault")])
        .args(args)
        .env("VMVAULT_PASSWORD", PASS)
        .env("VMVAULT_VAULT", &env.vault)
        .env("VMVAULT_STATE_DIR", env.path("state"))
        .current_dir(env.dir.path());
    let o = out(c.output().unwrap());
    let mut it = o.stdout.split_whitespace();
    let code = it.next().unwrap().parse().unwrap();
    let rss = it.next().unwrap().parse().unwrap();
    (code, rss, o.stderr)
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// A loop device over a file, detached when dropped.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    /// None (said on stderr) where loop devices cannot be had.
    pub fn attach(file: &Path) -> Option<Loop> {
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!(
                "no loop device: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        Some(Loop { dev })
    }
}

/// A loop device over a new file `device.img` of `size` bytes in the test's folder, and that
/// file; None (said on stderr) when not root, as loop devices need.
pub fn loop_device(env: &Env, size: u64) -> Option<(Loop, PathBuf)> {
    if !is_root() {
        eprintln!("skipped: loop devices need root");
        return None;
    }
    let backing = env.path("device.img");
    File::create(&backing).unwrap().set_len(size).unwrap();
    let dev = Loop::attach(&backing).expect("losetup as root");
    Some((dev, backing))
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
