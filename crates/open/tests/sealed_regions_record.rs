//! The regions record as an authenticated vault object (docs/format.md, "Regions record"): a
//! forged or damaged record stops the open before either region is written; a plain record of
//! an older build is read on the safe side and sealed; a vault without a record, or whose
//! given region is gone, is opened as before; `record` says where a vault lives without its
//! passphrase.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmvault_open::{
    add_secondary, create, open, open_recorded, record, Cache, Error, Feed, Location, Reach,
    Record, Spec,
};
use vmvault_store::{CreateOptions, Kind, LocalBackend, Notify, StoreError, WriteBackend};

const PASS: &[u8] = b"pw";

struct Setup {
    dir: tempfile::TempDir,
    told: Arc<Mutex<Vec<String>>>,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            told: Arc::default(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn loc(&self, name: &str) -> Location {
        Location::new(self.path(name).to_str().unwrap(), None, None, None).unwrap()
    }

    fn notify(&self) -> Notify {
        let told = self.told.clone();
        Arc::new(move |m: &str| told.lock().unwrap().push(m.to_string()))
    }

    fn told(&self, words: &str) -> bool {
        self.told.lock().unwrap().iter().any(|m| m.contains(words))
    }

    fn spec(&self, given: &str, reach: Reach, state: &str) -> Spec {
        Spec {
            given: self.loc(given),
            reach,
            feed: Feed::Sync,
            state_dir: self.path(state),
            notify: self.notify(),
            cancel: None,
        }
    }

    /// An encrypted vault in `p`, replicated to `s` when given, made by the host whose state
    /// is `st`.
    fn create(&self, encrypted: bool, secondary: Option<&str>) {
        let mut opts = CreateOptions {
            passphrase: encrypted.then(|| PASS.to_vec()),
            ..CreateOptions::default()
        };
        // Cheap key derivation: these tests open vaults many times.
        opts.kdf.memory_kib = 64;
        opts.kdf.time = 1;
        create(
            self.loc("p"),
            secondary.map(|s| self.loc(s)),
            opts,
            &self.path("st"),
            self.notify(),
        )
        .unwrap();
    }

    fn raw(&self, name: &str) -> Arc<dyn WriteBackend> {
        Arc::new(LocalBackend::new(self.path(name)))
    }

    fn stored_record(&self, region: &str) -> Vec<u8> {
        self.raw(region)
            .read(Kind::Config, vmvault_open::RECORD)
            .unwrap()
    }

    /// Writes `record` as builds before the sealed record did: plain JSON, through the backend.
    fn write_plain(&self, region: &str, record: &Record) {
        self.raw(region)
            .write(Kind::Config, vmvault_open::RECORD, &record.encode())
            .unwrap();
    }
}

fn pass() -> Result<Vec<u8>, String> {
    Ok(PASS.to_vec())
}

fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(b"VMVREGNS")
}

