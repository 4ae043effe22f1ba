//! Power loss of the whole unit (issue 6, "what it must show" 6): `kill -9`
//! of every process at a random moment during writes, then `rackblock up`
//! again in the same data directory: every acknowledged write is there.
//!
//! The unit is the product's own `rackblock up` (3 head nodes, 6 sleds,
//! the zonal control plane, vol0 served over NBD by an attach agent), run
//! in a network namespace of its own that has nothing but `lo`: the
//! default ports of `up` cannot clash with another test, and no traffic
//! leaves the namespace. The test's thread enters that namespace and
//! writes to vol0 over NBD (a minimal client below) one request at a time,
//! every write with FUA, so that an acknowledgement is a promise of
//! durability by the protocol itself. Every block's content names the
//! write and the block, so a read tells which write it came from.
//!
//! Each round, at a moment drawn from the printed seed (`POWER_LOSS_SEED`
//! reproduces it): SIGKILL to `up` and to every pid under `run/` (head
//! nodes, sleds, zonal, attach) at once, no clean shutdown anywhere; then
//! `rackblock up` again and a read of the whole volume. Each 4 KiB block
//! must hold what the last acknowledged write put there (zeros if never
//! written), except the blocks of the one write in flight at the kill,
//! which may hold the old or the new content — never anything else.
//! Rounds build on each other (a later round's crash also tests the state
//! an earlier recovery left). `POWER_LOSS_ROUNDS` (default 3) sets how many.
//!
//! `kill -9` is a power loss for processes only: what reached the page
//! cache survives it. Needs root (network namespaces).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::netns::{self, NetLab};
use tests::Rng;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = proto::BLOCK_SIZE_BYTES;
const VOLUME_BYTES: u64 = 64 * MIB;
const NBD: &str = "127.0.0.1:10809";
/// Upper bound on writes per round, whatever the clock says.
const MAX_WRITES_PER_ROUND: u64 = 100_000;

/// The 4 KiB that write `write` puts in block `block`: a header naming
/// both, then bytes derived from them.
fn block_content(write: u64, block: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK as usize);
    out.extend_from_slice(b"RBPLBLK\0");
    out.extend_from_slice(&write.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    let mut rng = Rng::new(write.wrapping_mul(1_000_003) ^ block);
    while out.len() < BLOCK as usize {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(BLOCK as usize);
    out
}

// ---- a minimal NBD client (fixed newstyle, EXPORT_NAME, simple replies) ----

const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLAG_FUA: u16 = 1;
const NBD_FLAG_SEND_FUA: u16 = 1 << 3;

struct Nbd {
    stream: TcpStream,
    size: u64,
    flags: u16,
    handle: u64,
}

impl Nbd {
    fn connect(address: SocketAddr, export: &str) -> std::io::Result<Nbd> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        if &greeting[..16] != b"NBDMAGICIHAVEOPT" {
            return Err(std::io::Error::other("not an NBD newstyle server"));
        }
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        let no_zeroes = server_flags & 2 != 0;
        let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        let mut hello = client_flags.to_be_bytes().to_vec();
        hello.extend_from_slice(b"IHAVEOPT");
        hello.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        hello.extend_from_slice(&(export.len() as u32).to_be_bytes());
        hello.extend_from_slice(export.as_bytes());
        stream.write_all(&hello)?;
        let mut info = [0u8; 10];
        stream.read_exact(&mut info)?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            stream.read_exact(&mut zeroes)?;
        }
        Ok(Nbd {
            stream,
            size: u64::from_be_bytes(info[..8].try_into().unwrap()),
            flags: u16::from_be_bytes([info[8], info[9]]),
            handle: 0,
        })
    }

    fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        data: &[u8],
        len: u32,
    ) -> std::io::Result<Vec<u8>> {
        self.handle += 1;
        let mut header = Vec::with_capacity(28 + data.len());
        header.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&command.to_be_bytes());
        header.extend_from_slice(&self.handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(data);
        self.stream.write_all(&header)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().unwrap());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(reply[8..].try_into().unwrap());
        if magic != 0x6744_6698 || handle != self.handle {
            return Err(std::io::Error::other(format!(
                "bad reply: magic {magic:#x}, handle {handle} (sent {})",
                self.handle
            )));
        }
        if error != 0 {
            return Err(std::io::Error::other(format!("NBD error {error}")));
        }
        let mut out = vec![
            0u8;
            if command == NBD_CMD_READ {
                len as usize
            } else {
                0
            }
        ];
        self.stream.read_exact(&mut out)?;
        Ok(out)
    }

    fn write_fua(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(
            NBD_CMD_WRITE,
            NBD_CMD_FLAG_FUA,
            offset,
            data,
            data.len() as u32,
        )
        .map(drop)
    }

    fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.request(NBD_CMD_READ, 0, offset, &[], len)
    }
}

