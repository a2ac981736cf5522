//! `vmvault-primitives`: how fast this machine runs, on one core, each step a backup is made of.
//!
//! `bench/run.py` compares vmvault's end-to-end throughput against these figures, so they must
//! measure the same work the backup path does: 1 MiB pieces (the default chunk size), BLAKE3
//! keyed like chunk names, zstd level 1 like the vault default, and `Sealer::seal` itself.
//!
//! ```text
//! vmvault-primitives [--file PATH [--file-only]] [--mib N] [--repeat N]
//! ```
//!
//! Prints one JSON object on stdout; MB/s are 10^6 bytes per second.

use std::fs::File;
use std::hint::black_box;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde_json::{Map, Value};
use vmvault_format::{is_zero, Codec, Keys, ObjectKind};

const MIB: usize = 1 << 20;

/// The text alphabet of `shared/bench/mkimage.py`, so "text" here compresses like the image's.
const ALPHABET: &[u8] = b"etaoinshrdlucmfw      \n";

const USAGE: &str = "usage: vmvault-primitives [--file PATH [--file-only]] [--mib N] [--repeat N]

Measures, on one thread, BLAKE3 (keyed), zstd level 1 on text-like and on random data,
AES-256-GCM (ring), zero detection and vmvault's whole chunk sealer, each over N MiB
(default 64) of generated data in 1 MiB pieces, keeping the best of --repeat passes
(default 3). With --file, also times a sequential page-cache read of PATH in 1 MiB reads
(after one untimed read that warms the cache) and reports which share of its 1 MiB pieces
are zero, text-like or other; --file-only skips everything else. Prints JSON; MB/s are
10^6 bytes per second.";

struct Options {
    file: Option<PathBuf>,
    mib: usize,
    repeat: usize,
    primitives: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        file: None,
        mib: 64,
        repeat: 3,
        primitives: true,
    };
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy().into_owned();
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value"))
                .map(|v| v.to_string_lossy().into_owned())
        };
        let number = |name: &str, text: String| -> Result<usize, String> {
            match text.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{name} wants a positive integer, got {text:?}")),
            }
        };
        match arg.as_str() {
            "--file" => options.file = Some(PathBuf::from(value("--file")?)),
            "--mib" => options.mib = number("--mib", value("--mib")?)?,
            "--repeat" => options.repeat = number("--repeat", value("--repeat")?)?,
            "--file-only" => options.primitives = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !options.primitives && options.file.is_none() {
        return Err("--file-only needs --file".into());
    }
    Ok(options)
}

/// splitmix64: the data only has to look random to zstd and be cheap to make; a fixed seed
/// keeps runs comparable.
struct Generator(u64);

impl Generator {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
        }
    }
}

fn text_table() -> [u8; 256] {
    std::array::from_fn(|i| ALPHABET[i % ALPHABET.len()])
}

/// Runs `pass` once untimed (page faults, lazy initialisation, CPU frequency ramp-up) and then
/// `repeat` times, returning the fastest: the machine is shared with compilers, and the
/// fastest pass is the one least disturbed by them.
fn best_of(repeat: usize, mut pass: impl FnMut()) -> Duration {
    pass();
    (0..repeat)
        .map(|_| {
            let start = Instant::now();
            pass();
            start.elapsed()
        })
        .min()
        .expect("repeat is positive")
}

fn mbps(bytes: usize, time: Duration) -> f64 {
    let mbps = bytes as f64 / time.as_secs_f64() / 1e6;
    (mbps * 10.0).round() / 10.0
}

fn ratio(num: usize, den: usize) -> f64 {
    (num as f64 / den as f64 * 10_000.0).round() / 10_000.0
}

