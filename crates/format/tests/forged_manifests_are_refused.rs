//! A manifest is read from storage that an attacker may write to (an unencrypted vault has no
//! tag to forge): its names become file names at a restore's target and its disk sizes size
//! the index a reader loads, so decoding refuses what no backup writes.

use serde_json::{json, Value};
use vmvault_format::{DiskIndex, FormatError, Manifest, MAX_DISK_CHUNKS};

fn good() -> Value {
    json!({
        "version": 1,
        "id": "00112233445566778899aabbccddeeff",
        "vm": "web01",
        "time": "2026-11-25T10:00:00.123456789Z",
        "source": "image",
        "consistency": "crash",
        "consistency_reason": "offline VM",
        "host": "h",
        "program": "vmvault 0.1.0",
        "chunk_size": 1048576,
        "vm_config": {
            "name": "web01", "cpus": 2, "memory_mib": 2048, "firmware": "bios",
            "disks": [
                {"name": "os", "path": "os.raw", "format": "raw", "bus": "virtio"},
                {"name": "data", "path": "data.raw", "format": "raw", "bus": "virtio"}
            ],
            "nics": []
        },
        "disks": [
            {"name": "os", "format": "raw", "size": 10485760, "index": "03".repeat(32),
             "stats": {"bytes_read": 0, "bytes_new": 0, "bytes_stored": 0,
                       "chunks_new": 0, "chunks_reused": 0, "chunks_zero": 0}},
            {"name": "data", "format": "qcow2", "size": 1, "index": "04".repeat(32),
             "stats": {"bytes_read": 0, "bytes_new": 0, "bytes_stored": 0,
                       "chunks_new": 0, "chunks_reused": 0, "chunks_zero": 0}}
        ],
        "stats": {"bytes_read": 0, "bytes_new": 0, "bytes_stored": 0,
                  "chunks_new": 0, "chunks_reused": 0, "chunks_zero": 0}
    })
}

fn decode(v: &Value) -> Result<Manifest, FormatError> {
    Manifest::decode(&serde_json::to_vec(v).unwrap())
}

fn refused(v: &Value, needle: &str) {
    let err = decode(v)
        .expect_err("a forged manifest must be refused")
        .to_string();
    assert!(err.contains(needle), "{err:?} should say {needle:?}");
    assert!(!err.contains('\n'), "one line: {err:?}");
}

#[test]
fn the_untouched_manifest_decodes() {
    let m = decode(&good()).unwrap();
    assert_eq!(m.disks.len(), 2);
}

#[test]
fn names_that_leave_the_target_folder_are_refused() {
    let bad = [
        "../../x",
        "..",
        ".",
        "",
        "a/b",
        "/etc/passwd",
        "-rf",
        "os\0",
        "x\\y",
        "é",
    ];
    for name in bad {
        let mut v = good();
        v["vm"] = json!(name);
        refused(&v, "VM name");
        let mut v = good();
        v["vm_config"]["name"] = json!(name);
        refused(&v, "VM name");
        let mut v = good();
        v["disks"][0]["name"] = json!(name);
        refused(&v, "disk name");
        let mut v = good();
        v["vm_config"]["disks"][1]["name"] = json!(name);
        refused(&v, "disk name");
    }
    let mut v = good();
    v["vm"] = json!("a".repeat(65));
    refused(&v, "VM name");
    let mut v = good();
    v["vm"] = json!("a".repeat(64));
    v["vm_config"]["name"] = json!("a".repeat(64));
    decode(&v).unwrap();
}

#[test]
fn a_disk_named_twice_is_refused() {
    let mut v = good();
    v["disks"][1]["name"] = json!("os");
    refused(&v, "twice");
}

#[test]
fn absurd_disk_sizes_and_chunk_sizes_are_refused() {
    let chunk = 1u64 << 20;
    let mut v = good();
    v["disks"][0]["size"] = json!(MAX_DISK_CHUNKS * chunk + 1);
    refused(&v, "larger than");
    let mut v = good();
    v["disks"][0]["size"] = json!(u64::MAX);
    refused(&v, "larger than");
    let mut v = good();
    v["disks"][0]["size"] = json!(MAX_DISK_CHUNKS * chunk);
    decode(&v).unwrap();
    for bad in [0u64, 1000, 1 << 15, 1 << 25, 3 << 20] {
        let mut v = good();
        v["chunk_size"] = json!(bad);
        refused(&v, "chunk size");
    }
}

#[test]
fn absurd_disk_counts_are_refused() {
    let mut v = good();
    let one = v["disks"][0].clone();
    let disks: Vec<Value> = (0..5000)
        .map(|i| {
            let mut d = one.clone();
            d["name"] = json!(format!("d{i}"));
            d
        })
        .collect();
    v["disks"] = json!(disks);
    refused(&v, "disks");
}

#[test]
fn an_index_never_claims_more_than_a_disk_may_hold() {
    // The bound a reader opens an index with stays at the largest real index, whatever
    // count a forged manifest implies.
    let most = DiskIndex::encoded_len(MAX_DISK_CHUNKS);
    assert_eq!(most, MAX_DISK_CHUNKS * 32 + 24);
    assert_eq!(DiskIndex::encoded_len(u64::MAX), most);
    assert_eq!(DiskIndex::encoded_len(1 << 40), most);
    // A header whose count is past the limit is refused before its length is looked at.
    let mut b = Vec::new();
    b.extend_from_slice(&((MAX_DISK_CHUNKS + 1) << 16).to_le_bytes());
    b.extend_from_slice(&(1u32 << 16).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(MAX_DISK_CHUNKS + 1).to_le_bytes());
    let err = DiskIndex::decode(&b).unwrap_err().to_string();
    assert!(err.contains("chunks"), "{err}");
}
