//! Telling an image's format from its bytes, as `format = "auto"` asks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::DiskError;

/// The format of the image at `path`, from its magic numbers: qcow2 (`QFI\xfb`), VHDX
/// (`vhdxfile`), VMDK (`KDMV` sparse extent, or a `# Disk DescriptorFile` text descriptor),
/// dynamic or differencing VHD (a `conectix` footer copy at offset 0), fixed VHD (a `conectix`
/// footer in the last 512 bytes); anything else is raw.
pub fn detect(path: &Path) -> Result<&'static str, DiskError> {
    let file = File::open(path).map_err(|e| DiskError::io(path, e))?;
    let mut head = [0u8; 64];
    let n = read_some(&file, &mut head, 0).map_err(|e| DiskError::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(b"QFI\xfb") {
        return Ok("qcow2");
    }
    if head.starts_with(b"vhdxfile") {
        return Ok("vhdx");
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        return Ok("vmdk");
    }
    if head.starts_with(b"conectix") {
        return Ok("vhd");
    }
    let size = crate::raw::RawReader::open(path)?.size_of_file();
    if size >= 512 {
        let mut footer = [0u8; 8];
        let n = read_some(&file, &mut footer, size - 512).map_err(|e| DiskError::io(path, e))?;
        if n == 8 && &footer == b"conectix" {
            return Ok("vhd");
        }
    }
    Ok("raw")
}

fn read_some(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], &str); 6] = [
            (b"QFI\xfb\0\0\0\x03", "qcow2"),
            (b"vhdxfile", "vhdx"),
            (b"KDMV\x01\0\0\0", "vmdk"),
            (b"# Disk DescriptorFile\n", "vmdk"),
            (b"conectix", "vhd"),
            (b"\0\0\0\0hello", "raw"),
        ];
        for (i, (bytes, want)) in cases.iter().enumerate() {
            let p = dir.path().join(format!("i{i}"));
            std::fs::write(&p, bytes).unwrap();
            assert_eq!(detect(&p).unwrap(), *want);
        }
        let p = dir.path().join("fixed.vhd");
        let mut data = vec![0u8; 4096];
        data[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        std::fs::write(&p, data).unwrap();
        assert_eq!(detect(&p).unwrap(), "vhd");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(detect(&empty).unwrap(), "raw");
    }
}
