//! The text descriptor ("# Disk DescriptorFile"): `key=value` lines for the disk
//! (`createType`, `CID`, `parentCID`, `parentFileNameHint`), one line per extent
//! (`ACCESS SECTORS TYPE ["FILE" [OFFSET]]`) and the `ddb.*` disk database, which is ignored.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    ReadWrite,
    ReadOnly,
    Denied,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    /// The extent type as written, upper-cased: FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE...
    pub kind: String,
    pub file: Option<String>,
    /// Sectors into `file` where a flat extent's data starts.
    pub offset: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Descriptor {
    pub create_type: Option<String>,
    pub cid: Option<u32>,
    pub parent_cid: Option<u32>,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

/// The `parentCID` of a disk without a parent.
pub(super) const NO_PARENT_CID: u32 = 0xffff_ffff;

impl Descriptor {
    /// The parent this disk reads unallocated grains from, if it names one.
    pub fn has_parent(&self) -> bool {
        self.parent_hint.is_some() || self.parent_cid.is_some_and(|c| c != NO_PARENT_CID)
    }
}

fn shorten(line: &str) -> String {
    let mut s: String = line.chars().take(80).collect();
    if s.len() < line.len() {
        s.push_str("...");
    }
    s
}

/// Splits an extent line into words; a double-quoted file name is one word, spaces and all.
fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut w = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(c) => w.push(c),
                    None => return Err(format!("unterminated quote in {:?}", shorten(line))),
                }
            }
            out.push(w);
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' {
                    break;
                }
                w.push(c);
                chars.next();
            }
            out.push(w);
        }
    }
    Ok(out)
}

fn parse_extent(access: Access, line: &str) -> Result<ExtentLine, String> {
    let bad = |why: &str| format!("invalid extent line {:?}: {why}", shorten(line));
    let w = words(line)?;
    if w.len() < 3 || w.len() > 5 {
        return Err(bad("expected ACCESS SECTORS TYPE [\"FILE\" [OFFSET]]"));
    }
    let sectors = w[1]
        .parse::<u64>()
        .map_err(|_| bad("the sector count is not a number"))?;
    let offset = match w.get(4) {
        Some(o) => Some(
            o.parse::<u64>()
                .map_err(|_| bad("the offset is not a number"))?,
        ),
        None => None,
    };
    Ok(ExtentLine {
        access,
        sectors,
        kind: w[2].to_ascii_uppercase(),
        file: w.get(3).cloned(),
        offset,
    })
}

fn parse_cid(key: &str, value: &str) -> Result<u32, String> {
    u32::from_str_radix(value, 16).map_err(|_| format!("{key}={value:?} is not a hexadecimal CID"))
}

/// Parses a descriptor's text (an embedded descriptor ends at its first NUL byte).
pub(super) fn parse(text: &str) -> Result<Descriptor, String> {
    let text = text.split('\0').next().unwrap_or("");
    let mut d = Descriptor::default();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        let access = match first {
            "RW" => Some(Access::ReadWrite),
            "RDONLY" => Some(Access::ReadOnly),
            "NOACCESS" => Some(Access::Denied),
            _ => None,
        };
        if let Some(access) = access {
            d.extents.push(parse_extent(access, line)?);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let mut value = value.trim();
        if let Some(rest) = value.strip_prefix('"') {
            value = rest.split('"').next().unwrap_or(rest);
        }
        if key.eq_ignore_ascii_case("createType") {
            d.create_type = Some(value.to_string());
        } else if key.eq_ignore_ascii_case("CID") {
            d.cid = Some(parse_cid(key, value)?);
        } else if key.eq_ignore_ascii_case("parentCID") {
            d.parent_cid = Some(parse_cid(key, value)?);
        } else if key.eq_ignore_ascii_case("parentFileNameHint") {
            d.parent_hint = Some(value.to_string());
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_and_vmware_write() {
        let text = "# Disk DescriptorFile\r\nversion=1\nCID=4c69ca2c\nparentCID=ffffffff\n\
            createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
            RW 4194304 SPARSE \"disk s001.vmdk\"\nRDONLY 100 FLAT \"f.vmdk\" 7\nRW 8 ZERO\n\
            # The Disk Data Base\n#DDB\nddb.adapterType = \"ide\"\n";
        let d = parse(text).unwrap();
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentSparse"));
        assert_eq!(d.cid, Some(0x4c69ca2c));
        assert!(!d.has_parent());
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("disk s001.vmdk"));
        assert_eq!(d.extents[0].sectors, 4194304);
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[1].offset, Some(7));
        assert_eq!(d.extents[2].kind, "ZERO");
        assert_eq!(d.extents[2].file, None);
        // ovftool writes createType unquoted.
        let d = parse("createType=streamOptimized\nparentFileNameHint=\"base.vmdk\"\n").unwrap();
        assert_eq!(d.create_type.as_deref(), Some("streamOptimized"));
        assert!(d.has_parent());
    }

    #[test]
    fn refuses_malformed_lines() {
        assert!(parse("RW lots FLAT \"f\" 0\n").is_err());
        assert!(parse("RW 10 FLAT \"f 0\n").is_err());
        assert!(parse("RW 10 FLAT \"f\" 0 9 9\n").is_err());
        assert!(parse("CID=zz\n").is_err());
    }
}
