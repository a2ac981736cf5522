//! Finding what an image holds on opening: the region table, the metadata items, and a
//! differencing image's parent.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::format::*;
use crate::{DiskError, DiskReader};

/// What the metadata region says about the disk.
pub(super) struct Metadata {
    pub block_size: u32,
    pub flags: u32,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub parent_locator: Option<Vec<(String, String)>>,
}

/// Reads the region table (the second copy if the first is damaged) and returns the BAT and
/// metadata regions, checked against each other and the file.
pub(super) fn read_region_table(
    file: &File,
    path: &Path,
    file_len: u64,
) -> Result<(Region, Region), DiskError> {
    let invalid = |detail: String| DiskError::invalid(path, FORMAT, detail);
    let mut buf = vec![0u8; REGION_TABLE_SIZE];
    crate::read_exact_at(file, &mut buf, REGION_TABLE_OFFSETS[0], path, FORMAT)?;
    let regions = match parse_region_table(&buf) {
        Ok(r) => r,
        Err(first) => {
            crate::read_exact_at(file, &mut buf, REGION_TABLE_OFFSETS[1], path, FORMAT)?;
            parse_region_table(&buf).map_err(|second| {
                invalid(format!(
                    "no valid region table: at 192 KiB: {first}; at 256 KiB: {second}"
                ))
            })?
        }
    };
    let mut bat = None;
    let mut metadata = None;
    for r in regions {
        let slot = if r.guid == BAT_REGION {
            &mut bat
        } else if r.guid == METADATA_REGION {
            &mut metadata
        } else if r.required {
            return Err(DiskError::unsupported(
                path,
                FORMAT,
                format!(
                    "the image has a region {} this reader does not know and may not ignore",
                    r.guid
                ),
            ));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(invalid(format!("the region table lists {} twice", r.guid)));
        }
        let name = if r.guid == BAT_REGION {
            "BAT"
        } else {
            "metadata"
        };
        if !r.offset.is_multiple_of(MIB)
            || r.offset < HEADER_SECTION
            || !(r.length as u64).is_multiple_of(MIB)
        {
            return Err(invalid(format!(
                "the {name} region (offset {}, {} bytes) is not placed on 1 MiB boundaries past \
                 the header section",
                r.offset, r.length
            )));
        }
        match r.offset.checked_add(r.length as u64) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(invalid(format!(
                    "truncated: the {name} region at {} ({} bytes) ends past the end of the file \
                     ({file_len} bytes)",
                    r.offset, r.length
                )))
            }
        }
        *slot = Some(r);
    }
    let (Some(bat), Some(metadata)) = (bat, metadata) else {
        return Err(invalid(
            "the region table lacks the BAT or the metadata region".into(),
        ));
    };
    if bat.offset < metadata.offset + metadata.length as u64
        && metadata.offset < bat.offset + bat.length as u64
    {
        return Err(invalid("the BAT and metadata regions overlap".into()));
    }
    Ok((bat, metadata))
}

/// Reads and checks the metadata items [MS-VHDX] 2.6.2 requires.
pub(super) fn read_metadata(
    file: &File,
    path: &Path,
    region: &Region,
) -> Result<Metadata, DiskError> {
    let invalid = |detail: String| DiskError::invalid(path, FORMAT, detail);
    if (region.length as usize) < METADATA_TABLE_SIZE {
        return Err(invalid(format!(
            "the metadata region is {} bytes, too small for its 64 KiB table",
            region.length
        )));
    }
    let mut table = vec![0u8; METADATA_TABLE_SIZE];
    crate::read_exact_at(file, &mut table, region.offset, path, FORMAT)?;
    let entries = parse_metadata_table(&table, region.length as u64).map_err(invalid)?;

    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE_83_DATA,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    let names = [
        "file parameters",
        "virtual disk size",
        "page 83 data",
        "logical sector size",
        "physical sector size",
        "parent locator",
    ];
    let minimum = [8u32, 8, 16, 4, 4, 20];
    let mut found: [Option<MetadataEntry>; 6] = [None; 6];
    for e in entries {
        match known.iter().position(|g| *g == e.item) {
            Some(i) => {
                if found[i].is_some() {
                    return Err(invalid(format!(
                        "the metadata table lists the {} twice",
                        names[i]
                    )));
                }
                if e.length < minimum[i] {
                    return Err(invalid(format!(
                        "the {} item is {} bytes, shorter than its {} bytes",
                        names[i], e.length, minimum[i]
                    )));
                }
                found[i] = Some(e);
            }
            None if e.flags & META_IS_REQUIRED != 0 => {
                let kind = if e.flags & META_IS_VIRTUAL_DISK != 0 {
                    "virtual disk"
                } else {
                    "file"
                };
                return Err(DiskError::unsupported(
                    path,
                    FORMAT,
                    format!(
                        "the image requires {kind} metadata item {} that this reader does not \
                         know",
                        e.item
                    ),
                ));
            }
            None => {}
        }
    }
    let mut items: Vec<Vec<u8>> = Vec::with_capacity(6);
    for (i, e) in found.iter().enumerate() {
        match e {
            Some(e) => {
                // Length is at most 1 MiB (checked by the table parser) and inside the region,
                // which lies inside the file.
                let mut data = vec![0u8; e.length as usize];
                crate::read_exact_at(
                    file,
                    &mut data,
                    region.offset + e.offset as u64,
                    path,
                    FORMAT,
                )?;
                items.push(data);
            }
            None if i < 5 => {
                return Err(invalid(format!(
                    "the required {} metadata item is missing",
                    names[i]
                )))
            }
            None => items.push(Vec::new()),
        }
    }

    let block_size = le32(&items[0], 0);
    let flags = le32(&items[0], 4);
    let virtual_size = le64(&items[1], 0);
    let logical_sector_size = le32(&items[3], 0);
    let physical_sector_size = le32(&items[4], 0);
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(invalid(format!(
            "block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    if flags & !(LEAVE_BLOCKS_ALLOCATED | HAS_PARENT) != 0 {
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!("file parameters flags {flags:#x} set bits this reader does not know"),
        ));
    }
    for (name, value) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if value != 512 && value != 4096 {
            return Err(invalid(format!(
                "{name} sector size {value} is neither 512 nor 4096"
            )));
        }
    }
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(invalid(format!(
            "virtual disk size {virtual_size} is larger than the format's 64 TiB"
        )));
    }
    if !virtual_size.is_multiple_of(logical_sector_size as u64) {
        return Err(invalid(format!(
            "virtual disk size {virtual_size} is not a multiple of the {logical_sector_size}-byte \
             logical sector"
        )));
    }
    let parent_locator = if flags & HAS_PARENT != 0 {
        if found[5].is_none() {
            return Err(invalid(
                "a differencing image (HasParent set) without a parent locator".into(),
            ));
        }
        let (kind, pairs) = parse_parent_locator(&items[5]).map_err(invalid)?;
        if kind != PARENT_LOCATOR_VHDX {
            return Err(DiskError::unsupported(
                path,
                FORMAT,
                format!("parent locator type {kind} (only VHDX parents are defined)"),
            ));
        }
        Some(pairs)
    } else {
        None
    };
    Ok(Metadata {
        block_size,
        flags,
        virtual_size,
        logical_sector_size,
        parent_locator,
    })
}

