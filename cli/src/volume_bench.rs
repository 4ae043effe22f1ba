//! `rackblock volume bench`: load one volume through the volume client
//! (the host's path: partition routing, both networks, CRC-checked reads).
//!
//! Phases (each one invocation, so a script can interleave them with a
//! baseline such as fio on the same disk):
//! * `seqwrite`: `--qd` writers of `--bs` bytes (default 1 MiB) walking the
//!   region `[0, --region-bytes)` in order, wrapping around; records in
//!   `--state` how much of the region is now written.
//! * `seqread`: the same walk, reading the written prefix.
//! * `randwrite`: `--bs` (default 4 KiB) writes at random aligned offsets of
//!   the region, `--qd` at once.
//! * `randread`: `--bs` reads at random aligned offsets of the written
//!   prefix, `--qd` at once.
//!
//! Every 4 KiB block ever written holds the same content, a template
//! stamped with the block's index and `--seed`, so overwrites change
//! nothing a reader can see and **every read is checked** against the
//! expected bytes (the client has already checked its CRC-32C). An error
//! or a wrong byte fails the run with exit code 1.
//!
//! Output: one `key=value` line (phase, ops, bytes, seconds, mb_per_s,
//! iops, p50_us, p99_us, p999_us, max_us).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use client::{ClientConfig, VolumeClient};
use hardware::rack::Rack;
use proto::BLOCK_SIZE_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Seqwrite,
    Seqread,
    Randwrite,
    Randread,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Seqwrite => "seqwrite",
            Phase::Seqread => "seqread",
            Phase::Randwrite => "randwrite",
            Phase::Randread => "randread",
        }
    }

    fn writes(self) -> bool {
        matches!(self, Phase::Seqwrite | Phase::Randwrite)
    }

    fn sequential(self) -> bool {
        matches!(self, Phase::Seqwrite | Phase::Seqread)
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which measurement to run.
    #[arg(value_enum)]
    phase: Phase,
    /// The unit's rack file (the head nodes to ask for the partition map).
    #[arg(long)]
    rack: PathBuf,
    /// Reach the host ports over TLS trusting this CA (as `attach
    /// --unit-ca`).
    #[arg(long, env = "RACKBLOCK_UNIT_CA", value_name = "FILE")]
    unit_ca: Option<PathBuf>,
    /// Volume id (registered before, e.g. with `rackblock volume register`).
    #[arg(long)]
    volume: u64,
    /// Records how much of the region is written (seqwrite writes it,
    /// the read phases need it).
    #[arg(long)]
    state: PathBuf,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Bytes per request, a multiple of 4096 (default: 1 MiB for the
    /// sequential phases, 4 KiB for the random ones).
    #[arg(long)]
    bs: Option<u64>,
    /// Bytes of the volume used, from offset 0 (default: the whole volume).
    #[arg(long)]
    region_bytes: Option<u64>,
    /// Content seed: readers must use the writers' seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

type BenchResult<T> = Result<T, String>;

/// The content of volume block `block`: a fixed pseudo-random template
/// with the block index and the seed in the first 16 bytes.
struct Content {
    template: Vec<u8>,
    seed: u64,
}

impl Content {
    fn new(seed: u64) -> Content {
        let mut template = vec![0u8; BLOCK_SIZE_BYTES as usize];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for word in template.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        Content { template, seed }
    }

    fn fill(&self, first_block: u64, out: &mut BytesMut, len: u64) {
        for i in 0..len / BLOCK_SIZE_BYTES {
            let start = out.len();
            out.extend_from_slice(&self.template);
            let block = first_block + i;
            out[start..start + 8].copy_from_slice(&block.to_le_bytes());
            out[start + 8..start + 16].copy_from_slice(&self.seed.to_le_bytes());
        }
    }

    fn check(&self, offset_bytes: u64, data: &[u8]) -> BenchResult<()> {
        for (i, got) in data.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
            let block = offset_bytes / BLOCK_SIZE_BYTES + i as u64;
            let mut want = self.template.clone();
            want[..8].copy_from_slice(&block.to_le_bytes());
            want[8..16].copy_from_slice(&self.seed.to_le_bytes());
            if got != &want[..got.len()] {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "wrong data at volume byte {}: got {:#04x}, want {:#04x} (block {block}{})",
                    block * BLOCK_SIZE_BYTES + at as u64,
                    got[at],
                    want[at],
                    if got.iter().all(|b| *b == 0) {
                        ", all zeros"
                    } else {
                        ""
                    }
                ));
            }
        }
        Ok(())
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn load_written(path: &PathBuf) -> BenchResult<u64> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: {e} (run the seqwrite phase first)", path.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("written_bytes="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{}: no written_bytes= line", path.display()))
}

