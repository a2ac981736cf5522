//! `kill -9` at any moment of a backup leaves a vault that verifies clean, lists no half point,
//! and whose next backup succeeds, reusing the chunks already written.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn kill_9_during_backup() {
    let env = Env::with_vault();
    make_image(&env.path("os.raw"), 96 * 1024 * 1024, 90);
    let desc = write_vm(env.dir.path(), "vm.toml", "web01", &[("os", "os.raw")]);
    let mut killed_with_chunks = Vec::new();
    // Kill after a few chunks, after many, and after more than the first attempt left.
    for threshold in [5usize, 300, 900] {
        let mut child = env
            .command(&["backup", desc.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        loop {
            if env.chunk_files().len() >= threshold {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "backup ended before the kill"
            );
            assert!(started.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        killed_with_chunks.push(env.chunk_files().len());

        let j = env.ok(&["points", "--json"]).json();
        assert_eq!(j["points"].as_array().unwrap().len(), 0, "no half point");
        assert!(j["unreadable"].as_array().unwrap().is_empty());
        env.ok(&["verify", "--read-data"]);
    }
    // The next backup is not blocked by the dead backup's lock and reuses its chunks.
    let o = env.ok(&["backup", desc.to_str().unwrap(), "--json"]).json();
    let reused = o["stats"]["chunks_reused"].as_u64().unwrap();
    assert!(
        reused as usize >= killed_with_chunks[2] * 9 / 10,
        "{reused} of {killed_with_chunks:?}"
    );
    env.ok(&["verify", "--read-data"]);
    env.ok(&["restore", "web01@latest", "--disk", "os", "--to", "r.raw"]);
    assert!(same_bytes(&env.path("r.raw"), &env.path("os.raw")));
    // Leftover temporaries are cleaned by gc once they are older than its cutoff.
    std::thread::sleep(vmvault_store::gc::SAFETY_MARGIN);
    env.ok(&["gc"]);
    for d in std::fs::read_dir(env.vault.join("chunks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let name = f.unwrap().file_name();
            assert!(
                !name.to_str().unwrap().starts_with(".tmp-"),
                "{name:?} left"
            );
        }
    }
}
