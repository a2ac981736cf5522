//! The replication queue: what the secondary region still lacks, in a local journal that
//! survives a restart.
//!
//! # File
//! One text file per process under the state directory, `VAULT_ID/PID-RANDOM.journal`, held
//! with an exclusive `flock` while its process lives. Lines:
//! ```text
//! vmvault replication journal 1
//! + SEQ copy|remove KIND NAME     enqueued
//! - SEQ                           done
//! ! overflow                      entries were dropped: only a full comparison finds them
//! ```
//! A process that opens the queue adopts every journal whose lock is free (its process died):
//! it replays them, takes their pending entries and deletes them. A torn last line (a crash in
//! mid-append) is ignored; anything else unreadable counts as an overflow, which is safe: the
//! next `vault replicate` compares the regions in full.
//!
//! # Bounds and order
//! At most `capacity` entries are held; past that the queue records one overflow instead of
//! growing, and the primary is never slowed by a secondary that is down. A recovery point's
//! manifest is handed out only when every entry queued before it is done, so a secondary never
//! holds a manifest whose chunks are still on their way.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::backend::Kind;
use crate::{Result, StoreError};

const HEADER: &str = "vmvault replication journal 1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Make the secondary hold the object (refreshing its time if it does).
    Copy,
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub op: Op,
    pub kind: Kind,
    pub name: String,
}

struct State {
    file: BufWriter<File>,
    pending: BTreeMap<u64, Entry>,
    in_flight: BTreeMap<u64, Entry>,
    next_seq: u64,
    overflowed: bool,
    closed: bool,
}

pub struct Journal {
    path: PathBuf,
    capacity: usize,
    state: Mutex<State>,
    changed: Condvar,
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Copy => "copy",
        Op::Remove => "remove",
    }
}

fn kind_from(name: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.name() == name)
}

fn io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io {
        context: format!("replication journal {}", path.display()),
        source: e,
    }
}

/// An entry read back from a journal, before it gets a new sequence number.
type Pending = (Op, Kind, String);

/// Replays one journal file: its pending entries, and whether it overflowed.
fn replay(path: &Path) -> std::io::Result<(Vec<Pending>, bool)> {
    let mut entries: BTreeMap<u64, (Op, Kind, String)> = BTreeMap::new();
    let mut overflowed = false;
    let text = fs::read(path)?;
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for (i, line) in BufReader::new(&text[..complete]).lines().enumerate() {
        let line = line.unwrap_or_default();
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            [h, ..] if i == 0 && line == HEADER && !h.is_empty() => {}
            ["+", seq, op, kind, name] => {
                let op = match *op {
                    "copy" => Some(Op::Copy),
                    "remove" => Some(Op::Remove),
                    _ => None,
                };
                match (seq.parse::<u64>(), op, kind_from(kind)) {
                    (Ok(seq), Some(op), Some(kind)) => {
                        entries.insert(seq, (op, kind, name.to_string()));
                    }
                    _ => overflowed = true,
                }
            }
            ["-", seq] => match seq.parse::<u64>() {
                Ok(seq) => {
                    entries.remove(&seq);
                }
                Err(_) => overflowed = true,
            },
            ["!", "overflow"] => overflowed = true,
            _ => overflowed = true,
        }
    }
    Ok((entries.into_values().collect(), overflowed))
}

