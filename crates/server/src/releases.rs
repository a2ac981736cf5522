//! Agent releases and host upgrades (docs/design.md, "Releases and the keys they touch").
//!
//! A release is a binary and its signed record (version, target triple, SHA-256, size), kept
//! as files in `STATE/releases/VERSION-TARGET/`. The server signs with its own key (made on
//! first use, `STATE/release.key`), or, given only an offline key's public half, takes a
//! signature made elsewhere and checks it. A host is offered a release in its heartbeat's
//! answer: the version asked for it (`host upgrade`), or with `auto_upgrade` the newest for
//! its target; never one that was rolled back on it, and never an older one.

use std::path::PathBuf;

use rusqlite::{params, OptionalExtension};
use vmvault_api::agent::{RolledBack, UpgradeOffer};
use vmvault_api::ReleaseInfo;
use vmvault_release::{ReleaseKey, ReleasePublicKey, SignedRelease, Version};

use crate::app::App;
use crate::db::ts;
use crate::hosts::HostRow;
use crate::{Error, Result};

/// At most this large a binary (the CLI's release build is a few tens of MiB).
pub const MAX_RELEASE: usize = 512 << 20;

fn bad(e: vmvault_release::ReleaseError) -> Error {
    Error::Input(e.to_string())
}

fn parse_version(v: &str) -> Result<Version> {
    v.parse()
        .map_err(|e| Error::Input(format!("version {v:?}: {e}")))
}

impl App {
    fn release_dir(&self, version: &Version, target: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("releases")
            .join(format!("{version}-{target}"))
    }

