//! Finding the host's QEMU VMs (docs/design.md, "Host agents"): QMP sockets from configured
//! globs and from the command lines of running QEMU processes, each asked once for the VM's
//! name, state and disks.
//!
//! QEMU serves one QMP client at a time, so each socket is connected to, asked and let go at
//! once, and a socket another client holds (its connect waits in the listen queue, its
//! greeting never comes) is given up after [`DiscoverConfig::timeout`] rather than waited for.
//! The heartbeat reports only what this finds, so a name QEMU cannot prove is never guessed.

mod args;
mod glob;

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vmvault_api::agent::{FoundDisk, FoundVm};
use vmvault_format::{valid_name, NAME_RULE};
use vmvault_qemu::block::{self, BlockDisk};
use vmvault_qemu::{QemuError, Qmp};

use args::{sockets_of, QemuArgs};

/// At most this many sockets are asked at once: enough that a few held sockets do not add up
/// their timeouts, few enough for a host with hundreds of VMs.
const PARALLEL: usize = 8;

#[derive(Debug, Clone)]
pub struct DiscoverConfig {
    /// Globs of QMP sockets (`/run/vmvault/qmp/*.sock`, `/var/lib/vm/*/qmp.sock`): `*` and `?`
    /// in any segment.
    pub qmp_globs: Vec<String>,
    /// Also look at running QEMU processes' command lines for their QMP and guest-agent
    /// sockets.
    pub scan_processes: bool,
    /// `/proc` normally; tests give a fake tree.
    pub proc_root: PathBuf,
    /// How long one QMP socket may take to answer, connecting included (2 s by default).
    pub timeout: Duration,
}