impl Journal {
    /// Opens this process's journal in `dir`, adopting the journals of dead processes.
    pub fn open(dir: &Path, capacity: usize) -> Result<Journal> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut suffix = [0u8; 4];
        vmvault_format::random_bytes(&mut suffix);
        let name = format!("{}-{}", std::process::id(), hex::encode(suffix));
        let path = dir.join(format!("{name}.journal"));
        // Made under a name no other process adopts, and locked, before it gets its real name:
        // a process opening the queue at the same moment never takes it for a dead one.
        let fresh = dir.join(format!(".{name}.new"));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&fresh)
            .map_err(|e| io(&fresh, e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| io(&fresh, e.into()))?;
        fs::rename(&fresh, &path).map_err(|e| io(&path, e))?;
        let journal = Journal {
            path: path.clone(),
            capacity,
            state: Mutex::new(State {
                file: BufWriter::new(file),
                pending: BTreeMap::new(),
                in_flight: BTreeMap::new(),
                next_seq: 1,
                overflowed: false,
                closed: false,
            }),
            changed: Condvar::new(),
        };
        {
            let mut st = journal.lock();
            writeln!(st.file, "{HEADER}").map_err(|e| io(&path, e))?;
        }
        journal.adopt(dir)?;
        journal.flush()?;
        Ok(journal)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes over the journals whose process is gone.
    fn adopt(&self, dir: &Path) -> Result<()> {
        let entries = fs::read_dir(dir).map_err(|e| io(dir, e))?;
        for entry in entries.flatten() {
            let other = entry.path();
            if other == self.path || other.extension().is_none_or(|e| e != "journal") {
                continue;
            }
            let Ok(file) = File::open(&other) else {
                continue;
            };
            // Held: its process lives and replicates its own entries.
            if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_err()
            {
                continue;
            }
            // Adopted and removed by another process since it was opened: not ours to replay.
            let same = match (fs::metadata(&other), file.metadata()) {
                (Ok(a), Ok(b)) => {
                    use std::os::unix::fs::MetadataExt;
                    a.ino() == b.ino() && a.dev() == b.dev()
                }
                _ => false,
            };
            if !same {
                continue;
            }
            let (pending, overflowed) = replay(&other).map_err(|e| io(&other, e))?;
            if overflowed {
                self.mark_overflow()?;
            }
            for (op, kind, name) in pending {
                self.push(op, kind, &name)?;
            }
            self.flush()?;
            match fs::remove_file(&other) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&other, e)),
            }
        }
        Ok(())
    }

    fn mark_overflow(&self) -> Result<()> {
        let mut st = self.lock();
        if !st.overflowed {
            st.overflowed = true;
            writeln!(st.file, "! overflow").map_err(|e| io(&self.path, e))?;
        }
        Ok(())
    }

    /// Records an operation durably *before* `apply` makes it happen in the primary, and
    /// queues it once `apply` succeeded: for recovery-point manifests, whose line must not be
    /// lost by a crash right after the manifest lands (the secondary would then lack the
    /// point until a full comparison). A crash in between leaves a line for an object the
    /// primary may not have; replaying it finds nothing to copy, which is done.
    pub fn push_ahead(
        &self,
        op: Op,
        kind: Kind,
        name: &str,
        apply: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let seq = {
            let mut st = self.lock();
            if st.pending.len() + st.in_flight.len() >= self.capacity {
                drop(st);
                self.mark_overflow()?;
                self.flush()?;
                return apply();
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            writeln!(st.file, "+ {seq} {} {} {name}", op_name(op), kind.name())
                .map_err(|e| io(&self.path, e))?;
            seq
        };
        self.flush()?;
        if let Err(e) = apply() {
            let mut st = self.lock();
            writeln!(st.file, "- {seq}").map_err(|e| io(&self.path, e))?;
            return Err(e);
        }
        let entry = Entry {
            seq,
            op,
            kind,
            name: name.to_string(),
        };
        self.lock().pending.insert(seq, entry);
        self.changed.notify_one();
        Ok(())
    }

    /// Queues an operation; past the capacity, records an overflow instead.
    pub fn push(&self, op: Op, kind: Kind, name: &str) -> Result<()> {
        let mut st = self.lock();
        if st.pending.len() + st.in_flight.len() >= self.capacity {
            drop(st);
            return self.mark_overflow();
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        writeln!(st.file, "+ {seq} {} {} {name}", op_name(op), kind.name())
            .map_err(|e| io(&self.path, e))?;
        st.pending.insert(
            seq,
            Entry {
                seq,
                op,
                kind,
                name: name.to_string(),
            },
        );
        drop(st);
        self.changed.notify_one();
        Ok(())
    }

    /// The next entry to work on, waiting up to `wait` for one; `None` when there is none or
    /// the journal is closed.
    pub fn take(&self, wait: Duration) -> Option<Entry> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return None;
            }
            let oldest_in_flight = st.in_flight.keys().next().copied().unwrap_or(u64::MAX);
            let first_pending = st.pending.keys().next().copied();
            let eligible = st
                .pending
                .values()
                .find(|e| {
                    e.kind != Kind::Point
                        || (Some(e.seq) == first_pending && oldest_in_flight > e.seq)
                })
                .map(|e| e.seq);
            if let Some(seq) = eligible {
                let e = st.pending.remove(&seq).expect("just found");
                st.in_flight.insert(seq, e.clone());
                return Some(e);
            }
            let (next, timeout) = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner());
            st = next;
            if timeout.timed_out() {
                return None;
            }
        }
    }

    /// Records the outcome of a taken entry: done, or back in the queue to try again.
    pub fn finish(&self, entry: &Entry, done: bool) -> Result<()> {
        let mut st = self.lock();
        if let Some(e) = st.in_flight.remove(&entry.seq) {
            if done {
                writeln!(st.file, "- {}", entry.seq).map_err(|e| io(&self.path, e))?;
            } else {
                st.pending.insert(e.seq, e);
            }
        }
        drop(st);
        self.changed.notify_all();
        Ok(())
    }

    /// Entries not yet done, and whether some were dropped.
    pub fn backlog(&self) -> (usize, bool) {
        let st = self.lock();
        (st.pending.len() + st.in_flight.len(), st.overflowed)
    }

    /// Waits until the queue is empty or `timeout` passes; returns what is left.
    pub fn wait_empty(&self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let left = st.pending.len() + st.in_flight.len();
            let now = std::time::Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Makes every record so far durable.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        st.file.flush().map_err(|e| io(&self.path, e))?;
        st.file.get_ref().sync_data().map_err(|e| io(&self.path, e))
    }

    /// Wakes every waiting worker and hands out nothing more.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Whether a full comparison of the regions found everything this journal recorded as
    /// dropped: clears the overflow.
    pub fn clear_overflow(&self) -> Result<()> {
        let mut st = self.lock();
        st.overflowed = false;
        Ok(())
    }
}

