//! The pieces under the upgrade: versions, the key file, the signature file, and an
//! installation picked up after a crash in the middle of a swap.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use tempfile::TempDir;
use vmvault_release::{
    sign, sign_release, this_target, verify, verify_file, Installation, Release, ReleaseError,
    ReleaseKey, ReleasePublicKey, SignedRelease, Version, VersionError,
};

fn v(text: &str) -> Version {
    text.parse().unwrap()
}

#[test]
fn versions_are_exactly_major_minor_patch_and_order_by_number() {
    assert_eq!(v("0.2.0"), Version::new(0, 2, 0));
    assert_eq!(v("10.0.31").to_string(), "10.0.31");
    assert!(v("0.10.0") > v("0.9.9"));
    assert!(v("1.0.0") > v("0.99.99"));
    assert!(v("0.2.1") > v("0.2.0"));
    for text in [
        "",
        "1",
        "1.2",
        "1.2.3.4",
        "v1.2.3",
        "1.2.3-rc1",
        "1.2.3+b",
        " 1.2.3",
        "1.2.3\n",
        "1..3",
        "+1.2.3",
        "1.-2.3",
        "a.b.c",
    ] {
        let err = text.parse::<Version>().unwrap_err();
        assert_eq!(err, VersionError::NotThreeNumbers(text.into()), "{text:?}");
    }
    assert_eq!(
        "1.02.3".parse::<Version>(),
        Err(VersionError::LeadingZero("1.02.3".into()))
    );
    assert_eq!(
        "1.2.99999999999999999999".parse::<Version>(),
        Err(VersionError::TooLarge("1.2.99999999999999999999".into()))
    );
    assert_eq!(serde_json::to_string(&v("1.2.3")).unwrap(), "\"1.2.3\"");
    assert!(serde_json::from_str::<Version>("\"01.2.3\"").is_err());
}

#[test]
fn this_target_is_the_triple_this_test_was_built_for() {
    let target = this_target();
    if cfg!(all(
        target_arch = "x86_64",
        target_os = "linux",
        target_env = "gnu"
    )) {
        assert_eq!(target, "x86_64-unknown-linux-gnu");
    }
    if cfg!(all(
        target_arch = "aarch64",
        target_os = "linux",
        target_env = "gnu"
    )) {
        assert_eq!(target, "aarch64-unknown-linux-gnu");
    }
    // Whatever it is, it can be signed for.
    let key = ReleaseKey::generate().unwrap().0;
    Release::of_bytes(b"x", v("1.0.0"), &target).unwrap();
    sign_release(&key, Release::of_bytes(b"x", v("1.0.0"), &target).unwrap()).unwrap();
}

#[test]
fn the_key_file_is_made_once_0600_and_never_replaced() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("release.key");
    let made = ReleaseKey::load_or_create(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let bytes = fs::read(&path).unwrap();
    assert_eq!(
        ReleaseKey::from_pkcs8(&bytes).unwrap().public(),
        made.public()
    );
    assert_eq!(
        ReleaseKey::load_or_create(&path).unwrap().public(),
        made.public()
    );
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["release.key"], "a temporary file was left behind");

    // Readable by others: refused, and left alone.
    fs::set_permissions(&path, PermissionsExt::from_mode(0o644)).unwrap();
    let err = ReleaseKey::load_or_create(&path).unwrap_err();
    assert!(err.to_string().contains("0600"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), bytes);

    // Not a key: an error to look at, never written over.
    fs::write(&path, b"garbage").unwrap();
    fs::set_permissions(&path, PermissionsExt::from_mode(0o600)).unwrap();
    assert!(matches!(
        ReleaseKey::load_or_create(&path),
        Err(ReleaseError::Format(_))
    ));
    assert_eq!(fs::read(&path).unwrap(), b"garbage");
    assert!(format!("{made:?}").contains(&made.public_hex()));
}

