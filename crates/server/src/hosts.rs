//! Hypervisor hosts: enrollment codes, the agent's key, heartbeats and the VMs they report,
//! and revocation (docs/design.md, "Enrollment" and "The host credential, and revocation").
//!
//! A code is `ID-SECRET`. The server keeps ID and a verifier derived from SECRET, never the
//! code; the agent proves it knows SECRET by a keyed hash over the server certificate's
//! fingerprint and its own key, and the server answers with a proof of its own. Neither side
//! sends the code, so a man in the middle (who shows another certificate) fails both proofs.

use rusqlite::{params, OptionalExtension};
use vmvault_api::agent::{EnrollAnswer, EnrollRequest, FoundVm, Heartbeat, HeartbeatAnswer};
use vmvault_api::{EnrollmentCode, Host, HostState, Vm, VmRunState};

use crate::app::App;
use crate::db::{parse_ts, ts};
use crate::peer::{HostKey, Peer};
use crate::{Error, Result};

/// Crockford's base32: no I, L, O, U, so a code read aloud or typed is not misread.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const ID_CHARS: usize = 8;
const SECRET_CHARS: usize = 26;
/// Failed proofs that void a code: 130 bits are not guessed, so failures mean someone tries.
const MAX_FAILURES: i64 = 5;
const VERIFIER_CONTEXT: &str = "vmvault host enrollment 1";

/// A host as the agent routes know it.
#[derive(Debug, Clone)]
pub struct HostRow {
    pub id: i64,
    pub name: String,
}

fn random_code(chars: usize) -> String {
    let mut b = vec![0u8; chars];
    vmvault_format::random_bytes(&mut b);
    // 256 is a multiple of 32: every character is equally likely.
    b.iter()
        .map(|x| CROCKFORD[(x & 31) as usize] as char)
        .collect()
}

pub fn verifier(secret: &str) -> [u8; 32] {
    blake3::derive_key(VERIFIER_CONTEXT, secret.as_bytes())
}

/// The agent's proof: `BLAKE3-keyed(verifier, "agent" ‖ F ‖ id ‖ public key)`.
pub fn agent_proof(verifier: &[u8; 32], fingerprint: &str, id: &str, public: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(verifier);
    h.update(b"agent");
    h.update(fingerprint.as_bytes());
    h.update(id.as_bytes());
    h.update(public);
    *h.finalize().as_bytes()
}

/// The server's proof, over everything the agent will pin.
pub fn server_proof(
    verifier: &[u8; 32],
    fingerprint: &str,
    id: &str,
    public: &[u8],
    host_id: i64,
    host: &str,
    release_key: &str,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(verifier);
    h.update(b"server");
    h.update(fingerprint.as_bytes());
    h.update(id.as_bytes());
    h.update(public);
    h.update(&host_id.to_le_bytes());
    h.update(host.as_bytes());
    h.update(release_key.as_bytes());
    *h.finalize().as_bytes()
}

/// `30m`, `1h`, `7d`: 5 minutes to 7 days.
pub fn parse_expiry(s: &str) -> Result<chrono::Duration> {
    let bad = || {
        Error::Input(format!(
            "--expires {s}: give minutes, hours or days (30m, 1h, 7d)"
        ))
    };
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => return Err(bad()),
    };
    if d < chrono::Duration::minutes(5) || d > chrono::Duration::days(7) {
        return Err(Error::Input(format!(
            "--expires {s}: an enrollment code lasts 5 minutes to 7 days"
        )));
    }
    Ok(d)
}

fn host_row(r: &rusqlite::Row) -> rusqlite::Result<(Host, i64)> {
    Ok((
        Host {
            name: r.get(0)?,
            state: HostState::from(r.get::<_, String>(1)?),
            agent_version: r.get(2)?,
            last_heartbeat: r.get(3)?,
            vms: r.get::<_, i64>(4)? as u32,
            silent: false,
            created: r.get(5)?,
            wanted_version: r.get(7)?,
            auto_upgrade: r.get(8)?,
            bad_versions: Vec::new(),
        },
        r.get(6)?,
    ))
}