impl Default for DiscoverConfig {
    fn default() -> Self {
        DiscoverConfig {
            qmp_globs: vec!["/run/vmvault/qmp/*.sock".into()],
            scan_processes: true,
            proc_root: PathBuf::from("/proc"),
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovery {
    /// Sorted by name.
    pub vms: Vec<FoundVm>,
    /// Sockets (or processes) that were found but not usable, with why: one line each, for
    /// the agent's log.
    pub skipped: Vec<(String, String)>,
}

/// Finds the VMs. Never fails as a whole: whatever is not usable lands in
/// [`Discovery::skipped`]. A VM reached through two sockets is reported once, through the
/// first: glob matches in the globs' order, then processes by PID.
pub fn discover(cfg: &DiscoverConfig) -> Discovery {
    let mut found = Found::default();
    for pattern in &cfg.qmp_globs {
        for path in glob::expand(pattern) {
            found.add(&path, None);
        }
    }
    if cfg.scan_processes {
        scan_processes(&cfg.proc_root, &mut found);
    }
    let answers = ask_all(&found, cfg.timeout);
    let Found {
        candidates,
        processes,
        mut skipped,
    } = found;
    let mut vms: Vec<FoundVm> = Vec::new();
    let mut by_name: HashMap<String, String> = HashMap::new();
    for (c, answer) in candidates.iter().zip(answers) {
        let process = c.process.map(|i| &processes[i]);
        let answer = match answer {
            Ok(a) => a,
            Err(why) => {
                skipped.push((c.shown.clone(), why));
                continue;
            }
        };
        let Some(name) = answer.name.or_else(|| process.and_then(|p| p.name.clone())) else {
            skipped.push((c.shown.clone(), "QEMU was started without -name".into()));
            continue;
        };
        if !valid_name(&name) {
            let why = format!("its name {name:?} is not a VM name ({NAME_RULE})");
            skipped.push((c.shown.clone(), why));
            continue;
        }
        if let Some(first) = by_name.get(&name) {
            let why = format!("{name} is already found at {first}");
            skipped.push((c.shown.clone(), why));
            continue;
        }
        by_name.insert(name.clone(), c.shown.clone());
        vms.push(FoundVm {
            name,
            kind: "qemu".into(),
            state: if answer.running { "running" } else { "paused" }.into(),
            qmp: Some(c.shown.clone()),
            qga: process.and_then(|p| p.qga.clone()),
            disks: answer.disks.into_iter().map(found_disk).collect(),
        });
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Discovery { vms, skipped }
}

fn found_disk(d: BlockDisk) -> FoundDisk {
    FoundDisk {
        name: d.name,
        file: Some(d.filename).filter(|f| !f.is_empty()),
        format: d.format,
        size: d.size,
    }
}

/// A QEMU process seen in the process table.
struct Process {
    pid: u32,
    name: Option<String>,
    qga: Option<String>,
}

/// One distinct QMP socket.
struct Candidate {
    /// Canonical, so that a glob's path and a process's spelling of it meet.
    path: PathBuf,
    shown: String,
    process: Option<usize>,
}

#[derive(Default)]
struct Found {
    candidates: Vec<Candidate>,
    processes: Vec<Process>,
    skipped: Vec<(String, String)>,
}

impl Found {
    fn add(&mut self, path: &Path, process: Option<usize>) {
        let shown = path.display().to_string();
        let path = match path.canonicalize() {
            Ok(p) => p,
            Err(e) => return self.skipped.push((shown, format!("not usable: {e}"))),
        };
        match path.metadata() {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => return self.skipped.push((shown, "not a socket".into())),
            Err(e) => return self.skipped.push((shown, format!("not usable: {e}"))),
        }
        // Reported paths go to the server as text: one that is not UTF-8 could not be named.
        let Some(shown) = path.to_str().map(str::to_string) else {
            return self.skipped.push((shown, "its path is not UTF-8".into()));
        };
        if let Some(c) = self.candidates.iter_mut().find(|c| c.path == path) {
            c.process = c.process.or(process);
            return;
        }
        self.candidates.push(Candidate {
            path,
            shown,
            process,
        });
    }
}

/// Every QEMU process's QMP sockets, lowest PID first (a stable order for "keep the first").
fn scan_processes(root: &Path, found: &mut Found) {
    let Ok(entries) = std::fs::read_dir(root) else {
        let why = "cannot be read: no process scan".to_string();
        return found.skipped.push((root.display().to_string(), why));
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = root.join(pid.to_string());
        // Gone since the listing, or a kernel thread: not a QEMU either way.
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv.first().is_some_and(|a| is_qemu(a)) {
            continue;
        }
        let parsed: QemuArgs = sockets_of(&argv[1..]);
        let who = format!("PID {pid}");
        if parsed.qmp.is_empty() {
            let why = "a QEMU process with no QMP unix socket it listens on".to_string();
            found.skipped.push((who, why));
            continue;
        }
        // QEMU resolves relative socket paths against its working directory.
        let cwd = std::fs::read_link(dir.join("cwd")).ok();
        let resolve = |p: &str| match (Path::new(p).is_absolute(), &cwd) {
            (true, _) => Some(PathBuf::from(p)),
            (false, Some(cwd)) => Some(cwd.join(p)),
            (false, None) => None,
        };
        let qga = parsed
            .qga
            .as_deref()
            .and_then(resolve)
            .and_then(|p| p.canonicalize().ok())
            .and_then(|p| p.to_str().map(str::to_string));
        let index = found.processes.len();
        found.processes.push(Process {
            pid,
            name: parsed.name,
            qga,
        });
        for qmp in &parsed.qmp {
            match resolve(qmp) {
                Some(path) => found.add(&path, Some(index)),
                None => {
                    let why = format!("its QMP socket {qmp} is relative and its cwd unreadable");
                    found.skipped.push((who.clone(), why));
                }
            }
        }
    }
}

fn is_qemu(argv0: &str) -> bool {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    base.starts_with("qemu-system-") || base.starts_with("qemu-kvm")
}

/// What one QMP socket said.
struct Answer {
    name: Option<String>,
    running: bool,
    disks: Vec<BlockDisk>,
}

/// Asks every candidate, [`PARALLEL`] at a time; answers in candidate order. The sockets of
/// one process are asked in turn, and only until one answers: they all reach the same VM, and
/// a monitor someone keeps for other tools is best left alone.
fn ask_all(found: &Found, timeout: Duration) -> Vec<Result<Answer, String>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of_process: HashMap<usize, usize> = HashMap::new();
    for (i, c) in found.candidates.iter().enumerate() {
        match c.process {
            Some(p) if group_of_process.contains_key(&p) => groups[group_of_process[&p]].push(i),
            Some(p) => {
                group_of_process.insert(p, groups.len());
                groups.push(vec![i]);
            }
            None => groups.push(vec![i]),
        }
    }
    let answers: Mutex<Vec<Option<Result<Answer, String>>>> =
        Mutex::new((0..found.candidates.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..groups.len().min(PARALLEL) {
            s.spawn(|| loop {
                let Some(group) = groups.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let mut answered: Option<&str> = None;
                for &i in group {
                    let c = &found.candidates[i];
                    let answer = match answered {
                        None => ask_within(&c.path, timeout),
                        Some(first) => {
                            let pid = c.process.map_or(0, |p| found.processes[p].pid);
                            Err(format!("not asked: QEMU process {pid} answered at {first}"))
                        }
                    };
                    if answer.is_ok() && answered.is_none() {
                        answered = Some(&c.shown);
                    }
                    answers.lock().expect("no panics while held")[i] = Some(answer);
                }
            });
        }
    });
    answers
        .into_inner()
        .expect("no panics while held")
        .into_iter()
        .map(|a| a.expect("every candidate is in one group"))
        .collect()
}

/// [`ask`] on a thread of its own, given up after `timeout`: `Qmp::connect` can block in
/// `connect` (a full listen queue) and waits for the greeting longer than we may. A thread
/// given up on drops its connection as soon as it returns.
fn ask_within(path: &Path, timeout: Duration) -> Result<Answer, String> {
    let (tx, rx) = mpsc::channel();
    let given_up = Arc::new(AtomicBool::new(false));
    let worker = {
        let path = path.to_path_buf();
        let given_up = given_up.clone();
        std::thread::Builder::new()
            .name("vmvault-discover".into())
            .spawn(move || {
                let _ = tx.send(ask(&path, timeout, &given_up));
            })
    };
    if let Err(e) = worker {
        return Err(format!("cannot start a thread to ask it: {e}"));
    }
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        given_up.store(true, Ordering::Relaxed);
        Err(format!(
            "no answer within {timeout:?}: another client may hold it \
             (QEMU serves one QMP client at a time)"
        ))
    })
}

fn ask(path: &Path, timeout: Duration, given_up: &AtomicBool) -> Result<Answer, String> {
    let mut qmp = Qmp::connect(path).map_err(reason)?;
    if given_up.load(Ordering::Relaxed) {
        return Err("given up".into());
    }
    qmp.set_timeout(timeout);
    let info = block::vm_info(&mut qmp).map_err(reason)?;
    let disks = block::disks(&mut qmp).map_err(reason)?;
    Ok(Answer {
        name: info.name.filter(|n| !n.is_empty()),
        running: info.running,
        disks,
    })
}

fn reason(e: QemuError) -> String {
    match e {
        QemuError::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused => {
            "nothing listens on it (connection refused): its QEMU is gone".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn fake_process(root: &Path, pid: u32, argv: &[&str], cwd: Option<&Path>) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmdline = argv.join("\0").into_bytes();
        cmdline.push(0);
        std::fs::write(dir.join("cmdline"), cmdline).unwrap();
        if let Some(cwd) = cwd {
            std::os::unix::fs::symlink(cwd, dir.join("cwd")).unwrap();
        }
    }

    #[test]
    fn only_qemu_processes_are_read_and_relative_paths_follow_their_cwd() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        let vm = t.path().join("vm");
        std::fs::create_dir_all(&vm).unwrap();
        // A listener nobody accepts on: the process's paths are what is tested, not QMP.
        drop(UnixListener::bind(vm.join("gone.sock")).unwrap());
        let q = "unix:gone.sock,server=on,wait=off";
        fake_process(
            &proc_root,
            20,
            &["/usr/bin/qemu-system-x86_64", "-qmp", q],
            Some(&vm),
        );
        fake_process(&proc_root, 21, &["/usr/libexec/qemu-kvm", "-S"], None);
        fake_process(&proc_root, 22, &["bash", "-qmp", q], Some(&vm));
        fake_process(&proc_root, 23, &["qemu-system-aarch64", "-qmp", q], None);
        let missing = "unix:/nonexistent/q.sock,server=on";
        fake_process(
            &proc_root,
            24,
            &["qemu-system-x86_64", "-qmp", missing],
            None,
        );
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        let cfg = DiscoverConfig {
            qmp_globs: vec![],
            proc_root,
            ..DiscoverConfig::default()
        };
        let d = discover(&cfg);
        assert!(d.vms.is_empty());
        let sock = vm.join("gone.sock").canonicalize().unwrap();
        let who: Vec<&str> = d.skipped.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(
            who,
            [
                "PID 21",
                "PID 23",
                "/nonexistent/q.sock",
                sock.to_str().unwrap()
            ],
            "{:?}",
            d.skipped
        );
        assert!(d.skipped[0].1.contains("no QMP unix socket"));
        assert!(d.skipped[1].1.contains("relative"));
        assert!(d.skipped[3].1.contains("connection refused"));
    }

    #[test]
    fn a_glob_and_a_process_naming_one_socket_are_one_candidate() {
        let t = tempfile::tempdir().unwrap();
        let _l = UnixListener::bind(t.path().join("a.sock")).unwrap();
        std::fs::write(t.path().join("b.sock"), b"").unwrap();
        let mut found = Found::default();
        for p in glob::expand(&format!("{}/*.sock", t.path().display())) {
            found.add(&p, None);
        }
        found.processes.push(Process {
            pid: 7,
            name: Some("web01".into()),
            qga: None,
        });
        found.add(&t.path().join(".").join("a.sock"), Some(0));
        assert_eq!(found.candidates.len(), 1);
        assert_eq!(found.candidates[0].process, Some(0));
        assert_eq!(found.skipped.len(), 1);
        assert_eq!(found.skipped[0].1, "not a socket");
    }

    #[test]
    fn qemu_binaries_are_told_by_their_name() {
        assert!(is_qemu("/usr/bin/qemu-system-x86_64"));
        assert!(is_qemu("qemu-kvm"));
        assert!(is_qemu("/usr/libexec/qemu-kvm"));
        assert!(!is_qemu("/usr/bin/qemu-img"));
        assert!(!is_qemu("/opt/qemu-system-x86_64/bin/other"));
        assert!(!is_qemu(""));
    }
}
