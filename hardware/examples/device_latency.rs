//! QD1 durable 4 KiB write latency through a [`BlockDevice`], to compare
//! the engines' completion-notice latency with fio on the same file.
//!
//! ```text
//! device_latency <file> <uring|sync> <seconds> <busy_tasks> <threads>
//! ```
//!
//! One task writes 4 KiB with `write_durable_at` (O_DIRECT + RWF_DSYNC on
//! io_uring) at QD1 over the first 64 MiB of the file; `busy_tasks` other
//! tasks keep the runtime busy meanwhile (each does 4 KiB reads of the same
//! file at QD1, in a loop, plus a yield), as a loaded daemon's would be: a
//! completion noticed late under load shows as a p50 above the idle one.
//! `threads` = 1 runs a current-thread runtime, otherwise a multi-thread
//! one with that many workers. Prints one `key=value` line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hardware::{open_device, AlignedBuf, EngineChoice, OpenOptions};

const SPAN_BYTES: u64 = 64 << 20;
const BLOCK: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, engine, seconds, busy, threads] = &args[..] else {
        return Err(
            "usage: device_latency <file> <uring|sync> <seconds> <busy_tasks> <threads>".into(),
        );
    };
    let path = PathBuf::from(path);
    let engine: EngineChoice = engine.parse()?;
    let seconds: u64 = seconds.parse()?;
    let busy: usize = busy.parse()?;
    let threads: usize = threads.parse()?;
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = builder.enable_all().build()?;
    runtime.block_on(async move {
        let device = open_device(
            &path,
            &OpenOptions {
                engine,
                create_size_bytes: Some(SPAN_BYTES),
                zero_fill_on_create: true,
                ..OpenOptions::default()
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let busy_ops = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for task in 0..busy {
            let device = device.clone();
            let stop = stop.clone();
            let busy_ops = busy_ops.clone();
            tasks.push(tokio::spawn(async move {
                let mut block = task as u64 * 97;
                while !stop.load(Ordering::Relaxed) {
                    block = block
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407)
                        % (SPAN_BYTES / BLOCK as u64);
                    if device.read_at(block * BLOCK as u64, BLOCK).await.is_err() {
                        break;
                    }
                    busy_ops.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }));
        }
        let mut latencies = Vec::new();
        let mut buf = AlignedBuf::zeroed(BLOCK)?;
        buf.fill(0xa5);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut block = 0u64;
        while Instant::now() < deadline {
            let start = Instant::now();
            buf = device
                .write_durable_at((block % (SPAN_BYTES / BLOCK as u64)) * BLOCK as u64, buf)
                .await?;
            latencies.push(start.elapsed().as_nanos() as u64);
            block += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
        latencies.sort_unstable();
        let pick = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        println!(
            "writes={} p50_us={:.1} p99_us={:.1} busy_reads_per_s={:.0}",
            latencies.len(),
            pick(0.5),
            pick(0.99),
            busy_ops.load(Ordering::Relaxed) as f64 / seconds as f64
        );
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
