//! `vmvault files ls|get|find VM@POINT ...`: single files from a recovery point, read lazily
//! from the vault without restoring the disk.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use vmvault_files::{
    confine, extract, Confinement, Entry, FilesError, Glob, GuestDisk, Kind, Located, Opener,
    Output, PointDisk, ReadAt, Skipped, Target, Visit, Visitor, VolumeInfo, Walk,
};
use vmvault_format::Manifest;

use crate::exit::InputError;
use crate::output::{bytes, print_json, table};
use crate::Global;

#[derive(Subcommand)]
pub enum FilesCommand {
    /// List partitions (at `/` of a disk with several), a folder, or one file.
    Ls(LsArgs),
    /// Extract a file or a folder (recursively) into a directory, or as tar or zip on stdout.
    Get(GetArgs),
    /// Find files whose name (or, for a pattern with `/`, whose path) matches a glob.
    Find(FindArgs),
}

#[derive(Args)]
pub struct Common {
    /// The recovery point: VM@latest, VM@ID (or a unique prefix), or VM@TIME (RFC 3339).
    point: String,
    /// The disk to read (default: the VM's first disk).
    #[arg(long)]
    disk: Option<String>,
    /// Say on stderr how many chunks were fetched from the vault, and how long it took.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args)]
pub struct LsArgs {
    #[command(flatten)]
    common: Common,
    /// A path: /p2/etc (partition by number) or /LABEL/etc; a disk with one partition has
    /// its root at /.
    #[arg(default_value = "/")]
    path: String,
    /// Kind, permissions, size, modification time, and symlink targets and streams.
    #[arg(long, short)]
    long: bool,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    common: Common,
    /// The file or folder to extract.
    path: String,
    /// Into this directory (made if missing); the file or folder keeps its name there.
    #[arg(long, conflicts_with_all = ["tar", "zip"])]
    to: Option<PathBuf>,
    /// Write a tar stream to stdout.
    #[arg(long, conflicts_with = "zip")]
    tar: bool,
    /// Write a zip stream to stdout.
    #[arg(long)]
    zip: bool,
}

#[derive(Args)]
pub struct FindArgs {
    #[command(flatten)]
    common: Common,
    /// A glob: `*`, `?`, `[a-z]`, `**` (across folders). Quote it for the shell.
    pattern: String,
    /// Search only under this path.
    #[arg(long, default_value = "/")]
    under: String,
}

/// A guest disk of a recovery point, open for reading.
struct Opened {
    confinement: Confinement,
    manifest: Manifest,
    disk_name: String,
    disk: Arc<PointDisk>,
    guest: GuestDisk,
    started: Instant,
}

#[derive(Serialize)]
struct Chunks {
    fetched: u64,
    total: u64,
}

impl Opened {
    /// Opens the vault and the disk's index, then takes write rights away (but beneath
    /// `out`) before the first guest byte is parsed.
    fn open(g: &Global, c: &Common, out: Option<&std::path::Path>) -> Result<Opened> {
        let started = Instant::now();
        let vault = Arc::new(crate::vault::open(g)?);
        let points = vmvault_engine::Points::read(&vault)?;
        let manifest = points.select(&c.point)?.clone();
        let record = match &c.disk {
            Some(name) => vmvault_engine::select_disk(&manifest, name)?,
            None => manifest
                .disks
                .first()
                .ok_or_else(|| InputError("this recovery point has no disk".into()))?,
        }
        .clone();
        let disk = Arc::new(PointDisk::open(vault, &record)?);
        let confinement = confine(out).context("confining the guest filesystem parsers")?;
        let reader: Arc<dyn ReadAt> = disk.clone();
        let guest = GuestDisk::open(reader).with_context(|| format!("disk {}", record.name))?;
        Ok(Opened {
            confinement,
            manifest,
            disk_name: record.name,
            disk,
            guest,
            started,
        })
    }

    fn chunks(&self) -> Chunks {
        Chunks {
            fetched: self.disk.fetched(),
            total: self.disk.chunk_count(),
        }
    }

    fn report(&self, verbose: bool) {
        if verbose {
            let c = self.chunks();
            eprintln!(
                "fetched {} of {} chunks ({:.2}%) of disk {} of {}@{} in {:.2} s (guest parsers: {})",
                c.fetched,
                c.total,
                100.0 * c.fetched as f64 / c.total.max(1) as f64,
                self.disk_name,
                self.manifest.vm,
                self.manifest.id.short(),
                self.started.elapsed().as_secs_f64(),
                self.confinement
            );
        }
    }

    /// A filesystem error as the disk explains it (a failed fetch beats a damaged guest).
    fn check(&self, e: FilesError) -> anyhow::Error {
        anyhow::Error::new(self.guest.check(e))
    }