// ---- the model ----

/// What the volume may hold, per 4 KiB block.
#[derive(Debug)]
struct Model {
    /// Last acknowledged write of each block (`None`: never written, zeros).
    acked: Vec<Option<u64>>,
    /// The write sent and not (yet) acknowledged: (id, first block, blocks).
    pending: Option<(u64, u64, u64)>,
    next_write: u64,
    acked_writes: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            acked: vec![None; (VOLUME_BYTES / BLOCK) as usize],
            pending: None,
            next_write: 1,
            acked_writes: 0,
        }
    }

    /// Compares the whole volume with the model; then the model takes
    /// what was read for the blocks of the write that was in flight.
    fn check(&mut self, nbd: &mut Nbd, when: &str) {
        let mut pending_new = 0;
        let mut pending_old = 0;
        for piece in 0..VOLUME_BYTES / MIB {
            let data = nbd
                .read(piece * MIB, MIB as u32)
                .unwrap_or_else(|e| panic!("{when}: read at {}: {e}", piece * MIB));
            for (i, got) in data.chunks(BLOCK as usize).enumerate() {
                let block = piece * (MIB / BLOCK) + i as u64;
                let old = match self.acked[block as usize] {
                    Some(write) => block_content(write, block),
                    None => vec![0u8; BLOCK as usize],
                };
                if got == old {
                    if self.in_pending(block) {
                        pending_old += 1;
                    }
                    continue;
                }
                if let Some((write, _, _)) = self.pending.filter(|_| self.in_pending(block)) {
                    if got == block_content(write, block) {
                        self.acked[block as usize] = Some(write);
                        pending_new += 1;
                        continue;
                    }
                }
                panic!(
                    "{when}: block {block} (byte {}) holds {}, expected {} (write in flight: {:?})",
                    block * BLOCK,
                    describe(got),
                    describe(&old),
                    self.pending
                );
            }
        }
        eprintln!(
            "power loss: {when}: every acknowledged write reads back ({} writes so far); \
             the write in flight left {pending_new} blocks new, {pending_old} old",
            self.acked_writes
        );
        self.pending = None;
    }

    fn in_pending(&self, block: u64) -> bool {
        self.pending
            .is_some_and(|(_, first, count)| (first..first + count).contains(&block))
    }
}

fn describe(block: &[u8]) -> String {
    if block.iter().all(|b| *b == 0) {
        "zeros".into()
    } else if &block[..8] == b"RBPLBLK\0" {
        let write = u64::from_le_bytes(block[8..16].try_into().unwrap());
        let target = u64::from_le_bytes(block[16..24].try_into().unwrap());
        format!("write {write}'s content for block {target}")
    } else {
        format!("unknown bytes {:02x?}", &block[..16])
    }
}

/// Writes one at a time (FUA) until the connection breaks or `until`:
/// 1 to 16 blocks at a random block.
/// What a writer sends.
#[derive(Debug, Clone, Copy)]
enum Mix {
    /// 1 to 16 blocks.
    Small,
    /// Half of the writes 256 KiB to 1 MiB (full stripes at k = 4 when
    /// aligned, partial ones otherwise), the rest small.
    Large,
}

