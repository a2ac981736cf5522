//! Opening a vault by its regions record: the given region alone first, the sealed record
//! read through it, then the secondary it names attached (the crate doc says why), and the
//! record as `vault info` shows it without a passphrase.

use std::sync::Arc;

use vmvault_store::{
    Cancellable, Notify, Regions, Replication, StoreError, StoredRegions, Vault, WriteBackend,
};

use crate::{Cache, Error, Feed, Location, Reach, Record, Result, Spec};

/// The regions of the vault at `given` without its passphrase (what `vault info` shows), and
/// the backend of `given`. An unencrypted vault's record is read (its checksum checked); an
/// encrypted vault's is sealed with its key, so the copy this host remembers from its last
/// open is shown, or, without one, the given region alone, and `notify` says why. When
/// `given` cannot be read, the remembered copy is used too.
pub fn record(
    given: &Location,
    cache: &Cache,
    notify: &Notify,
) -> Result<(Record, Arc<dyn WriteBackend>)> {
    let backend = given.backend(false)?;
    let remembered = || cache.remembered(&given.location);
    let found = match Vault::peek_regions_record(&*backend) {
        Ok(found) => found,
        Err(e) => match remembered() {
            Some(r) => {
                notify(&format!(
                    "the regions record of {} cannot be read ({e}); using the regions \
                     remembered from an earlier run",
                    given.describe()
                ));
                return Ok((r, backend));
            }
            None => return Err(e.into()),
        },
    };
    let record = match found {
        Some(StoredRegions::Sealed(payload)) => {
            Record::decode(&payload).map_err(|why| damaged(&*backend, why))?
        }
        Some(StoredRegions::Plain(bytes)) => {
            let plain = Record::decode(&bytes).map_err(|why| damaged(&*backend, why))?;
            match remembered() {
                Some(r) if r != plain => {
                    notify(&plain_differs(given));
                    r
                }
                _ => plain,
            }
        }
        Some(StoredRegions::Locked) => remembered().unwrap_or_else(|| {
            notify(
                "the vault is encrypted and its regions record is sealed with its key: a \
                 secondary region, if it has one, shows here once a command has opened the \
                 vault with its passphrase on this host",
            );
            Record::new(given.clone(), None)
        }),
        // A vault without a record (made before regions existed, or the record was lost): one
        // region, as given. One whose primary is gone entirely: the remembered record.
        None => remembered()
            .filter(|r| r.secondary.is_some())
            .unwrap_or_else(|| Record::new(given.clone(), None)),
    };
    Ok((record, backend))
}

fn damaged(backend: &dyn WriteBackend, why: String) -> Error {
    Error::Store(StoreError::Damaged {
        location: backend.location(),
        object: "the regions record".into(),
        reason: why,
    })
}

fn plain_differs(given: &Location) -> String {
    format!(
        "the regions record of {} is plain JSON (written by an older build, or by anyone with \
         access to the storage) and differs from the regions this host remembers: using the \
         remembered ones",
        given.describe()
    )
}

/// A passphrase asked at most once, however many times a vault is opened with it.
struct Ask<F> {
    ask: Option<F>,
    got: Option<std::result::Result<Vec<u8>, String>>,
}

impl<F: FnOnce() -> std::result::Result<Vec<u8>, String>> Ask<F> {
    fn get(&mut self) -> std::result::Result<Vec<u8>, String> {
        if self.got.is_none() {
            self.got = Some(match self.ask.take() {
                Some(f) => f(),
                None => Err("no passphrase".into()),
            });
        }
        self.got.clone().expect("set above")
    }
}

fn cancellable(spec: &Spec, backend: Arc<dyn WriteBackend>) -> Arc<dyn WriteBackend> {
    match &spec.cancel {
        Some((flag, why)) => Cancellable::wrap(backend, flag, why),
        None => backend,
    }
}

fn single(spec: &Spec, backend: Arc<dyn WriteBackend>) -> Regions {
    Regions {
        notify: spec.notify.clone(),
        ..Regions::single(backend)
    }
}

/// The primary `primary` and the secondary at `secondary`, fed as `spec` says.
fn both(spec: &Spec, primary: Arc<dyn WriteBackend>, secondary: &Location) -> Result<Regions> {
    Ok(Regions {
        primary,
        secondary: Some(cancellable(spec, secondary.backend(true)?)),
        replication: match spec.feed {
            Feed::Sync => Replication::Sync,
            Feed::Queue { capacity } => Replication::Async {
                state_dir: spec.state_dir.clone(),
                capacity,
            },
        },
        notify: spec.notify.clone(),
    })
}

/// Opens the vault `spec` names; `pass` is asked only when the vault is encrypted.
pub fn open(
    spec: &Spec,
    pass: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
) -> Result<Vault> {
    open_recorded(spec, pass).map(|(vault, _)| vault)
}

