//! The agent's upgrades end to end over real files: what is refused (and that a refusal
//! changes nothing), what an upgrade may touch, a rollback, a confirmed upgrade, and the
//! record's bytes and signature pinned.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use vmvault_release::{
    sign_release, this_target, verify, Installation, Pending, Release, ReleaseError, ReleaseKey,
    SignedRelease, Version,
};

fn v(text: &str) -> Version {
    text.parse().unwrap()
}

fn binary(version: &str) -> Vec<u8> {
    format!("\x7fELF pretend vmvault {version}\n")
        .repeat(100)
        .into_bytes()
}

fn signed(key: &ReleaseKey, bytes: &[u8], version: &str, target: &str) -> SignedRelease {
    sign_release(key, Release::of_bytes(bytes, v(version), target).unwrap()).unwrap()
}

fn for_here(key: &ReleaseKey, bytes: &[u8], version: &str) -> SignedRelease {
    signed(key, bytes, version, &this_target())
}

/// A host's state directory: the agent's key material beside an installation adopted at
/// 0.1.0.
struct Host {
    root: TempDir,
    _elsewhere: TempDir,
    inst: Installation,
    key: ReleaseKey,
}

const HOST_KEY: &[u8] =
    b"-----BEGIN PRIVATE KEY-----\nnot really a key\n-----END PRIVATE KEY-----\n";
const PINS: &[u8] = b"{\"fingerprint\": \"ab12cd34\", \"release_key\": \"d75a98\"}\n";