    /// As `check`, with paths as the user gave them (`/p2/etc`, not the filesystem's `/etc`).
    fn check_in(&self, at: &Located<'_>, e: FilesError) -> anyhow::Error {
        let e = match e {
            FilesError::NotFound(p) => FilesError::NotFound(format!("{}{p}", at.prefix)),
            FilesError::NotADirectory(p) => FilesError::NotADirectory(format!("{}{p}", at.prefix)),
            e => e,
        };
        self.check(e)
    }
}

pub fn run(g: &Global, cmd: FilesCommand) -> Result<()> {
    // A panic inside a filesystem crate is caught and reported as damage, quietly.
    vmvault_files::quiet_caught_panics();
    match cmd {
        FilesCommand::Ls(a) => ls(g, a),
        FilesCommand::Get(a) => get(g, a),
        FilesCommand::Find(a) => find(g, a),
    }
}

#[derive(Serialize)]
struct LsOut<'a> {
    point: String,
    vm: &'a str,
    disk: &'a str,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    partitions: Option<Vec<VolumeInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<Vec<Entry>>,
    chunks: Chunks,
}

fn mode_text(e: &Entry) -> String {
    let kind = match e.kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::File => '-',
        Kind::Other => '?',
    };
    match e.mode {
        Some(m) => {
            let bits: String = (0..9)
                .map(|i| {
                    let on = m & (0o400 >> i) != 0;
                    if on {
                        ['r', 'w', 'x'][i % 3]
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("{kind}{bits}")
        }
        None => format!("{kind}---------"),
    }
}

fn time_text(e: &Entry) -> String {
    e.mtime
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn ls(g: &Global, a: LsArgs) -> Result<()> {
    let o = Opened::open(g, &a.common, None)?;
    let target = o.guest.resolve(&a.path).map_err(|e| o.check(e))?;
    let mut out = LsOut {
        point: o.manifest.id.to_hex(),
        vm: &o.manifest.vm,
        disk: &o.disk_name,
        path: String::new(),
        partitions: None,
        entries: None,
        chunks: o.chunks(),
    };
    match &target {
        Target::Volumes => {
            out.path = "/".into();
            out.partitions = Some(o.guest.volumes.iter().map(|v| v.info()).collect());
        }
        Target::In(at) => {
            out.path = at.display();
            let top = at.fs.stat(&at.path).map_err(|e| o.check_in(at, e))?;
            out.entries = Some(if top.kind == Kind::Dir {
                at.fs.list(&at.path).map_err(|e| o.check_in(at, e))?
            } else {
                vec![top]
            });
        }
    }
    out.chunks = o.chunks();
    if g.json {
        print_json(&out);
    } else if let Some(parts) = &out.partitions {
        let rows: Vec<Vec<String>> = parts
            .iter()
            .map(|p| {
                vec![
                    format!("/{}", p.name),
                    p.filesystem.unwrap_or("-").to_string(),
                    p.label.clone().unwrap_or_else(|| "-".into()),
                    bytes(p.partition.size),
                    p.partition.table.to_string(),
                    p.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &["PARTITION", "FS", "LABEL", "SIZE", "TABLE", "NOTE"],
            &rows,
        );
    } else if let Some(entries) = &out.entries {
        for e in entries {
            let name = if e.kind == Kind::Dir {
                format!("{}/", e.name)
            } else {
                e.name.clone()
            };
            if a.long {
                let mut line = format!("{} {:>12} {} {}", mode_text(e), e.size, time_text(e), name);
                if let Some(t) = &e.target {
                    line.push_str(&format!(" -> {t}"));
                }
                for s in &e.streams {
                    line.push_str(&format!(" [stream {}: {} bytes]", s.name, s.size));
                }
                outln!("{line}");
            } else {
                outln!("{name}");
            }
        }
    }
    o.report(a.common.verbose);
    Ok(())
}

#[derive(Serialize)]
struct GetOut {
    point: String,
    path: String,
    to: Option<String>,
    files: u64,
    folders: u64,
    symlinks: u64,
    hard_links: u64,
    bytes: u64,
    skipped: Vec<Skipped>,
    chunks: Chunks,
    seconds: f64,
}

fn located<'a>(target: Target<'a>, path: &str) -> Result<Located<'a>> {
    match target {
        Target::In(at) => Ok(at),
        Target::Volumes => Err(InputError(format!(
            "{path} is the disk's root: name a partition (ls / lists them)"
        ))
        .into()),
    }
}

fn get(g: &Global, a: GetArgs) -> Result<()> {
    if a.to.is_none() && !a.tar && !a.zip {
        return Err(InputError(
            "where to: give --to DIR to extract into a folder, or --tar or --zip to write an \
             archive to stdout"
                .into(),
        )
        .into());
    }
    if g.json && a.to.is_none() {
        return Err(
            InputError("--json goes with --to (a tar or zip stream is the output)".into()).into(),
        );
    }
    if let Some(dir) = &a.to {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let o = Opened::open(g, &a.common, a.to.as_deref())?;
    let at = located(o.guest.resolve(&a.path).map_err(|e| o.check(e))?, &a.path)?;
    let name = match at.path.last() {
        Some(n) => n.clone(),
        None => at.volume.label().unwrap_or_else(|| at.volume.name()),
    };
    let stdout = std::io::stdout();
    let mut lock = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let output = match &a.to {
        Some(dir) => Output::Dir(dir),
        None if a.tar => Output::Tar(&mut lock),
        None => Output::Zip(&mut lock),
    };
    let done = extract(at.fs, &at.path, &name, output).map_err(|e| o.check_in(&at, e))?;
    lock.flush().context("writing to stdout")?;
    drop(lock);
    for s in &done.skipped {
        eprintln!("vmvault: skipped {}: {}", s.path, s.reason);
    }
    let out = GetOut {
        point: o.manifest.id.to_hex(),
        path: at.display(),
        to: a.to.as_ref().map(|d| d.join(&name).display().to_string()),
        files: done.files,
        folders: done.folders,
        symlinks: done.symlinks,
        hard_links: done.hard_links,
        bytes: done.bytes,
        skipped: done.skipped,
        chunks: o.chunks(),
        seconds: o.started.elapsed().as_secs_f64(),
    };
    if g.json {
        print_json(&out);
    } else if let Some(to) = &out.to {
        outln!("{to}");
        eprintln!(
            "extracted {} file(s), {} folder(s), {} symlink(s), {}",
            out.files,
            out.folders,
            out.symlinks,
            bytes(out.bytes)
        );
    }
    o.report(a.common.verbose);
    Ok(())
}

#[derive(Serialize)]
struct Match {
    path: String,
    kind: Kind,
    size: u64,
}

struct Finder<'a> {
    glob: &'a Glob,
    /// How the walk's start is shown: `/p2/var`.
    prefix: String,
    found: Vec<Match>,
}

impl Visitor for Finder<'_> {
    fn entry(
        &mut self,
        rel: &[String],
        e: &Entry,
        _: Option<&dyn Opener>,
    ) -> vmvault_files::Result<Visit> {
        if rel.len() > 1 {
            let path = format!(
                "{}/{}",
                self.prefix.trim_end_matches('/'),
                rel[1..].join("/")
            );
            let hit = if self.glob.whole_path {
                self.glob.matches(&path)
            } else {
                self.glob.matches(&e.name)
            };
            if hit {
                self.found.push(Match {
                    path,
                    kind: e.kind,
                    size: e.size,
                });
            }
        }
        Ok(Visit::Enter)
    }
}

#[derive(Serialize)]
struct FindOut {
    point: String,
    pattern: String,
    matches: Vec<Match>,
    skipped: Vec<Skipped>,
    chunks: Chunks,
}

fn find(g: &Global, a: FindArgs) -> Result<()> {
    let glob = Glob::new(&a.pattern)?;
    let o = Opened::open(g, &a.common, None)?;
    let mut starts = Vec::new();
    match o.guest.resolve(&a.under).map_err(|e| o.check(e))? {
        Target::Volumes => {
            for v in &o.guest.volumes {
                if v.fs.is_some() {
                    if let Target::In(at) = o
                        .guest
                        .resolve(&format!("/{}", v.name()))
                        .map_err(|e| o.check(e))?
                    {
                        starts.push(at);
                    }
                }
            }
        }
        Target::In(at) => starts.push(at),
    }
    let mut finder = Finder {
        glob: &glob,
        prefix: String::new(),
        found: Vec::new(),
    };
    let mut skipped = Vec::new();
    for at in starts {
        let top = at.fs.stat(&at.path).map_err(|e| o.check_in(&at, e))?;
        finder.prefix = at.display();
        let mut walk = Walk::new(at.fs);
        walk.run(&at.path, &top, &mut vec![String::new()], &mut finder)
            .map_err(|e| o.check(e))?;
        skipped.extend(walk.skipped);
    }
    for s in &skipped {
        eprintln!("vmvault: skipped {}: {}", s.path, s.reason);
    }
    let out = FindOut {
        point: o.manifest.id.to_hex(),
        pattern: a.pattern.clone(),
        matches: finder.found,
        skipped,
        chunks: o.chunks(),
    };
    if g.json {
        print_json(&out);
    } else {
        for m in &out.matches {
            outln!("{}", m.path);
        }
    }
    o.report(a.common.verbose);
    Ok(())
}
