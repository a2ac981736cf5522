//! The backend: the vault's objects as objects under a prefix, one request per call.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::runtime::Runtime;
use vmvault_store::{
    check_name, Hold, HoldState, Kind, ObjectInfo, ReadBackend, StoreError, WriteBackend,
};

use crate::config::Built;
use crate::error::{classify, Failure, Redactor};
use crate::hold::S3Requests;
use crate::object_lock::{self, StorageLock};

/// Reading more than this ahead of the bytes arriving is not worth trusting a server's
/// `Content-Length` for.
const MAX_RESERVE: u64 = 64 << 20;

pub(crate) struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    /// `Some` until drop, which shuts it down without blocking (see `Drop`).
    runtime: Option<Runtime>,
    root: Path,
    location: String,
    bucket_label: String,
    redactor: Redactor,
    concurrency: usize,
    /// The requests object_store does not make (S3 only).
    s3: Option<S3Requests>,
    /// The hold every write other than a lock carries, once the bucket was found to take it.
    held: RwLock<Option<Hold>>,
}

impl ObjectBackend {
    pub fn new(
        built: Built,
        bucket: Option<object_lock::Bucket>,
    ) -> Result<ObjectBackend, StoreError> {
        let s3 = bucket.map(S3Requests::new).transpose()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmvault-cloud")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| StoreError::Io {
                context: format!("starting the I/O threads for {}", built.location),
                source,
            })?;
        Ok(ObjectBackend {
            store: built.store,
            runtime: Some(runtime),
            root: built.root,
            location: built.location,
            bucket_label: built.bucket_label,
            redactor: built.redactor,
            concurrency: built.concurrency,
            s3,
            held: RwLock::new(None),
        })
    }

    /// Runs a request's future to completion on the calling thread, the runtime's workers
    /// driving the connections. Callable from any number of threads at once. From inside
    /// another async runtime (where `block_on` would panic) a helper thread waits instead.
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        if tokio::runtime::Handle::try_current().is_err() {
            return runtime.block_on(fut);
        }
        std::thread::scope(|s| match s.spawn(|| runtime.block_on(fut)).join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    fn dir(kind: Kind) -> Option<&'static str> {
        match kind {
            Kind::Config => None,
            Kind::Key => Some("keys"),
            Kind::Chunk => Some("chunks"),
            Kind::Index => Some("indexes"),
            Kind::Point => Some("points"),
            Kind::Lock => Some("locks"),
        }
    }

    fn kind_root(&self, kind: Kind) -> Path {
        match Self::dir(kind) {
            Some(dir) => self.root.clone().join(dir),
            None => self.root.clone(),
        }
    }

    /// Where an object lives: the local backend's layout under the prefix.
    fn path(&self, kind: Kind, name: &str) -> Result<Path, StoreError> {
        check_name(name)?;
        let dir = self.kind_root(kind);
        Ok(match kind {
            Kind::Chunk if name.len() >= 2 => dir.join(&name[..2]).join(name),
            _ => dir.join(name),
        })
    }

    /// A list request's prefix: `None` lists the whole bucket.
    fn list_prefix(p: &Path) -> Option<&Path> {
        (p.parts_count() > 0).then_some(p)
    }

    fn remote(&self, detail: String, transient: bool) -> StoreError {
        StoreError::Remote {
            location: self.location.clone(),
            detail,
            transient,
        }
    }

    fn no_bucket(&self) -> StoreError {
        self.remote(
            format!("the {} does not exist: create it first", self.bucket_label),
            false,
        )
    }

    /// The vault's error for a failed request on one object.
    fn fail(&self, doing: &str, kind: Kind, name: &str, e: &object_store::Error) -> StoreError {
        match classify(e, &self.redactor) {
            Failure::Missing => StoreError::NotFound(format!("{} {name}", kind.name())),
            Failure::NoBucket => self.no_bucket(),
            Failure::Other { detail, transient } => self.remote(
                format!("{doing} {} {name}: {detail}", kind.name()),
                transient,
            ),
        }
    }

    /// The vault's error for a failed request of our own on one object.
    fn failed(&self, doing: &str, kind: Kind, name: &str, f: Failure) -> StoreError {
        match f {
            Failure::Missing => StoreError::NotFound(format!("{} {name}", kind.name())),
            Failure::NoBucket => self.no_bucket(),
            Failure::Other { detail, transient } => self.remote(
                format!(
                    "{doing} {} {name}: {}",
                    kind.name(),
                    self.redactor.redact(&detail)
                ),
                transient,
            ),
        }
    }

    fn hold(&self) -> Option<Hold> {
        self.held.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The vault's error for a failed listing, where "not found" is the bucket.
    fn fail_list(&self, doing: &str, e: &object_store::Error) -> StoreError {
        match classify(e, &self.redactor) {
            Failure::Missing | Failure::NoBucket => self.no_bucket(),
            Failure::Other { detail, transient } => {
                self.remote(format!("{doing}: {detail}"), transient)
            }
        }
    }

    fn head(&self, kind: Kind, name: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.path(kind, name)?;
        match self.run(self.store.head(&path)) {
            Ok(meta) => Ok(Some(meta)),
            Err(e) => match self.fail("reading", kind, name, &e) {
                StoreError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    fn info(name: &str, meta: &ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            name: name.to_string(),
            size: meta.size,
            modified: SystemTime::from(meta.last_modified),
        }
    }

    /// An object's name if its path is where this kind keeps objects; stray objects (other
    /// tools', deeper paths, bad names) are not the vault's.
    fn listed_name(kind: Kind, relative: &[&str]) -> Option<String> {
        let name = match (kind, relative) {
            (Kind::Chunk, [fan, name]) if name.len() >= 2 && *fan == &name[..2] => name,
            (Kind::Chunk, [name]) if name.len() < 2 => name,
            (Kind::Chunk, _) => return None,
            (_, [name]) => name,
            _ => return None,
        };
        check_name(name).ok().map(|()| name.to_string())
    }
}

impl Drop for ObjectBackend {
    /// Dropping a runtime blocks until its workers stop, which panics inside another async
    /// runtime; shutting down in the background never blocks.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl ReadBackend for ObjectBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::new();
        self.read_into(kind, name, &mut buf)?;
        Ok(buf)
    }

    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        buf.clear();
        let got = self.run(async {
            let got = self.store.get(&path).await?;
            buf.reserve(got.meta.size.min(MAX_RESERVE) as usize);
            let mut stream = got.into_stream();
            while let Some(piece) = stream.try_next().await? {
                buf.extend_from_slice(&piece);
            }
            Ok::<_, object_store::Error>(())
        });
        got.map_err(|e| self.fail("reading", kind, name, &e))
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        Ok(self.head(kind, name)?.map(|meta| Self::info(name, &meta)))
    }

    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>, StoreError> {
        if kind == Kind::Config {
            return Ok(self.stat(Kind::Config, "config")?.into_iter().collect());
        }
        let dir = self.kind_root(kind);
        let listed: Vec<ObjectMeta> = self
            .run(self.store.list(Self::list_prefix(&dir)).try_collect())
            .map_err(|e| self.fail_list(&format!("listing {}s", kind.name()), &e))?;
        let mut out = Vec::with_capacity(listed.len());
        for meta in &listed {
            let Some(relative) = meta.location.prefix_match(&dir) else {
                continue;
            };
            let relative: Vec<_> = relative.collect();
            let relative: Vec<&str> = relative.iter().map(|p| p.as_ref()).collect();
            if let Some(name) = Self::listed_name(kind, &relative) {
                out.push(Self::info(&name, meta));
            }
        }
        Ok(out)
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }
}

