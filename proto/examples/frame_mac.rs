//! CPU cost of the unit port's frame MAC (`proto::auth::FrameMac`) per
//! frame of a 4 KiB write or read, against the CRC-32C every frame already
//! carries, measured in the same run, in CPU time of the measuring thread
//! (the machine is shared: wall time would count other processes):
//! `cargo run --release -p proto --example frame_mac`.

use std::time::Duration;

use proto::auth::{FrameMac, Key};

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn main() {
    const ROUNDS: u32 = 200_000;
    for size in [64usize, 4096 + 96, 65536 + 96, 1 << 20] {
        let frame = vec![0xa5u8; size];
        let mut mac = FrameMac::new(&Key::from_bytes([7; 32]));
        let rounds = (ROUNDS as usize * 4096 / size.max(4096)).max(200) as u32;
        let started = thread_cpu();
        let mut sink = 0u8;
        for _ in 0..rounds {
            sink ^= mac.seal(&frame)[0];
        }
        let mac_ns = (thread_cpu() - started).as_nanos() as f64 / f64::from(rounds);
        let started = thread_cpu();
        let mut crc = 0u32;
        for _ in 0..rounds {
            crc ^= crc32c::crc32c(&frame);
        }
        let crc_ns = (thread_cpu() - started).as_nanos() as f64 / f64::from(rounds);
        // bench/README.md conventions; the baseline is the CRC-32C of the
        // same frame, which every frame already pays.
        println!(
            "BENCH auth.frame_mac.{size}B.cpu_ns value={mac_ns:.0} unit=ns baseline={crc_ns:.0} ratio={:.1} better=lower",
            mac_ns / crc_ns
        );
        println!(
            "# frame_bytes={size} hmac_mb_per_s={:.0} (sink {sink} {crc})",
            size as f64 / mac_ns * 1e3
        );
    }
}
