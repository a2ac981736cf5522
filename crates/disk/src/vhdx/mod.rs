//! VHDX images (Hyper-V's Virtual Hard Disk v2).
//!
//! Specification: Microsoft, "[MS-VHDX]: Virtual Hard Disk v2 (VHDX) File Format", Open
//! Specifications, revision 20160714 and later (the structures are unchanged since the "VHDX
//! Format Specification v1.00" of 25 August 2012).
//!
//! Read:
//! - the file type identifier, both headers (CRC-32C checked; the valid one with the greater
//!   sequence number is current), the region table (CRC-32C checked; the second copy is used if
//!   the first is damaged), the metadata items: file parameters (block size, LeaveBlockAllocated,
//!   HasParent), virtual disk size, logical and physical sector sizes, page 83 data (required,
//!   not otherwise used) and the parent locator;
//! - the BAT, held in memory (8 bytes per block: 800 KiB for a 100 GiB disk of 1 MiB blocks),
//!   payload and sector bitmap entries interleaved per chunk. FULLY_PRESENT blocks are read from
//!   the file, neighbours stored back to back in one read; ZERO blocks read as zeros (in a
//!   differencing image too: the state says the block is zeros, hiding the parent's data);
//!   NOT_PRESENT, UNDEFINED and UNMAPPED blocks read as zeros, or from the parent in a
//!   differencing image; PARTIALLY_PRESENT blocks (differencing only) read each sector from the
//!   file or the parent as the chunk's sector bitmap says;
//! - all three subformats: "fixed" (LeaveBlockAllocated), "dynamic", and "differencing"
//!   (HasParent). A parent is looked for at the locator's `relative_path` (against the image's
//!   folder), then at `volume_path` and `absolute_win32_path` where they are Unix paths, then by
//!   file name beside the image (Windows drive letters and volume GUIDs name nothing here); it
//!   is opened through [`crate::open_in_chain`] (loops and over-deep chains are refused there)
//!   and must carry the data write GUID the locator's `parent_linkage` (or `parent_linkage2`)
//!   names, else the image is refused: a parent changed since is not this disk's base.
//!
//! Refused, as [`DiskError::Unsupported`](crate::DiskError::Unsupported):
//! - an image whose header names a log (non-zero log GUID): its last updates sit in the log,
//!   not yet in the BAT and blocks. Log replay is not implemented; the message says to open
//!   the image once in Hyper-V or run `qemu-img check -r all`, which replay it;
//! - unknown regions or metadata items flagged required, unknown file parameter flags, and
//!   parent locators of a type other than VHDX: the specification says a reader that does not
//!   understand them must not open the file.
//!
//! Everything else that breaks the specification's rules (bad signatures or checksums, tables
//! or blocks past the end of the file or overlapping the headers, BAT or metadata, sizes out of
//! range, reserved block states) is [`DiskError::Invalid`](crate::DiskError::Invalid).
//!
//! Written ([`VhdxWriter`]): dynamic VHDX with 1 MiB blocks (`writer::BLOCK_SIZE` says
//! why), 512-byte logical and 4096-byte physical sectors, a virtual size rounded up to a whole
//! sector. Blocks are allocated (FULLY_PRESENT) on their first non-zero write, in write order;
//! zeros are never written, so a block's unwritten part stays a hole of the file; blocks never
//! allocated are ZERO. The `writer` module has the layout.

mod format;
mod layout;
mod reader;
mod writer;

pub use reader::VhdxReader;
pub use writer::VhdxWriter;

#[cfg(test)]
mod tests;
