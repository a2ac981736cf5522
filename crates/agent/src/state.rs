//! The agent's state directory (`/var/lib/vmvault-agent` by default, 0700): the host key it
//! made and the certificate carrying it (`host.key`, 0600; `host.crt`), and what enrollment
//! pinned (`server.json`: the server's address, certificate fingerprint and release key).
//! Binaries never live here, so an upgrade or a rollback never touches key material.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::Identity;
use crate::{AgentError, Result};

/// What enrollment pinned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pins {
    pub server: String,
    pub fingerprint: String,
    pub host: String,
    pub host_id: i64,
    pub release_key: String,
}

pub struct AgentState {
    pub dir: PathBuf,
}

impl AgentState {
    /// Opens (making, 0700) the state directory.
    pub fn open(dir: &Path) -> Result<AgentState> {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("making {}", dir.display()), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| AgentError::io(format!("restricting {}", dir.display()), e))?;
        Ok(AgentState {
            dir: dir.to_path_buf(),
        })
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("host.key")
    }

    fn pins_path(&self) -> PathBuf {
        self.dir.join("server.json")
    }

    /// Where running backups keep QEMU's point-in-time images.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    /// The host key and its certificate, made on first use. The certificate's names and
    /// dates mean nothing to the server: the key is the host's identity.
    pub fn identity(&self) -> Result<Identity> {
        let key_path = self.key_path();
        let cert_path = self.dir.join("host.crt");
        if key_path.exists() && cert_path.exists() {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|e| AgentError::io(format!("reading {}", p.display()), e))
            };
            return Ok(Identity {
                key_pkcs8: read(&key_path)?,
                cert: read(&cert_path)?,
            });
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| AgentError::Tls(format!("making the host key: {e}")))?;
        let cert = rcgen::CertificateParams::new(vec!["vmvault-agent".to_string()])
            .and_then(|p| p.self_signed(&key))
            .map_err(|e| AgentError::Tls(format!("making the host certificate: {e}")))?;
        let pkcs8 = key.serialize_der();
        write_new(&key_path, &pkcs8, 0o600)?;
        write_new(&cert_path, cert.der(), 0o644)?;
        Ok(Identity {
            key_pkcs8: pkcs8,
            cert: cert.der().to_vec(),
        })
    }

    /// The host key's raw Ed25519 public half.
    pub fn public_key(&self, id: &Identity) -> Result<[u8; 32]> {
        let key = rcgen::KeyPair::try_from(id.key_pkcs8.as_slice())
            .map_err(|e| AgentError::Tls(format!("reading the host key: {e}")))?;
        key.public_key_raw()
            .try_into()
            .map_err(|_| AgentError::Tls("the host key is not an Ed25519 key".into()))
    }

    pub fn pins(&self) -> Result<Option<Pins>> {
        match std::fs::read(self.pins_path()) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| AgentError::Input(format!("{}: {e}", self.pins_path().display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::io(
                format!("reading {}", self.pins_path().display()),
                e,
            )),
        }
    }

    pub fn save_pins(&self, pins: &Pins) -> Result<()> {
        let text = serde_json::to_vec_pretty(pins).map_err(|e| AgentError::Input(e.to_string()))?;
        let tmp = self.dir.join("server.json.new");
        let _ = std::fs::remove_file(&tmp);
        write_new(&tmp, &text, 0o600)?;
        std::fs::rename(&tmp, self.pins_path())
            .map_err(|e| AgentError::io(format!("writing {}", self.pins_path().display()), e))
    }
}

/// Writes a file that must not exist yet, with `mode` from its creation on, and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let io = |e| AgentError::io(format!("writing {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}
