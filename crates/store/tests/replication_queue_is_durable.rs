//! Fault matrix: the replication queue loses nothing a crash could take, and processes that
//! open it at the same moment all succeed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmvault_store::journal::{Journal, Op};
use vmvault_store::{CreateOptions, Kind, LocalBackend, Regions, Replication, Vault, WriteBackend};

fn journal_text(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "journal") {
            text.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    text
}

/// A manifest's queue line is on disk once the manifest is in the primary: a `kill -9` before
/// the backup's last sync must not leave the secondary without the point.
#[test]
fn a_manifest_is_journaled_before_it_lands() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let regions = Regions {
        primary: Arc::new(LocalBackend::new(dir.path().join("primary"))) as Arc<dyn WriteBackend>,
        secondary: Some(Arc::new(LocalBackend::new(dir.path().join("secondary")))),
        replication: Replication::Async {
            state_dir: state.clone(),
            capacity: 1000,
        },
        notify: Arc::new(|_: &str| {}),
    };
    let vault = Vault::create(regions, CreateOptions::default()).unwrap();
    let replicated = vault.replication().unwrap().clone();
    // The workers must not race the check: stop them from taking anything.
    replicated.journal().unwrap().close();
    let name = "0123456789abcdef0123456789abcdef";
    vault
        .backend()
        .write(Kind::Point, name, b"manifest")
        .unwrap();
    let queue = state
        .join("replication")
        .join(hex::encode(vault.config().vault_id));
    let text = journal_text(&queue);
    assert!(
        text.contains(&format!("copy point {name}")),
        "not on disk yet:\n{text}"
    );
}

/// A failed write of a manifest leaves no entry to copy.
#[test]
fn a_manifest_that_did_not_land_is_not_queued() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), 100).unwrap();
    let failed = j.push_ahead(Op::Copy, Kind::Point, "p1", || {
        Err(vmvault_store::StoreError::Invalid("refused".into()))
    });
    assert!(failed.is_err());
    assert_eq!(j.backlog(), (0, false));
    j.push_ahead(Op::Copy, Kind::Point, "p2", || Ok(()))
        .unwrap();
    assert_eq!(j.take(Duration::ZERO).unwrap().name, "p2");
}

/// Many processes (here: separate opens, which `flock` treats alike) open one queue at once:
/// none fails, none adopts another's live journal.
#[test]
fn processes_opening_the_queue_together_all_succeed() {
    for round in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().to_path_buf());
        let barrier = Arc::new(std::sync::Barrier::new(6));
        let opened: Vec<_> = (0..6)
            .map(|i| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let j = Journal::open(&path, 100)?;
                    j.push(Op::Copy, Kind::Chunk, &format!("c{i}"))?;
                    j.flush()?;
                    Ok::<_, vmvault_store::StoreError>(j)
                })
            })
            .collect();
        let journals: Vec<Journal> = opened
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let held: usize = journals.iter().map(|j| j.backlog().0).sum();
        assert_eq!(held, 6, "round {round}: an entry was adopted away or lost");
    }
}