impl App {
    /// `host add`: a pending host with a fresh code (a new code for a pending name replaces
    /// the old one); an enrolled name needs `replace`, a revoked one starts over.
    pub fn add_host(
        &self,
        name: &str,
        expires: Option<&str>,
        replace: bool,
    ) -> Result<EnrollmentCode> {
        crate::api::check_name(name, "host")?;
        let life = parse_expiry(expires.unwrap_or("1h"))?;
        let id = random_code(ID_CHARS);
        let secret = random_code(SECRET_CHARS);
        let until = self.now() + life;
        let now = ts(self.now());
        let conn = self.db.conn();
        let state: Option<String> = conn
            .query_row("SELECT state FROM hosts WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        match state.as_deref().map(HostState::from) {
            None => {
                conn.execute(
                    "INSERT INTO hosts (name, state, code_id, verifier, code_expires, created)
                     VALUES (?1, 'pending', ?2, ?3, ?4, ?5)",
                    params![name, id, hex::encode(verifier(&secret)), ts(until), now],
                )?;
            }
            Some(HostState::Enrolled) if !replace => {
                return Err(Error::Conflict(format!(
                    "host '{name}' is enrolled: `host remove {name}` first (its key is revoked \
                     at once), then add it again"
                )));
            }
            Some(_) => {
                // A revoked or replaced key stays refused for good.
                conn.execute(
                    "INSERT OR IGNORE INTO revoked_keys (key, host, revoked)
                     SELECT key, name, ?2 FROM hosts WHERE name = ?1 AND key IS NOT NULL",
                    params![name, now],
                )?;
                conn.execute(
                    "UPDATE hosts SET state = 'pending', key = NULL, public_key = NULL,
                     code_id = ?2, verifier = ?3, code_expires = ?4, code_failures = 0
                     WHERE name = ?1",
                    params![name, id, hex::encode(verifier(&secret)), ts(until)],
                )?;
            }
        }
        Ok(EnrollmentCode {
            host: name.to_string(),
            code: format!("{id}-{secret}"),
            expires: ts(until),
            fingerprint: self.fingerprint(),
        })
    }

