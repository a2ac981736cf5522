//! The randomized soak behind `scripts/soak SECONDS`: rounds of concurrent backups, garbage
//! collection, prune and restores on one vault, with `kill -9` of a random one of them, and
//! after every round a check that nothing that should exist was lost.
//!
//! What "should exist" means: a point the soak has seen is gone only if prune (`--keep-last
//! 3`) may have removed it, that is when at least three newer points of its VM still exist.
//! Every point that exists must restore byte-equal to its VM's images as they were in the
//! round that made it (images change only between rounds), the vault must verify clean, and
//! no manifest may be half-written. Each finding is printed with the round and the seed, the
//! vault is kept for a look, and the test fails at the end.
//!
//! Ignored in the test command (it runs for as long as it is told); `scripts/soak` runs it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KEEP_LAST: usize = 3;
const IMAGE_SIZE: u64 = 8 << 20;
/// VMs and their disks.
const VMS: &[(&str, &[&str])] = &[("vm0", &["os"]), ("vm1", &["os"]), ("vm2", &["os", "data"])];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Job {
    Backup(usize),
    Gc,
    Prune,
    Restore,
}

struct Running {
    job: Job,
    child: Child,
    killed: bool,
}

/// A point the soak has seen: its VM and the round that made it (one point per VM per round,
/// so the round orders a VM's points).
struct Known {
    vm: usize,
    round: u64,
}

struct Soak {
    env: Env,
    rng: Rng,
    round: u64,
    known: BTreeMap<String, Known>,
    findings: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
}

impl Soak {
    fn image(&self, vm: usize, disk: &str) -> PathBuf {
        self.env.path(&format!("{}-{disk}.raw", VMS[vm].0))
    }

    fn truth(&self, id: &str, disk: &str) -> PathBuf {
        self.env.path(&format!("truth/{id}-{disk}.raw"))
    }