fn writer(model: Arc<Mutex<Model>>, mut rng: Rng, until: Instant, mix: Mix) -> (u64, String) {
    let mut nbd = match Nbd::connect(NBD.parse().unwrap(), "vol0") {
        Ok(nbd) => nbd,
        Err(e) => return (0, format!("connect: {e}")),
    };
    assert_eq!(nbd.size, VOLUME_BYTES, "vol0 size");
    assert!(nbd.flags & NBD_FLAG_SEND_FUA != 0, "vol0 does not take FUA");
    let blocks = VOLUME_BYTES / BLOCK;
    let mut done = 0;
    while Instant::now() < until && done < MAX_WRITES_PER_ROUND {
        let large = matches!(mix, Mix::Large) && rng.below(2) == 0;
        let (first, count) = if large {
            let count = 64 + rng.below(193);
            let first = rng.below(blocks - count + 1);
            // Mostly stripe-aligned, like a file system's large writes.
            let first = if rng.below(4) == 0 {
                first
            } else {
                first / 64 * 64
            };
            (first, count)
        } else {
            let first = rng.below(blocks);
            (first, (1 + rng.below(16)).min(blocks - first))
        };
        let data: Vec<u8> = {
            let mut model = model.lock().unwrap();
            let write = model.next_write;
            model.next_write += 1;
            model.pending = Some((write, first, count));
            (first..first + count)
                .flat_map(|b| block_content(write, b))
                .collect()
        };
        match nbd.write_fua(first * BLOCK, &data) {
            Ok(()) => {
                let mut model = model.lock().unwrap();
                let (write, _, _) = model.pending.take().unwrap();
                for b in first..first + count {
                    model.acked[b as usize] = Some(write);
                }
                model.acked_writes += 1;
                done += 1;
            }
            Err(e) => return (done, e.to_string()),
        }
    }
    (done, "time bound reached".into())
}

// ---- the unit ----

