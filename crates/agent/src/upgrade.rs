//! The agent's own upgrades (docs/design.md, "Releases and the keys they touch"): the server
//! offers a release in a heartbeat's answer; between jobs the agent fetches it, checks it
//! against the release key pinned at enrollment and installs it (crates/release), then asks
//! its caller to restart it in the new binary. The new version confirms itself healthy after
//! its first heartbeat; one that cannot heartbeat by its deadline rolls itself back, and the
//! rollback is reported with the next heartbeat so the server never offers that version to
//! this host again.
//!
//! The binaries live in `STATE/install` (versions/, current, previous); the host key and the
//! pins stay beside it in the state dir, where an upgrade never writes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vmvault_api::agent::{release_path, RolledBack, UpgradeOffer};
use vmvault_release::{Installation, ReleasePublicKey, SignedRelease, Version};

use crate::client::Client;
use crate::state::AgentState;
use crate::{AgentError, Result};

fn rel(e: vmvault_release::ReleaseError) -> AgentError {
    AgentError::Input(e.to_string())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `run` asks of its caller when it returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Asked to stop.
    Stopped,
    /// Start this binary with the same arguments (an upgrade, or a rollback, is installed).
    Restart(PathBuf),
}

pub struct Upgrades {
    pub install: Installation,
    public: ReleasePublicKey,
    /// The version this process runs as.
    pub running: Version,
    report_path: PathBuf,
    /// This process's binary: adopted as the installation's first version before the first
    /// upgrade, so that a rollback has it to go back to.
    exe: PathBuf,
    wanted: Mutex<Option<UpgradeOffer>>,
    refused: Mutex<std::collections::HashSet<String>>,
}

