//! Single files from recovery points, without restoring a disk.
//!
//! [`PointDisk`] reads one disk of a recovery point lazily (only the chunks a read touches,
//! through a small LRU cache); [`GuestDisk`] finds its partitions (GPT, MBR) and opens their
//! filesystems (ext2/3/4, FAT, NTFS) behind one [`Filesystem`] trait; [`extract`] writes a
//! file or folder tree to a directory, a tar or a zip stream without ever writing outside its
//! target; [`Walk`] and [`Glob`] find files by pattern.
//!
//! Guest filesystems are untrusted input: every parser here is fuzzed (`fuzz/`), and every
//! walk is bounded in depth, entries and bytes read for partition tables; [`confine`] takes
//! write rights away from the parsing thread (Landlock).

mod disk;
mod error;
mod ext4;
mod ext4lite;
mod extract;
mod fat;
mod fs;
mod guard;
mod lznt1;
mod ntfs;
mod partition;
mod sandbox;
mod volume;
mod walk;

pub use disk::{FileDisk, MemDisk, Part, PointDisk, ReadAt, DEFAULT_CACHE_BYTES};
pub use error::{FilesError, Result};
pub use extract::{extract, safe_name, Extracted, Output};
pub use fs::{
    display_path, open as open_filesystem, probe, Entry, Filesystem, FsType, Kind, Opener, Stream,
    MAX_DIR_ENTRIES,
};
pub use guard::{quiet_caught_panics, Guarded};
pub use partition::{partitions, Partition};
pub use sandbox::{confine, Confinement};
pub use volume::{GuestDisk, Located, Target, Volume, VolumeInfo};
pub use walk::{Glob, Skipped, Visit, Visitor, Walk, MAX_DEPTH, MAX_ENTRIES};
