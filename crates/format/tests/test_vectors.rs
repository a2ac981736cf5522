//! The format's test vectors (docs/format.md, "Test vectors"): objects exactly as vmvault 0.1.0
//! wrote them, decoded by this build. They pin the bytes, not the code that makes them: if one
//! fails, the change broke format version 1 and needs a new version and a reader for this one.

use vmvault_format::{
    Codec, Deletion, DiskIndex, FormatError, KeyFile, Manifest, ObjectKind, PointId, VaultConfig,
    VaultRules, MAX_MANIFEST_LEN, MAX_REGIONS_LEN, MAX_RULES_LEN,
};

fn bytes(hex: &str) -> Vec<u8> {
    hex::decode(hex.split_whitespace().collect::<String>()).unwrap()
}

/// An unencrypted vault's config: 64 KiB chunks, zstd level 1.
const PLAIN_CONFIG: &str = "564d56434f4e46000100000000000100
    00dae394c8d6a79958cdb94a75be3427 8539106b00000000 01000000 000000000000000000000000
    a005b4c8b3499c4d";

/// In that vault, the one chunk of a 40-byte disk, stored uncompressed (zstd would not shrink
/// it), under its unkeyed BLAKE3 digest.
const PLAIN_CHUNK: &str = "564d564348554e4b 01 00 00 00 00000000 2800000000000000
    000000000000000000000000 00000000
    766d7661756c74207465737420766563746f723a206f6e652073686f7274206368756e6b0a000000
    60e118fe3b71081e4eb53d54f9eaf34d";
const PLAIN_CHUNK_NAME: &str = "7cbba6a78da8802af4c849eb88490cbffe0229f495314c87e5780d23e3622e20";
const PLAIN_CHUNK_PAYLOAD: &[u8] = b"vmvault test vector: one short chunk\n\0\0\0";

/// That disk's index, zstd-compressed, under the digest of its payload.
const PLAIN_INDEX: &str = "564d56494e444558 01 01 00 00 00000000 3800000000000000
    00000000000000000000000000000000
    28b52ffd203875010064022800010001007cbba6a78da8802af4c849eb88490cbffe0229f495314c87e5780d23e3622e20035002001388
    bacd5aa75ae2aa7e0b47985473d56ad5";
const PLAIN_INDEX_NAME: &str = "c5ced4cf25e2b54bf37fd0f2db4e3a6acf61545d01f4616faa8f0c7fdb3e0872";

/// The key file of the checked-in vault `crates/cli/tests/data/vault-v1` (passphrase
/// `test passphrase`, Argon2id 64 MiB, 3 passes, 1 lane).
const KEY_FILE: &str = "564d564b45590000 0100 0100 00000100 03000000 01000000
    fc448d4ad6c5fbb3b0795dee00ea7f4b20fba6c96d37e564a8a316e299e09195
    e02a2c795f95eb2587ac32e1
    a330c936b23bd55ab6c9099d2c9ea2f614f1c2318a0805577b4a6b84f43c9795
    169704e8b689a6fd03e2650dc40bde74da4a1659b0914baaf3d3bc44f81618ac a166f4a7d165f04825147739546b42d5
    4d7c43c67927299107d84fc3308f85680f2a9040b4ccb71f562fb16085559887";
const VAULT_V1_CONFIG: &str = "564d56434f4e46000100010000000100495d7177ea8d980dafa8d5281b49f714
    6a38106b0000000001000000000000000000000000000000784ef36f0115471a";

/// That vault's first recovery point's manifest, encrypted.
const MANIFEST: &[&str] = &[
    "564d56504f494e5401010100000000005a03000000000000925f039fbe81045b60b93540000000000a4881a9f6279641",
    "d57aa87d31bca9c205fc439404a52636b8ec3e8ff4d587022b7b2ea1c0294c4691d537c7b022d8aa916870e55f4a7409",
    "5c6a526eb5236cfb5fa37d790c14618e154431895c2a63a6b16a3a75656d4264b87ca630129fd00e6eda6e724fb393ad",
    "71ea4ee9858eea507b067ff5347309516e1fc6009e437f507bc54e99fc028fd5d403c4cd0e3bb69ae2876fef9da47d3f",
    "79592ac523050a8becc61f2441ff316b0007552e913141086e343161135a0046d973431d42f761c32513dee0e03dd8a2",
    "1652912afda6fa34a569ce91476a72c784a2ab0a4e2794816583dc55eeb777f4ffb2dee2d14edd0f5f74f1d27e510a9e",
    "1af054b84115d5fb6bcb3cbd454ece4451a86a8ede2ee0b1042d2c2624ef9ff745ef76fa7d0a39f2a91543fbc804f0d1",
    "e235d9ae90ad30fb372dbd28325e69baf2a1a25df0ad06e98fdde91505762fdbfd65c3b5052cddc0efa5f678bf153dea",
    "eb1be61ca33e2e362064766e134eb6c21572ce7e8e3ae553fe2048d61a38c70b98b551a4d4e223cf68cd109ba3ecba07",
    "a3f2b75bda3cd1a0d445682f4dec488c6435c2eb614d56a39d3fbd68243375d96f73352bb3c2d4957aa7425786d7b2a0",
    "a2037acb56aaa6e7bd41ab6915e92d877139ad508b773e6719b7ce5e895bb78a422268768c6c811bb442d3",
];