    fn find(&mut self, what: String) {
        eprintln!("FINDING (round {}): {what}", self.round);
        self.findings.push(format!("round {}: {what}", self.round));
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    /// The test's command for `args`, run by `VMVAULT_SOAK_BIN` when set: `scripts/soak` runs
    /// a copy, so that a build during an hour's soak does not change the program under test.
    fn command(&self, args: &[&str]) -> Command {
        let base = self.env.command(args);
        let Some(bin) = std::env::var_os("VMVAULT_SOAK_BIN") else {
            return base;
        };
        let mut c = Command::new(bin);
        c.args(base.get_args());
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = base.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Out {
        out(self.command(args).output().unwrap())
    }

    fn spawn(&self, job: Job, args: &[String]) -> Running {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self
            .command(&refs)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Running {
            job,
            child,
            killed: false,
        }
    }

    /// The newest point of `vm` the soak knows, if any.
    fn newest(&self, vm: usize) -> Option<String> {
        self.known
            .iter()
            .filter(|(_, k)| k.vm == vm)
            .max_by_key(|(_, k)| k.round)
            .map(|(id, _)| id.clone())
    }

    fn restore_args(&self, vm: usize, id: &str, disk: &str, to: &Path) -> Vec<String> {
        vec![
            "restore".into(),
            format!("{}@{id}", VMS[vm].0),
            "--disk".into(),
            disk.into(),
            "--to".into(),
            to.display().to_string(),
        ]
    }

    fn round(&mut self) {
        self.round += 1;
        let r = self.round;
        for (vm, (_, disks)) in VMS.iter().enumerate() {
            for disk in *disks {
                let percent = 0.2 + self.rng.below(40) as f64 / 10.0;
                mutate_image(&self.image(vm, disk), percent, self.rng.next());
            }
        }
        let mut jobs = Vec::new();
        for (vm, (name, _)) in VMS.iter().enumerate() {
            if self.rng.below(10) < 9 {
                let desc = self.env.path(&format!("{name}.toml"));
                let args = vec!["backup".into(), desc.display().to_string(), "--json".into()];
                jobs.push(self.spawn(Job::Backup(vm), &args));
            }
        }
        if self.rng.below(2) == 0 {
            jobs.push(self.spawn(Job::Gc, &["gc".into()]));
        }
        if self.rng.below(2) == 0 {
            let args = vec!["prune".into(), "--keep-last".into(), KEEP_LAST.to_string()];
            jobs.push(self.spawn(Job::Prune, &args));
        }
        // A restore beside the others, of a point prune cannot take this round: the newest of
        // its VM (one backup per VM per round leaves it among the newest two).
        let vm = self.rng.below(VMS.len() as u64) as usize;
        let mut restoring = None;
        if let Some(id) = self.newest(vm) {
            let to = self.env.path(&format!("during-{r}.raw"));
            let args = self.restore_args(vm, &id, "os", &to);
            jobs.push(self.spawn(Job::Restore, &args));
            restoring = Some((id, to));
        }
        if self.rng.below(2) == 0 {
            let victims: Vec<usize> = (0..jobs.len())
                .filter(|&i| jobs[i].job != Job::Restore)
                .collect();
            if !victims.is_empty() {
                let v = victims[self.rng.below(victims.len() as u64) as usize];
                std::thread::sleep(Duration::from_millis(self.rng.below(400)));
                if jobs[v].child.try_wait().unwrap().is_none() {
                    let _ = jobs[v].child.kill();
                    jobs[v].killed = true;
                    self.count("kills");
                }
            }
        }
        let mut log = Vec::new();
        for job in jobs {
            let o = out(job.child.wait_with_output().unwrap());
            log.push(match (job.killed, o.code) {
                (true, _) => format!("{:?} killed", job.job),
                (false, 0) => format!("{:?} ok", job.job),
                (false, code) => format!("{:?} exit {code}", job.job),
            });
            if job.killed {
                continue;
            }
            let ok = match job.job {
                Job::Backup(_) => {
                    self.count("backups");
                    o.code == 0
                }
                Job::Gc => {
                    self.count("collections");
                    o.code == 0
                }
                Job::Prune => {
                    self.count("prunes");
                    o.code == 0
                }
                Job::Restore => {
                    self.count("restores during rounds");
                    o.code == 0
                }
            };
            if !ok || o.stderr.contains("panicked") {
                self.find(format!(
                    "{:?} exited {}: {}",
                    job.job,
                    o.code,
                    o.stderr.trim()
                ));
            }
        }
        eprintln!("soak: round {r}: {}", log.join(", "));
        if let Some((id, to)) = restoring {
            if to.exists() && !same_bytes(&to, &self.truth(&id, "os")) {
                self.find(format!("the restore of {id} during the round differs"));
            }
            let _ = std::fs::remove_file(&to);
        }
        self.check();
    }

    /// After a round: what exists is what should, and all of it restores byte-equal.
    fn check(&mut self) {
        let o = self.run(&["points", "--json"]);
        if o.code != 0 {
            self.find(format!("points failed: {}", o.stderr.trim()));
            return;
        }
        let j = o.json();
        for u in j["unreadable"].as_array().unwrap() {
            self.find(format!("an unreadable point: {u}"));
        }
        let mut present: BTreeMap<String, usize> = BTreeMap::new();
        for p in j["points"].as_array().unwrap() {
            let id = p["id"].as_str().unwrap().to_string();
            let vm = VMS
                .iter()
                .position(|(n, _)| *n == p["vm"].as_str().unwrap())
                .unwrap();
            present.insert(id, vm);
        }
        // New points were made this round, from the images as they are now.
        for (id, &vm) in &present {
            if !self.known.contains_key(id) {
                for disk in VMS[vm].1 {
                    std::fs::copy(self.image(vm, disk), self.truth(id, disk)).unwrap();
                }
                self.known.insert(
                    id.clone(),
                    Known {
                        vm,
                        round: self.round,
                    },
                );
            }
        }
        // A point that is gone must have had KEEP_LAST newer points that still exist.
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !present.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            let (vm, round) = (self.known[&id].vm, self.known[&id].round);
            let newer = present
                .keys()
                .filter(|p| self.known[*p].vm == vm && self.known[*p].round > round)
                .count();
            if newer < KEEP_LAST {
                let what = format!(
                    "point {id} of {} (round {}) is gone with only {newer} newer point(s)",
                    VMS[vm].0, round
                );
                self.find(what);
            }
            for disk in VMS[vm].1 {
                let _ = std::fs::remove_file(self.truth(&id, disk));
            }
            self.known.remove(&id);
            self.count("points pruned");
        }
        let read_data = self.round.is_multiple_of(10);
        let mut args = vec!["verify"];
        if read_data {
            args.push("--read-data");
        }
        let v = self.run(&args);
        if v.code != 0 {
            self.find(format!("verify exited {}: {}", v.code, v.stdout.trim()));
        }
        for (id, vm) in present {
            for disk in VMS[vm].1 {
                let to = self.env.path("check.raw");
                let _ = std::fs::remove_file(&to);
                let args = self.restore_args(vm, &id, disk, &to);
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let o = self.run(&refs);
                self.count("restores checked");
                if o.code != 0 {
                    self.find(format!(
                        "restore of {id}/{disk} failed: {}",
                        o.stderr.trim()
                    ));
                } else if !same_bytes(&to, &self.truth(&id, disk)) {
                    self.find(format!("restore of {id}/{disk} differs from its round"));
                }
                let _ = std::fs::remove_file(&to);
            }
        }
    }
}

#[test]
#[ignore = "a soak: scripts/soak SECONDS runs it"]
fn soak() {
    let seconds: u64 = std::env::var("VMVAULT_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("VMVAULT_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("soak: {seconds} s, seed {seed} (VMVAULT_SOAK_SEED repeats it)");
    let env = Env::with_vault();
    std::fs::create_dir(env.path("truth")).unwrap();
    let mut soak = Soak {
        env,
        rng: Rng(seed),
        round: 0,
        known: BTreeMap::new(),
        findings: Vec::new(),
        counts: BTreeMap::new(),
    };
    for (vm, (name, disks)) in VMS.iter().enumerate() {
        let mut listed = Vec::new();
        for disk in *disks {
            make_image(&soak.image(vm, disk), IMAGE_SIZE, soak.rng.next());
            listed.push((*disk, format!("{name}-{disk}.raw")));
        }
        let refs: Vec<(&str, &str)> = listed.iter().map(|(d, p)| (*d, p.as_str())).collect();
        write_vm(soak.env.dir.path(), &format!("{name}.toml"), name, &refs);
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        soak.round();
        if last_report.elapsed() > Duration::from_secs(60) {
            eprintln!("soak: round {}, {:?}", soak.round, soak.counts);
            last_report = Instant::now();
        }
    }
    eprintln!(
        "soak: {} rounds, {} finding(s); {:?}",
        soak.round,
        soak.findings.len(),
        soak.counts
    );
    if !soak.findings.is_empty() {
        let kept = soak.env.dir.keep();
        panic!(
            "seed {seed}: {} finding(s), the vault is kept in {}:\n{}",
            soak.findings.len(),
            kept.display(),
            soak.findings.join("\n")
        );
    }
}