/// `rackblock up` in `data_dir` (in the caller's namespace), killed with
/// every daemon it started when dropped.
struct Up {
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Up {
    /// `settings`: `--head-node-setting` lines.
    fn start(dir: &Path, data_dir: &Path, round: u32, settings: &[&str]) -> Up {
        let log = dir.join(format!("up-{round}.log"));
        let mut command = tests::up_command(dir, data_dir, &log);
        command.args(["--volume-size", "64MiB", "--device-size-mib", "256"]);
        for setting in settings {
            command.args(["--head-node-setting", setting]);
        }
        let child = command.spawn().unwrap();
        let mut up = Up {
            child,
            data_dir: data_dir.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(140);
        loop {
            let text = std::fs::read_to_string(&up.log).unwrap_or_default();
            if text.contains("Ctrl-C stops the unit.") {
                return up;
            }
            if let Ok(Some(status)) = up.child.try_wait() {
                panic!("rackblock up (round {round}) exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "rackblock up (round {round}) not ready:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pids of every daemon `up` started (its pid files under `run/`).
    fn daemon_pids(&self) -> Vec<(String, i32)> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(self.data_dir.join("run"))
            .unwrap()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                if let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    .filter(|pid| *pid > 0)
                {
                    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                    pids.push((name, pid));
                }
            }
        }
        pids.sort();
        pids
    }

    /// SIGKILL to `up` and every daemon at once; returns the daemons'
    /// pids. Reaps `up`.
    fn power_off(&mut self) -> Vec<(String, i32)> {
        let daemons = self.daemon_pids();
        // SAFETY: SIGKILL to our child and to the daemons it started (their
        // pids, read from its pid files while it was alive).
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGKILL);
            for (_, pid) in &daemons {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
        daemons
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.power_off();
        }
    }
}

/// Full-stripe writes the head nodes of `up` report (the sum of
/// `direct_writes` over their partitions, from their admin `/partitions`).
fn direct_writes() -> u64 {
    (1..=3u16)
        .filter_map(|h| {
            let admin: SocketAddr = format!("127.0.0.1:{}", 9100 + h).parse().ok()?;
            let (status, body) = tests::http_get(admin, "/partitions")?;
            (status == 200).then_some(body)
        })
        .filter_map(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
        .flat_map(|json| json["partitions"].as_array().cloned().unwrap_or_default())
        .map(|p| p["direct_writes"].as_u64().unwrap_or(0))
        .sum()
}

/// State of a process from /proc: `None` when it is gone.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim().chars().next()
}

/// Waits until every killed daemon is dead (gone or a zombie), bounded;
/// then, bounded, for init to reap them. A pid file of a zombie would make
/// the next `up` think the unit still runs; after a real power loss there
/// is no process at all, so a zombie's pid file is removed here.
fn wait_dead(data_dir: &Path, daemons: &[(String, i32)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (name, pid) in daemons {
        while matches!(process_state(*pid), Some(state) if state != 'Z') {
            assert!(Instant::now() < deadline, "{name} ({pid}) survived SIGKILL");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemons.iter().any(|(_, pid)| process_state(*pid).is_some()) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, pid) in daemons {
        if process_state(*pid).is_some() {
            eprintln!("power loss: {name} ({pid}) is dead but not reaped; removing its pid file");
            let _ = std::fs::remove_file(data_dir.join("run").join(format!("{name}.pid")));
        }
    }
}

#[test]
fn power_loss_of_the_whole_unit_keeps_every_acknowledged_write() {
    power_loss_rounds("pl", Mix::Small, &[]);
}

/// The same with full-stripe writes in flight: writes of 256 KiB and up
/// go straight to the sleds with only their index record in the logs.
#[test]
fn power_loss_with_full_stripe_writes_in_flight_keeps_every_acknowledged_write() {
    power_loss_rounds("plfs", Mix::Large, &["direct_write_min_bytes = 262144"]);
}

/// Rounds of writes and power losses; `lab`: the network lab's name (one
/// per test), `settings`: head-node settings of the unit.
fn power_loss_rounds(lab: &str, mix: Mix, settings: &[&str]) {
    let started = Instant::now();
    let seed = tests::seed_from_env("POWER_LOSS_SEED");
    let rounds: u32 = std::env::var("POWER_LOSS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .clamp(1, 10);
    eprintln!(
        "power loss ({lab}, {mix:?} writes, settings {settings:?}): seed {seed} (POWER_LOSS_SEED), \
         {rounds} rounds (POWER_LOSS_ROUNDS)"
    );
    let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
    let mut lab = NetLab::new(lab);
    let ns = lab.add_isolated("unit");
    netns::run_in(&ns, move || {
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let mut rng = Rng::new(seed);
        let model = Arc::new(Mutex::new(Model::new()));
        let mut up = Up::start(dir.path(), &data_dir, 0, &settings);
        eprintln!("power loss: unit up at {:?}", started.elapsed());
        for round in 1..=rounds {
            let kill_after = Duration::from_millis(1000 + rng.below(3000));
            let writer_rng = Rng::new(rng.next());
            let writer_model = model.clone();
            let until = Instant::now() + kill_after + Duration::from_secs(30);
            let writer = std::thread::spawn(move || writer(writer_model, writer_rng, until, mix));
            std::thread::sleep(kill_after);
            let direct = direct_writes();
            let daemons = up.power_off();
            let killed_at = started.elapsed();
            let (writes, ended) = writer.join().unwrap();
            assert!(writes > 0, "round {round}: no write acknowledged ({ended})");
            eprintln!("power loss: round {round}: {direct} full-stripe writes before the kill");
            if let Mix::Large = mix {
                assert!(
                    direct > 0,
                    "round {round}: no write went straight to the sleds"
                );
            }
            eprintln!(
                "power loss: round {round}: kill -9 of up and {} daemons ({}) {kill_after:?} \
                 into the writes, at {killed_at:?}; {writes} writes acknowledged this round; \
                 writer: {ended}",
                daemons.len(),
                daemons
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            assert!(
                daemons.len() >= 11,
                "expected 3 head nodes, 6 sleds, zonal and attach under run/: {daemons:?}"
            );
            wait_dead(&data_dir, &daemons);
            drop(up);
            up = Up::start(dir.path(), &data_dir, round, &settings);
            eprintln!(
                "power loss: round {round}: unit up again at {:?}",
                started.elapsed()
            );
            let mut nbd = Nbd::connect(NBD.parse().unwrap(), "vol0").unwrap();
            model
                .lock()
                .unwrap()
                .check(&mut nbd, &format!("after power loss {round}"));
            eprintln!(
                "power loss: round {round} checked at {:?}",
                started.elapsed()
            );
        }
        let daemons = up.power_off();
        wait_dead(&data_dir, &daemons);
    });
    drop(lab);
    eprintln!("power loss: done in {:?}", started.elapsed());
}