#[test]
fn an_unencrypted_vaults_config_chunk_and_index_decode() {
    let config = VaultConfig::decode(&bytes(PLAIN_CONFIG)).unwrap();
    assert!(!config.encrypted);
    assert_eq!(config.chunk_size, 65536);
    assert_eq!(
        hex::encode(config.vault_id),
        "00dae394c8d6a79958cdb94a75be3427"
    );
    assert_eq!(config.created, 1_796_225_413); // 2026-12-02T15:30:13Z
    assert_eq!(config.zstd_level, 1);
    assert_eq!(config.encode().to_vec(), bytes(PLAIN_CONFIG));

    let codec = Codec::plain(config.zstd_level);
    let chunk = codec
        .open(ObjectKind::Chunk, &bytes(PLAIN_CHUNK), 65536)
        .unwrap();
    assert_eq!(chunk, PLAIN_CHUNK_PAYLOAD);
    assert_eq!(codec.digest(&chunk).to_hex(), PLAIN_CHUNK_NAME);

    let payload = codec
        .open(ObjectKind::Index, &bytes(PLAIN_INDEX), 1 << 20)
        .unwrap();
    assert_eq!(codec.digest(&payload).to_hex(), PLAIN_INDEX_NAME);
    let index = DiskIndex::decode(&payload).unwrap();
    assert_eq!((index.disk_size, index.chunk_size), (40, 65536));
    assert_eq!(index.chunks.len(), 1);
    assert_eq!(index.chunks[0].to_hex(), PLAIN_CHUNK_NAME);
}

#[test]
fn a_flipped_bit_in_any_vector_is_refused() {
    let codec = Codec::plain(1);
    let chunk = bytes(PLAIN_CHUNK);
    for i in 0..chunk.len() {
        let mut bad = chunk.clone();
        bad[i] ^= 0x10;
        assert!(
            codec.open(ObjectKind::Chunk, &bad, 65536).is_err(),
            "byte {i} flipped still opens"
        );
    }
    let config = bytes(PLAIN_CONFIG);
    for i in 0..config.len() {
        let mut bad = config.clone();
        bad[i] ^= 0x01;
        assert!(VaultConfig::decode(&bad).is_err(), "config byte {i}");
    }
    // A chunk is never read as an index, nor an index as a chunk.
    assert!(codec.open(ObjectKind::Index, &chunk, 1 << 20).is_err());
    assert!(codec
        .open(ObjectKind::Chunk, &bytes(PLAIN_INDEX), 65536)
        .is_err());
}

#[test]
fn the_checked_in_vaults_key_file_opens_its_manifest() {
    let config = VaultConfig::decode(&bytes(VAULT_V1_CONFIG)).unwrap();
    assert!(config.encrypted);
    let key_file = KeyFile::decode(&bytes(KEY_FILE)).unwrap();
    assert!(matches!(
        key_file.unwrap_keys(b"not the passphrase"),
        Err(FormatError::WrongPassphrase)
    ));
    let keys = key_file.unwrap_keys(b"test passphrase").unwrap();
    let codec = Codec::encrypted(&keys, config.zstd_level);
    let sealed = bytes(&MANIFEST.concat());
    let payload = codec
        .open(ObjectKind::Manifest, &sealed, MAX_MANIFEST_LEN)
        .unwrap();
    let m = Manifest::decode(&payload).unwrap();
    assert_eq!(m.id.to_hex(), "4a60e7ec98cc8c29acd202476fc0cf95");
    assert_eq!(m.vm, "web01");
    assert_eq!(m.program, "vmvault 0.1.0");
    assert_eq!(m.disks.len(), 1);
    assert_eq!(m.disks[0].size, 1 << 20);
    // Under the wrong key (a plain codec) it does not open.
    assert!(Codec::plain(1)
        .open(ObjectKind::Manifest, &sealed, MAX_MANIFEST_LEN)
        .is_err());
}

/// Vault rules (unencrypted vault): soft delete 30 days, locked by alice; stored uncompressed.
const PLAIN_RULES: &str = "564d5652554c4553 01 00 00 00 00000000 5700000000000000
    000000000000000000000000 00000000
    7b2276657273696f6e223a312c22736f66745f64656c6574655f64617973223a33302c226c6f636b6564223a7b226174223a22323032362d31322d30325431303a30303a30305a222c226279223a22616c696365227d7d
    603ab8de7b34e73a28f95fd6b248ec29";

