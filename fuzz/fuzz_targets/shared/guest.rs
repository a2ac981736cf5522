//! The body the guest-filesystem fuzz targets share: untrusted bytes as a disk, its partition
//! table or one filesystem opened, every folder listed (bounded), the start of every file read
//! and every symlink read. Never a panic, a hang or an allocation the input does not justify.

use std::sync::Arc;

use std::io::{Read, Seek, SeekFrom};

use vmvault_files::{
    Entry, Filesystem, FsType, GuestDisk, Kind, MemDisk, Opener, Part, ReadAt, Visit, Visitor, Walk,
};

/// Entries visited per input: enough to reach deep structures, few enough to stay fast.
const BUDGET: usize = 2000;

struct Reader<'a> {
    fs: &'a dyn Filesystem,
    base: Vec<String>,
    seen: usize,
}

impl Visitor for Reader<'_> {
    fn entry(
        &mut self,
        rel: &[String],
        e: &Entry,
        content: Option<&dyn Opener>,
    ) -> vmvault_files::Result<Visit> {
        self.seen += 1;
        if self.seen > BUDGET {
            return Err(vmvault_files::FilesError::Limit("fuzz budget".into()));
        }
        let mut path = self.base.clone();
        path.extend_from_slice(&rel[1..]);
        match e.kind {
            Kind::File => {
                let mut buf = vec![0u8; 65536];
                match content.map(|c| c.open()) {
                    Some(Ok(mut f)) => {
                        let _ = f.read(&mut buf);
                        if f.seek(SeekFrom::Start(e.size.saturating_sub(100))).is_ok() {
                            let _ = f.read(&mut buf[..100]);
                        }
                    }
                    Some(Err(_)) => {}
                    None => {
                        let _ = self.fs.read_range(&path, 0, &mut buf);
                    }
                }
            }
            Kind::Symlink => {
                let _ = self.fs.read_link(&path);
            }
            _ => {}
        }
        Ok(Visit::Enter)
    }
}

fn walk(fs: &dyn Filesystem) {
    let _ = fs.label();
    let Ok(top) = fs.stat(&[]) else { return };
    let mut r = Reader {
        fs,
        base: Vec::new(),
        seen: 0,
    };
    let _ = Walk::new(fs).run(&[], &top, &mut vec![String::new()], &mut r);
    let _ = fs.stat(&["a".to_string(), "b".to_string()]);
}

/// One filesystem of type `ty` on the whole input.
pub fn filesystem(data: &[u8], ty: FsType) {
    // Panics that vmvault catches (and reports as damage) are not crashes; any other is.
    vmvault_files::quiet_caught_panics();
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(data.to_vec()));
    if let Ok(fs) = vmvault_files::open_filesystem(ty, Part::whole(disk)) {
        walk(&*fs);
    }
}

/// The input as a whole disk: partition table, then every filesystem found.
pub fn disk(data: &[u8]) {
    vmvault_files::quiet_caught_panics();
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(data.to_vec()));
    let Ok(g) = GuestDisk::open(disk) else { return };
    for v in &g.volumes {
        let _ = v.info();
        if let Some(fs) = &v.fs {
            walk(&**fs);
        }
    }
    let _ = g.resolve("/p1/x/../y");
}
