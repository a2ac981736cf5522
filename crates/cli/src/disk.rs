//! `vmvault disk info FILE`: what a disk image is, as vmvault reads it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;
use vmvault_disk::DiskReader;

use crate::output::{bytes, print_json};
use crate::Global;

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Format, virtual size, allocated bytes and backing chain of a disk image, and every
    /// file it reads (itself, its extents, its backing files).
    Info {
        /// The image file (or block device).
        file: PathBuf,
        /// Read it as this format instead of detecting it.
        #[arg(long, default_value = "auto", value_parser = clap::builder::PossibleValuesParser::new(vmvault_disk::FORMATS))]
        format: String,
        /// Also let the image pull in files from this folder (as `allow_backing` in a VM
        /// description); by default only from the image's own folder. Repeatable.
        #[arg(long, value_name = "DIR")]
        allow_backing: Vec<PathBuf>,
    },
}

#[derive(Serialize)]
struct Info {
    path: String,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subformat: Option<String>,
    virtual_size: u64,
    allocated_bytes: u64,
    file_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing: Option<Box<Info>>,
}

/// What `disk info` prints: the chain, and every file it reads, canonical, in the order met.
#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    info: Info,
    files: Vec<String>,
}

fn info(r: &dyn DiskReader) -> Result<Info> {
    let file_size = std::fs::metadata(r.path()).map(|m| m.len()).unwrap_or(0);
    Ok(Info {
        path: r.path().display().to_string(),
        format: r.format(),
        subformat: r.subformat(),
        virtual_size: r.size(),
        allocated_bytes: r.allocated_bytes()?,
        file_size,
        backing: match r.backing() {
            Some(b) => Some(Box::new(info(b)?)),
            None => None,
        },
    })
}

pub fn run(g: &Global, cmd: DiskCommand) -> Result<()> {
    match cmd {
        DiskCommand::Info {
            file,
            format,
            allow_backing,
        } => {
            let reader = vmvault_disk::open_allowing(&file, &format, &allow_backing)?;
            let files = vmvault_disk::files(&*reader)
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            let report = Report {
                info: info(&*reader)?,
                files,
            };
            if g.json {
                print_json(&report);
                return Ok(());
            }
            let info = &report.info;
            let mut level = Some(info);
            let mut depth = 0;
            while let Some(i) = level {
                let indent = "  ".repeat(depth);
                let kind = match &i.subformat {
                    Some(s) => format!("{} ({s})", i.format),
                    None => i.format.to_string(),
                };
                if depth == 0 {
                    outln!("file          {}", i.path);
                } else {
                    outln!("{indent}backing file  {}", i.path);
                }
                outln!("{indent}format        {kind}");
                outln!(
                    "{indent}virtual size  {} ({} bytes)",
                    bytes(i.virtual_size),
                    i.virtual_size
                );
                outln!("{indent}allocated     {}", bytes(i.allocated_bytes));
                outln!("{indent}file size     {}", bytes(i.file_size));
                level = i.backing.as_deref();
                depth += 1;
            }
            for (n, f) in report.files.iter().enumerate() {
                let label = if n == 0 { "reads" } else { "" };
                outln!("{label:<14}{f}");
            }
            Ok(())
        }
    }
}
