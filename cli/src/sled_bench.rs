//! `rackblock sled bench`: load a sled controller over the real protocol.
//!
//! Phases (each one invocation, so a script can interleave them with a
//! baseline such as fio on the same disk):
//! * `append`: `--streams` concurrent writers, each appending `--chunk-bytes`
//!   chunks to its own claimed column (a fresh column when one is full);
//!   records the columns written in `--state`.
//! * `read`: reads back the columns listed in `--state` in chunks, with
//!   `--streams` concurrent readers.
//! * `randread`: 4 KiB reads at random block offsets of those columns, one at
//!   a time (QD1), for latency percentiles.
//!
//! Output: one `key=value` line (ops, bytes, seconds, mb_per_s, iops,
//! p50_us, p99_us). Every reply is checked: an error reply fails the run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::sled::{ColumnId, PartitionId, SledRequest, SledResponse};
use proto::{Message, BLOCK_SIZE_BYTES};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Phase {
    Append,
    Read,
    Randread,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which measurement to run.
    #[arg(value_enum)]
    phase: Phase,
    /// The sled's network A address.
    #[arg(long)]
    address_a: SocketAddr,
    /// The sled's network B address.
    #[arg(long)]
    address_b: SocketAddr,
    /// The unit's credentials directory: the bench authenticates to the
    /// sled with its `unit.key`, as a head node does (SECURITY.md).
    #[arg(long, env = "RACKBLOCK_CREDENTIALS")]
    credentials: PathBuf,
    /// Columns written by `append`, read by `read`/`randread`.
    #[arg(long)]
    state: PathBuf,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent streams.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Bytes per append or read (a multiple of 4096).
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
}

type BenchResult<T> = Result<T, String>;

async fn call(link: &PeerLink, request: SledRequest) -> BenchResult<SledResponse> {
    let idempotent = request.is_idempotent();
    match link.call(Message::Sled(request), idempotent).await {
        Ok(Message::SledReply(SledResponse::Error(error))) => Err(format!("sled refused: {error}")),
        Ok(Message::SledReply(response)) => Ok(response),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(error) => Err(format!("link: {error}")),
    }
}

const VOLUME: u64 = 0xBE_0C;

fn chunk(len: usize, seed: u64) -> (Bytes, Vec<u32>) {
    let mut data = vec![0u8; len];
    let mut x = seed | 1;
    for word in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
    let crcs = data
        .chunks(BLOCK_SIZE_BYTES as usize)
        .map(crc32c::crc32c)
        .collect();
    (Bytes::from(data), crcs)
}