#[test]
fn a_public_key_reads_back_from_its_hex() {
    let key = ReleaseKey::generate().unwrap().0;
    let hex = key.public_hex();
    assert_eq!(hex.len(), 64);
    assert_eq!(ReleasePublicKey::from_hex(&hex).unwrap(), key.public());
    assert_eq!(
        ReleasePublicKey::from_hex(&hex.to_uppercase()).unwrap(),
        key.public()
    );
    for bad in [
        "",
        &hex[..62],
        &format!("{hex}00"),
        &format!("zz{}", &hex[2..]),
    ] {
        assert!(
            matches!(
                ReleasePublicKey::from_hex(bad),
                Err(ReleaseError::Format(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn a_signed_file_verifies_and_a_changed_one_does_not() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("vmvault");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&path, &content).unwrap();
    let key = ReleaseKey::generate().unwrap().0;
    let signed = sign(&key, &path, v("0.3.0"), "aarch64-unknown-linux-gnu").unwrap();
    assert_eq!(signed.release.size, content.len() as u64);
    assert_eq!(signed.release.target, "aarch64-unknown-linux-gnu");
    verify_file(&key.public(), &signed, &path).unwrap();
    verify(&key.public(), &signed, &content).unwrap();

    let other = ReleaseKey::generate().unwrap().0;
    assert!(matches!(
        verify_file(&other.public(), &signed, &path),
        Err(ReleaseError::BadSignature)
    ));
    let mut changed = content.clone();
    changed[2_500_000] ^= 0x80;
    fs::write(&path, &changed).unwrap();
    let err = verify_file(&key.public(), &signed, &path).unwrap_err();
    assert!(
        matches!(&err, ReleaseError::Mismatch(m) if m.contains("SHA-256")),
        "{err}"
    );
    fs::write(&path, &content[1..]).unwrap();
    let err = verify_file(&key.public(), &signed, &path).unwrap_err();
    assert!(
        matches!(&err, ReleaseError::Mismatch(m) if m.contains("bytes")),
        "{err}"
    );
}

#[test]
fn a_signature_file_of_another_form_is_refused() {
    let key = ReleaseKey::generate().unwrap().0;
    let signed = sign_release(
        &key,
        Release::of_bytes(b"bin", v("1.0.0"), "x86_64-unknown-linux-gnu").unwrap(),
    )
    .unwrap();
    let json = signed.to_json();
    assert_eq!(SignedRelease::from_json(json.as_bytes()).unwrap(), signed);
    let edits = [
        json.replace("vmvault release 1", "vmvault release 2"),
        json.replace("\"size\"", "\"extra\": 1,\n  \"size\""),
        json.replace("\"1.0.0\"", "\"1.0\""),
        json.replace("x86_64-unknown-linux-gnu", "x86_64\\nsize 1"),
        json.replace(&hex::encode(signed.signature), "00"),
        json.replace(&hex::encode(signed.release.sha256), "abc"),
        json.replace("\"size\": 3", "\"size\": -3"),
        "not json".to_string(),
    ];
    for edit in edits {
        assert_ne!(edit, json);
        assert!(
            matches!(
                SignedRelease::from_json(edit.as_bytes()),
                Err(ReleaseError::Format(_))
            ),
            "{edit}"
        );
    }
    // A target that could not be written is refused before signing, and as unsigned.
    assert!(Release::of_bytes(b"bin", v("1.0.0"), "x86_64\nsize 1").is_err());
    let mut forged = signed.clone();
    forged.release.target = "x86_64-unknown-linux-gnu\n".into();
    assert!(matches!(
        verify(&key.public(), &forged, b"bin"),
        Err(ReleaseError::BadSignature)
    ));
}

/// A host at 0.1.0 with 0.2.0 installed and pending.
fn upgrading() -> (TempDir, Installation) {
    let root = TempDir::new().unwrap();
    let old = root.path().join("old");
    fs::write(&old, b"old").unwrap();
    let inst = Installation::open(root.path()).unwrap();
    inst.adopt(v("0.1.0"), &old).unwrap();
    fs::remove_file(&old).unwrap();
    let key = ReleaseKey::generate().unwrap().0;
    let signed = sign_release(
        &key,
        Release::of_bytes(b"new", v("0.2.0"), &this_target()).unwrap(),
    )
    .unwrap();
    inst.install(&key.public(), &signed, b"new", v("0.1.0"), 0)
        .unwrap();
    (root, inst)
}

fn repoint(root: &Path, name: &str, target: &str) {
    fs::remove_file(root.join(name)).unwrap();
    symlink(target, root.join(name)).unwrap();
}

#[test]
fn a_rollback_cut_short_or_an_install_cut_short_is_finished() {
    // `current` already back (or never swapped), `upgrade.pending` still there.
    let (root, inst) = upgrading();
    repoint(root.path(), "current", "versions/0.1.0");
    assert_eq!(
        inst.rollback("restart").unwrap(),
        Some((v("0.2.0"), v("0.1.0")))
    );
    assert_eq!(inst.pending().unwrap(), None);
    assert_eq!(inst.bad_versions().unwrap()[0].version, v("0.2.0"));
    assert_eq!(inst.rollback("again").unwrap(), None);

    // Marked bad and pending gone, but `current` still on the bad version.
    let (root, inst) = upgrading();
    inst.rollback("deadline").unwrap().unwrap();
    repoint(root.path(), "current", "versions/0.2.0");
    assert_eq!(
        inst.rollback("bad current").unwrap(),
        Some((v("0.2.0"), v("0.1.0")))
    );
    assert_eq!(inst.current_version().unwrap(), Some(v("0.1.0")));
    assert_eq!(inst.bad_versions().unwrap()[0].reason, "deadline");
}

#[test]
fn an_installation_needs_a_current_version_to_fall_back_to() {
    let root = TempDir::new().unwrap();
    let inst = Installation::open(root.path()).unwrap();
    assert_eq!(inst.current_version().unwrap(), None);
    assert_eq!(inst.rollback("nothing").unwrap(), None);
    let key = ReleaseKey::generate().unwrap().0;
    let signed = sign_release(
        &key,
        Release::of_bytes(b"new", v("0.2.0"), &this_target()).unwrap(),
    )
    .unwrap();
    let err = inst
        .install(&key.public(), &signed, b"new", v("0.1.0"), 0)
        .unwrap_err();
    assert!(matches!(err, ReleaseError::NoCurrent(_)), "{err}");
    assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);

    repoint_new(root.path(), "current", "/usr/bin/vmvault");
    assert!(matches!(
        inst.current_version(),
        Err(ReleaseError::Format(_))
    ));
    assert!(Installation::open(&root.path().join("missing")).is_err());
}

fn repoint_new(root: &Path, name: &str, target: &str) {
    symlink(target, root.join(name)).unwrap();
}
