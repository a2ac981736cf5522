//! Finding a differencing disk's parent from its locators, and checking it is the parent.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::{DiskError, DiskReader};

use super::header::{DynHeader, Locator, PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU};
use super::reader::{find_footer, open_image};
use super::FORMAT;

/// A parent path, however long, takes a few KiB in UTF-16.
const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// Finds and opens a differencing disk's parent, checking it is the image the child was made
/// from.
pub(super) fn open_parent(
    path: &Path,
    file: &File,
    len: u64,
    header: &DynHeader,
    chain: &mut crate::Chain,
) -> Result<Box<dyn DiskReader>, DiskError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for code in [PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX] {
        for (i, locator) in header.locators.iter().enumerate() {
            if locator.platform != code || locator.length == 0 {
                continue;
            }
            let Some(text) = read_locator(path, file, len, i, locator)? else {
                continue;
            };
            if let Some(candidate) = locator_path(code, &text, dir) {
                candidates.push(candidate);
            }
            if let Some(name) = file_name(&text) {
                names.push(name);
            }
        }
    }
    if let Some(name) = header.parent_name().as_deref().and_then(file_name) {
        names.push(name);
    }
    // A parent moved with its child (a copied VM folder) is found beside it; the unique id
    // check below refuses a namesake.
    candidates.extend(names.iter().map(|n| dir.join(n)));
    let mut tried: Vec<PathBuf> = Vec::new();
    for c in candidates {
        if !tried.contains(&c) {
            tried.push(c);
        }
    }
    let found: Vec<PathBuf> = tried.iter().filter_map(|c| existing(c)).collect();
    if found.is_empty() {
        let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        let mut detail = if tried.is_empty() {
            "differencing disk without a usable parent locator".to_string()
        } else {
            format!("parent image not found (tried {})", tried.join(", "))
        };
        let others: Vec<String> = header
            .locators
            .iter()
            .filter(|l| l.platform != 0)
            .filter(|l| ![PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX].contains(&l.platform))
            .map(|l| String::from_utf8_lossy(&l.platform.to_be_bytes()).into_owned())
            .collect();
        if !others.is_empty() {
            detail.push_str(&format!(
                "; locators of platforms {others:?} are not followed"
            ));
        }
        return Err(DiskError::invalid(path, FORMAT, detail));
    }
    // The first candidate that is the image this disk was made from: locators can be stale
    // (a W2ku path to where the parent was), and a namesake beside the child is not it.
    let mut refusal = None;
    for candidate in &found {
        // Judged before its footer is read: a locator may name any host file.
        if let Err(e) = chain.admit(path, candidate, "parent") {
            refusal.get_or_insert(e);
            continue;
        }
        let id = open_image(candidate).and_then(|(f, len, _)| find_footer(&f, len, candidate));
        match id {
            Ok(footer)
                if header.parent_unique_id == [0u8; 16]
                    || footer.unique_id == header.parent_unique_id =>
            {
                return crate::open_in_chain(candidate, FORMAT, chain);
            }
            Ok(footer) => {
                refusal.get_or_insert_with(|| {
                    DiskError::invalid(
                        path,
                        FORMAT,
                        format!(
                            "parent {} has unique id {}, but this disk was made from {}: the \
                             parent was replaced or changed",
                            candidate.display(),
                            hex(&footer.unique_id),
                            hex(&header.parent_unique_id)
                        ),
                    )
                });
            }
            Err(e) => {
                refusal.get_or_insert(e);
            }
        }
    }
    Err(refusal.unwrap_or_else(|| DiskError::invalid(path, FORMAT, "parent image not found")))
}

/// `candidate`, or a file beside it whose name differs only in case: Windows wrote the
/// locator, and its file names ignore case.
fn existing(candidate: &Path) -> Option<PathBuf> {
    if is_disk(candidate) {
        return Some(candidate.to_path_buf());
    }
    let name = candidate.file_name()?.to_str()?.to_lowercase();
    let dir = match candidate.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.to_lowercase() == name)
                && is_disk(p)
        })
}

fn is_disk(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_file() || m.file_type().is_block_device())
        .unwrap_or(false)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The text of parent locator `i`, or `None` when it does not decode.
fn read_locator(
    path: &Path,
    file: &File,
    len: u64,
    i: usize,
    locator: &Locator,
) -> Result<Option<String>, DiskError> {
    if locator.length > MAX_LOCATOR_LEN {
        return Err(DiskError::invalid(
            path,
            FORMAT,
            format!(
                "parent locator {i} is {} bytes long; no path is",
                locator.length
            ),
        ));
    }
    let end = locator
        .offset
        .checked_add(u64::from(locator.length))
        .filter(|end| *end <= len);
    if end.is_none() {
        return Err(DiskError::invalid(
            path,
            FORMAT,
            format!(
                "parent locator {i} at offset {} ({} bytes) is past the end of the file ({len} \
                 bytes)",
                locator.offset, locator.length
            ),
        ));
    }
    let mut buf = vec![0u8; locator.length as usize];
    crate::read_exact_at(file, &mut buf, locator.offset, path, FORMAT)?;
    let text = if locator.platform == PLATFORM_MACX {
        String::from_utf8(buf).ok()
    } else {
        if buf.len() & 1 == 1 {
            return Ok(None);
        }
        let units: Vec<u16> = buf
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).ok()
    };
    Ok(text
        .map(|t| t.trim_end_matches('\0').to_string())
        .filter(|t| !t.is_empty()))
}

/// Where a locator's text points on this machine, if it can point anywhere here: Windows
/// drive-letter and UNC paths cannot (their file name is then looked for beside the child).
fn locator_path(code: u32, text: &str, dir: &Path) -> Option<PathBuf> {
    if code == PLATFORM_MACX {
        let rest = text.strip_prefix("file://")?;
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        let decoded = percent_decode(rest)?;
        return decoded.starts_with('/').then(|| PathBuf::from(decoded));
    }
    let text = text.strip_prefix(r"\\?\").unwrap_or(text);
    let windows_absolute = text.starts_with(r"\\")
        || (text.len() >= 2
            && text.as_bytes()[1] == b':'
            && text.as_bytes()[0].is_ascii_alphabetic());
    if windows_absolute {
        return None;
    }
    let unix = text.replace('\\', "/");
    if unix.starts_with('/') {
        Some(PathBuf::from(unix))
    } else if code == PLATFORM_W2RU {
        // ".\\parent.vhd" is the usual spelling; "./" adds nothing but noise to messages.
        let relative: PathBuf = Path::new(&unix)
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        Some(dir.join(relative))
    } else {
        None
    }
}

/// The last component of a Windows or Unix path.
fn file_name(text: &str) -> Option<String> {
    let name = text.rsplit(['\\', '/']).next()?;
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
