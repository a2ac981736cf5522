//! The regions record as a vault object (docs/format.md, "Regions record"): which regions the
//! vault lives in, sealed in its own envelope kind (`VMVREGNS`) by the vault's codec like the
//! rules, so that in an encrypted vault a forged or altered record fails its tag and is damage,
//! never a silent change of where the vault replicates to. The JSON inside is crates/open's
//! (it knows what a location is); this module says only whether the record was authenticated.
//!
//! Builds before the record was sealed wrote it as plain JSON. Such a record is handed on as
//! [`StoredRegions::Plain`], for the caller to read on the safe side; a record that is neither
//! sealed nor JSON, or sealed and failing its tag or check, is [`StoreError::Damaged`], never
//! "no record".

use vmvault_format::{Codec, ObjectKind, MAX_REGIONS_LEN};

use crate::backend::{Kind, WriteBackend};
use crate::{Result, StoreError, Vault, REGIONS_RECORD};

/// The regions record as a region stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredRegions {
    /// Sealed (`VMVREGNS`) and opened: its payload, authenticated in an encrypted vault
    /// (checked, not authenticated, in an unencrypted one).
    Sealed(Vec<u8>),
    /// Plain JSON, as builds before the sealed record wrote it: authenticated by nothing.
    Plain(Vec<u8>),
    /// Sealed in an encrypted vault, read without its key (`vault info`): what it says is
    /// not known.
    Locked,
}

/// Judges a stored record; `codec` is the vault's, or `None` without its key. `Err` says why
/// the bytes are damaged.
pub(crate) fn judge(
    bytes: &[u8],
    codec: Option<&Codec>,
) -> std::result::Result<StoredRegions, String> {
    if bytes.starts_with(&ObjectKind::Regions.magic()) {
        return match codec {
            Some(c) => c
                .open(ObjectKind::Regions, bytes, MAX_REGIONS_LEN)
                .map(StoredRegions::Sealed)
                .map_err(|e| e.to_string()),
            None => Ok(StoredRegions::Locked),
        };
    }
    if bytes.len() as u64 > MAX_REGIONS_LEN {
        return Err(format!(
            "{} bytes of plain JSON, above the {MAX_REGIONS_LEN} a record may have",
            bytes.len()
        ));
    }
    serde_json::from_slice::<serde_json::Value>(bytes)
        .map(|_| StoredRegions::Plain(bytes.to_vec()))
        .map_err(|e| format!("neither sealed nor plain JSON ({e})"))
}

fn damaged(location: String, why: String) -> StoreError {
    StoreError::Damaged {
        location,
        object: "the regions record".into(),
        reason: why,
    }
}

