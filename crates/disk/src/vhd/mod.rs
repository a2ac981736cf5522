//! VHD images (Microsoft Virtual Hard Disk; QEMU calls the format `vpc`).
//!
//! Specification: Microsoft, "Virtual Hard Disk Image Format Specification", version 1.0
//! (October 11, 2006). All fields are big-endian.
//!
//! Read:
//! - fixed disks: the disk's bytes, then a 512-byte footer. Holes in the file are reported as
//!   holes (SEEK_DATA), as for raw images.
//! - dynamic disks: a footer copy at offset 0, the dynamic disk header, the block allocation
//!   table (BAT), blocks (a sector bitmap, then the block's data) and the footer at the end.
//!   An unallocated block reads as zeros. Within an allocated block the sector bitmap is not
//!   consulted, as QEMU does not: writers zero-fill a block when they allocate it, and trusting
//!   the data area never drops data a writer forgot to flag in the bitmap. Holes in the file
//!   within allocated blocks (QEMU leaves the unwritten parts of a block so) are reported as
//!   holes too.
//! - differencing disks: as dynamic, but unallocated blocks and sectors whose bitmap bit is
//!   clear read from the parent, found through the parent locators ("W2ru" relative path,
//!   "W2ku" absolute path, both UTF-16LE; "MacX" UTF-8 file URL), then by the locators' file
//!   name (and the header's parent name) beside the child; a file name that differs only in
//!   case is accepted, as Windows wrote it. The parent must carry the unique id the child
//!   records (when it records one): a replaced or modified parent would silently give wrong
//!   bytes, so a candidate with another id is passed over, and refused if no other is found.
//!   A missing parent or a chain that loops is an error.
//!
//! The footer and dynamic header checksums are verified; a bad one makes the image invalid.
//! The virtual size is the footer's "current size" (what Hyper-V, Azure and QEMU's
//! `force_size` use), not the CHS geometry, which rounds down and cannot exceed 127 GiB.
//! When the footer copy at offset 0 is missing, the footer at the end is used, as the
//! specification allows; when the one at the end is missing or damaged, the copy at 0 is used
//! (as QEMU does), provided every allocated block lies within the file.
//!
//! Refused as invalid: files without a footer, unknown versions or disk types, bad checksums,
//! block sizes that are not a power of two, headers, tables or blocks past the end of the file
//! or blocks over the headers, BATs too small for the virtual size, virtual sizes over 256
//! TiB, parent locators past the end. Refused as unsupported: BATs of more than 2^26 entries
//! (they would take more memory than vmvault allows itself). Not followed (said so when no
//! other locator finds the parent): the deprecated "Wi2r"/"Wi2k" locators and Mac OS aliases
//! ("Mac "), whose encodings are code-page or Mac OS specific. The "saved state" flag is
//! ignored: it concerns the VM's memory, not the disk's bytes.
//!
//! Written: dynamic disks ([`VhdWriter::create_dynamic`], format "vhd") and fixed disks
//! ([`VhdWriter::create_fixed`], format "vhd-fixed"); see the writer for sizes and layout.

mod header;
mod parent;
mod reader;
mod writer;

pub use reader::VhdReader;
pub use writer::VhdWriter;

pub(crate) const FORMAT: &str = "vhd";

#[cfg(test)]
mod tests;