/// The deletion marker of point 1111...11 (unencrypted vault), zstd-compressed.
const PLAIN_DELETION: &str = "564d5644454c5054 01 01 00 00 00000000 7f00000000000000
    000000000000000000000000 00000000
    28b52ffd207fad0200a285121890a7e9985f3436df0086eb60aee55db1556e9b6996df1dd089bb7a1401f2a492a2c8f651e7fc70b607777997870273c560099833e7ab20a0ae1e45db78be92a10a1be649190952c38802006a86016e4013ec97bec39164
    58af2830fc0b9a53f3cb";

#[test]
fn the_rules_and_deletion_marker_vectors_decode() {
    let codec = Codec::plain(1);
    let rules = codec
        .open(ObjectKind::Rules, &bytes(PLAIN_RULES), MAX_RULES_LEN)
        .unwrap();
    let rules = VaultRules::decode(&rules).unwrap();
    assert_eq!(rules.soft_delete_days, 30);
    assert_eq!(rules.locked.unwrap().by, "alice");
    let point = PointId([0x11; 16]);
    let marker = codec
        .open(ObjectKind::Deletion, &bytes(PLAIN_DELETION), MAX_RULES_LEN)
        .unwrap();
    let marker = Deletion::decode(&marker, &point).unwrap();
    assert_eq!(
        (marker.by.as_str(), marker.reason.as_str()),
        ("bob", "point delete")
    );
    // One is never read as the other, nor a marker as another point's.
    assert!(codec
        .open(ObjectKind::Deletion, &bytes(PLAIN_RULES), MAX_RULES_LEN)
        .is_err());
    let payload = codec
        .open(ObjectKind::Deletion, &bytes(PLAIN_DELETION), MAX_RULES_LEN)
        .unwrap();
    assert!(Deletion::decode(&payload, &PointId([0x12; 16])).is_err());
    for v in [PLAIN_RULES, PLAIN_DELETION] {
        let good = bytes(v);
        for bit in 0..good.len() * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let kind = if v == PLAIN_RULES {
                ObjectKind::Rules
            } else {
                ObjectKind::Deletion
            };
            assert!(codec.open(kind, &b, MAX_RULES_LEN).is_err(), "bit {bit}");
        }
    }
}

/// A regions record (unencrypted vault), zstd-compressed: primary `/srv/vault`, secondary
/// `s3://geo/vault` at `https://s3.example.test`, region `eu-2`.
const PLAIN_REGIONS: &str = "564d565245474e53 01 01 00 00 00000000 9000000000000000
    000000000000000000000000 00000000
    28b52ffd20904d030012c7161980b76dc631c8e45e8b5ca716eb811101137ce07ea80d9a3b02cb720120c103f7e6cdd80326851c020e049b1dabeec1ef9d48959178a378981dc1466a817cb3bc537296ad65fb3d15f529345db917f62068d54de09e8a78715d09030042c3284d651193a7f6
    a1839cb4a879b82b17bd2d3419ce87ae";
const PLAIN_REGIONS_PAYLOAD: &str = r#"{"version":1,"primary":{"location":"/srv/vault"},"secondary":{"location":"s3://geo/vault","endpoint":"https://s3.example.test","region":"eu-2"}}"#;

#[test]
fn the_regions_record_vector_decodes_and_is_no_other_kind() {
    let codec = Codec::plain(1);
    let good = bytes(PLAIN_REGIONS);
    let payload = codec
        .open(ObjectKind::Regions, &good, MAX_REGIONS_LEN)
        .unwrap();
    assert_eq!(payload, PLAIN_REGIONS_PAYLOAD.as_bytes());
    // Sealing the payload again gives the same bytes (no nonce, one zstd frame).
    assert_eq!(codec.seal(ObjectKind::Regions, &payload), good);
    // Not readable as another kind, nor another kind as it.
    for kind in [
        ObjectKind::Rules,
        ObjectKind::Deletion,
        ObjectKind::Manifest,
        ObjectKind::Chunk,
        ObjectKind::Index,
    ] {
        assert!(
            codec.open(kind, &good, MAX_REGIONS_LEN).is_err(),
            "{kind:?}"
        );
    }
    for other in [PLAIN_RULES, PLAIN_DELETION] {
        assert!(codec
            .open(ObjectKind::Regions, &bytes(other), MAX_REGIONS_LEN)
            .is_err());
    }
    // A limit below its plain length refuses it unread.
    assert!(matches!(
        codec.open(ObjectKind::Regions, &good, 100),
        Err(FormatError::TooLarge { .. })
    ));
    for bit in 0..good.len() * 8 {
        let mut b = good.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(
            codec
                .open(ObjectKind::Regions, &b, MAX_REGIONS_LEN)
                .is_err(),
            "bit {bit}"
        );
    }
}