/// The version a binary runs as: the release it was installed as (its signed record named
/// that version for exactly these bytes), else the version it was built as.
pub fn version_of(install: &Installation, exe: &Path) -> Version {
    let built: Version = crate::VERSION
        .parse()
        .expect("the crate's version is MAJOR.MINOR.PATCH");
    let versions = install.root().join("versions");
    let exe = exe.canonicalize().unwrap_or_else(|_| exe.to_path_buf());
    let versions = versions.canonicalize().unwrap_or(versions);
    exe.strip_prefix(&versions)
        .ok()
        .and_then(|rest| rest.components().next())
        .and_then(|c| c.as_os_str().to_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or(built)
}

impl Upgrades {
    /// At start: the installation, and whether
    /// to restart at once in another binary (a newer installed version, or after rolling
    /// back an upgrade that missed its deadline).
    pub fn start(
        state: &AgentState,
        release_key: &str,
        health_deadline_secs: u64,
    ) -> Result<(Upgrades, Option<PathBuf>)> {
        let root = state.dir.join("install");
        std::fs::create_dir_all(&root)
            .map_err(|e| AgentError::io(format!("making {}", root.display()), e))?;
        let install = Installation::open(&root)
            .map_err(rel)?
            .with_health_deadline(health_deadline_secs);
        let exe = std::env::current_exe().map_err(|e| AgentError::io("finding this program", e))?;
        let running = version_of(&install, &exe);
        let public = ReleasePublicKey::from_hex(release_key).map_err(rel)?;
        let up = Upgrades {
            install,
            public,
            running,
            report_path: state.dir.join("rolled-back.json"),
            exe: exe.clone(),
            wanted: Mutex::new(None),
            refused: Mutex::new(Default::default()),
        };
        if up.install.overdue(now()).map_err(rel)?.is_some() {
            let restart = up.roll_back("it did not heartbeat healthy before its deadline")?;
            return Ok((up, restart));
        }
        // The old version marks the new one as started when it hands over; finding the mark
        // while another version starts means the new one stopped before it reported healthy
        // (it exited or was killed at start, and systemd started the installed binary again).
        let started = up.started_path();
        if let Some(p) = up.install.pending().map_err(rel)? {
            if p.to != running
                && std::fs::read_to_string(&started).is_ok_and(|v| v == p.to.to_string())
            {
                let _ = std::fs::remove_file(&started);
                let restart = up.roll_back("it stopped before it reported healthy")?;
                return Ok((
                    up,
                    restart.filter(|bin| bin.canonicalize().ok() != exe.canonicalize().ok()),
                ));
            }
        }
        let current = up.install.current_version().map_err(rel)?;
        let here = exe.canonicalize().ok();
        let theirs = up.install.current_binary().canonicalize().ok();
        if current.is_some_and(|c| c > running) && here != theirs {
            let bin = up.install.current_binary();
            return Ok((up, Some(bin)));
        }
        Ok((up, None))
    }

    /// Rolls back a pending upgrade; the binary to restart in, if one was rolled back.
    pub fn roll_back(&self, reason: &str) -> Result<Option<PathBuf>> {
        Ok(roll_back(&self.install, &self.report_path, reason)?
            .map(|_| self.install.current_binary()))
    }

    fn started_path(&self) -> PathBuf {
        self.report_path.with_file_name("upgrade-started")
    }

    /// A rollback not yet told to the server.
    pub fn report(&self) -> Option<RolledBack> {
        std::fs::read(&self.report_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// After a heartbeat the server answered: a pending upgrade to this very version is
    /// healthy, a told rollback is forgotten, and an offer is noted for between jobs.
    pub fn heartbeat_answered(&self, told: bool, offer: Option<UpgradeOffer>) -> Result<()> {
        if told {
            let _ = std::fs::remove_file(&self.report_path);
        }
        if let Some(p) = self.install.pending().map_err(rel)? {
            if p.to == self.running {
                self.install.confirm_healthy(self.running).map_err(rel)?;
                let _ = std::fs::remove_file(self.started_path());
            }
        }
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) =
            offer.filter(|o| !refused.contains(&o.version));
        Ok(())
    }

    /// A heartbeat that failed: an upgrade that cannot reach the server by its deadline is
    /// not healthy.
    pub fn heartbeat_failed(&self) -> Result<Option<PathBuf>> {
        match self.install.pending().map_err(rel)? {
            Some(p) if p.to == self.running && now() > p.deadline => {
                self.roll_back("it could not reach the server before its deadline")
            }
            _ => Ok(None),
        }
    }

    /// Between jobs: installs the offered release; the binary to restart in. A release that
    /// is refused (signature, version, target) is said and not tried again in this run.
    pub fn apply(&self, client: &Client, say: &(dyn Fn(&str) + Sync)) -> Option<PathBuf> {
        let offer = self
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        match self.install_offer(client, &offer) {
            Ok(()) => {
                say(&format!("upgraded to {}: restarting", offer.version));
                if let Err(e) = std::fs::write(self.started_path(), &offer.version) {
                    say(&format!("marking the upgrade: {e}"));
                }
                Some(self.install.current_binary())
            }
            Err(e) => {
                say(&format!("release {} refused: {e}", offer.version));
                self.refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(offer.version);
                None
            }
        }
    }

    fn install_offer(&self, client: &Client, offer: &UpgradeOffer) -> Result<()> {
        let signed = SignedRelease::from_json(offer.signature.as_bytes()).map_err(rel)?;
        if signed.release.version.to_string() != offer.version {
            return Err(AgentError::Input(format!(
                "the offer names {} but its signature is for {}",
                offer.version, signed.release.version
            )));
        }
        let binary = client
            .get_raw(&release_path(&offer.version), None)?
            .ok_or_else(|| AgentError::Server("the release has no content".into()))?;
        self.install.adopt(self.running, &self.exe).map_err(rel)?;
        self.install
            .install(&self.public, &signed, &binary, self.running, now())
            .map_err(rel)?;
        Ok(())
    }
}

/// Rolls back a pending upgrade and keeps a report of it for the next heartbeat; the
/// versions (failed, now current).
fn roll_back(
    install: &Installation,
    report: &Path,
    reason: &str,
) -> Result<Option<(Version, Version)>> {
    let Some((failed, now)) = install.rollback(reason).map_err(rel)? else {
        return Ok(None);
    };
    let told = RolledBack {
        version: failed.to_string(),
        reason: reason.to_string(),
    };
    let text = serde_json::to_vec(&told).map_err(|e| AgentError::Input(e.to_string()))?;
    std::fs::write(report, text)
        .map_err(|e| AgentError::io(format!("writing {}", report.display()), e))?;
    Ok(Some((failed, now)))
}

/// `vmvault agent rollback` (systemd's `OnFailure=`, when a new version cannot start or
/// hangs): back to the previous version if an upgrade is pending; told to the server with
/// the next heartbeat. Returns the versions (failed, now current), if one was rolled back.
pub fn rollback(state: &AgentState, reason: &str) -> Result<Option<(Version, Version)>> {
    let install = Installation::open(&state.dir.join("install")).map_err(rel)?;
    roll_back(&install, &state.dir.join("rolled-back.json"), reason)
}