impl Drop for Journal {
    /// An empty journal is removed; one with entries stays for the next process to adopt.
    fn drop(&mut self) {
        let _ = self.flush();
        let (left, overflowed) = self.backlog();
        if left == 0 && !overflowed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_crash_and_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let j = Journal::open(dir.path(), 100).unwrap();
            j.push(Op::Copy, Kind::Chunk, "aa").unwrap();
            j.push(Op::Copy, Kind::Chunk, "bb").unwrap();
            j.push(Op::Remove, Kind::Point, "cc").unwrap();
            let e = j.take(Duration::ZERO).unwrap();
            assert_eq!(e.name, "aa");
            j.finish(&e, true).unwrap();
            j.flush().unwrap();
            let path = j.path.clone();
            // A crash: the process dies without dropping (its lock goes with it).
            std::mem::forget(j);
            path
        };
        // Simulate the dead process's lock being released: the forgotten File still holds
        // it in this process, so copy the file aside as the new "dead" journal.
        let dead = dir.path().join("1-dead.journal");
        let mut text = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        text.extend_from_slice(b"+ 9 copy chu"); // torn last line
        fs::write(&dead, text).unwrap();

        let j = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(j.backlog(), (2, false));
        assert!(!dead.exists(), "adopted and removed");
        let a = j.take(Duration::ZERO).unwrap();
        assert_eq!((a.kind, a.name.as_str()), (Kind::Chunk, "bb"));
    }

    #[test]
    fn a_manifest_waits_for_what_was_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 100).unwrap();
        j.push(Op::Copy, Kind::Chunk, "c1").unwrap();
        j.push(Op::Copy, Kind::Point, "p1").unwrap();
        j.push(Op::Copy, Kind::Chunk, "c2").unwrap();
        let c1 = j.take(Duration::ZERO).unwrap();
        let c2 = j.take(Duration::ZERO).unwrap();
        assert_eq!(
            c2.name, "c2",
            "the manifest is skipped while c1 is in flight"
        );
        assert_eq!(j.take(Duration::ZERO), None);
        j.finish(&c1, false).unwrap();
        assert_eq!(
            j.take(Duration::ZERO).unwrap().name,
            "c1",
            "failed: queued again"
        );
        j.finish(&c1, true).unwrap();
        assert_eq!(j.take(Duration::ZERO).unwrap().name, "p1");
    }

    #[test]
    fn past_its_capacity_it_records_an_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 2).unwrap();
        for n in ["a", "b", "c"] {
            j.push(Op::Copy, Kind::Chunk, n).unwrap();
        }
        assert_eq!(j.backlog(), (2, true));
        drop(j);
        let j = Journal::open(dir.path(), 10).unwrap();
        assert_eq!(j.backlog(), (2, true), "the overflow is remembered");
    }
}
