//! One backend, many threads: the engine calls a region from up to `concurrency()` workers.

use std::sync::Arc;
use std::time::Instant;

use vmvault_cloud::open;
use vmvault_store::{Kind, WriteBackend};
use vmvault_testkit::{Azurite, S3Server};

const THREADS: usize = 16;
const PER_THREAD: usize = 8;

fn sixteen_writers(backend: Arc<dyn WriteBackend>) {
    assert_eq!(backend.concurrency(), 16, "the default");
    backend.create().unwrap();
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let backend = &backend;
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let name = format!("{t:02x}{i:02x}{}", "0".repeat(60));
                    let data = vec![(t * PER_THREAD + i) as u8; 256 << 10];
                    backend.write(Kind::Chunk, &name, &data).unwrap();
                    assert_eq!(backend.read(Kind::Chunk, &name).unwrap(), data);
                }
            });
        }
    });
    eprintln!(
        "{}: {} writes and reads of 256 KiB from {THREADS} threads in {:?}",
        backend.location(),
        THREADS * PER_THREAD,
        started.elapsed()
    );
    let listed = backend.list(Kind::Chunk).unwrap();
    assert_eq!(listed.len(), THREADS * PER_THREAD);
    assert!(listed.iter().all(|o| o.size == 256 << 10));
}

#[test]
fn sixteen_threads_write_at_once_through_one_backend() {
    if let Some(s3) = S3Server::start() {
        s3.create_bucket("parallel");
        sixteen_writers(open("s3://parallel/vault", &s3.options()).unwrap());
    }
    if let Some(azurite) = Azurite::start() {
        azurite.create_bucket("parallel");
        sixteen_writers(open("azblob://parallel/vault", &azurite.options()).unwrap());
    }
}

/// A caller that is itself inside an async runtime (a server's handler) gets answers, not a
/// "runtime within a runtime" panic, and dropping the backend there is fine too.
#[test]
fn calls_from_inside_an_async_runtime_work() {
    let Some(s3) = S3Server::start() else { return };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let backend = open(&s3.url("async"), &s3.options()).unwrap();
        backend.write(Kind::Point, "p1", b"manifest").unwrap();
        assert_eq!(backend.read(Kind::Point, "p1").unwrap(), b"manifest");
        drop(backend);
    });
}