async fn new_column(link: &PeerLink, stream: usize) -> BenchResult<(ColumnId, PartitionId)> {
    let SledResponse::Allocated(columns) = call(
        link,
        SledRequest::AllocateColumns {
            column_count: 1,
            device: None,
        },
    )
    .await?
    else {
        return Err("allocate: unexpected reply".into());
    };
    let column = *columns.first().ok_or("allocate returned no column")?;
    let partition = PartitionId {
        volume: VOLUME,
        index: stream as u32,
    };
    call(
        link,
        SledRequest::Claim {
            column,
            partition,
            epoch: 1,
        },
    )
    .await?;
    Ok((column, partition))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub async fn run(args: BenchArgs) -> BenchResult<()> {
    if args.chunk_bytes == 0 || args.chunk_bytes % BLOCK_SIZE_BYTES as usize != 0 {
        return Err(format!(
            "--chunk-bytes {} is not a multiple of {BLOCK_SIZE_BYTES}",
            args.chunk_bytes
        ));
    }
    let credential =
        proto::auth::load_credential(&args.credentials, proto::auth::Role::HeadNode, "sled-bench")
            .map_err(|e| e.to_string())?;
    let link = PeerLink::new(
        "bench".into(),
        args.address_a,
        args.address_b,
        LinkConfig {
            auth: Some(std::sync::Arc::new(credential)),
            ..LinkConfig::default()
        },
        LinkMetrics::unregistered(),
    );
    let duration = Duration::from_secs(args.seconds.max(1));
    let started = Instant::now();
    let (ops, bytes, mut latencies_us) = match args.phase {
        Phase::Append => append(&link, &args, duration).await?,
        Phase::Read => read(&link, &args, duration).await?,
        Phase::Randread => randread(&link, &args, duration).await?,
    };
    let seconds = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    println!(
        "ops={ops} bytes={bytes} seconds={seconds:.3} mb_per_s={:.1} iops={:.0} p50_us={} p99_us={}",
        bytes as f64 / seconds / 1e6,
        ops as f64 / seconds,
        percentile(&latencies_us, 50.0),
        percentile(&latencies_us, 99.0)
    );
    link.close();
    Ok(())
}

type Measured = (u64, u64, Vec<u64>);

async fn append(
    link: &Arc<PeerLink>,
    args: &BenchArgs,
    duration: Duration,
) -> BenchResult<Measured> {
    let inventory = match call(link, SledRequest::Inventory).await? {
        SledResponse::Inventory(inventory) => inventory,
        other => return Err(format!("inventory: unexpected {other:?}")),
    };
    let column_size = inventory.column_size_bytes;
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for stream in 0..args.streams {
        let link = link.clone();
        let chunk_bytes = args.chunk_bytes;
        tasks.push(tokio::spawn(async move {
            let mut written: Vec<(ColumnId, u64)> = Vec::new();
            let mut latencies = Vec::new();
            let (mut column, mut partition) = new_column(&link, stream).await?;
            let mut offset = 0u64;
            let mut ops = 0u64;
            let (data, crcs) = chunk(chunk_bytes, stream as u64 + 7);
            while Instant::now() < deadline {
                if offset + chunk_bytes as u64 > column_size {
                    written.push((column, offset));
                    match new_column(&link, stream).await {
                        Ok(next) => (column, partition) = next,
                        // The sled is full: this stream is done early.
                        Err(error) if error.contains("no free column") => {
                            offset = 0;
                            break;
                        }
                        Err(error) => return Err(error),
                    }
                    offset = 0;
                }
                let t = Instant::now();
                call(
                    &link,
                    SledRequest::Append {
                        column,
                        partition,
                        epoch: 1,
                        offset_bytes: offset,
                        data: data.clone(),
                        block_crcs: crcs.clone(),
                    },
                )
                .await?;
                latencies.push(t.elapsed().as_micros() as u64);
                offset += chunk_bytes as u64;
                ops += 1;
            }
            written.push((column, offset));
            BenchResult::Ok((ops, written, latencies))
        }));
    }
    let mut state = String::new();
    let (mut ops, mut latencies) = (0, Vec::new());
    for task in tasks {
        let (n, written, lat) = task.await.map_err(|e| e.to_string())??;
        ops += n;
        latencies.extend(lat);
        for (column, length) in written {
            state.push_str(&format!("{} {} {}\n", column.device, column.index, length));
        }
    }
    std::fs::write(&args.state, state).map_err(|e| format!("{}: {e}", args.state.display()))?;
    Ok((ops, ops * args.chunk_bytes as u64, latencies))
}

fn load_state(args: &BenchArgs) -> BenchResult<Vec<(ColumnId, u64)>> {
    let text = std::fs::read_to_string(&args.state)
        .map_err(|e| format!("{}: {e}", args.state.display()))?;
    let mut columns = Vec::new();
    for line in text.lines() {
        let fields: Vec<u64> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if let [device, index, length] = fields[..] {
            if length > 0 {
                columns.push((
                    ColumnId {
                        device: device as u16,
                        index: index as u32,
                    },
                    length,
                ));
            }
        }
    }
    if columns.is_empty() {
        return Err("no written columns in the state file: run the append phase first".into());
    }
    Ok(columns)
}

async fn read(link: &Arc<PeerLink>, args: &BenchArgs, duration: Duration) -> BenchResult<Measured> {
    let columns = Arc::new(load_state(args)?);
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for stream in 0..args.streams {
        let link = link.clone();
        let columns = columns.clone();
        let chunk_bytes = args.chunk_bytes as u64;
        tasks.push(tokio::spawn(async move {
            let (mut ops, mut bytes, mut latencies) = (0u64, 0u64, Vec::new());
            let mut which = stream;
            'outer: while Instant::now() < deadline {
                let (column, length) = columns[which % columns.len()];
                which += 1;
                let mut offset = 0;
                while offset < length {
                    if Instant::now() >= deadline {
                        break 'outer;
                    }
                    let len = chunk_bytes.min(length - offset) as u32;
                    let t = Instant::now();
                    let SledResponse::Data { data, .. } = call(
                        &link,
                        SledRequest::Read {
                            column,
                            offset_bytes: offset,
                            len_bytes: len,
                        },
                    )
                    .await?
                    else {
                        return Err("read: unexpected reply".to_string());
                    };
                    latencies.push(t.elapsed().as_micros() as u64);
                    bytes += data.len() as u64;
                    ops += 1;
                    offset += u64::from(len);
                }
            }
            BenchResult::Ok((ops, bytes, latencies))
        }));
    }
    let (mut ops, mut bytes, mut latencies) = (0, 0, Vec::new());
    for task in tasks {
        let (n, b, lat) = task.await.map_err(|e| e.to_string())??;
        ops += n;
        bytes += b;
        latencies.extend(lat);
    }
    Ok((ops, bytes, latencies))
}

async fn randread(
    link: &Arc<PeerLink>,
    args: &BenchArgs,
    duration: Duration,
) -> BenchResult<Measured> {
    let columns = load_state(args)?;
    let deadline = Instant::now() + duration;
    let (mut ops, mut latencies) = (0u64, Vec::new());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while Instant::now() < deadline {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (column, length) = columns[(x % columns.len() as u64) as usize];
        let offset = ((x >> 16) % (length / BLOCK_SIZE_BYTES)) * BLOCK_SIZE_BYTES;
        let t = Instant::now();
        call(
            link,
            SledRequest::Read {
                column,
                offset_bytes: offset,
                len_bytes: BLOCK_SIZE_BYTES as u32,
            },
        )
        .await?;
        latencies.push(t.elapsed().as_micros() as u64);
        ops += 1;
    }
    Ok((ops, ops * BLOCK_SIZE_BYTES, latencies))
}