    /// The agent's enrollment: the proof checked in constant time, the code used once.
    pub fn enroll(&self, peer: &Peer, req: &EnrollRequest) -> Result<EnrollAnswer> {
        // Anyone with any key may send an id, as long and as odd as they like: the audit
        // keeps what a code's id could be and a little more, without control characters.
        let target: String = req
            .id
            .chars()
            .filter(|c| !c.is_control())
            .take(32)
            .collect();
        let refuse = |why: String| {
            crate::auth::audit(
                &self.db,
                "-",
                "host.enroll",
                &target,
                &format!("denied: {why}"),
            );
            Error::Unauthorized(why)
        };
        let Some(key) = &peer.agent else {
            return Err(refuse(
                "enrollment needs the agent's TLS client certificate".into(),
            ));
        };
        let Some(fingerprint) = self.fingerprint() else {
            return Err(refuse("agents enroll only over TLS".into()));
        };
        if hex::decode(&req.public_key).ok().as_deref() != Some(&key.public[..]) {
            return Err(refuse(
                "the key in the request is not the connection's".into(),
            ));
        }
        let row: Option<(i64, String, String, String, Option<String>, i64)> = self
            .db
            .conn()
            .query_row(
                "SELECT id, name, verifier, code_expires, key, code_failures FROM hosts
                 WHERE code_id = ?1 AND state = 'pending'",
                [&req.id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((host_id, name, verifier_hex, expires, _, failures)) = row else {
            return Err(refuse(
                "no enrollment code has that id (used, replaced or never made)".into(),
            ));
        };
        let verifier: [u8; 32] = hex::decode(&verifier_hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Input("a damaged enrollment verifier".into()))?;
        if failures >= MAX_FAILURES {
            return Err(refuse(format!(
                "the code for host '{name}' was voided after {MAX_FAILURES} failed proofs"
            )));
        }
        if parse_ts(&expires).is_none_or(|t| t <= self.now()) {
            return Err(refuse(format!(
                "the code for host '{name}' expired at {expires}"
            )));
        }
        let want = agent_proof(&verifier, &fingerprint, &req.id, &key.public);
        let given: Option<[u8; 32]> = hex::decode(&req.proof).ok().and_then(|g| g.try_into().ok());
        // blake3::Hash compares in constant time.
        if given.map(blake3::Hash::from) != Some(blake3::Hash::from(want)) {
            // Counted only while the code stands: of proofs sent at once, no more than five
            // are ever judged, the rest find the code voided.
            let counted = self.db.conn().execute(
                "UPDATE hosts SET code_failures = code_failures + 1
                 WHERE id = ?1 AND code_failures < ?2",
                params![host_id, MAX_FAILURES],
            )?;
            if counted == 0 {
                return Err(refuse(format!(
                    "the code for host '{name}' was voided after {MAX_FAILURES} failed proofs"
                )));
            }
            return Err(refuse(format!(
                "the proof for host '{name}' is wrong (a wrong code, or a connection through \
                 something that is not this server)"
            )));
        }
        let revoked: bool = self.db.conn().query_row(
            "SELECT count(*) > 0 FROM revoked_keys WHERE key = ?1",
            [&key.id],
            |r| r.get(0),
        )?;
        if revoked {
            return Err(refuse(
                "this agent key was revoked: make a new one (remove the agent's state)".into(),
            ));
        }
        let now = ts(self.now());
        let took = self.db.conn().execute(
            "UPDATE hosts SET state = 'enrolled', key = ?2, public_key = ?3, code_id = NULL,
             verifier = NULL, code_expires = NULL, agent_version = ?4
             WHERE id = ?1 AND state = 'pending' AND code_id = ?5 AND code_expires > ?6
             AND code_failures < ?7",
            params![
                host_id,
                key.id,
                req.public_key,
                req.version,
                req.id,
                now,
                MAX_FAILURES
            ],
        );
        match took {
            Ok(1) => {}
            Ok(_) => return Err(refuse("the code was used meanwhile".into())),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(refuse("this agent key is another host's".into()));
            }
            Err(e) => return Err(e.into()),
        }
        crate::auth::audit(
            &self.db,
            &format!("host:{name}"),
            "host.enroll",
            &name,
            "ok",
        );
        let release_key = self.release_public_key()?;
        let proof = server_proof(
            &verifier,
            &fingerprint,
            &req.id,
            &key.public,
            host_id,
            &name,
            &release_key,
        );
        Ok(EnrollAnswer {
            host_id,
            host: name,
            fingerprint,
            release_key,
            server_proof: hex::encode(proof),
        })
    }

    /// The enrolled host a connection's key belongs to; anything else is 401, audited once a
    /// minute per key so that a flood does not flood the log.
    pub fn agent_host(&self, peer: &Peer) -> Result<HostRow> {
        let Some(key) = &peer.agent else {
            return Err(Error::Unauthorized(
                "agent routes need an enrolled agent's TLS client certificate".into(),
            ));
        };
        let row = self
            .db
            .conn()
            .query_row(
                "SELECT id, name FROM hosts WHERE key = ?1 AND state = 'enrolled'",
                [&key.id],
                |r| {
                    Ok(HostRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                    })
                },
            )
            .optional()?;
        match row {
            Some(h) => Ok(h),
            None => {
                self.audit_refused_key(key);
                Err(Error::Unauthorized(
                    "this agent's key is not an enrolled host's (revoked, or never enrolled)"
                        .into(),
                ))
            }
        }
    }

