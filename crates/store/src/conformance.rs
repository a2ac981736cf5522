//! The contract of [`WriteBackend`], as a test suite every backend must pass.
//!
//! Run against the local backend by this crate's tests; a new backend (S3, Azure Blob) calls
//! [`run`] on a fresh, empty region of its own.

use std::time::{Duration, SystemTime};

use crate::{Kind, StoreError, WriteBackend};

/// Checks every promise of the backend contract on an empty region. Panics on the first broken one.
pub fn run(b: &dyn WriteBackend) {
    assert!(b.concurrency() >= 1);
    b.create().expect("create an empty region");
    for kind in Kind::ALL {
        assert!(b.list(kind).unwrap().is_empty(), "{kind:?} starts empty");
    }
    let name = "00ff3a";
    let config = "config";
    for (kind, name) in [
        (Kind::Config, config),
        (Kind::Key, "default"),
        (Kind::Chunk, name),
        (Kind::Index, name),
        (Kind::Point, name),
        (Kind::Lock, name),
    ] {
        // Absent objects.
        assert!(
            matches!(b.read(kind, name), Err(StoreError::NotFound(_))),
            "{kind:?}"
        );
        assert_eq!(b.stat(kind, name).unwrap(), None);
        assert_eq!(b.touch(kind, name).unwrap(), None);
        b.remove(kind, name)
            .expect("removing an absent object succeeds");
        assert!(!b
            .remove_unless_touched(kind, name, SystemTime::now())
            .unwrap());

        // Write, read back, replace.
        b.write(kind, name, b"first").unwrap();
        assert_eq!(b.read(kind, name).unwrap(), b"first");
        let mut buf = vec![9u8; 100];
        b.read_into(kind, name, &mut buf).unwrap();
        assert_eq!(buf, b"first");
        b.write(kind, name, b"second, longer").unwrap();
        assert_eq!(b.read(kind, name).unwrap(), b"second, longer");
        let info = b.stat(kind, name).unwrap().expect("written object");
        assert_eq!(info.size, 14);
        let listed = b.list(kind).unwrap();
        assert_eq!(listed.len(), 1, "{kind:?}: only the object, no temporaries");
        assert_eq!(listed[0].name, name);
        b.write(kind, name, b"").unwrap();
        assert_eq!(b.read(kind, name).unwrap(), b"");

        // Touch moves the time forward and the conditional remove honours it, where the
        // backend can; elsewhere touch says whether the object exists.
        assert!(
            b.touch(kind, name).unwrap() == Some(0),
            "{kind:?}: touch finds the object and tells its size"
        );
        if b.atomic_touch() {
            let before = b.stat(kind, name).unwrap().unwrap().modified;
            std::thread::sleep(Duration::from_millis(20));
            let cutoff = SystemTime::now();
            std::thread::sleep(Duration::from_millis(20));
            assert!(b.touch(kind, name).unwrap().is_some());
            let after = b.stat(kind, name).unwrap().unwrap().modified;
            assert!(
                after > before && after >= cutoff,
                "{kind:?}: touch sets the time to now"
            );
            assert!(
                !b.remove_unless_touched(kind, name, cutoff).unwrap(),
                "touched: spared"
            );
            assert!(b.stat(kind, name).unwrap().is_some(), "and still there");
        } else {
            let written = b.stat(kind, name).unwrap().unwrap().modified;
            assert!(
                !b.remove_unless_touched(kind, name, written - Duration::from_secs(60))
                    .unwrap(),
                "{kind:?}: written after the cutoff: spared"
            );
        }
        let later = SystemTime::now() + Duration::from_secs(60);
        assert!(
            b.remove_unless_touched(kind, name, later).unwrap(),
            "older than cutoff"
        );
        assert_eq!(b.stat(kind, name).unwrap(), None);

        // A checked read hands the caller's verdict on, naming the region.
        b.write(kind, name, b"payload").unwrap();
        let mut buf = Vec::new();
        b.read_checked(kind, name, &mut buf, &mut |bytes: &mut Vec<u8>| {
            bytes.truncate(3);
            Ok(())
        })
        .unwrap();
        assert_eq!(buf, b"pay", "the check may transform the bytes");
        match b.read_checked(kind, name, &mut buf, &mut |_: &mut Vec<u8>| {
            Err("bad".into())
        }) {
            Err(StoreError::Damaged {
                location, reason, ..
            }) => {
                assert_eq!(location, b.location());
                assert_eq!(reason, "bad");
            }
            other => panic!("{kind:?}: a failed check is Damaged, got {other:?}"),
        }

        // Remove is idempotent.
        b.write(kind, name, b"x").unwrap();
        b.remove(kind, name).unwrap();
        b.remove(kind, name).unwrap();
        assert!(matches!(b.read(kind, name), Err(StoreError::NotFound(_))));
    }

    // Many objects of one kind are all listed, past an object store's page of 1,000.
    let names: Vec<String> = (0..1050u32)
        .map(|i| format!("{:08x}", i.wrapping_mul(2654435761)))
        .collect();
    std::thread::scope(|s| {
        for part in names.chunks(names.len().div_ceil(8)) {
            s.spawn(move || {
                for n in part {
                    b.write(Kind::Chunk, n, n.as_bytes()).unwrap();
                }
            });
        }
    });
    let mut listed: Vec<String> = b
        .list(Kind::Chunk)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    listed.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(listed, want);
    b.sync().unwrap();
    assert_eq!(
        b.remove_temporaries(SystemTime::now() + Duration::from_secs(60))
            .unwrap(),
        0
    );
    assert_eq!(
        b.list(Kind::Chunk).unwrap().len(),
        1050,
        "temporaries cleanup spares objects"
    );

    // Names are vmvault's own: anything that could reach outside a kind's place is refused.
    for bad in ["", "../x", ".hidden", "a/b", "a\\\\b", "a b"] {
        assert!(b.write(Kind::Point, bad, b"x").is_err(), "{bad:?}");
        assert!(b.read(Kind::Point, bad).is_err(), "{bad:?}");
    }

    // A second create over a region that holds objects is refused.
    assert!(matches!(b.create(), Err(StoreError::NotEmpty { .. })));
}

#[cfg(test)]
mod tests {
    use crate::{Kind, LocalBackend, ReadBackend, StoreError, WriteBackend};

    #[test]
    fn local_backend_remakes_a_removed_folder_of_its_layout() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("vault"));
        b.create().unwrap();
        std::fs::remove_dir_all(dir.path().join("vault/chunks/ab")).unwrap();
        std::fs::remove_dir_all(dir.path().join("vault/points")).unwrap();
        b.write(Kind::Chunk, "abcd", b"x").unwrap();
        b.write(Kind::Point, "p1", b"y").unwrap();
        assert_eq!(b.read(Kind::Chunk, "abcd").unwrap(), b"x");
        // But not a whole vault that is gone: that is not a vault to write into.
        std::fs::remove_dir_all(dir.path().join("vault")).unwrap();
        assert!(b.write(Kind::Point, "p2", b"z").is_err());
    }

    #[test]
    fn local_backend_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        super::run(&LocalBackend::new(dir.path().join("vault")));
    }

    #[test]
    fn local_backend_refuses_a_non_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("something"), b"x").unwrap();
        let created = LocalBackend::new(dir.path()).create();
        assert!(matches!(created, Err(StoreError::NotEmpty { .. })));
    }
}