fn read_record(backend: &dyn WriteBackend) -> Result<Option<Vec<u8>>> {
    match backend.read(Kind::Config, REGIONS_RECORD) {
        Ok(b) => Ok(Some(b)),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Vault {
    /// The vault's regions record, opened with its key; `None` when it has none (made before
    /// regions existed). Never [`StoredRegions::Locked`]. A record that fails its tag or check,
    /// or is neither sealed nor JSON, is [`StoreError::Damaged`].
    pub fn regions_record(&self) -> Result<Option<StoredRegions>> {
        let Some(bytes) = read_record(&**self.backend())? else {
            return Ok(None);
        };
        judge(&bytes, Some(self.codec()))
            .map(Some)
            .map_err(|why| damaged(self.location(), why))
    }

    /// Writes the regions record (its JSON payload), sealed, to every region the vault is
    /// open in.
    pub fn write_regions_record(&self, payload: &[u8]) -> Result<()> {
        if payload.len() as u64 > MAX_REGIONS_LEN {
            return Err(StoreError::Invalid(format!(
                "a regions record of {} bytes: at most {MAX_REGIONS_LEN}",
                payload.len()
            )));
        }
        let sealed = self.codec().seal(ObjectKind::Regions, payload);
        self.backend()
            .write(Kind::Config, REGIONS_RECORD, &sealed)?;
        self.backend().sync()
    }

    /// The regions record of the vault in `backend`, read without its key (what `vault info`
    /// shows before a passphrase): opened (checksum) in an unencrypted vault,
    /// [`StoredRegions::Locked`] when sealed in an encrypted one or in a region whose config
    /// cannot be read.
    pub fn peek_regions_record(backend: &dyn WriteBackend) -> Result<Option<StoredRegions>> {
        let Some(bytes) = read_record(backend)? else {
            return Ok(None);
        };
        let codec = match Self::read_config(backend) {
            Ok(c) if !c.encrypted => Some(Codec::plain(c.zstd_level)),
            _ => None,
        };
        judge(&bytes, codec.as_ref())
            .map(Some)
            .map_err(|why| damaged(backend.location(), why))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{CreateOptions, LocalBackend, Regions};

    fn cheap(passphrase: Option<&[u8]>) -> CreateOptions {
        CreateOptions {
            passphrase: passphrase.map(<[u8]>::to_vec),
            kdf: vmvault_format::KdfParams {
                memory_kib: 64,
                time: 1,
                parallelism: 1,
            },
            ..CreateOptions::default()
        }
    }

    fn local(dir: &std::path::Path) -> Arc<dyn WriteBackend> {
        Arc::new(LocalBackend::new(dir))
    }

    const RECORD: &[u8] = br#"{"version":1,"primary":{"location":"/v/p"}}"#;

    #[test]
    fn a_sealed_record_round_trips_and_is_locked_without_the_key() {
        let d = tempfile::tempdir().unwrap();
        let raw = local(&d.path().join("v"));
        let vault = Vault::create(raw.clone(), cheap(Some(b"pw"))).unwrap();
        assert_eq!(vault.regions_record().unwrap(), None);
        vault.write_regions_record(RECORD).unwrap();
        assert_eq!(
            vault.regions_record().unwrap(),
            Some(StoredRegions::Sealed(RECORD.to_vec()))
        );
        let stored = raw.read(Kind::Config, REGIONS_RECORD).unwrap();
        assert!(stored.starts_with(b"VMVREGNS"));
        assert!(
            !String::from_utf8_lossy(&stored).contains("/v/p"),
            "encrypted in an encrypted vault"
        );
        assert_eq!(
            Vault::peek_regions_record(&*raw).unwrap(),
            Some(StoredRegions::Locked)
        );
    }

    #[test]
    fn an_unencrypted_vaults_record_is_read_without_a_key() {
        let d = tempfile::tempdir().unwrap();
        let raw = local(&d.path().join("v"));
        let vault = Vault::create(raw.clone(), cheap(None)).unwrap();
        vault.write_regions_record(RECORD).unwrap();
        assert_eq!(
            Vault::peek_regions_record(&*raw).unwrap(),
            Some(StoredRegions::Sealed(RECORD.to_vec()))
        );
    }

    #[test]
    fn every_flipped_bit_of_a_sealed_record_is_damage_and_never_no_record() {
        for pass in [Some(&b"pw"[..]), None] {
            let d = tempfile::tempdir().unwrap();
            let raw = local(&d.path().join("v"));
            let vault = Vault::create(raw.clone(), cheap(pass)).unwrap();
            vault.write_regions_record(RECORD).unwrap();
            let good = raw.read(Kind::Config, REGIONS_RECORD).unwrap();
            for bit in 0..good.len() * 8 {
                let mut b = good.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                raw.write(Kind::Config, REGIONS_RECORD, &b).unwrap();
                let e = vault.regions_record().unwrap_err();
                assert!(matches!(e, StoreError::Damaged { .. }), "bit {bit}: {e}");
                if pass.is_none() {
                    let e = Vault::peek_regions_record(&*raw).unwrap_err();
                    assert!(matches!(e, StoreError::Damaged { .. }), "bit {bit}: {e}");
                }
            }
        }
    }

    #[test]
    fn a_forged_record_is_damage_in_an_encrypted_vault() {
        let d = tempfile::tempdir().unwrap();
        let raw = local(&d.path().join("v"));
        let vault = Vault::create(raw.clone(), cheap(Some(b"pw"))).unwrap();
        // Sealed under another key, or checksummed only: neither opens.
        let other = Codec::encrypted(&vmvault_format::Keys::generate(), 1);
        for forged in [
            other.seal(ObjectKind::Regions, RECORD),
            Codec::plain(1).seal(ObjectKind::Regions, RECORD),
            // Another kind of sealed object put under the record's name.
            vault.codec().seal(ObjectKind::Rules, RECORD),
            b"not json".to_vec(),
        ] {
            raw.write(Kind::Config, REGIONS_RECORD, &forged).unwrap();
            let e = vault.regions_record().unwrap_err();
            assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
        }
        // Plain JSON is handed on as plain, for the caller to judge.
        raw.write(Kind::Config, REGIONS_RECORD, RECORD).unwrap();
        assert_eq!(
            vault.regions_record().unwrap(),
            Some(StoredRegions::Plain(RECORD.to_vec()))
        );
    }

    #[test]
    fn a_vault_opened_alone_is_given_its_secondary_without_the_passphrase() {
        let d = tempfile::tempdir().unwrap();
        let (p, s) = (local(&d.path().join("p")), local(&d.path().join("s")));
        Vault::create(
            Regions {
                primary: p.clone(),
                secondary: Some(s.clone()),
                ..Regions::single(p.clone())
            },
            cheap(Some(b"pw")),
        )
        .unwrap();
        let alone = Vault::open(p.clone(), || Ok(b"pw".to_vec())).unwrap();
        let both = alone
            .with_regions(Regions {
                primary: p.clone(),
                secondary: Some(s.clone()),
                ..Regions::single(p.clone())
            })
            .unwrap();
        assert_eq!(both.regions().len(), 2);
        both.write_regions_record(RECORD).unwrap();
        for b in [&p, &s] {
            assert!(b.stat(Kind::Config, REGIONS_RECORD).unwrap().is_some());
        }
        // The secondary alone, as the primary of its own view.
        let alone = Vault::open(p.clone(), || Ok(b"pw".to_vec())).unwrap();
        let second = alone.with_regions(s.clone()).unwrap();
        assert_eq!(
            second.regions_record().unwrap(),
            Some(StoredRegions::Sealed(RECORD.to_vec()))
        );
        // A region holding another vault is refused; one holding none yet is taken as a
        // secondary (replication fills it), never as the region to work from.
        let other = local(&d.path().join("o"));
        Vault::create(other.clone(), cheap(Some(b"pw"))).unwrap();
        let empty = local(&d.path().join("e"));
        let open = || Vault::open(p.clone(), || Ok(b"pw".to_vec())).unwrap();
        for (regions, ok) in [
            (
                Regions {
                    primary: p.clone(),
                    secondary: Some(other.clone()),
                    ..Regions::single(p.clone())
                },
                false,
            ),
            (Regions::single(other.clone()), false),
            (Regions::single(empty.clone()), false),
            (
                Regions {
                    primary: p.clone(),
                    secondary: Some(empty.clone()),
                    ..Regions::single(p.clone())
                },
                true,
            ),
        ] {
            assert_eq!(open().with_regions(regions).is_ok(), ok);
        }
    }
}