fn primitives(options: &Options, report: &mut Map<String, Value>) {
    let len = options.mib * MIB;
    let repeat = options.repeat;
    let mut generator = Generator(0x766d_7661_756c_7421);
    let mut random = vec![0u8; len];
    generator.fill(&mut random);
    let table = text_table();
    let mut text = vec![0u8; len];
    generator.fill(&mut text);
    text.iter_mut().for_each(|b| *b = table[*b as usize]);
    // Filled after a black_box so the pages are really written: a fresh zeroed allocation may
    // be the kernel's shared zero page, which always sits in cache and would flatter is_zero.
    let mut zeros = vec![1u8; len];
    black_box(&mut zeros);
    zeros.fill(0);

    let keys = Keys::generate();
    let codec = Codec::encrypted(&keys, 1);

    let time = best_of(repeat, || {
        for piece in random.chunks(MIB) {
            black_box(blake3::keyed_hash(&keys.id, piece));
        }
    });
    report.insert("blake3_mbps".into(), mbps(len, time).into());

    let mut compressor = zstd::bulk::Compressor::new(1).expect("zstd level 1");
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(MIB)];
    for (name, data) in [("text", &text), ("random", &random)] {
        let mut packed = 0;
        let time = best_of(repeat, || {
            packed = 0;
            for piece in data.chunks(MIB) {
                packed += compressor
                    .compress_to_buffer(piece, &mut out)
                    .expect("buffer sized by compress_bound");
            }
        });
        report.insert(format!("zstd_{name}_mbps"), mbps(len, time).into());
        report.insert(format!("zstd_{name}_ratio"), ratio(packed, len).into());
    }

    let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &keys.data).expect("AES-256 key"));
    // Encrypts a copy in place, over and over: AES-GCM's speed does not depend on the bytes,
    // and copying each piece first would time memcpy as well.
    let mut buffer = random.clone();
    let mut counter = 0u64;
    let time = best_of(repeat, || {
        for piece in buffer.chunks_mut(MIB) {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_le_bytes());
            let tag = aead
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    piece,
                )
                .expect("piece below the AES-GCM limit");
            let _ = black_box(tag);
        }
    });
    report.insert("aes_gcm_mbps".into(), mbps(len, time).into());
    drop(buffer);

    let time = best_of(repeat, || {
        for piece in zeros.chunks(MIB) {
            assert!(is_zero(black_box(piece)));
        }
    });
    report.insert("zero_mbps".into(), mbps(len, time).into());

    let mut sealer = codec.sealer();
    let mut sealed = Vec::with_capacity(2 * MIB);
    for (name, data) in [("text", &text), ("random", &random)] {
        let mut stored = 0;
        let time = best_of(repeat, || {
            stored = 0;
            for piece in data.chunks(MIB) {
                sealer.seal(ObjectKind::Chunk, piece, &mut sealed);
                stored += sealed.len();
            }
        });
        report.insert(format!("seal_{name}_mbps"), mbps(len, time).into());
        report.insert(format!("seal_{name}_ratio"), ratio(stored, len).into());
    }
}

/// Reads `file` to its end in 1 MiB reads, handing each full piece (the last may be short)
/// to `each`. Returns the bytes read.
fn read_pieces(
    file: &mut File,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        each(&buf[..filled]);
        total += filled;
    }
}

fn page_cache(path: &PathBuf, report: &mut Map<String, Value>) -> std::io::Result<()> {
    let mut buf = vec![0u8; MIB];
    let mut in_alphabet = [false; 256];
    ALPHABET
        .iter()
        .for_each(|&b| in_alphabet[b as usize] = true);
    let (mut zero, mut text, mut other) = (0usize, 0usize, 0usize);
    // The warming read also classifies the file, so that run.py can weigh the primitives
    // by what the image actually holds. mkimage.py writes whole-MiB runs at MiB offsets, so
    // the pieces of its images are each purely one kind.
    let total = read_pieces(&mut File::open(path)?, &mut buf, |piece| {
        if is_zero(piece) {
            zero += piece.len();
        } else if piece.iter().all(|&b| in_alphabet[b as usize]) {
            text += piece.len();
        } else {
            other += piece.len();
        }
    })?;
    let start = Instant::now();
    let again = read_pieces(&mut File::open(path)?, &mut buf, |piece| {
        black_box(piece);
    })?;
    let time = start.elapsed();
    if again != total {
        return Err(std::io::Error::other(format!(
            "{} changed size while being read ({total} then {again} bytes)",
            path.display()
        )));
    }
    report.insert("page_cache_read_mbps".into(), mbps(total, time).into());
    report.insert("file_bytes".into(), total.into());
    let share = |n: usize| ratio(n, total.max(1));
    report.insert("file_zero_fraction".into(), share(zero).into());
    report.insert("file_text_fraction".into(), share(text).into());
    report.insert("file_other_fraction".into(), share(other).into());
    Ok(())
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("vmvault-primitives: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut report = Map::new();
    report.insert("data_mib".into(), options.mib.into());
    report.insert("repeat".into(), options.repeat.into());
    report.insert("piece_bytes".into(), MIB.into());
    if options.primitives {
        primitives(&options, &mut report);
    }
    if let Some(path) = &options.file {
        if let Err(e) = page_cache(path, &mut report) {
            eprintln!("vmvault-primitives: reading {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(report)).expect("JSON of numbers")
    );
    ExitCode::SUCCESS
}