impl WriteBackend for ObjectBackend {
    /// Refuses a prefix that holds any object; creates nothing (no directories to make).
    fn create(&self) -> Result<(), StoreError> {
        let first = self.run(async {
            let mut objects = self.store.list(Self::list_prefix(&self.root));
            objects.try_next().await
        });
        match first {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(StoreError::NotEmpty {
                location: self.location(),
            }),
            Err(e) => Err(self.fail_list("checking that the prefix is empty", &e)),
        }
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        if let (Some(hold), Some(s3)) = (self.hold().filter(|_| Hold::holds(kind)), &self.s3) {
            return self
                .run(s3.put_held(path.as_ref(), data, &hold))
                .map_err(|f| self.failed("writing (held)", kind, name, f));
        }
        let payload = PutPayload::from(data.to_vec());
        self.run(self.store.put(&path, payload))
            .map(|_| ())
            .map_err(|e| self.fail("writing", kind, name, &e))
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        match self.run(self.store.delete(&path)) {
            Ok(()) => Ok(()),
            Err(e) => match self.fail("removing", kind, name, &e) {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Only says whether the object exists: an object store cannot renew its time.
    fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.head(kind, name)?.map(|meta| meta.size))
    }

    /// A HEAD, then a DELETE when the object is older than `cutoff`; not atomic with `touch`
    /// (hence `atomic_touch` is false).
    fn remove_unless_touched(
        &self,
        kind: Kind,
        name: &str,
        cutoff: SystemTime,
    ) -> Result<bool, StoreError> {
        let Some(meta) = self.head(kind, name)? else {
            return Ok(false);
        };
        if SystemTime::from(meta.last_modified) >= cutoff {
            return Ok(false);
        }
        self.remove(kind, name)?;
        Ok(true)
    }

    /// A PUT is durable when it returns.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Writes are single PUTs and leave nothing behind when interrupted.
    fn remove_temporaries(&self, _older_than: SystemTime) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn atomic_touch(&self) -> bool {
        false
    }

    /// Holds writes from now on when the bucket has Object Lock (one request to find out).
    fn set_hold(&self, hold: Option<Hold>) -> Result<HoldState, StoreError> {
        let Some(hold) = hold else {
            *self.held.write().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(HoldState::NotEnforced("no hold was asked for".into()));
        };
        let Some(s3) = &self.s3 else {
            return Ok(HoldState::NotEnforced(
                "Azure Blob immutability policies are not used by vmvault yet".into(),
            ));
        };
        let (status, body) = self.run(s3.object_lock()).map_err(|f| {
            self.failed(
                "reading the Object Lock setting of",
                Kind::Config,
                "(the bucket)",
                f,
            )
        })?;
        let state = match object_lock::parse_status(status, &body) {
            StorageLock::Enabled { .. } => HoldState::Enforced,
            other => HoldState::NotEnforced(other.to_string()),
        };
        *self.held.write().unwrap_or_else(|e| e.into_inner()) =
            (state == HoldState::Enforced).then_some(hold);
        Ok(state)
    }

    fn extend_hold(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        let (Some(hold), Some(s3)) = (self.hold(), &self.s3) else {
            return Err(StoreError::Invalid(format!(
                "{}: this storage holds nothing (no Object Lock hold was given)",
                self.location
            )));
        };
        self.run(s3.extend(path.as_ref(), &hold))
            .map_err(|f| self.failed("holding", kind, name, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_names_follow_the_layout() {
        assert_eq!(
            ObjectBackend::listed_name(Kind::Chunk, &["ab", "abcdef"]).as_deref(),
            Some("abcdef")
        );
        assert_eq!(
            ObjectBackend::listed_name(Kind::Chunk, &["ac", "abcdef"]),
            None
        );
        assert_eq!(ObjectBackend::listed_name(Kind::Chunk, &["abcdef"]), None);
        assert_eq!(
            ObjectBackend::listed_name(Kind::Point, &["p1"]).as_deref(),
            Some("p1")
        );
        assert_eq!(ObjectBackend::listed_name(Kind::Point, &["x", "p1"]), None);
        assert_eq!(ObjectBackend::listed_name(Kind::Lock, &[".hidden"]), None);
    }
}
