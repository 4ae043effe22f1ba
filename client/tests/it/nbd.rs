//! The NBD server against real clients nobody here wrote (nbdinfo,
//! qemu-io, qemu-img, nbdcopy, fio's nbd engine, nbdsh/libnbd) over TCP
//! and a unix socket, plus raw-socket checks of malformed input.

use std::path::PathBuf;
use std::time::Duration;

use client::nbd::wire::*;
use client::nbd::{BackendOp, MemoryBackend, MemoryFault, NbdErrno};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::nbd_harness::*;

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_block_sizes() {
    let served = Served::start().await;
    let out = run_ok(NBDINFO, &["--json", &served.uri("vol0")], TOOL_TIMEOUT).await;
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["protocol"], "newstyle-fixed", "{out}");
    assert_eq!(info["structured"], true, "{out}");
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "vol0", "{out}");
    assert_eq!(export["export-size"], VOL0_BYTES, "{out}");
    assert_eq!(export["block_size_minimum"], 512, "{out}");
    assert_eq!(export["block_size_preferred"], 4096, "{out}");
    assert_eq!(export["block_size_maximum"], 32 << 20, "{out}");
    assert_eq!(export["description"], "test volume 0", "{out}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(export[flag], true, "{flag}: {out}");
    }
    assert_eq!(export["is_read_only"], false, "{out}");
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_over_unix_socket() {
    let served = Served::start().await;
    let uri = format!("nbd+unix:///?socket={}", served.socket.display());
    let out = run_ok(NBDINFO, &["--list", "--json", &uri], TOOL_TIMEOUT).await;
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exports = info["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vol0", "vol1"], "{out}");
    assert_eq!(exports[1]["export-size"], VOL1_BYTES, "{out}");
    served.shutdown().await;
}

/// Runs `qemu-io -f raw -c COMMAND… URI`, which must exit 0 and report no
/// failure in its output: qemu-io reports failures in text; the exit status
/// alone is not enough on every version.
async fn qemu_io(uri: &str, commands: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(uri);
    let out = run_ok(QEMU_IO, &args, TOOL_TIMEOUT).await;
    for bad in ["failed", "error", "Error", "mismatch"] {
        assert!(!out.contains(bad), "qemu-io reported `{bad}`:\n{out}");
    }
}

/// Asserts that every byte of `data`, read at volume byte `offset`, is
/// `byte`.
fn assert_bytes(data: &[u8], offset: u64, byte: u8) {
    if let Some(at) = data.iter().position(|&b| b != byte) {
        panic!(
            "byte {} is {:#04x}, want {byte:#04x} for {} bytes at {offset}",
            offset + at as u64,
            data[at],
            data.len()
        );
    }
}

/// Asserts that `len` bytes of `volume` at `offset` (512-byte aligned, as
/// the backend reads) are all `byte`.
fn assert_filled(volume: &MemoryBackend, offset: u64, len: u64, byte: u8) {
    assert_bytes(&volume.read_sync(offset, len).unwrap(), offset, byte);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_patterns_zeroes_discards_and_flushes() {
    let served = Served::start().await;
    let uri = served.uri("vol0");
    let flushes_before = served.vol0.flush_count();
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0x77 1M 128k",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "read -P 0x77 1088k 64k",
            "write -P 0x33 2M 64k",
            "discard 2M 64k",
            "write -P 0x44 3M 64k -f",
            "flush",
        ],
    )
    .await;
    let vol = &served.vol0;
    assert_filled(vol, 0, 1 << 20, 0xab);
    assert_filled(vol, 1 << 20, 64 << 10, 0);
    assert_filled(vol, (1 << 20) + (64 << 10), 64 << 10, 0x77);
    assert_filled(vol, 2 << 20, 64 << 10, 0);
    assert_filled(vol, 3 << 20, 64 << 10, 0x44);
    assert!(
        vol.flush_count() > flushes_before,
        "no NBD_CMD_FLUSH arrived"
    );
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_unaligned_io_over_unix_socket() {
    let served = Served::start().await;
    let uri = served.unix_uri("vol1");
    qemu_io(
        &uri,
        &[
            // 512-byte I/O that is not 4 KiB aligned.
            "write -P 0xcd 512 512",
            "write -P 0xef 1536 1024",
            "read -P 0xcd 512 512",
            "read -P 0xef 1536 1024",
            // Below the 512-byte minimum: qemu reads, modifies, writes.
            "write -P 0x11 100 300",
            "read -P 0x11 100 300",
            "read -P 0 0 100",
            "read -P 0 400 112",
            "flush",
        ],
    )
    .await;
    let head = served.vol1.read_sync(0, 4096).unwrap();
    for (range, byte) in [
        (0..100, 0),
        (100..400, 0x11),
        (400..512, 0),
        (512..1024, 0xcd),
        (1024..1536, 0),
        (1536..2560, 0xef),
        (2560..4096, 0),
    ] {
        assert_bytes(&head[range.clone()], range.start as u64, byte);
    }
    served.shutdown().await;
}

