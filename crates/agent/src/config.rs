//! The agent's configuration: one struct read from TOML (`/etc/vmvault/agent.toml` when it
//! exists, or `--config FILE`), then overridden by the environment and flags (the CLI maps
//! both onto [`Overrides`], as the server's configuration does). Every field has a default,
//! so an agent runs with no file at all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::discover::DiscoverConfig;
use crate::{AgentError, Result};

/// Read when no `--config` is given and it exists; its absence is no error.
pub const DEFAULT_PATH: &str = "/etc/vmvault/agent.toml";

/// Where the host key and the pins live unless told otherwise (the systemd unit's
/// `StateDirectory=vmvault-agent`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmvault-agent";

/// The longest a guest may stay frozen: the local `backup --freeze-limit` has the same bound.
pub const MAX_FREEZE_LIMIT_SECS: u64 = 600;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The host key, its certificate and what enrollment pinned (0700).
    pub state_dir: PathBuf,
    /// Globs of QMP sockets to ask (`*` and `?` in any segment).
    pub qmp_globs: Vec<String>,
    /// Also read running QEMU processes' command lines for their QMP and guest-agent sockets
    /// (the only way a guest agent's socket is found).
    pub scan_processes: bool,
    /// Seconds a guest stays frozen at most during a backup: its quiesce helper thaws it then,
    /// whatever happens to the agent.
    pub freeze_limit_secs: u64,
    /// Folders restores may write into (each restore a new folder or file below one). None:
    /// this host takes no restore, whatever a job says.
    pub restore_roots: Vec<PathBuf>,
    /// Seconds a new version has to report in healthy before it is rolled back.
    pub health_deadline_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            // Discovery's own default, and no libvirt paths: libvirtd stays connected to its
            // VMs' monitors, and QEMU serves one QMP client at a time, so those sockets would
            // never answer (libvirt VMs are found by the process scan, or not at all).
            qmp_globs: DiscoverConfig::default().qmp_globs,
            scan_processes: true,
            // Longer than the local backup's 10 s: nobody watches a scheduled backup, and a
            // thaw before the instant makes a crash-consistent point of it.
            freeze_limit_secs: 60,
            restore_roots: Vec::new(),
            health_deadline_secs: vmvault_release::DEFAULT_HEALTH_DEADLINE_SECS,
        }
    }
}

/// What flags and the environment set; `None` (or empty) leaves the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    /// Given: these globs instead of the file's, so that one command line says all of them.
    pub qmp_globs: Vec<String>,
    pub no_process_scan: bool,
    pub freeze_limit_secs: Option<u64>,
    /// Added to the file's.
    pub restore_roots: Vec<PathBuf>,
}

impl AgentConfig {
    /// Reads `file` (which must exist), else [`DEFAULT_PATH`] when it exists, applies `over`
    /// and checks the result.
    pub fn load(file: Option<&Path>, over: Overrides) -> Result<AgentConfig> {
        Self::load_from(file, Path::new(DEFAULT_PATH), over)
    }

    /// [`AgentConfig::load`] with another default path (tests cannot write `/etc`).
    pub fn load_from(file: Option<&Path>, default: &Path, over: Overrides) -> Result<AgentConfig> {
        let mut c = match file {
            Some(path) => Self::read(path)?,
            None if default.exists() => Self::read(default)?,
            None => AgentConfig::default(),
        };
        c.apply(over);
        c.check()?;
        Ok(c)
    }

