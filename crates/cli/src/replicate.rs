//! `vmvault vault replicate [--watch]` and `vmvault vault status`.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use vmvault_engine::Progress;
use vmvault_store::compare::{self, CopyReport, Lag, RegionSize};
use vmvault_store::Vault;

use crate::exit::InputError;
use crate::output::{bytes, print_json, Bar};
use crate::regions::{self, Use};
use crate::Global;

fn two_regions(g: &Global, vault: &Vault) -> Result<()> {
    if vault.regions().len() < 2 {
        return Err(InputError(format!(
            "{} has no secondary region here (create one with `vault create --secondary`{})",
            vault.location(),
            if g.from_region.is_some() {
                ", and leave out --from-region"
            } else {
                ""
            }
        ))
        .into());
    }
    Ok(())
}

#[derive(Serialize)]
struct PassReport {
    #[serde(flatten)]
    copy: CopyReport,
    seconds: f64,
}

/// How long the adopted queue may go without copying anything before the comparison starts
/// anyway (a secondary that is still down makes no progress; the pass then reports why).
const QUEUE_STALL: Duration = Duration::from_secs(3);

/// Lets the queue adopted at open (entries earlier backups left) copy what it can, so the
/// comparison after it neither races it for the same objects nor reports their copies as
/// nothing done. Returns the objects and bytes the queue copied since `since`.
fn settle_queue(vault: &Vault, since: (u64, u64)) -> Result<(u64, u64)> {
    let Some(rep) = vault.replication() else {
        return Ok((0, 0));
    };
    let copied = || {
        let s = rep.stats();
        (
            s.copied.load(std::sync::atomic::Ordering::Relaxed),
            s.bytes.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    loop {
        let before = copied();
        if rep.drain(QUEUE_STALL)? == 0 || copied().0 == before.0 {
            break;
        }
    }
    let now = copied();
    Ok((now.0 - since.0, now.1 - since.1))
}

/// One full pass: compare the regions and copy what the secondary lacks. `queue_seen` is
/// what the queue had copied when the previous pass ended (zero at open).
fn pass(vault: &Vault, queue_seen: &mut (u64, u64)) -> Result<PassReport> {
    let started = Instant::now();
    let _lock = vault.lock_replicate(&mut |m| eprintln!("vmvault: {m}"))?;
    let (by_queue, queue_bytes) = settle_queue(vault, *queue_seen)?;
    queue_seen.0 += by_queue;
    queue_seen.1 += queue_bytes;
    let (primary, secondary) = (&vault.regions()[0], &vault.regions()[1]);
    let bar = Bar::new();
    let threads = secondary.backend.concurrency().max(2);
    let mut copy = compare::copy_missing(primary, secondary, threads, &|total, n| match total {
        Some(total) => bar.start("replicating to the secondary region", total),
        None => bar.advance(n),
    })?;
    bar.finish();
    copy.objects += by_queue;
    copy.bytes += queue_bytes;
    // What the queue dropped when it overflowed has now been found and copied.
    if copy.failed == 0 {
        if let Some(j) = vault.replication().and_then(|r| r.journal()) {
            j.clear_overflow()?;
        }
    }
    Ok(PassReport {
        copy,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn print_pass(g: &Global, r: &PassReport) {
    if g.json {
        print_json(r);
        return;
    }
    eprintln!(
        "replicated {} object(s), {} in {:.1} s{}",
        r.copy.objects,
        bytes(r.copy.bytes),
        r.seconds,
        if r.copy.failed > 0 {
            format!(
                "; {} failed{} (first: {})",
                r.copy.failed,
                if r.copy.points_held_back {
                    ", recovery points held back until they succeed"
                } else {
                    ""
                },
                r.copy.failures.first().map(String::as_str).unwrap_or("")
            )
        } else {
            String::new()
        }
    );
}

pub fn replicate(g: &Global, watch: bool, interval: u64) -> Result<()> {
    // Opened as a backup is: queues left by earlier runs are adopted and worked too.
    let vault = regions::open(g, Use::Backup)?;
    two_regions(g, &vault)?;
    let mut queue_seen = (0, 0);
    loop {
        let r = pass(&vault, &mut queue_seen)?;
        print_pass(g, &r);
        if !watch {
            if r.copy.failed > 0 {
                anyhow::bail!(
                    "{} object(s) could not be replicated; run again to retry",
                    r.copy.failed
                );
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(interval.max(1)));
    }
}

#[derive(Serialize)]
struct RegionStatus {
    name: String,
    location: String,
    #[serde(flatten)]
    size: RegionSize,
}

#[derive(Serialize)]
struct Status {
    regions: Vec<RegionStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replication_lag: Option<Lag>,
}

pub fn status(g: &Global) -> Result<()> {
    let vault = regions::open(g, Use::Read)?;
    let regions = vault.regions();
    let status = if regions.len() == 2 {
        let (p, s, lag) = compare::lag(&regions[0], &regions[1])?;
        Status {
            regions: vec![
                RegionStatus {
                    name: regions[0].name.clone(),
                    location: regions[0].backend.location(),
                    size: p,
                },
                RegionStatus {
                    name: regions[1].name.clone(),
                    location: regions[1].backend.location(),
                    size: s,
                },
            ],
            replication_lag: Some(lag),
        }
    } else {
        let mut size = RegionSize::default();
        for kind in compare::REPLICATED {
            let list = regions[0].backend.list(kind)?;
            size.objects += list.len() as u64;
            size.bytes += list.iter().map(|o| o.size).sum::<u64>();
        }
        Status {
            regions: vec![RegionStatus {
                name: regions[0].name.clone(),
                location: regions[0].backend.location(),
                size,
            }],
            replication_lag: None,
        }
    };
    if g.json {
        print_json(&status);
        return Ok(());
    }
    for r in &status.regions {
        outln!(
            "{:<10} {}: {} objects, {}",
            r.name,
            r.location,
            r.size.objects,
            bytes(r.size.bytes)
        );
    }
    if let Some(lag) = &status.replication_lag {
        if lag.objects == 0 {
            outln!("replication: the secondary holds everything the primary does");
        } else {
            outln!(
                "replication lag: {} object(s), {}, oldest {} s old; `vmvault vault replicate` \
                 copies them",
                lag.objects,
                bytes(lag.bytes),
                lag.oldest_seconds.unwrap_or(0)
            );
        }
        if lag.points_only_in_secondary > 0 {
            outln!(
                "{} recovery point(s) only in the secondary: pruned while it was unreachable, \
                 or lost from the primary (`vmvault verify --repair` restores lost ones)",
                lag.points_only_in_secondary
            );
        }
    }
    Ok(())
}