/// [`open`], and the regions record the vault was opened by (with [`Reach::Primary`], which
/// reads no record: the given region alone).
///
/// The given region is opened alone first; its record is then read through the vault (in an
/// encrypted vault only its key opens it, so a forged or altered record is damage and nothing
/// is written to either region), and the secondary it names is attached without the
/// passphrase asked again. Where the given region cannot be opened, the record this host
/// remembers from its last open is used, as before the record was sealed (that opening then
/// fails over to the secondary). A plain record, written by builds before the record was
/// sealed, is read on the safe side: damage where this host last read the vault's record
/// sealed; the remembered copy where one differs; else as it is. It is rewritten sealed by an
/// open of both regions from the primary when what is used is what this host remembered from
/// an earlier run, so that a host that never saw the vault does not authenticate a record it
/// only just read. A record that is gone is written back, sealed, the same way by a host that
/// remembers a secondary for the vault.
pub fn open_recorded(
    spec: &Spec,
    pass: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
) -> Result<(Vault, Record)> {
    let mut pass = Ask {
        ask: Some(pass),
        got: None,
    };
    let at = spec.given.location.as_str();
    let given = cancellable(spec, spec.given.backend(false)?);
    if spec.reach == Reach::Primary {
        let vault = Vault::open(single(spec, given), || pass.get())?;
        return Ok((vault, Record::new(spec.given.clone(), None)));
    }
    let cache = Cache::new(&spec.state_dir);
    let alone = match Vault::open(single(spec, given.clone()), || pass.get()) {
        Ok(v) => v,
        Err(
            e @ (StoreError::WrongPassphrase { .. }
            | StoreError::Passphrase(_)
            | StoreError::Cancelled(_)),
        ) => return Err(e.into()),
        Err(e) => {
            let Some(record) = cache.remembered(at).filter(|r| r.secondary.is_some()) else {
                return Err(e.into());
            };
            let vault = open_remembered(spec, &record, given, || pass.get())?;
            return Ok((vault, record));
        }
    };
    let vault_id = alone.config().vault_id;
    let Recorded {
        record,
        mut sealed,
        seal,
    } = recorded(spec, &alone, &cache)?;
    let reached_secondary = record
        .secondary
        .as_ref()
        .is_some_and(|s| s.location == spec.given.location);
    let vault = match (spec.reach, &record.secondary) {
        (Reach::Secondary, None) => {
            return Err(Error::Input(format!(
                "{} has no secondary region (create one with `vault create --secondary`)",
                spec.given.describe()
            )))
        }
        // The secondary named directly: opened alone (a user reaching the surviving region
        // must not have writes sent back to the lost one).
        (_, Some(_)) if reached_secondary => alone,
        (Reach::Secondary, Some(s)) => {
            alone.with_regions(single(spec, cancellable(spec, s.backend(true)?)))?
        }
        (_, None) => alone,
        (_, Some(s)) => alone.with_regions(both(spec, given, s)?)?,
    };
    if spec.reach == Reach::Both && !reached_secondary {
        if seal {
            match vault.write_regions_record(&record.payload()) {
                Ok(()) => {
                    sealed = true;
                    (spec.notify)(&format!(
                        "sealed the regions record of {} as this host remembers it (it was \
                         plain JSON, written by an older build, or missing)",
                        spec.given.describe()
                    ));
                }
                Err(e) => (spec.notify)(&format!(
                    "the regions record of {} could not be sealed now: {e}",
                    spec.given.describe()
                )),
            }
        }
        cache.remember(at, &record);
        if sealed {
            cache.remember_sealed(at, &vault_id);
        }
    }
    Ok((vault, record))
}

/// The record an opened vault's given region gives, read as [`open_recorded`] says.
struct Recorded {
    record: Record,
    /// Read sealed.
    sealed: bool,
    /// Plain or missing, and what this host remembered: to be written sealed.
    seal: bool,
}

fn recorded(spec: &Spec, alone: &Vault, cache: &Cache) -> Result<Recorded> {
    let at = spec.given.location.as_str();
    let record_damaged = |why: String| {
        forged_or_damaged(StoreError::Damaged {
            location: alone.location(),
            object: "the regions record".into(),
            reason: why,
        })
    };
    let stored = match alone.regions_record() {
        Ok(stored) => stored,
        Err(e @ StoreError::Damaged { .. }) => return Err(forged_or_damaged(e)),
        Err(e) => match cache.remembered(at) {
            Some(record) => {
                (spec.notify)(&format!(
                    "the regions record of {} cannot be read ({e}); using the regions \
                     remembered from an earlier run",
                    spec.given.describe()
                ));
                return Ok(Recorded {
                    record,
                    sealed: false,
                    seal: false,
                });
            }
            None => return Err(e.into()),
        },
    };
    Ok(match stored {
        Some(StoredRegions::Sealed(payload)) => Recorded {
            record: Record::decode(&payload).map_err(record_damaged)?,
            sealed: true,
            seal: false,
        },
        Some(StoredRegions::Plain(bytes)) => {
            if cache.saw_sealed(at, &alone.config().vault_id) {
                return Err(record_damaged(
                    "it is plain JSON where this host last read it sealed: forged or put back \
                     by someone with access to the storage"
                        .into(),
                ));
            }
            let plain = Record::decode(&bytes).map_err(record_damaged)?;
            match cache.remembered(at) {
                Some(r) => {
                    if r != plain {
                        (spec.notify)(&plain_differs(&spec.given));
                    }
                    Recorded {
                        record: r,
                        sealed: false,
                        seal: true,
                    }
                }
                None => Recorded {
                    record: plain,
                    sealed: false,
                    seal: false,
                },
            }
        }
        Some(StoredRegions::Locked) => {
            return Err(record_damaged(
                "sealed under a key this vault was not opened with".into(),
            ))
        }
        // A vault without a record (made before regions existed, or the record was lost): one
        // region, as given, unless this host remembers a secondary, which it then records
        // again.
        None => match cache.remembered(at).filter(|r| r.secondary.is_some()) {
            Some(record) => Recorded {
                record,
                sealed: false,
                seal: true,
            },
            None => Recorded {
                record: Record::new(spec.given.clone(), None),
                sealed: false,
                seal: false,
            },
        },
    })
}

