//! The agent's side of an upgrade: the versions it keeps, the swap, the health deadline and
//! the rollback (the layout is in the crate documentation).

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{fsx, this_target, verify, ReleaseError, ReleasePublicKey, SignedRelease, Version};

/// How long a new version has, from its install, to call
/// [`confirm_healthy`](Installation::confirm_healthy): long enough for a restart and a few
/// heartbeats on a busy host, short enough that a broken version does not sit for long.
pub const DEFAULT_HEALTH_DEADLINE_SECS: u64 = 300;

const BINARY: &str = "vmvault";
const VERSIONS: &str = "versions";
const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const STATE: &str = "state.json";
const PENDING: &str = "upgrade.pending";

/// An upgrade waiting for the new version's first healthy heartbeat (`upgrade.pending`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub from: Version,
    pub to: Version,
    /// Unix seconds; past it, the upgrade is rolled back.
    pub deadline: u64,
}

/// A version rolled back on this host, and why: never installed again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadVersion {
    pub version: Version,
    pub reason: String,
}

/// `state.json`. Unknown fields are ignored, not refused: after a rollback the older version
/// reads what the newer one wrote, and must not fail on it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The versions that came up healthy here (or were running when something was installed).
    #[serde(default)]
    ran: Vec<Version>,
    #[serde(default)]
    bad: Vec<BadVersion>,
}

impl State {
    fn record_ran(&mut self, version: Version) {
        if !self.ran.contains(&version) {
            self.ran.push(version);
            self.ran.sort();
        }
    }

    fn bad(&self, version: Version) -> Option<&BadVersion> {
        self.bad.iter().find(|b| b.version == version)
    }
}

/// The versions of the agent on one host, under one root directory.
#[derive(Debug, Clone)]
pub struct Installation {
    root: PathBuf,
    health_deadline_secs: u64,
}