    /// `release add`: signs the binary (or checks the given signature) and keeps both.
    pub fn add_release(
        &self,
        version: &str,
        target: Option<&str>,
        binary: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<ReleaseInfo> {
        let version = parse_version(version)?;
        let target = target.map_or_else(vmvault_release::this_target, str::to_string);
        let signed =
            match (&self.cfg.release_public_key, signature) {
                (None, None) => {
                    let key = ReleaseKey::load_or_create(&self.cfg.state_dir.join("release.key"))
                        .map_err(|e| Error::Config(format!("the release key: {e}")))?;
                    let record = vmvault_release::Release::of_bytes(binary, version, &target)
                        .map_err(bad)?;
                    vmvault_release::sign_release(&key, record).map_err(bad)?
                }
                (_, Some(sig)) => SignedRelease::from_json(sig).map_err(bad)?,
                (Some(_), None) => return Err(Error::Input(
                    "this server holds only the release key's public half: sign the binary with \
                     `vmvault release sign --key KEY FILE` and give the .sig file"
                        .into(),
                )),
            };
        let public = ReleasePublicKey::from_hex(&self.release_public_key()?).map_err(bad)?;
        vmvault_release::verify(&public, &signed, binary).map_err(bad)?;
        if signed.release.version != version || signed.release.target != target {
            return Err(Error::Input(format!(
                "the signature is for {} on {}, not {version} on {target}",
                signed.release.version, signed.release.target
            )));
        }
        let dir = self.release_dir(&version, &target);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("making {}", dir.display()), e))?;
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))
        };
        // The signature last: a release is offered only once its file says it is whole.
        write("vmvault", binary)?;
        write("vmvault.sig", signed.to_json().as_bytes())?;
        let info = ReleaseInfo {
            version: version.to_string(),
            target: target.clone(),
            sha256: hex::encode(signed.release.sha256),
            size: signed.release.size,
            added: ts(self.now()),
        };
        self.db.conn().execute(
            "INSERT INTO releases (version, target, sha256, size, added) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (version, target) DO UPDATE SET sha256 = ?3, size = ?4, added = ?5",
            params![info.version, info.target, info.sha256, info.size as i64, info.added],
        )?;
        Ok(info)
    }

    pub fn releases(&self) -> Result<Vec<ReleaseInfo>> {
        let conn = self.db.conn();
        let mut stmt = conn.prepare("SELECT version, target, sha256, size, added FROM releases")?;
        let mut rows = stmt
            .query_map([], |r| {
                Ok(ReleaseInfo {
                    version: r.get(0)?,
                    target: r.get(1)?,
                    sha256: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    added: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.sort_by_key(|r| (r.version.parse::<Version>().ok(), r.target.clone()));
        Ok(rows)
    }

    /// `host upgrade`: the version the host is to run (the newest for its target if none is
    /// named).
    pub fn upgrade_host(&self, name: &str, version: Option<&str>) -> Result<()> {
        if self.is_own_host(name) {
            return Err(Error::Conflict(format!(
                "'{name}' is the server's own host: its agent is upgraded with the server"
            )));
        }
        let (id, target): (i64, Option<String>) = self
            .db
            .conn()
            .query_row(
                "SELECT id, target FROM hosts WHERE name = ?1 AND state = 'enrolled'",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| Error::NotFound(format!("no enrolled host '{name}'")))?;
        let target = target.ok_or_else(|| {
            Error::Conflict(format!(
                "host '{name}' has not said what it runs on yet (no heartbeat)"
            ))
        })?;
        let version = match version {
            Some(v) => parse_version(v)?,
            None => self.newest_release(&target)?.ok_or_else(|| {
                Error::NotFound(format!("no release for {target} (`release add`)"))
            })?,
        };
        if !self
            .release_dir(&version, &target)
            .join("vmvault.sig")
            .exists()
        {
            return Err(Error::NotFound(format!(
                "no release {version} for {target}"
            )));
        }
        let bad: bool = self.db.conn().query_row(
            "SELECT count(*) > 0 FROM host_bad_versions WHERE host_id = ?1 AND version = ?2",
            params![id, version.to_string()],
            |r| r.get(0),
        )?;
        if bad {
            return Err(Error::Conflict(format!(
                "{version} was rolled back on host '{name}': it is not offered to it again"
            )));
        }
        self.db.conn().execute(
            "UPDATE hosts SET wanted_version = ?2 WHERE id = ?1",
            params![id, version.to_string()],
        )?;
        Ok(())
    }

    pub fn set_auto_upgrade(&self, name: &str, on: bool) -> Result<()> {
        let n = self.db.conn().execute(
            "UPDATE hosts SET auto_upgrade = ?2 WHERE name = ?1 AND state != 'revoked'",
            params![name, on],
        )?;
        if n == 0 {
            return Err(Error::NotFound(format!("no host '{name}'")));
        }
        Ok(())
    }

    fn newest_release(&self, target: &str) -> Result<Option<Version>> {
        Ok(self
            .releases()?
            .into_iter()
            .filter(|r| r.target == target)
            .filter_map(|r| r.version.parse::<Version>().ok())
            .max())
    }

    /// Heartbeat bookkeeping: a rollback the agent reports, and the release to offer it.
    pub(crate) fn upgrade_for(
        &self,
        host: &HostRow,
        running: &str,
        target: &str,
        rolled_back: Option<&RolledBack>,
    ) -> Result<Option<UpgradeOffer>> {
        if let Some(r) = rolled_back {
            parse_version(&r.version)?;
            let reason: String = r.reason.chars().take(500).collect();
            self.db.conn().execute(
                "INSERT OR IGNORE INTO host_bad_versions (host_id, version, reason, time)
                 VALUES (?1, ?2, ?3, ?4)",
                params![host.id, r.version, reason, ts(self.now())],
            )?;
            // Not wanted any more: an admin names another version, or the next release.
            self.db.conn().execute(
                "UPDATE hosts SET wanted_version = NULL WHERE id = ?1 AND wanted_version = ?2",
                params![host.id, r.version],
            )?;
            self.alert(
                "upgrade_rolled_back",
                &host.name,
                &format!("host '{}' rolled back {}: {reason}", host.name, r.version),
            );
        }
        if self.is_own_host(&host.name) {
            return Ok(None);
        }
        if target.is_empty()
            || target.len() > 64
            || !target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(Error::Input(format!(
                "target {target:?} is not a target triple"
            )));
        }
        let (wanted, auto): (Option<String>, bool) = self.db.conn().query_row(
            "UPDATE hosts SET target = ?2 WHERE id = ?1 RETURNING wanted_version, auto_upgrade",
            params![host.id, target],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let running = parse_version(running)?;
        let wanted = match wanted {
            Some(w) => Some(parse_version(&w)?),
            None if auto => self.newest_release(target)?,
            None => None,
        };
        let Some(wanted) = wanted.filter(|w| *w > running) else {
            // Reached (or passed): nothing is wanted any more.
            self.db.conn().execute(
                "UPDATE hosts SET wanted_version = NULL WHERE id = ?1 AND wanted_version = ?2",
                params![host.id, running.to_string()],
            )?;
            return Ok(None);
        };
        let bad: bool = self.db.conn().query_row(
            "SELECT count(*) > 0 FROM host_bad_versions WHERE host_id = ?1 AND version = ?2",
            params![host.id, wanted.to_string()],
            |r| r.get(0),
        )?;
        if bad {
            return Ok(None);
        }
        let sig = self.release_dir(&wanted, target).join("vmvault.sig");
        match std::fs::read_to_string(&sig) {
            Ok(signature) => Ok(Some(UpgradeOffer {
                version: wanted.to_string(),
                signature,
            })),
            Err(_) => Ok(None),
        }
    }

    /// The binary of a release for the host's own target.
    pub fn release_binary(&self, host: &HostRow, version: &str) -> Result<Vec<u8>> {
        let version = parse_version(version)?;
        let target: Option<String> =
            self.db
                .conn()
                .query_row("SELECT target FROM hosts WHERE id = ?1", [host.id], |r| {
                    r.get(0)
                })?;
        let target =
            target.ok_or_else(|| Error::NotFound("no target known for this host".into()))?;
        let path = self.release_dir(&version, &target).join("vmvault");
        std::fs::read(&path)
            .map_err(|_| Error::NotFound(format!("no release {version} for {target}")))
    }

    /// The versions rolled back on a host, for `hosts`.
    pub(crate) fn bad_versions(&self, host: &str) -> Result<Vec<String>> {
        let conn = self.db.conn();
        let mut stmt = conn.prepare(
            "SELECT b.version FROM host_bad_versions b JOIN hosts h ON h.id = b.host_id
             WHERE h.name = ?1 ORDER BY b.time",
        )?;
        let rows = stmt
            .query_map([host], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(rows)
    }
}