    fn read(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            // A missing or unreadable file is the person's to fix, as a wrong field is.
            AgentError::Input(format!(
                "reading the agent's configuration {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text, path)
    }

    /// The TOML text of a configuration file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<AgentConfig> {
        toml::from_str(text).map_err(|e| {
            // toml's own rendering draws the line over several; an error here is one line.
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            let at = line.map_or_else(String::new, |l| format!(", line {l}"));
            AgentError::Input(format!("{}{at}: {}", origin.display(), e.message().trim()))
        })
    }

    pub fn apply(&mut self, over: Overrides) {
        if let Some(d) = over.state_dir {
            self.state_dir = d;
        }
        if !over.qmp_globs.is_empty() {
            self.qmp_globs = over.qmp_globs;
        }
        if over.no_process_scan {
            self.scan_processes = false;
        }
        if let Some(s) = over.freeze_limit_secs {
            self.freeze_limit_secs = s;
        }
        self.restore_roots.extend(over.restore_roots);
    }

    /// Refuses what would start an agent that can never work.
    pub fn check(&self) -> Result<()> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(AgentError::Input("state_dir is empty".into()));
        }
        if self.qmp_globs.is_empty() && !self.scan_processes {
            return Err(AgentError::Input(
                "no QMP socket globs and no process scan: this agent would never find a VM \
                 (give qmp_globs or --qmp-glob, or leave the process scan on)"
                    .into(),
            ));
        }
        if let Some(r) = self.restore_roots.iter().find(|r| !r.is_absolute()) {
            return Err(AgentError::Input(format!(
                "restore root {} is not an absolute path",
                r.display()
            )));
        }
        if self.health_deadline_secs < 10 {
            return Err(AgentError::Input(
                "health_deadline_secs must be at least 10: a new version needs a heartbeat".into(),
            ));
        }
        if let Some(g) = self.qmp_globs.iter().find(|g| g.trim().is_empty()) {
            return Err(AgentError::Input(format!(
                "qmp_globs has an empty glob: {g:?}"
            )));
        }
        if !(1..=MAX_FREEZE_LIMIT_SECS).contains(&self.freeze_limit_secs) {
            return Err(AgentError::Input(format!(
                "the freeze limit must be 1 to {MAX_FREEZE_LIMIT_SECS} seconds, not {}",
                self.freeze_limit_secs
            )));
        }
        Ok(())
    }

    /// How discovery is to look for the host's VMs.
    pub fn discover(&self) -> DiscoverConfig {
        DiscoverConfig {
            qmp_globs: self.qmp_globs.clone(),
            scan_processes: self.scan_processes,
            ..DiscoverConfig::default()
        }
    }

    pub fn freeze_limit(&self) -> Duration {
        Duration::from_secs(self.freeze_limit_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig> {
        AgentConfig::parse(text, Path::new("agent.toml"))
    }

    #[test]
    fn no_file_means_the_defaults_and_the_defaults_can_run() {
        let t = tempfile::tempdir().unwrap();
        let absent = t.path().join("agent.toml");
        let c = AgentConfig::load_from(None, &absent, Overrides::default()).unwrap();
        assert_eq!(c, AgentConfig::default());
        assert_eq!(c.state_dir, Path::new("/var/lib/vmvault-agent"));
        assert_eq!(c.qmp_globs, ["/run/vmvault/qmp/*.sock"]);
        assert!(c.scan_processes);
        assert_eq!(c.freeze_limit(), Duration::from_secs(60));
        let d = c.discover();
        assert_eq!(d.qmp_globs, c.qmp_globs);
        assert!(d.scan_processes);
    }

    #[test]
    fn the_default_file_is_read_when_it_exists_and_an_explicit_one_wins() {
        let t = tempfile::tempdir().unwrap();
        let default = t.path().join("agent.toml");
        std::fs::write(&default, "state_dir = \"/srv/agent\"\n").unwrap();
        let c = AgentConfig::load_from(None, &default, Overrides::default()).unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/agent"));
        let other = t.path().join("other.toml");
        std::fs::write(
            &other,
            "scan_processes = false\nqmp_globs = [\"/vm/*/qmp\"]\n",
        )
        .unwrap();
        let c = AgentConfig::load_from(Some(&other), &default, Overrides::default()).unwrap();
        // The explicit file is the whole file: nothing of the default one leaks in.
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert!(!c.scan_processes);
        assert_eq!(c.qmp_globs, ["/vm/*/qmp"]);
    }

    #[test]
    fn a_named_file_that_is_missing_is_bad_input() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("nope.toml");
        let e = AgentConfig::load_from(Some(&missing), &missing, Overrides::default());
        assert!(
            matches!(&e, Err(AgentError::Input(m)) if m.contains("nope.toml")),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        let e = parse("scan_processes = true\nstate_dri = \"/x\"\n").unwrap_err();
        assert!(
            matches!(&e, AgentError::Input(m) if m.starts_with("agent.toml, line 2: ")
                && m.contains("state_dri") && !m.contains('\n')),
            "{e:?}"
        );
        let e = parse("scan_processes = \"yes\"\n").unwrap_err();
        assert!(
            matches!(&e, AgentError::Input(m) if m.contains("agent.toml")),
            "{e:?}"
        );
    }

    #[test]
    fn flags_override_the_file_and_globs_replace_it() {
        let text = "state_dir = \"/a\"\nqmp_globs = [\"/x/*.sock\", \"/y/*.sock\"]\n";
        let mut c = parse(text).unwrap();
        c.apply(Overrides::default());
        assert_eq!(c.state_dir, Path::new("/a"));
        assert_eq!(c.qmp_globs.len(), 2);
        c.apply(Overrides {
            state_dir: Some("/b".into()),
            qmp_globs: vec!["/z/qmp.sock".into()],
            no_process_scan: true,
            freeze_limit_secs: Some(5),
            restore_roots: vec!["/srv/restores".into()],
        });
        assert_eq!(c.state_dir, Path::new("/b"));
        assert_eq!(c.restore_roots, [Path::new("/srv/restores")]);
        assert_eq!(c.qmp_globs, ["/z/qmp.sock"]);
        assert!(!c.scan_processes);
        assert_eq!(c.freeze_limit_secs, 5);
        c.check().unwrap();
        c.restore_roots.push("relative".into());
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .contains("not an absolute path"));
        c.restore_roots.pop();
    }

    #[test]
    fn a_configuration_that_could_never_work_is_refused() {
        let nothing = parse("qmp_globs = []\nscan_processes = false\n").unwrap();
        assert!(nothing.check().is_err());
        let scan_only = parse("qmp_globs = []\n").unwrap();
        scan_only.check().unwrap();
        for limit in [0, MAX_FREEZE_LIMIT_SECS + 1] {
            let c = parse(&format!("freeze_limit_secs = {limit}\n")).unwrap();
            assert!(c.check().is_err(), "{limit}");
        }
        assert!(parse("qmp_globs = [\"\"]\n").unwrap().check().is_err());
        assert!(parse("state_dir = \"\"\n").unwrap().check().is_err());
    }
}
