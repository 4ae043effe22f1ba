//! CPU cost of the unit port's frame MAC (`proto::auth::FrameMac`) per
//! frame of a 4 KiB write or read, against the CRC-32C every frame already
//! carries, measured in the same run:
//! `cargo run --release -p proto --example frame_mac`.

use std::time::Instant;

use proto::auth::{FrameMac, Key};

fn main() {
    const ROUNDS: u32 = 200_000;
    for size in [64usize, 4096 + 96, 65536 + 96, 1 << 20] {
        let frame = vec![0xa5u8; size];
        let mut mac = FrameMac::new(&Key::from_bytes([7; 32]));
        let rounds = (ROUNDS as usize * 4096 / size.max(4096)).max(200) as u32;
        let started = Instant::now();
        let mut sink = 0u8;
        for _ in 0..rounds {
            sink ^= mac.seal(&frame)[0];
        }
        let mac_ns = started.elapsed().as_nanos() as f64 / f64::from(rounds);
        let started = Instant::now();
        let mut crc = 0u32;
        for _ in 0..rounds {
            crc ^= crc32c::crc32c(&frame);
        }
        let crc_ns = started.elapsed().as_nanos() as f64 / f64::from(rounds);
        println!(
            "frame_bytes={size} hmac_tag_ns={mac_ns:.0} crc32c_ns={crc_ns:.0} ratio={:.1} hmac_mb_per_s={:.0} (sink {sink} {crc})",
            mac_ns / crc_ns,
            size as f64 / mac_ns * 1e3
        );
    }
}