impl Installation {
    /// The installation in `root`, which must be a directory (it is the agent's state
    /// directory; it is not made here, so that its owner and mode stay the agent's choice).
    pub fn open(root: &Path) -> Result<Installation, ReleaseError> {
        let meta =
            fs::metadata(root).map_err(ReleaseError::io(format!("opening {}", root.display())))?;
        if !meta.is_dir() {
            return Err(ReleaseError::Format(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        Ok(Installation {
            root: root.to_path_buf(),
            health_deadline_secs: DEFAULT_HEALTH_DEADLINE_SECS,
        })
    }

    /// The same installation, giving new versions `secs` to come back healthy.
    pub fn with_health_deadline(mut self, secs: u64) -> Installation {
        self.health_deadline_secs = secs;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What systemd starts: `ROOT/current/vmvault`.
    pub fn current_binary(&self) -> PathBuf {
        self.root.join(CURRENT).join(BINARY)
    }

    /// The version `current` points at, `None` before the first adopt.
    pub fn current_version(&self) -> Result<Option<Version>, ReleaseError> {
        self.link_version(CURRENT)
    }

    /// The version `previous` points at: where a rollback goes.
    pub fn previous_version(&self) -> Result<Option<Version>, ReleaseError> {
        self.link_version(PREVIOUS)
    }

    /// The highest version that has run on this host; a release must be newer.
    pub fn highest_run(&self) -> Result<Option<Version>, ReleaseError> {
        Ok(self.state()?.ran.into_iter().max())
    }

    /// The versions rolled back here, oldest rollback first.
    pub fn bad_versions(&self) -> Result<Vec<BadVersion>, ReleaseError> {
        Ok(self.state()?.bad)
    }

    /// The upgrade waiting for its health check, if any.
    pub fn pending(&self) -> Result<Option<Pending>, ReleaseError> {
        let path = self.root.join(PENDING);
        let Some(bytes) = fsx::read_if_exists(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ReleaseError::Format(format!("{}: {e}", path.display())))
    }

    /// The pending upgrade, if its deadline has passed without a healthy heartbeat. The agent
    /// asks at start and rolls back when there is one.
    pub fn overdue(&self, now: u64) -> Result<Option<Pending>, ReleaseError> {
        Ok(self.pending()?.filter(|p| now > p.deadline))
    }

    /// Make the running agent (its binary at `binary`, version `running`) the installation's
    /// first version, so that a later upgrade has something to fall back to. Nothing happens
    /// (`Ok(false)`) once `current` exists: the agent can call this at every start.
    pub fn adopt(&self, running: Version, binary: &Path) -> Result<bool, ReleaseError> {
        if self.current_version()?.is_some() {
            return Ok(false);
        }
        let mut file = File::open(binary)
            .map_err(ReleaseError::io(format!("reading {}", binary.display())))?;
        self.write_binary(running, &mut file)?;
        let mut state = self.state()?;
        state.record_ran(running);
        self.write_state(&state)?;
        self.point(CURRENT, running)?;
        fsx::sync_dir(&self.root)?;
        Ok(true)
    }

    /// Install `signed`'s binary (`binary`, as received) and make it current, with an upgrade
    /// pending until `now` + the health deadline. The agent restarts into it next.
    ///
    /// Everything is checked before anything is written, so a refused release leaves every
    /// file as it was: the signature against the enrolled release key, the target, the size
    /// and hash, that the version is newer than `running` and than every version this host
    /// has run (a signed but old, vulnerable release is refused), and that it was not rolled
    /// back here before.
    pub fn install(
        &self,
        public: &ReleasePublicKey,
        signed: &SignedRelease,
        binary: &[u8],
        running: Version,
        now: u64,
    ) -> Result<Pending, ReleaseError> {
        verify(public, signed, binary)?;
        let release = &signed.release;
        let want = this_target();
        if release.target != want {
            return Err(ReleaseError::WrongTarget {
                want,
                got: release.target.clone(),
            });
        }
        let mut state = self.state()?;
        let highest = state.ran.iter().copied().fold(running, Version::max);
        if release.version <= highest {
            return Err(ReleaseError::NotNewer {
                version: release.version,
                highest,
            });
        }
        if let Some(bad) = state.bad(release.version) {
            return Err(ReleaseError::MarkedBad {
                version: bad.version,
                reason: bad.reason.clone(),
            });
        }
        if let Some(p) = self.pending()? {
            return Err(ReleaseError::UpgradePending { to: p.to });
        }
        let Some(from) = self.current_version()? else {
            return Err(ReleaseError::NoCurrent(self.root.display().to_string()));
        };

        let to = release.version;
        self.write_binary(to, &mut &binary[..])?;
        state.record_ran(running);
        self.write_state(&state)?;
        // Pending before the swap: a crash in between leaves a pending upgrade that a
        // rollback clears, never a new `current` that no deadline watches.
        let pending = Pending {
            from,
            to,
            deadline: now.saturating_add(self.health_deadline_secs),
        };
        let text = serde_json::to_vec_pretty(&pending).expect("versions and a number");
        fsx::replace(
            &self.root.join(PENDING),
            &self.root.join(format!("{PENDING}.new")),
            &mut text.as_slice(),
            0o644,
        )?;
        self.point(PREVIOUS, from)?;
        self.point(CURRENT, to)?;
        fsx::sync_dir(&self.root)?;
        Ok(pending)
    }

    /// Called by the running version after its first healthy heartbeat: the version counts
    /// as run here (no release at or below it is installed again) and its pending upgrade, if
    /// it is the one waited for, is done. Returns that upgrade. A version rolled back here is
    /// not recorded: it must not raise the bar over the fix that replaces it.
    pub fn confirm_healthy(&self, running: Version) -> Result<Option<Pending>, ReleaseError> {
        let mut state = self.state()?;
        if state.bad(running).is_some() {
            return Ok(None);
        }
        if !state.ran.contains(&running) {
            state.record_ran(running);
            self.write_state(&state)?;
        }
        match self.pending()? {
            Some(p) if p.to == running => {
                fsx::remove_if_exists(&self.root.join(PENDING))?;
                fsx::sync_dir(&self.root)?;
                Ok(Some(p))
            }
            _ => Ok(None),
        }
    }

    /// Undo a failed upgrade: the pending one, or a `current` marked bad. Marks the version
    /// bad (with `reason`), points `current` back at `previous` and clears the pending
    /// upgrade; returns (failed version, version now current). With nothing to undo it does
    /// nothing and returns `None`, so systemd's `OnFailure=` can run it after any crash
    /// without ever downgrading a version that was confirmed healthy.
    ///
    /// Each step can be cut short by a crash and the call repeated: the version is marked
    /// bad first, so a half-done rollback is still one to finish.
    pub fn rollback(&self, reason: &str) -> Result<Option<(Version, Version)>, ReleaseError> {
        let pending = self.pending()?;
        let current = self.current_version()?;
        let mut state = self.state()?;
        let failed = match (pending, current) {
            (Some(p), _) => p.to,
            (None, Some(c)) if state.bad(c).is_some() => c,
            _ => return Ok(None),
        };
        if state.bad(failed).is_none() {
            state.bad.push(BadVersion {
                version: failed,
                reason: reason.to_string(),
            });
            self.write_state(&state)?;
        }
        let back_to = if current == Some(failed) {
            match self.previous_version()? {
                Some(p) if p != failed && state.bad(p).is_none() => {
                    self.point(CURRENT, p)?;
                    p
                }
                _ => return Err(ReleaseError::NoPrevious(failed)),
            }
        } else {
            // The swap never happened, or this is a rollback cut short after it.
            current.ok_or(ReleaseError::NoPrevious(failed))?
        };
        fsx::remove_if_exists(&self.root.join(PENDING))?;
        fsx::sync_dir(&self.root)?;
        Ok(Some((failed, back_to)))
    }

    /// Remove the versions nothing points at (not current, previous or pending), returning
    /// them. Only directories under `versions/` named as a version are touched.
    pub fn prune(&self) -> Result<Vec<Version>, ReleaseError> {
        let keep = [
            self.current_version()?,
            self.previous_version()?,
            self.pending()?.map(|p| p.to),
        ];
        let versions = self.root.join(VERSIONS);
        let entries = match fs::read_dir(&versions) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ReleaseError::io(format!("listing {}", versions.display()))(
                    e,
                ))
            }
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(ReleaseError::io(format!("listing {}", versions.display())))?;
            let Some(version) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if keep.contains(&Some(version)) || !entry.path().is_dir() {
                continue;
            }
            fs::remove_dir_all(entry.path()).map_err(ReleaseError::io(format!(
                "removing {}",
                entry.path().display()
            )))?;
            removed.push(version);
        }
        if !removed.is_empty() {
            fsx::sync_dir(&versions)?;
        }
        removed.sort();
        Ok(removed)
    }

    /// `versions/V/vmvault` from `data`: written as `vmvault.tmp` (0755), synced, renamed, the
    /// directories synced. A directory made here is removed again if the write fails.
    fn write_binary(&self, version: Version, data: &mut dyn Read) -> Result<(), ReleaseError> {
        let versions = self.root.join(VERSIONS);
        fs::create_dir_all(&versions)
            .map_err(ReleaseError::io(format!("making {}", versions.display())))?;
        let dir = versions.join(version.to_string());
        let made = match fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(ReleaseError::io(format!("making {}", dir.display()))(e)),
        };
        let written = fsx::replace(
            &dir.join(BINARY),
            &dir.join(format!("{BINARY}.tmp")),
            data,
            0o755,
        )
        .and_then(|()| fsx::sync_dir(&versions));
        if written.is_err() && made {
            let _ = fs::remove_dir_all(&dir);
        }
        written
    }