pub async fn run(args: BenchArgs) -> BenchResult<()> {
    let bs = args.bs.unwrap_or(if args.phase.sequential() {
        1 << 20
    } else {
        BLOCK_SIZE_BYTES
    });
    if bs == 0 || bs % BLOCK_SIZE_BYTES != 0 {
        return Err(format!(
            "--bs {bs} is not a positive multiple of {BLOCK_SIZE_BYTES}"
        ));
    }
    if args.qd == 0 || args.qd > 1024 {
        return Err(format!("--qd {} is outside 1..=1024", args.qd));
    }
    let rack = Rack::load(&args.rack).map_err(|e| format!("{}: {e}", args.rack.display()))?;
    let lcp = crate::unit::client(&rack, crate::unit::operator_credential(&args.rack));
    // An attachment of its own for the run, revoked at the end.
    let credential = client::register_attachment(&lcp, args.volume, "volume-bench")
        .await
        .map_err(|e| format!("cannot attach volume {}: {e}", args.volume))?;
    let result = bench(&args, &rack, credential, bs).await;
    if let Err(error) = client::remove_attachment(&lcp, args.volume, credential.attachment).await {
        eprintln!(
            "volume bench: could not revoke attachment {}: {error}",
            credential.attachment
        );
    }
    lcp.close();
    result
}

async fn bench(
    args: &BenchArgs,
    rack: &Rack,
    credential: proto::volume::AttachmentCredential,
    bs: u64,
) -> BenchResult<()> {
    // As a host does: through the head nodes' host ports (SECURITY.md).
    let endpoints: Vec<client::HostEndpoint> = rack
        .head_node
        .iter()
        .filter_map(|h| {
            Some(client::HostEndpoint {
                node: h.id.clone(),
                address: h.host?,
            })
        })
        .collect();
    let mut config = ClientConfig::default();
    config.link.tls = crate::attach::unit_tls(args.unit_ca.as_deref()).map_err(|e| e.line())?;
    let client = VolumeClient::connect_host(&endpoints, args.volume, credential, config)
        .await
        .map_err(|e| e.to_string())?;
    let size = client.size_bytes();
    let region = args.region_bytes.unwrap_or(size).min(size) / bs * bs;
    if region == 0 {
        return Err(format!(
            "region of {} bytes holds no {bs}-byte request (volume {size} bytes)",
            args.region_bytes.unwrap_or(size)
        ));
    }
    // Reads stay within what was written, so every byte has an expected value.
    let readable = if args.phase.writes() {
        region
    } else {
        let written = load_written(&args.state)?.min(region) / bs * bs;
        if written == 0 {
            return Err(format!(
                "{}: less than one {bs}-byte request written",
                args.state.display()
            ));
        }
        written
    };
    let duration = Duration::from_secs(args.seconds.max(1));
    let content = Arc::new(Content::new(args.seed));
    // The sequential cursor, shared by the workers; counts requests.
    let cursor = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(args.qd);
    for worker in 0..args.qd {
        let client = client.clone();
        let content = content.clone();
        let cursor = cursor.clone();
        let phase = args.phase;
        tasks.push(tokio::spawn(async move {
            let slots = readable / bs;
            let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ ((worker as u64 + 1) << 32);
            let mut latencies = Vec::new();
            let mut buffer = BytesMut::with_capacity(bs as usize);
            while Instant::now() < deadline {
                let offset = if phase.sequential() {
                    (cursor.fetch_add(1, Ordering::Relaxed) % slots) * bs
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % slots) * bs
                };
                let t = Instant::now();
                if phase.writes() {
                    content.fill(offset / BLOCK_SIZE_BYTES, &mut buffer, bs);
                    let data: Bytes = buffer.split().freeze();
                    client
                        .write(offset, data, false)
                        .await
                        .map_err(|e| format!("write at {offset}: {e}"))?;
                    latencies.push(t.elapsed().as_micros() as u64);
                } else {
                    let data = client
                        .read(offset, bs)
                        .await
                        .map_err(|e| format!("read at {offset}: {e}"))?;
                    latencies.push(t.elapsed().as_micros() as u64);
                    if data.len() as u64 != bs {
                        return Err(format!("read at {offset}: {} bytes, want {bs}", data.len()));
                    }
                    content.check(offset, &data)?;
                }
            }
            BenchResult::Ok(latencies)
        }));
    }
    let mut latencies_us = Vec::new();
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok(latencies)) => latencies_us.extend(latencies),
            Ok(Err(error)) => failure = failure.or(Some(error)),
            Err(error) => failure = failure.or(Some(error.to_string())),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    client.close();
    if let Some(error) = failure {
        return Err(error);
    }
    if args.phase == Phase::Seqwrite {
        // Requests were handed out in order; every one below the cursor
        // completed (workers only stop between requests).
        let written = (cursor.load(Ordering::Relaxed) * bs).min(region);
        let previous = load_written(&args.state).unwrap_or(0);
        std::fs::write(
            &args.state,
            format!("written_bytes={}\n", written.max(previous)),
        )
        .map_err(|e| format!("{}: {e}", args.state.display()))?;
    }
    latencies_us.sort_unstable();
    let ops = latencies_us.len() as u64;
    let bytes = ops * bs;
    println!(
        "phase={} qd={} bs={bs} ops={ops} bytes={bytes} seconds={seconds:.3} mb_per_s={:.1} iops={:.0} p50_us={} p99_us={} p999_us={} max_us={}",
        args.phase.name(),
        args.qd,
        bytes as f64 / seconds / 1e6,
        ops as f64 / seconds,
        percentile(&latencies_us, 50.0),
        percentile(&latencies_us, 99.0),
        percentile(&latencies_us, 99.9),
        latencies_us.last().copied().unwrap_or(0)
    );
    Ok(())
}
