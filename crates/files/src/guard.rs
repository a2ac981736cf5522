//! A last line of defence around the filesystem crates: a panic inside one of them (fuzzing
//! found one in `ext4-view` 1.0: `File::read_bytes` unwraps a block iterator that a corrupt
//! inode can end early) becomes a `Damaged` error for that one call, never a crash of vmvault.
//! [`quiet_caught_panics`] keeps such caught panics off stderr; others are reported as usual.

use std::cell::Cell;
use std::io::{self, Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use crate::error::{FilesError, Result};
use crate::fs::{Entry, Filesystem, Opener, ReadSeek};

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

fn message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

fn catching<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let was = CATCHING.with(|c| c.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(was));
    r.map_err(|p| message(&*p))
}

/// Runs a call into a filesystem crate; its panic becomes a `Damaged` error about `what`.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catching(f).unwrap_or_else(|m| {
        Err(FilesError::damaged(
            what,
            format!("its parser gave up ({m})"),
        ))
    })
}

/// Installs (once) a panic hook that stays silent for panics [`guarded`] catches and hands
/// every other panic to the hook that was there before.
pub fn quiet_caught_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(|c| c.get()) {
                previous(info);
            }
        }));
    });
}

/// A filesystem whose every call is [`guarded`].
pub struct Guarded(pub Box<dyn Filesystem>);

impl Filesystem for Guarded {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn label(&self) -> Option<String> {
        catching(|| self.0.label()).ok().flatten()
    }

    fn stat(&self, path: &[String]) -> Result<Entry> {
        guarded(self.0.kind(), || self.0.stat(path))
    }

    fn list(&self, path: &[String]) -> Result<Vec<Entry>> {
        guarded(self.0.kind(), || self.0.list(path))
    }

    fn read_link(&self, path: &[String]) -> Result<String> {
        guarded(self.0.kind(), || self.0.read_link(path))
    }

    fn max_entries(&self) -> usize {
        self.0.max_entries()
    }

    fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    fn list_with(
        &self,
        path: &[String],
        f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>,
    ) -> Result<()> {
        let kind = self.0.kind();
        guarded(kind, || {
            self.0
                .list_with(path, &mut |e, open| f(e, &GuardedOpener(open, kind)))
        })
    }

    fn open(&self, path: &[String]) -> Result<Box<dyn ReadSeek + '_>> {
        let inner = guarded(self.0.kind(), || self.0.open(path))?;
        Ok(Box::new(GuardedReader(inner)))
    }
}

struct GuardedOpener<'o>(&'o dyn Opener, &'static str);

impl Opener for GuardedOpener<'_> {
    fn open(&self) -> Result<Box<dyn ReadSeek + '_>> {
        let inner = guarded(self.1, || self.0.open())?;
        Ok(Box::new(GuardedReader(inner)))
    }

    fn list_with(&self, f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>) -> Result<()> {
        let kind = self.1;
        guarded(kind, || {
            self.0
                .list_with(&mut |e, open| f(e, &GuardedOpener(open, kind)))
        })
    }
}

struct GuardedReader<'a>(Box<dyn ReadSeek + 'a>);

fn io_panic(m: String) -> io::Error {
    io::Error::other(format!("the filesystem's parser gave up ({m})"))
}

impl Read for GuardedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        catching(|| self.0.read(buf)).unwrap_or_else(|m| Err(io_panic(m)))
    }
}

impl Seek for GuardedReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        catching(|| self.0.seek(to)).unwrap_or_else(|m| Err(io_panic(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_damaged_error() {
        quiet_caught_panics();
        let r: Result<()> = guarded("test fs", || panic!("boom"));
        match r {
            Err(FilesError::Damaged { what, reason }) => {
                assert_eq!(what, "test fs");
                assert!(reason.contains("boom"), "{reason}");
            }
            r => panic!("{r:?}"),
        }
    }
}