fn host() -> Host {
    let root = TempDir::new().unwrap();
    fs::write(root.path().join("host.key"), HOST_KEY).unwrap();
    fs::set_permissions(
        root.path().join("host.key"),
        PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    fs::write(root.path().join("pins.json"), PINS).unwrap();
    let elsewhere = TempDir::new().unwrap();
    let old = elsewhere.path().join("vmvault");
    fs::write(&old, binary("0.1.0")).unwrap();
    let inst = Installation::open(root.path())
        .unwrap()
        .with_health_deadline(300);
    assert!(inst.adopt(v("0.1.0"), &old).unwrap());
    assert!(!inst.adopt(v("0.1.0"), &old).unwrap(), "adopt is once");
    Host {
        root,
        _elsewhere: elsewhere,
        inst,
        key: ReleaseKey::generate().unwrap().0,
    }
}

#[derive(Debug, PartialEq)]
enum Entry {
    Dir(u32),
    File(Vec<u8>, u32),
    Link(PathBuf),
}

/// Every file, directory and link under `root`, with its bytes, mode or target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let name = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode();
            if meta.file_type().is_symlink() {
                out.insert(name, Entry::Link(fs::read_link(&path).unwrap()));
            } else if meta.is_dir() {
                out.insert(name, Entry::Dir(mode));
                walk(root, &path, out);
            } else {
                out.insert(name, Entry::File(fs::read(&path).unwrap(), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn link(root: &Path, name: &str) -> PathBuf {
    fs::read_link(root.join(name)).unwrap()
}

#[test]
fn an_unsigned_wrongly_signed_older_or_foreign_release_is_refused() {
    let h = host();
    let new = binary("0.2.0");
    h.inst
        .install(
            &h.key.public(),
            &for_here(&h.key, &new, "0.2.0"),
            &new,
            v("0.1.0"),
            1_000,
        )
        .unwrap();
    assert_eq!(
        h.inst.confirm_healthy(v("0.2.0")).unwrap().unwrap().to,
        v("0.2.0")
    );
    assert_eq!(h.inst.highest_run().unwrap(), Some(v("0.2.0")));

    let next = binary("0.3.0");
    let good = for_here(&h.key, &next, "0.3.0");
    let foreign_target = if this_target() == "aarch64-unknown-linux-gnu" {
        "x86_64-unknown-linux-gnu"
    } else {
        "aarch64-unknown-linux-gnu"
    };

    // Unsigned: a .sig whose signature is all zeros, read back through the file form.
    let zeros = SignedRelease::from_json(
        good.to_json()
            .replace(&hex::encode(good.signature), &"0".repeat(128))
            .as_bytes(),
    )
    .unwrap();
    let other_key = ReleaseKey::generate().unwrap().0;
    let by_other_key = for_here(&other_key, &next, "0.3.0");
    let mut relabelled = good.clone();
    relabelled.release.version = v("0.4.0");
    let mut retargeted = good.clone();
    retargeted.release.target = foreign_target.to_string();
    let mut flipped = next.clone();
    flipped[100] ^= 1;
    let mut longer = next.clone();
    longer.push(0);

    type Check = fn(&ReleaseError) -> bool;
    let bad_signature: Check = |e| matches!(e, ReleaseError::BadSignature);
    let mismatch: Check = |e| matches!(e, ReleaseError::Mismatch(_));
    let cases: Vec<(&str, SignedRelease, Vec<u8>, Check)> = vec![
        ("all-zero signature", zeros, next.clone(), bad_signature),
        (
            "signed by another key",
            by_other_key,
            next.clone(),
            bad_signature,
        ),
        (
            "version changed after signing",
            relabelled,
            next.clone(),
            bad_signature,
        ),
        (
            "target changed after signing",
            retargeted,
            next.clone(),
            bad_signature,
        ),
        (
            "a byte changed after signing",
            good.clone(),
            flipped,
            mismatch,
        ),
        ("a byte added after signing", good.clone(), longer, mismatch),
        (
            "older than the highest run",
            for_here(&h.key, &binary("0.1.5"), "0.1.5"),
            binary("0.1.5"),
            |e| {
                matches!(e, ReleaseError::NotNewer { version, highest }
                    if *version == v("0.1.5") && *highest == v("0.2.0"))
            },
        ),
        (
            "the version running and run",
            for_here(&h.key, &new, "0.2.0"),
            new.clone(),
            |e| matches!(e, ReleaseError::NotNewer { .. }),
        ),
        (
            "the first version",
            for_here(&h.key, &binary("0.1.0"), "0.1.0"),
            binary("0.1.0"),
            |e| matches!(e, ReleaseError::NotNewer { .. }),
        ),
        (
            "built for another target",
            signed(&h.key, &next, "0.3.0", foreign_target),
            next.clone(),
            |e| {
                matches!(e, ReleaseError::WrongTarget { want, got }
                    if *want == this_target() && got != want)
            },
        ),
    ];

    let before = snapshot(h.root.path());
    for (what, release, bytes, check) in cases {
        let err = h
            .inst
            .install(&h.key.public(), &release, &bytes, v("0.2.0"), 2_000)
            .expect_err(what);
        assert!(check(&err), "{what}: wrong error {err:?}");
        assert!(!err.to_string().contains('\n'), "{what}: {err}");
        assert_eq!(snapshot(h.root.path()), before, "{what}: files changed");
        let dir = Path::new("versions").join(release.release.version.to_string());
        if !before.contains_key(&dir) {
            assert!(
                !h.root.path().join(&dir).exists(),
                "{what}: {} remains",
                dir.display()
            );
        }
    }

    // The same host takes the release once nothing is wrong with it.
    let pending = h
        .inst
        .install(&h.key.public(), &good, &next, v("0.2.0"), 2_000)
        .unwrap();
    assert_eq!((pending.from, pending.to), (v("0.2.0"), v("0.3.0")));
}

#[test]
fn an_upgrade_never_touches_the_host_key_or_the_pins() {
    let h = host();
    let root = h.root.path();
    let key_material = |root: &Path| {
        ["host.key", "pins.json"].map(|name| {
            let meta = fs::symlink_metadata(root.join(name)).unwrap();
            (
                fs::read(root.join(name)).unwrap(),
                meta.mode(),
                meta.ino(),
                meta.mtime_nsec(),
            )
        })
    };
    let original = key_material(root);
    assert_eq!((&original[0].0[..], &original[1].0[..]), (HOST_KEY, PINS));
    let allowed = [
        "host.key",
        "pins.json",
        "versions",
        "current",
        "previous",
        "state.json",
        "upgrade.pending",
    ];
    let check = |step: &str| {
        assert_eq!(key_material(root), original, "after {step}");
        for entry in fs::read_dir(root).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                allowed.contains(&name.as_str()),
                "after {step}: {name} left in the root"
            );
        }
    };

    let public = h.key.public();
    let b2 = binary("0.2.0");
    h.inst
        .install(
            &public,
            &for_here(&h.key, &b2, "0.2.0"),
            &b2,
            v("0.1.0"),
            10,
        )
        .unwrap();
    check("install");
    h.inst.confirm_healthy(v("0.2.0")).unwrap().unwrap();
    check("confirm");
    let b3 = binary("0.3.0");
    h.inst
        .install(
            &public,
            &for_here(&h.key, &b3, "0.3.0"),
            &b3,
            v("0.2.0"),
            20,
        )
        .unwrap();
    check("second install");
    assert!(h.inst.overdue(1_000).unwrap().is_some());
    assert_eq!(
        h.inst.rollback("deadline").unwrap(),
        Some((v("0.3.0"), v("0.2.0")))
    );
    check("rollback");
    assert_eq!(h.inst.rollback("again").unwrap(), None);
    check("second rollback");
    let refused = h.inst.install(
        &public,
        &for_here(&h.key, &b3, "0.3.0"),
        &b3,
        v("0.2.0"),
        30,
    );
    assert!(matches!(refused, Err(ReleaseError::MarkedBad { .. })));
    check("refused install");
    assert_eq!(h.inst.prune().unwrap(), vec![v("0.1.0"), v("0.3.0")]);
    check("prune");
}

#[test]
fn an_upgrade_that_does_not_come_back_healthy_is_rolled_back() {
    let h = host();
    let root = h.root.path();
    let public = h.key.public();
    let new = binary("0.2.0");
    let release = for_here(&h.key, &new, "0.2.0");

    let pending = h
        .inst
        .install(&public, &release, &new, v("0.1.0"), 1_000)
        .unwrap();
    let expected = Pending {
        from: v("0.1.0"),
        to: v("0.2.0"),
        deadline: 1_300,
    };
    assert_eq!(pending, expected);
    assert_eq!(h.inst.pending().unwrap(), Some(expected));
    assert_eq!(link(root, "current"), Path::new("versions/0.2.0"));
    assert_eq!(link(root, "previous"), Path::new("versions/0.1.0"));
    assert_eq!(fs::read(h.inst.current_binary()).unwrap(), new);
    let mode = fs::metadata(root.join("versions/0.2.0/vmvault"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(!root.join("versions/0.2.0/vmvault.tmp").exists());
    // Another upgrade waits until this one is settled.
    let b3 = binary("0.3.0");
    let busy = h.inst.install(
        &public,
        &for_here(&h.key, &b3, "0.3.0"),
        &b3,
        v("0.2.0"),
        1_001,
    );
    assert!(matches!(busy, Err(ReleaseError::UpgradePending { to }) if to == v("0.2.0")));

    // The deadline is the last second it may still come back.
    assert_eq!(h.inst.overdue(1_300).unwrap(), None);
    assert_eq!(h.inst.overdue(1_301).unwrap(), Some(expected));

    let reason = "no healthy heartbeat by the deadline";
    assert_eq!(
        h.inst.rollback(reason).unwrap(),
        Some((v("0.2.0"), v("0.1.0")))
    );
    assert_eq!(h.inst.current_version().unwrap(), Some(v("0.1.0")));
    assert_eq!(fs::read(h.inst.current_binary()).unwrap(), binary("0.1.0"));
    assert_eq!(h.inst.pending().unwrap(), None);
    assert_eq!(h.inst.overdue(u64::MAX).unwrap(), None);
    let bad = h.inst.bad_versions().unwrap();
    assert_eq!(bad.len(), 1);
    assert_eq!(
        (bad[0].version, bad[0].reason.as_str()),
        (v("0.2.0"), reason)
    );

    // Idempotent: systemd's OnFailure= may run it again; nothing moves.
    let settled = snapshot(root);
    assert_eq!(h.inst.rollback("OnFailure").unwrap(), None);
    assert_eq!(snapshot(root), settled);

    // The failed version heartbeating late does not count as run.
    assert_eq!(h.inst.confirm_healthy(v("0.2.0")).unwrap(), None);
    assert_eq!(h.inst.highest_run().unwrap(), Some(v("0.1.0")));
    assert_eq!(snapshot(root), settled);

    // The same version again is refused, and nothing changes.
    let again = h.inst.install(&public, &release, &new, v("0.1.0"), 2_000);
    match again {
        Err(ReleaseError::MarkedBad {
            version,
            reason: why,
        }) => {
            assert_eq!((version, why.as_str()), (v("0.2.0"), reason))
        }
        other => panic!("installed a rolled-back version: {other:?}"),
    }
    assert_eq!(snapshot(root), settled);

    // A fix is taken: a rollback does not raise the bar above the failed version.
    let fix = binary("0.2.1");
    let pending = h
        .inst
        .install(
            &public,
            &for_here(&h.key, &fix, "0.2.1"),
            &fix,
            v("0.1.0"),
            3_000,
        )
        .unwrap();
    assert_eq!((pending.from, pending.to), (v("0.1.0"), v("0.2.1")));
}

#[test]
fn a_healthy_upgrade_is_kept() {
    let h = host();
    let root = h.root.path();
    let public = h.key.public();
    let new = binary("0.2.0");
    let release = for_here(&h.key, &new, "0.2.0");
    let pending = h
        .inst
        .install(&public, &release, &new, v("0.1.0"), 1_000)
        .unwrap();

    // The old version's heartbeat does not confirm the new one.
    assert_eq!(h.inst.confirm_healthy(v("0.1.0")).unwrap(), None);
    assert_eq!(h.inst.pending().unwrap(), Some(pending));

    assert_eq!(h.inst.confirm_healthy(v("0.2.0")).unwrap(), Some(pending));
    assert!(!root.join("upgrade.pending").exists());
    assert_eq!(h.inst.highest_run().unwrap(), Some(v("0.2.0")));
    assert_eq!(h.inst.overdue(u64::MAX).unwrap(), None);
    // A crash of a confirmed version (OnFailure= runs rollback) never downgrades it.
    assert_eq!(h.inst.rollback("crashed").unwrap(), None);
    assert_eq!(h.inst.current_version().unwrap(), Some(v("0.2.0")));
    assert_eq!(h.inst.previous_version().unwrap(), Some(v("0.1.0")));
    assert_eq!(fs::read(h.inst.current_binary()).unwrap(), new);
    assert!(h.inst.bad_versions().unwrap().is_empty());

    // Now it has run, it is the bar: neither it nor the old version installs again.
    let again = h.inst.install(&public, &release, &new, v("0.2.0"), 2_000);
    assert!(
        matches!(again, Err(ReleaseError::NotNewer { .. })),
        "{again:?}"
    );
    // A stale running version does not lower the bar either.
    let again = h.inst.install(&public, &release, &new, v("0.1.0"), 2_000);
    assert!(matches!(again, Err(ReleaseError::NotNewer { highest, .. }) if highest == v("0.2.0")));

    // The version before stays as the rollback target; the one before that can go.
    assert_eq!(h.inst.prune().unwrap(), vec![]);
    let b3 = binary("0.3.0");
    h.inst
        .install(
            &public,
            &for_here(&h.key, &b3, "0.3.0"),
            &b3,
            v("0.2.0"),
            3_000,
        )
        .unwrap();
    h.inst.confirm_healthy(v("0.3.0")).unwrap().unwrap();
    assert_eq!(h.inst.prune().unwrap(), vec![v("0.1.0")]);
    assert!(!root.join("versions/0.1.0").exists());
    assert_eq!(link(root, "previous"), Path::new("versions/0.2.0"));
}

/// RFC 8032's first test key (section 7.1), in the PKCS#8 v2 form ring writes.
const PKCS8: &str = "3051020101300506032b657004220420\
    9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60\
    812100\
    d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

#[test]
fn the_release_record_and_its_signature_are_pinned() {
    let key = ReleaseKey::from_pkcs8(&hex::decode(PKCS8).unwrap()).unwrap();
    assert_eq!(
        key.public_hex(),
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    );
    let bytes = b"vmvault 0.2.0\n";
    let release = Release::of_bytes(bytes, v("0.2.0"), "x86_64-unknown-linux-gnu").unwrap();
    // `printf 'vmvault 0.2.0\n' | sha256sum`
    let sha = "8f4e732e5ef28b36ca3f027cdec0dfc9ef225032da6113d0349e489fb1ab54f3";
    assert_eq!(hex::encode(release.sha256), sha);
    assert_eq!(release.canonical_bytes().len(), 144);
    assert_eq!(
        release.canonical_bytes(),
        format!(
            "vmvault release 1\nversion 0.2.0\ntarget x86_64-unknown-linux-gnu\nsha256 {sha}\nsize 14\n"
        )
        .as_bytes()
    );
    let signed = sign_release(&key, release).unwrap();
    // Also what Python's `cryptography` Ed25519 makes from the same seed and bytes.
    let signature = "46d8e7059277674e80b0960cf9af1196237b29de2b0166893828b145f6192466\
                     c821772b89c82c4d086769e97f79222b0539c0a855c44d7bbcf6032088152000";
    assert_eq!(hex::encode(signed.signature), signature);
    let json = format!(
        "{{\n  \"format\": \"vmvault release 1\",\n  \"version\": \"0.2.0\",\n  \
         \"target\": \"x86_64-unknown-linux-gnu\",\n  \"sha256\": \"{sha}\",\n  \"size\": 14,\n  \
         \"signature\": \"{signature}\"\n}}\n"
    );
    assert_eq!(signed.to_json(), json);
    let read = SignedRelease::from_json(json.as_bytes()).unwrap();
    assert_eq!(read, signed);
    verify(&key.public(), &read, bytes).unwrap();
}