/// Finds and opens a differencing image's parent from its locator ([MS-VHDX] 2.6.2.6.3),
/// then checks it is the disk the child was made from.
pub(super) fn open_parent(
    path: &Path,
    locator: &[(String, String)],
    chain: &mut crate::Chain,
) -> Result<Box<dyn DiskReader>, DiskError> {
    let invalid = |detail: String| DiskError::invalid(path, FORMAT, detail);
    let get = |key: &str| {
        locator
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let linkage = get("parent_linkage")
        .ok_or_else(|| invalid("the parent locator has no parent_linkage".into()))?;
    let linkage = Guid::parse(linkage).ok_or_else(|| {
        invalid(format!(
            "the parent locator's parent_linkage {linkage:?} is not a GUID"
        ))
    })?;
    let linkage2 = get("parent_linkage2").and_then(Guid::parse);

    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let unix = |p: &str| p.replace('\\', "/");
    // The specification's order: relative path, volume path, absolute path. The last two are
    // Windows paths (a drive letter or a volume GUID) that name nothing here, unless written
    // as Unix paths; a parent moved along with its child is then looked for beside the child.
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(rel) = get("relative_path") {
        candidates.push(dir.join(unix(rel)));
    }
    for key in ["volume_path", "absolute_win32_path"] {
        if let Some(p) = get(key).map(unix) {
            // "//" starts a UNC or device path (\\?\Volume{...}\), which names nothing here.
            if p.starts_with('/') && !p.starts_with("//") {
                candidates.push(PathBuf::from(p));
            }
        }
    }
    for key in ["relative_path", "volume_path", "absolute_win32_path"] {
        if let Some(name) = get(key).map(unix).and_then(|p| {
            Path::new(&p)
                .file_name()
                .map(|n| n.to_os_string())
                .filter(|n| !n.to_string_lossy().contains(':'))
        }) {
            let beside = dir.join(name);
            if !candidates.contains(&beside) {
                candidates.push(beside);
            }
        }
    }
    if candidates.is_empty() {
        return Err(invalid(
            "the parent locator names no relative_path, volume_path or absolute_win32_path".into(),
        ));
    }
    // Judged before the parent's header is read: a locator may name any host file.
    let mut refusal = None;
    let admitted =
        candidates
            .iter()
            .filter(|c| c.is_file())
            .find(|c| match chain.admit(path, c, "parent") {
                Ok(_) => true,
                Err(e) => {
                    refusal.get_or_insert(e);
                    false
                }
            });
    if let (None, Some(e)) = (admitted, refusal) {
        return Err(e);
    }
    let Some(parent_path) = admitted else {
        let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
        let named: Vec<String> = locator
            .iter()
            .filter(|(k, _)| k.ends_with("_path"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return Err(invalid(format!(
            "parent disk not found (locator: {}; tried: {})",
            named.join(", "),
            tried.join(", ")
        )));
    };
    let parent = crate::open_in_chain(parent_path, "vhdx", chain)?;

    // [MS-VHDX] 2.6.2.6.3: the parent's DataWriteGuid is the linkage; any other value means the
    // parent changed after the child was made, and the child's data no longer fits on it.
    let file = File::open(parent_path).map_err(|e| DiskError::io(parent_path, e))?;
    let header = read_current_header(&file, parent_path)?;
    if header.data_write_guid != linkage && Some(header.data_write_guid) != linkage2 {
        return Err(invalid(format!(
            "parent {} is not the disk this image was made from, or it changed since: its data \
             write GUID is {}, the parent locator expects {linkage}",
            parent_path.display(),
            header.data_write_guid
        )));
    }
    Ok(parent)
}