/// `VOL1_BYTES` of random data (from `seed`) written to `in.raw` in the
/// served directory, and the path `out.raw` beside it for the copy back.
fn round_trip_files(served: &Served, seed: u64) -> (Vec<u8>, PathBuf, PathBuf) {
    let data = random_bytes(VOL1_BYTES as usize, seed);
    let input = served.dir.path().join("in.raw");
    std::fs::write(&input, &data).unwrap();
    (data, input, served.dir.path().join("out.raw"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_round_trips_a_random_file() {
    let served = Served::start().await;
    let (data, input, output) = round_trip_files(&served, 0xfeed);
    let uri = served.uri("vol1");
    run_ok(
        QEMU_IMG,
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            path_str(&input),
            &uri,
        ],
        TOOL_TIMEOUT,
    )
    .await;
    assert!(served.vol1.read_sync(0, VOL1_BYTES).unwrap() == data[..]);
    run_ok(
        QEMU_IMG,
        &["convert", "-f", "raw", "-O", "raw", &uri, path_str(&output)],
        TOOL_TIMEOUT,
    )
    .await;
    assert!(
        std::fs::read(&output).unwrap() == data,
        "round trip differs"
    );
    run_ok(
        QEMU_IMG,
        &["compare", "-f", "raw", "-F", "raw", path_str(&input), &uri],
        TOOL_TIMEOUT,
    )
    .await;
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_a_random_file() {
    let served = Served::start().await;
    let (data, input, output) = round_trip_files(&served, 0xc0ffee);
    let uri = served.uri("vol1");
    run_ok(NBDCOPY, &[path_str(&input), &uri], TOOL_TIMEOUT).await;
    assert!(served.vol1.read_sync(0, VOL1_BYTES).unwrap() == data[..]);
    // Out over the unix socket, with several connections (multi-conn).
    let unix = served.unix_uri("vol1");
    run_ok(
        NBDCOPY,
        &["--connections=4", &unix, path_str(&output)],
        TOOL_TIMEOUT,
    )
    .await;
    assert!(
        std::fs::read(&output).unwrap() == data,
        "round trip differs"
    );
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_random_read_write_verifies() {
    let served = Served::start().await;
    let uri = served.uri("vol0");
    let uri_arg = format!("--uri={uri}");
    let out = run_ok(
        FIO,
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--runtime=3",
            "--output-format=json",
        ],
        TOOL_TIMEOUT,
    )
    .await;
    let start = out.find('{').expect("fio printed no JSON");
    let report: serde_json::Value = serde_json::from_str(&out[start..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(job["write"]["total_ios"].as_u64().unwrap() > 0, "{out}");
    assert!(job["read"]["total_ios"].as_u64().unwrap() > 0, "{out}");
    served.shutdown().await;
}

/// Run a Python script under nbdsh (libnbd's shell); it prints `ok` at
/// the end.
async fn nbdsh(script: &str) {
    let out = run_nbdsh(script, TOOL_TIMEOUT).await;
    assert!(
        out.trim_end().ends_with("ok"),
        "nbdsh script did not finish:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_lists_exports_and_refuses_info_for_unknown_export() {
    let served = Served::start().await;
    let script = format!(
        r#"
import errno, nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri("nbd://127.0.0.1:{port}/")
names = []
def entry(name, description):
    names.append((name, description))
    return 0
h.opt_list(entry)
assert sorted(names) == [("vol0", "test volume 0"), ("vol1", "test volume 1")], names
h.set_export_name("no-such-volume")
try:
    h.opt_info()
    raise SystemExit("NBD_OPT_INFO for an unknown export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOENT, (e.errnum, e.string)
h.set_export_name("vol1")
h.opt_info()
assert h.get_size() == {vol1}, h.get_size()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
h.opt_go()
assert h.get_size() == {vol1}
assert h.pread(512, 0) == bytes(512)
h.shutdown()
print("ok")
"#,
        port = served.port,
        vol1 = VOL1_BYTES,
    );
    nbdsh(&script).await;
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_bad_requests_get_errors_without_disturbing_other_connections() {
    let served = Served::start().await;
    let fault_offset: u64 = 8 << 20;
    served.vol0.inject_fault(MemoryFault {
        op: BackendOp::Read,
        offset_bytes: fault_offset,
        len: 4096,
        errno: NbdErrno::Io,
    });
    let script = format!(
        r#"
import errno, nbd
uri = "{uri}"
h1 = nbd.NBD()
h1.set_strict_mode(0)  # let libnbd send what it would normally refuse
h1.connect_uri(uri)
h2 = nbd.NBD()
h2.connect_uri(uri)
size = h1.get_size()
assert size == {size}
def expect(errnum, what, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == errnum, (what, e.errnum, e.string)
        return
    raise SystemExit(what + " succeeded")
expect(errno.EINVAL, "read past the end", lambda: h1.pread(512, size))
expect(errno.EINVAL, "read across the end", lambda: h1.pread(4096, size - 512))
expect(errno.ENOSPC, "write past the end", lambda: h1.pwrite(bytes(512), size))
expect(errno.ENOSPC, "zero past the end", lambda: h1.zero(4096, size - 512))
expect(errno.EINVAL, "trim past the end", lambda: h1.trim(4096, size))
expect(errno.EINVAL, "misaligned read", lambda: h1.pread(512, 100))
expect(errno.EINVAL, "misaligned write", lambda: h1.pwrite(bytes(100), 0))
expect(errno.EINVAL, "zero-length read", lambda: h1.pread(0, 0))
expect(errno.EINVAL, "bad flag", lambda: h1.pread(512, 0, flags=nbd.CMD_FLAG_NO_HOLE))
expect(errno.EIO, "read of a failing range", lambda: h1.pread(4096, {fault}))
# The connection that got the errors still works, and so does the other.
h1.pwrite(b"\xaa" * 4096, 0)
h1.flush()
assert h1.pread(4096, 0) == b"\xaa" * 4096
assert h2.pread(4096, 0) == b"\xaa" * 4096
h1.shutdown()
h2.shutdown()
print("ok")
"#,
        uri = served.uri("vol0"),
        size = VOL0_BYTES,
        fault = fault_offset,
    );
    nbdsh(&script).await;
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_multi_conn_handles_see_each_others_writes_after_flush() {
    let served = Served::start().await;
    let script = format!(
        r#"
import os, nbd
uri = "{uri}"
h1 = nbd.NBD(); h1.connect_uri(uri)
h2 = nbd.NBD(); h2.connect_uri(uri)
for h in (h1, h2):
    assert h.can_multi_conn() and h.can_flush() and h.can_fua()
    assert h.get_structured_replies_negotiated() and h.can_df()
a = os.urandom(65536)
h1.pwrite(a, 1 << 20)
h1.flush()
assert h2.pread(65536, 1 << 20) == a
b = os.urandom(65536)
h2.pwrite(b, 2 << 20, flags=nbd.CMD_FLAG_FUA)
chunks = []
def chunk(data, offset, status, error):
    chunks.append((bytes(data), offset, status))
    return 0
got = h1.pread_structured(65536, 2 << 20, chunk, flags=nbd.CMD_FLAG_DF)
assert got == b and len(chunks) == 1, len(chunks)
assert chunks[0][1] == 2 << 20 and chunks[0][2] == nbd.READ_DATA
# Many requests in flight on both handles at once, answered out of order.
cookies = []
for i in range(64):
    h = (h1, h2)[i % 2]
    data = bytes([i]) * 4096
    cookies.append((h, h.aio_pwrite(data, (4 << 20) + i * 4096)))
for h, c in cookies:
    while not h.aio_command_completed(c):
        h.poll(-1)
h1.flush(); h2.flush()
for i in range(64):
    h = (h2, h1)[i % 2]
    assert h.pread(4096, (4 << 20) + i * 4096) == bytes([i]) * 4096, i
h1.shutdown(); h2.shutdown()
print("ok")
"#,
        uri = served.unix_uri("vol0"),
    );
    nbdsh(&script).await;
    served.shutdown().await;
}

// ---------------------------------------------------------------------------
// Raw-socket checks: input no well-behaved client sends.

/// Connects, reads the server's greeting and answers with `client_flags`.
async fn raw_greeted(port: u16, client_flags: u32) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    stream.write_u32(client_flags).await.unwrap();
    stream
}

/// Fixed-newstyle handshake up to the transmission phase via
/// NBD_OPT_EXPORT_NAME (no zeroes); returns the export size.
async fn raw_connect(port: u16, export: &str) -> (TcpStream, u64) {
    let mut stream = raw_greeted(port, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    send_option(&mut stream, OPT_EXPORT_NAME, export.as_bytes()).await;
    let size = stream.read_u64().await.unwrap();
    let flags = stream.read_u16().await.unwrap();
    assert_ne!(flags & FLAG_HAS_FLAGS, 0);
    (stream, size)
}

async fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    stream.write_u64(OPTION_MAGIC).await.unwrap();
    stream.write_u32(option).await.unwrap();
    stream.write_u32(data.len() as u32).await.unwrap();
    stream.write_all(data).await.unwrap();
}

/// Read one option reply: (option, type, data).
async fn read_option_reply(stream: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(stream.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
    let option = stream.read_u32().await.unwrap();
    let kind = stream.read_u32().await.unwrap();
    let mut data = vec![0u8; stream.read_u32().await.unwrap() as usize];
    stream.read_exact(&mut data).await.unwrap();
    (option, kind, data)
}

async fn send_request(stream: &mut TcpStream, command: u16, handle: u64, offset: u64, len: u32) {
    let header = RequestHeader {
        flags: 0,
        command,
        handle,
        offset_bytes: offset,
        length_bytes: len,
    };
    stream
        .write_all(&encode_request_header(&header))
        .await
        .unwrap();
}

/// Read a simple reply header: (error, handle).
async fn read_simple_reply(stream: &mut TcpStream) -> (u32, u64) {
    assert_eq!(stream.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    let error = stream.read_u32().await.unwrap();
    (error, stream.read_u64().await.unwrap())
}

async fn assert_closed(stream: &mut TcpStream) {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
        .await
        .expect("server did not close the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "connection still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_closes_only_its_connection() {
    let served = Served::start().await;
    let (mut good, size) = raw_connect(served.port, "vol0").await;
    assert_eq!(size, VOL0_BYTES);
    let (mut bad, _) = raw_connect(served.port, "vol0").await;
    bad.write_all(&[0x55; REQUEST_HEADER_BYTES]).await.unwrap();
    assert_closed(&mut bad).await;

    // Unknown command: an error, and the connection goes on.
    send_request(&mut good, 42, 1, 0, 512).await;
    assert_eq!(read_simple_reply(&mut good).await, (22, 1));
    // A WRITE longer than the maximum payload: discarded unread, EOVERFLOW.
    let len = (32 << 20) + 512;
    send_request(&mut good, CMD_WRITE, 2, 0, len).await;
    good.write_all(&vec![0xee; len as usize]).await.unwrap();
    assert_eq!(read_simple_reply(&mut good).await, (75, 2));
    // Still in sync: a read returns the (untouched) data.
    send_request(&mut good, CMD_READ, 3, 0, 512).await;
    assert_eq!(read_simple_reply(&mut good).await, (0, 3));
    let mut data = [1u8; 512];
    good.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [0u8; 512]);
    // DISC: the server closes after answering what is in flight.
    send_request(&mut good, CMD_DISC, 4, 0, 0).await;
    assert_closed(&mut good).await;
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_bad_input_without_buffering_it() {
    let served = Served::start().await;

    // Unknown client flags: the server hangs up.
    let mut stream = raw_greeted(served.port, 1 << 7).await;
    assert_closed(&mut stream).await;

    let mut stream = raw_greeted(served.port, FLAG_C_FIXED_NEWSTYLE).await;
    // Option data beyond the buffer bound: discarded, ERR_INVALID.
    send_option(&mut stream, OPT_GO, &vec![0u8; 100_000]).await;
    assert_eq!(
        read_option_reply(&mut stream).await,
        (OPT_GO, REP_ERR_INVALID, b"option data too long".to_vec())
    );
    // Unknown option: ERR_UNSUP. LIST with data: ERR_INVALID.
    send_option(&mut stream, 4242, b"").await;
    assert_eq!(read_option_reply(&mut stream).await.1, REP_ERR_UNSUP);
    send_option(&mut stream, OPT_LIST, b"x").await;
    assert_eq!(read_option_reply(&mut stream).await.1, REP_ERR_INVALID);
    // A length no server should buffer or drain: hang up.
    stream.write_u64(OPTION_MAGIC).await.unwrap();
    stream.write_u32(OPT_INFO).await.unwrap();
    stream.write_u32(u32::MAX).await.unwrap();
    assert_closed(&mut stream).await;

    // NBD_OPT_EXPORT_NAME for an unknown export cannot be answered: close.
    let mut stream = raw_greeted(served.port, FLAG_C_FIXED_NEWSTYLE).await;
    send_option(&mut stream, OPT_EXPORT_NAME, b"nope").await;
    assert_closed(&mut stream).await;

    // ABORT: ACK, then close.
    let mut stream = raw_greeted(served.port, FLAG_C_FIXED_NEWSTYLE).await;
    send_option(&mut stream, OPT_ABORT, b"").await;
    assert_eq!(
        read_option_reply(&mut stream).await,
        (OPT_ABORT, REP_ACK, vec![])
    );
    assert_closed(&mut stream).await;
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_earlier_writes_and_shutdown_closes_connections() {
    let served = Served::start().await;
    let (mut stream, _) = raw_connect(served.port, "vol1").await;
    // Pipeline 32 writes and a flush without waiting; every write must be
    // acknowledged and visible by the time the flush is.
    for i in 0..32u64 {
        send_request(&mut stream, CMD_WRITE, i, i * 65536, 65536).await;
        stream.write_all(&vec![i as u8 + 1; 65536]).await.unwrap();
    }
    send_request(&mut stream, CMD_FLUSH, 100, 0, 0).await;
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let (error, handle) = read_simple_reply(&mut stream).await;
        assert_eq!(error, 0);
        if handle == 100 {
            break;
        }
        seen.insert(handle);
    }
    assert_eq!(
        seen.len(),
        32,
        "flush answered before earlier writes: {seen:?}"
    );
    for i in 0..32u64 {
        let data = served.vol1.read_sync(i * 65536, 65536).unwrap();
        assert!(data.iter().all(|&b| b == i as u8 + 1));
    }
    // Server shutdown closes the idle connection.
    let shutdown = tokio::spawn(served.shutdown());
    assert_closed(&mut stream).await;
    shutdown.await.unwrap();
}

/// The production backend: qemu-io through the NBD server and the
/// `VolumeClient` to fake head nodes, across a primary failover and a
/// burst of `Unavailable` refusals, without a single failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_through_the_volume_client_rides_out_a_failover() {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use client::nbd::{NbdBackend, NbdConfig, NbdServer};
    use tokio_util::sync::CancellationToken;

    const PARTITION: u64 = 1 << 20;
    let unit = crate::fake::Unit::start(3, 8, PARTITION).await;
    let volume = unit.client(crate::fake::Unit::config()).await;
    let mut exports: BTreeMap<String, Arc<dyn NbdBackend>> = BTreeMap::new();
    exports.insert("vol0".into(), Arc::new(volume));
    let server = NbdServer::new(exports, NbdConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("nbd://{}/vol0", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let serving = tokio::spawn({
        let stop = stop.clone();
        async move { server.serve_tcp(listener, stop.cancelled_owned()).await }
    });

    let info = run_ok(NBDINFO, &["--json", &uri], TOOL_TIMEOUT).await;
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 8 * PARTITION);
    qemu_io(
        &uri,
        &["write -P 0x5a 0 8M", "write -P 0x6b 1020k 8k", "flush"],
    )
    .await;

    // Node `old` fails: its partitions move to the others in the map, it
    // refuses everything as not primary, and a new primary is briefly
    // unavailable.
    let old = unit.primary(0);
    let new = (old + 1) % 3;
    for partition in 0..8 {
        if unit.primary(partition) == old {
            unit.move_partition(partition, (old + 1 + partition as usize % 2) % 3);
        }
    }
    unit.nodes[old].behaviour.lock().unwrap().not_primary = Some(None);
    unit.nodes[new].behaviour.lock().unwrap().unavailable = 5;
    qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 1020k",
            "read -P 0x6b 1020k 8k",
            "read -P 0x5a 1028k 7164k",
            "write -z 4M 64k",
            "read -P 0 4M 64k",
            "write -P 0x7c 512 1024",
            "read -P 0x7c 512 1024",
            "flush",
        ],
    )
    .await;
    assert!(unit.primary(0) == new);
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// 200 connections that take the greeting and then say nothing can
/// neither keep a real client out (each new connection closes the oldest
/// one still in its handshake) nor outlive the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_keep_a_new_client_out() {
    let served = Served::start().await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(("127.0.0.1", served.port))
            .await
            .unwrap();
        let mut greeting = [0u8; 18];
        // The oldest of them are already closed: take what comes.
        let _ = stream.read(&mut greeting).await;
        idle.push(stream);
    }
    let started = std::time::Instant::now();
    let out = run_ok(NBDINFO, &["--json", &served.uri("vol0")], TOOL_TIMEOUT).await;
    assert!(out.contains("\"export-size\""), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "nbdinfo took {:?} beside 200 idle connections",
        started.elapsed()
    );
    // All but the newest max_handshaking (16) were closed to make room.
    let mut closed = 0;
    for stream in &mut idle[..150] {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 150, "idle connections left open");
    served.shutdown().await;
}

/// A client that pipelines reads and never reads a reply cannot hold the
/// server's shutdown (the attach agent's detach runs after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_hold_shutdown() {
    let served = Served::start().await;
    let (mut stream, _) = raw_connect(served.port, "vol0").await;
    // 64 reads of 1 MiB: far more than the socket buffers hold.
    for handle in 0..64u64 {
        send_request(&mut stream, CMD_READ, handle, 0, 1 << 20).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), served.shutdown())
        .await
        .expect("shutdown held by a client that does not read");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "shutdown took {:?}",
        started.elapsed()
    );
    drop(stream);
}