    fn audit_refused_key(&self, key: &HostKey) {
        let now = std::time::Instant::now();
        let mut seen = self.refused_keys.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, t| now.duration_since(*t) < std::time::Duration::from_secs(60));
        if seen.insert(key.id.clone(), now).is_none() {
            crate::auth::audit(
                &self.db,
                "-",
                "agent",
                &key.id[..16],
                "denied: not an enrolled host's key",
            );
        }
    }

    pub fn heartbeat(&self, host: &HostRow, hb: &Heartbeat) -> Result<HeartbeatAnswer> {
        if hb.vms.len() > vmvault_api::agent::MAX_VMS {
            return Err(Error::Input(format!(
                "a heartbeat lists at most {} VMs",
                vmvault_api::agent::MAX_VMS
            )));
        }
        if hb.version.len() > 64 || hb.instance.len() > 64 {
            return Err(Error::Input(
                "a version or instance id longer than 64".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for vm in &hb.vms {
            crate::api::check_name(&vm.name, "VM")?;
            if !seen.insert(vm.name.as_str()) {
                return Err(Error::Input(format!("VM '{}' is listed twice", vm.name)));
            }
        }
        let now = ts(self.now());
        let mut conn = self.db.conn();
        let tx = conn.transaction()?;
        let before: Option<String> =
            tx.query_row("SELECT instance FROM hosts WHERE id = ?1", [host.id], |r| {
                r.get(0)
            })?;
        tx.execute(
            "UPDATE hosts SET agent_version = ?2, instance = ?3, last_heartbeat = ?4,
             silent_alerted = 0 WHERE id = ?1",
            params![host.id, hb.version, hb.instance, now],
        )?;
        // A VM that is not listed stays known, stopped, with what was last seen of it.
        tx.execute(
            "UPDATE host_vms SET state = 'stopped' WHERE host_id = ?1",
            [host.id],
        )?;
        for vm in &hb.vms {
            let state = match vm.state.as_str() {
                "running" => VmRunState::Running,
                "paused" => VmRunState::Paused,
                _ => VmRunState::Stopped,
            };
            let info = serde_json::to_string(vm).map_err(|e| Error::Input(e.to_string()))?;
            tx.execute(
                "INSERT INTO host_vms (host_id, name, state, info, last_seen) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (host_id, name) DO UPDATE SET state = ?3, info = ?4, last_seen = ?5",
                params![host.id, vm.name, state.as_str(), info, now],
            )?;
        }
        tx.commit()?;
        drop(conn);
        if before.is_some_and(|b| b != hb.instance) {
            self.note_instance_change(host, &hb.instance);
        }
        let upgrade = self.upgrade_for(host, &hb.version, &hb.target, hb.rolled_back.as_ref())?;
        Ok(HeartbeatAnswer {
            every_secs: self.cfg.agent_heartbeat_secs,
            upgrade,
        })
    }

    /// A second process with one host's key shows as a heartbeat whose instance flips back
    /// and forth; a restart changes it once.
    fn note_instance_change(&self, host: &HostRow, instance: &str) {
        let mut flips = self
            .instance_flips
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let entry = flips.entry(host.id).or_default();
        entry.retain(|(t, _)| now.duration_since(*t) < std::time::Duration::from_secs(600));
        entry.push((now, instance.to_string()));
        let distinct: std::collections::HashSet<&str> =
            entry.iter().map(|(_, i)| i.as_str()).collect();
        if distinct.len() > 2 || (entry.len() >= 3 && distinct.len() == 2) {
            self.alert(
                "host_credential_duplicated",
                &host.name,
                &format!(
                    "two agent processes use the key of host '{}': if one is not yours, \
                     `host remove {}` and enroll the host again",
                    host.name, host.name
                ),
            );
            entry.clear();
        }
    }

    /// `host remove`: the key is refused from the next request on, the host's running jobs
    /// are cancelled (no manifest; the lock goes), its VMs' items and points stay.
    pub fn remove_host(&self, name: &str) -> Result<()> {
        let now = ts(self.now());
        let n = {
            let mut conn = self.db.conn();
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO revoked_keys (key, host, revoked)
                 SELECT key, name, ?2 FROM hosts WHERE name = ?1 AND key IS NOT NULL",
                params![name, now],
            )?;
            let n = tx.execute(
                "UPDATE hosts SET state = 'revoked', code_id = NULL, verifier = NULL
                 WHERE name = ?1 AND state != 'revoked'",
                [name],
            )?;
            tx.commit()?;
            n
        };
        if n == 0 {
            return Err(Error::NotFound(format!(
                "no host '{name}' (or it is removed already)"
            )));
        }
        let running: Vec<i64> = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare(
                "SELECT id FROM jobs WHERE host = ?1 AND state IN ('running', 'queued')",
            )?;
            let ids = stmt
                .query_map([name], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            ids
        };
        for id in running {
            let _ = self.cancel_job(id);
        }
        Ok(())
    }

    pub fn hosts(&self) -> Result<Vec<Host>> {
        let conn = self.db.conn();
        let mut stmt = conn.prepare(
            "SELECT name, state, agent_version, last_heartbeat,
             (SELECT count(*) FROM host_vms v WHERE v.host_id = h.id AND v.state != 'stopped'),
             created, id, wanted_version, auto_upgrade FROM hosts h ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], host_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let limit = chrono::Duration::seconds(self.cfg.agent_silence_alert_secs as i64);
        let now = self.now();
        drop(stmt);
        drop(conn);
        let mut out = Vec::new();
        for (mut h, _) in rows {
            h.bad_versions = self.bad_versions(&h.name)?;
            out.push(h);
        }
        Ok(out
            .into_iter()
            .map(|mut h| {
                h.silent = h.state == HostState::Enrolled
                    && h.last_heartbeat
                        .as_deref()
                        .and_then(parse_ts)
                        .is_none_or(|t| now - t > limit);
                h
            })
            .collect())
    }

    pub fn vms(&self, host: Option<&str>) -> Result<Vec<Vm>> {
        let conn = self.db.conn();
        let mut stmt = conn.prepare(
            "SELECT h.name, v.name, v.state, v.info, v.last_seen, p.name, p.policy
             FROM host_vms v JOIN hosts h ON h.id = v.host_id
             LEFT JOIN protected_items p ON p.host = h.name AND p.name = v.name
             WHERE (?1 IS NULL OR h.name = ?1) ORDER BY h.name, v.name",
        )?;
        let rows = stmt
            .query_map([host], |r| {
                let info: String = r.get(3)?;
                let found: Option<FoundVm> = serde_json::from_str(&info).ok();
                Ok(Vm {
                    host: r.get(0)?,
                    name: r.get(1)?,
                    state: VmRunState::from(r.get::<_, String>(2)?),
                    last_seen: r.get(4)?,
                    protected: r.get(5)?,
                    policy: r.get(6)?,
                    guest_agent: found.as_ref().is_some_and(|f| f.qga.is_some()),
                    disks: found.map(|f| f.disks).unwrap_or_default(),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The VM as its host's agent last reported it.
    pub fn found_vm(&self, host: &str, vm: &str) -> Result<FoundVm> {
        let info: Option<String> = self
            .db
            .conn()
            .query_row(
                "SELECT v.info FROM host_vms v JOIN hosts h ON h.id = v.host_id
                 WHERE h.name = ?1 AND v.name = ?2",
                [host, vm],
                |r| r.get(0),
            )
            .optional()?;
        let info = info.ok_or_else(|| {
            Error::NotFound(format!(
                "host '{host}' has reported no VM '{vm}' (`vms --host {host}`)"
            ))
        })?;
        serde_json::from_str(&info).map_err(|e| Error::Input(format!("VM '{vm}': {e}")))
    }
}

impl App {
    /// The scheduler pass's look at hosts: an agent silent for longer than
    /// `agent_silence_alert_secs` is alerted once (a heartbeat re-arms it), and a queued job
    /// its host's agent has not taken within `agent_job_wait_secs` fails, alerted as any
    /// failed job: an offline host never holds a VM's protection silently.
    pub(crate) fn check_hosts(&self, now: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let silence = chrono::Duration::seconds(self.cfg.agent_silence_alert_secs as i64);
        let silent: Vec<(i64, String, Option<String>)> = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare(
                "SELECT id, name, last_heartbeat FROM hosts
                 WHERE state = 'enrolled' AND silent_alerted = 0
                 AND (last_heartbeat IS NULL OR last_heartbeat < ?1)",
            )?;
            let rows = stmt
                .query_map([ts(now - silence)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        for (id, name, last) in silent {
            self.db
                .conn()
                .execute("UPDATE hosts SET silent_alerted = 1 WHERE id = ?1", [id])?;
            self.alert(
                "agent_silent",
                &name,
                &format!(
                    "the agent on host '{name}' has not been heard from since {}",
                    last.as_deref().unwrap_or("it enrolled")
                ),
            );
        }
        let wait = chrono::Duration::seconds(self.cfg.agent_job_wait_secs as i64);
        let waiting: Vec<(i64, String, String, Option<String>)> = {
            let conn = self.db.conn();
            let mut stmt = conn.prepare(
                "SELECT j.id, j.kind, j.host, h.last_heartbeat FROM jobs j
                 LEFT JOIN hosts h ON h.name = j.host
                 WHERE j.host IS NOT NULL AND j.state = 'queued' AND j.not_before < ?1",
            )?;
            let rows = stmt
                .query_map([ts(now - wait)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        for (id, kind, host, last) in waiting {
            let error = format!(
                "the agent on host '{host}' did not take the job within {} s (last heard from: {})",
                self.cfg.agent_job_wait_secs,
                last.as_deref().unwrap_or("never")
            );
            let n = self.db.conn().execute(
                "UPDATE jobs SET state = 'failed', ended = ?2, error = ?3, error_code = 'unavailable'
                 WHERE id = ?1 AND state = 'queued'",
                params![id, ts(now), error],
            )?;
            if n == 1 {
                self.job_log(id, &format!("failed: {error}"));
                self.alert_job_failed(id, &kind, &error);
            }
        }
        Ok(())
    }
}