/// Every file under `dir` and its bytes (a missing directory: none).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(tree(&e.path()));
        } else {
            out.insert(e.path(), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

fn is_damage(e: &Error) -> bool {
    matches!(e, Error::Store(StoreError::Damaged { .. }))
}

#[test]
fn the_record_is_sealed_in_both_regions_and_encrypted_in_an_encrypted_vault() {
    let s = Setup::new();
    s.create(true, Some("s"));
    for region in ["p", "s"] {
        let bytes = s.stored_record(region);
        assert!(is_sealed(&bytes), "{region}");
        assert!(!String::from_utf8_lossy(&bytes).contains("/s"), "{region}");
    }
    // Another host (no memory of the vault) reads the sealed record through the vault.
    let asked = AtomicUsize::new(0);
    let (v, r) = open_recorded(&s.spec("p", Reach::Both, "other"), || {
        asked.fetch_add(1, Ordering::Relaxed);
        pass()
    })
    .unwrap();
    assert_eq!(v.regions().len(), 2);
    assert_eq!(r.secondary, Some(s.loc("s")));
    assert_eq!(
        asked.load(Ordering::Relaxed),
        1,
        "the passphrase is asked once"
    );
    // The secondary alone, through the primary's record.
    let v = open(&s.spec("p", Reach::Secondary, "other"), pass).unwrap();
    assert_eq!(v.regions().len(), 1);
    assert!(v.location().ends_with("/s"), "{}", v.location());
}

/// Someone with storage access points the vault's replication at their own bucket.
#[test]
fn a_forged_plain_record_in_an_encrypted_vault_is_damage_and_nothing_is_written() {
    let s = Setup::new();
    s.create(true, Some("s"));
    open(&s.spec("p", Reach::Both, "st"), pass).unwrap();
    let forged = Record::new(s.loc("p"), Some(s.loc("evil")));
    s.write_plain("p", &forged);
    let before = (tree(&s.path("p")), tree(&s.path("s")));
    for reach in [Reach::Both, Reach::Secondary] {
        let e = open(&s.spec("p", reach, "st"), pass).err().unwrap();
        assert!(is_damage(&e), "{e}");
        assert!(e.to_string().contains("nothing was written"), "{e}");
    }
    assert_eq!((tree(&s.path("p")), tree(&s.path("s"))), before);
    assert!(!s.path("evil").exists());
    // Dropping the secondary is refused the same way.
    s.write_plain("p", &Record::new(s.loc("p"), None));
    let e = open(&s.spec("p", Reach::Both, "st"), pass).err().unwrap();
    assert!(is_damage(&e), "{e}");
}

#[test]
fn a_sealed_record_with_a_flipped_bit_or_forged_under_another_key_is_damage() {
    let s = Setup::new();
    s.create(true, Some("s"));
    let good = s.stored_record("p");
    for at in [0, 9, 20, 45, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x04;
        s.raw("p")
            .write(Kind::Config, vmvault_open::RECORD, &bad)
            .unwrap();
        // Damage even to a host that remembers the record: it is never "no record".
        for state in ["st", "other"] {
            let e = open(&s.spec("p", Reach::Both, state), pass).err().unwrap();
            assert!(is_damage(&e), "byte {at}, {state}: {e}");
        }
    }
    // Sealed by another vault (its own key) and copied in.
    let t = Setup::new();
    t.create(true, Some("evil"));
    s.raw("p")
        .write(Kind::Config, vmvault_open::RECORD, &t.stored_record("p"))
        .unwrap();
    let e = open(&s.spec("p", Reach::Both, "other"), pass)
        .err()
        .unwrap();
    assert!(is_damage(&e), "{e}");
    assert!(!s.path("evil").exists());
}

#[test]
fn a_plain_record_of_an_older_build_is_read_and_sealed_with_what_this_host_remembered() {
    let s = Setup::new();
    s.create(true, Some("s"));
    let old = Record::new(s.loc("p"), Some(s.loc("s")));
    s.write_plain("p", &old);
    s.write_plain("s", &old);
    // A host upgraded in place remembers the record from its older build's runs.
    Cache::new(&s.path("host")).remember(&s.loc("p").location, &old);
    let (v, r) = open_recorded(&s.spec("p", Reach::Both, "host"), pass).unwrap();
    assert_eq!((v.regions().len(), r), (2, old.clone()));
    for region in ["p", "s"] {
        assert!(is_sealed(&s.stored_record(region)), "{region}");
    }
    assert!(s.told("sealed the regions record"));
    drop(v);
    // Sealed, it opens everywhere; a plain one put back is now damage on this host.
    assert_eq!(
        open(&s.spec("p", Reach::Both, "other"), pass)
            .unwrap()
            .regions()
            .len(),
        2
    );
    s.write_plain("p", &old);
    let e = open(&s.spec("p", Reach::Both, "host"), pass).err().unwrap();
    assert!(is_damage(&e), "{e}");
}

#[test]
fn a_host_that_never_saw_the_vault_uses_its_plain_record_and_seals_it_on_a_later_open() {
    let s = Setup::new();
    s.create(false, Some("s"));
    let old = Record::new(s.loc("p"), Some(s.loc("s")));
    s.write_plain("p", &old);
    let v = open(&s.spec("p", Reach::Both, "new"), pass).unwrap();
    assert_eq!(v.regions().len(), 2);
    drop(v);
    assert!(
        !is_sealed(&s.stored_record("p")),
        "a record only just read is not authenticated by this host"
    );
    // Opened for reading or writing alike: only both regions from the primary seal it.
    open(&s.spec("p", Reach::Primary, "new"), pass).unwrap();
    open(&s.spec("s", Reach::Both, "new"), pass).unwrap();
    assert!(!is_sealed(&s.stored_record("p")));
    let v = open(&s.spec("p", Reach::Both, "new"), pass).unwrap();
    assert_eq!(v.regions().len(), 2);
    assert!(is_sealed(&s.stored_record("p")));
    assert!(is_sealed(&s.stored_record("s")));
}

#[test]
fn a_plain_record_that_differs_from_the_remembered_one_loses_to_it() {
    let s = Setup::new();
    s.create(true, Some("s"));
    let remembered = Record::new(s.loc("p"), Some(s.loc("s")));
    // Neither a new secondary nor none is taken from an unauthenticated record over what
    // this host remembers.
    for plain in [
        Record::new(s.loc("p"), Some(s.loc("evil"))),
        Record::new(s.loc("p"), None),
    ] {
        let host = tempfile::tempdir().unwrap();
        Cache::new(host.path()).remember(&s.loc("p").location, &remembered);
        s.write_plain("p", &plain);
        let spec = Spec {
            state_dir: host.path().to_path_buf(),
            ..s.spec("p", Reach::Both, "unused")
        };
        let (v, r) = open_recorded(&spec, pass).unwrap();
        assert_eq!((v.regions().len(), r), (2, remembered.clone()));
        assert!(s.told("differs from the regions this host remembers"));
        assert!(!s.path("evil").exists());
        drop(v);
        // Sealed as this host remembered it.
        let (_, r) = open_recorded(&s.spec("p", Reach::Both, "other"), pass).unwrap();
        assert_eq!(r, remembered);
    }
}

#[test]
fn a_vault_without_a_record_is_one_region_unless_this_host_remembers_a_secondary() {
    let s = Setup::new();
    s.create(true, Some("s"));
    std::fs::remove_file(s.path("p/regions")).unwrap();
    std::fs::remove_file(s.path("s/regions")).unwrap();
    let v = open(&s.spec("p", Reach::Both, "other"), pass).unwrap();
    assert_eq!(v.regions().len(), 1);
    drop(v);
    assert!(!s.path("p/regions").exists(), "nothing to write back");
    let e = open(&s.spec("p", Reach::Secondary, "other"), pass)
        .err()
        .unwrap();
    assert!(matches!(e, Error::Input(_)), "{e}");
    // The host that remembers the secondary keeps it, and writes the record back.
    let v = open(&s.spec("p", Reach::Both, "st"), pass).unwrap();
    assert_eq!(v.regions().len(), 2, "the remembered secondary");
    drop(v);
    for region in ["p", "s"] {
        assert!(is_sealed(&s.stored_record(region)), "{region}");
    }
    let v = open(&s.spec("p", Reach::Both, "other"), pass).unwrap();
    assert_eq!(v.regions().len(), 2);
}

#[test]
fn a_primary_that_is_gone_is_reached_through_the_remembered_record() {
    let s = Setup::new();
    s.create(true, Some("s"));
    std::fs::remove_dir_all(s.path("p")).unwrap();
    let v = open(&s.spec("p", Reach::Both, "st"), pass).unwrap();
    assert!(v.failed_over());
    assert!(v.location().ends_with("/s"), "{}", v.location());
    let v = open(&s.spec("p", Reach::Secondary, "st"), pass).unwrap();
    assert!(v.location().ends_with("/s"), "{}", v.location());
    // A host that never opened it has nothing to go on.
    let e = open(&s.spec("p", Reach::Both, "other"), pass)
        .err()
        .unwrap();
    assert!(
        matches!(e, Error::Store(StoreError::NotAVault { .. })),
        "{e}"
    );
}

#[test]
fn a_record_that_names_another_vaults_region_is_refused() {
    let s = Setup::new();
    s.create(false, Some("s"));
    let t = Setup::new();
    t.create(false, None);
    // An unencrypted vault: a record anyone can write, naming a region of another vault.
    let forged = Record::new(s.loc("p"), Some(t.loc("p")));
    s.write_plain("p", &forged);
    std::fs::remove_dir_all(s.path("st")).unwrap();
    let e = open(&s.spec("p", Reach::Both, "st"), pass).err().unwrap();
    assert!(e.to_string().contains("holds another vault"), "{e}");
}

#[test]
fn where_a_vault_lives_is_said_without_its_passphrase() {
    let s = Setup::new();
    s.create(true, Some("s"));
    let given = s.loc("p");
    // The host that opened it remembers its regions.
    let (r, _) = record(&given, &Cache::new(&s.path("st")), &s.notify()).unwrap();
    assert_eq!(r.secondary, Some(s.loc("s")));
    // Another host sees the given region and is told the rest is sealed.
    let (r, _) = record(&given, &Cache::new(&s.path("other")), &s.notify()).unwrap();
    assert_eq!((r.primary, r.secondary), (given.clone(), None));
    assert!(s.told("sealed with its key"));
    // An unencrypted vault's record is read (checksum) by anyone.
    let u = Setup::new();
    u.create(false, Some("s"));
    let (r, _) = record(&u.loc("p"), &Cache::new(&u.path("other")), &u.notify()).unwrap();
    assert_eq!(r.secondary, Some(u.loc("s")));
    // A flipped bit is damage there.
    let mut bad = u.stored_record("p");
    bad[50] ^= 1;
    u.raw("p")
        .write(Kind::Config, vmvault_open::RECORD, &bad)
        .unwrap();
    let e = record(&u.loc("p"), &Cache::new(&u.path("other")), &u.notify())
        .err()
        .unwrap();
    assert!(is_damage(&e), "{e}");
}

#[test]
fn a_secondary_added_to_an_open_vault_is_recorded_sealed_and_attached() {
    let s = Setup::new();
    s.create(true, None);
    std::fs::create_dir_all(s.path("s")).unwrap();
    let spec = s.spec("p", Reach::Both, "st");
    let (v, r) = open_recorded(&spec, pass).unwrap();
    assert_eq!((v.regions().len(), r.secondary), (1, None));
    let v = add_secondary(&spec, v, s.loc("s")).unwrap();
    assert_eq!(v.regions().len(), 2);
    assert!(is_sealed(&s.stored_record("p")));
    assert!(is_sealed(&s.stored_record("s")));
    drop(v);
    let (v, r) = open_recorded(&s.spec("p", Reach::Both, "other"), pass).unwrap();
    assert_eq!((v.regions().len(), r.secondary), (2, Some(s.loc("s"))));
    let e = add_secondary(&spec, v, s.loc("t")).err().unwrap();
    assert!(matches!(e, Error::Input(_)), "{e}");
}