    fn state(&self) -> Result<State, ReleaseError> {
        let path = self.root.join(STATE);
        match fsx::read_if_exists(&path)? {
            None => Ok(State::default()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ReleaseError::Format(format!("{}: {e}", path.display()))),
        }
    }

    fn write_state(&self, state: &State) -> Result<(), ReleaseError> {
        let text = serde_json::to_vec_pretty(state).expect("versions and strings");
        fsx::replace(
            &self.root.join(STATE),
            &self.root.join(format!("{STATE}.new")),
            &mut text.as_slice(),
            0o644,
        )
    }

    /// Swap the link `name` to `versions/V` (relative, so the root can move).
    fn point(&self, name: &str, version: Version) -> Result<(), ReleaseError> {
        fsx::point(
            &self.root.join(name),
            &self.root.join(format!("{name}.new")),
            &format!("{VERSIONS}/{version}"),
        )
    }

    fn link_version(&self, name: &str) -> Result<Option<Version>, ReleaseError> {
        let link = self.root.join(name);
        let target = match fs::read_link(&link) {
            Ok(target) => target,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ReleaseError::io(format!(
                    "reading the link {}",
                    link.display()
                ))(e))
            }
        };
        target
            .to_str()
            .and_then(|t| t.strip_prefix(VERSIONS)?.strip_prefix('/'))
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                ReleaseError::Format(format!(
                    "{} points at {}, not at {VERSIONS}/VERSION",
                    link.display(),
                    target.display()
                ))
            })
    }
}