/// A damaged record stops the open before either region is written; says what to do.
fn forged_or_damaged(e: StoreError) -> Error {
    match e {
        StoreError::Damaged {
            location,
            object,
            reason,
        } => Error::Store(StoreError::Damaged {
            location,
            object,
            reason: format!(
                "{reason}; nothing was written to the vault. If it was damaged rather than \
                 forged, copy `regions` from the vault's other region"
            ),
        }),
        e => Error::Store(e),
    }
}

/// Opens the regions `record` (this host's copy) gives, as before the record was sealed: the
/// given region could not be opened, so the vault fails over to the secondary.
fn open_remembered(
    spec: &Spec,
    record: &Record,
    given: Arc<dyn WriteBackend>,
    pass: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
) -> Result<Vault> {
    let reached_secondary = record
        .secondary
        .as_ref()
        .is_some_and(|s| s.location == spec.given.location);
    let regions = match (spec.reach, &record.secondary) {
        (_, Some(_)) if reached_secondary => single(spec, given),
        (Reach::Secondary, Some(s)) => single(spec, cancellable(spec, s.backend(true)?)),
        (_, Some(s)) => both(spec, given, s)?,
        (_, None) => single(spec, given),
    };
    Ok(Vault::open(regions, pass)?)
}

/// Records `secondary` as the secondary region of `vault`, opened by `spec` in its primary
/// alone and without one recorded (the server's configured secondary): the sealed record is
/// written to the primary, then to the secondary (which may not be reachable yet: told, not
/// fatal), remembered, and the vault is returned with both regions.
pub fn add_secondary(spec: &Spec, vault: Vault, secondary: Location) -> Result<Vault> {
    if secondary.location == spec.given.location {
        return Err(Error::Input(format!(
            "the secondary region {} is the primary itself",
            secondary.describe()
        )));
    }
    if vault.regions().len() > 1 || vault.failed_over() {
        return Err(Error::Input(format!(
            "{} has a secondary region already",
            spec.given.describe()
        )));
    }
    let record = Record::new(spec.given.clone(), Some(secondary.clone()));
    vault.write_regions_record(&record.payload())?;
    let given = cancellable(spec, spec.given.backend(false)?);
    let vault = vault.with_regions(both(spec, given, &secondary)?)?;
    if let Err(e) = vault.region_view(1).write_regions_record(&record.payload()) {
        (spec.notify)(&format!(
            "the regions record could not be written to the secondary region {} now: {e}",
            secondary.describe()
        ));
    }
    let cache = Cache::new(&spec.state_dir);
    cache.remember(&spec.given.location, &record);
    cache.remember_sealed(&spec.given.location, &vault.config().vault_id);
    Ok(vault)
}

/// The vault `spec` names as a new view of `opened` (the same vault, opened by an earlier
/// [`open`] of `spec`): fresh backends (a job's cancellation wraps them) with `opened`'s keys,
/// so a job does not derive the key from the passphrase again. Where the view cannot be made
/// from what `opened` knows (it failed over to its secondary, or its regions record is not
/// sealed), the vault is opened anew with `pass`.
pub fn reopen(
    spec: &Spec,
    opened: &Vault,
    pass: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
) -> Result<Vault> {
    if opened.failed_over() {
        return open(spec, pass);
    }
    let given = cancellable(spec, spec.given.backend(false)?);
    let regions = if opened.regions().len() > 1 {
        let record = match opened.regions_record()? {
            Some(StoredRegions::Sealed(payload)) => {
                Record::decode(&payload).map_err(|why| damaged(&**opened.backend(), why))?
            }
            _ => return open(spec, pass),
        };
        match &record.secondary {
            Some(s) => both(spec, given, s)?,
            None => return open(spec, pass),
        }
    } else {
        single(spec, given)
    };
    Ok(opened.view_with(regions)?)
}
