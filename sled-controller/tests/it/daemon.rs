//! The daemon: startup, both networks (one blocked at start), admin
//! endpoints, fatal configuration errors, shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use proto::frame::FrameCodec;
use proto::sled::{SledRequest, SledResponse};
use proto::Message;
use sled_controller::{run, SledControllerConfig, SledControllerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Unit {
    _dir: tempfile::TempDir,
    rack: PathBuf,
    a: SocketAddr,
    b: SocketAddr,
    admin: SocketAddr,
    devices: Vec<PathBuf>,
}

fn unit() -> Unit {
    let dir = tempfile::tempdir().unwrap();
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let mut rack = format!(
        "[unit]\nname = \"t\"\ncolumn_size_bytes = 1048576\nerasure_codes = [\"1+1\"]\n\n\
         [[head_node]]\nid = \"hn-1\"\naddress_a = \"{}\"\naddress_b = \"{}\"\nadmin = \"{}\"\n\n",
        addr(free_port()),
        addr(free_port()),
        addr(free_port())
    );
    let (a, b, admin) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let mut devices = Vec::new();
    for s in 1..=2 {
        let (sa, sb, sadmin) = if s == 1 {
            (a, b, admin)
        } else {
            (addr(free_port()), addr(free_port()), addr(free_port()))
        };
        rack.push_str(&format!("[[sled]]\nid = \"sled-{s}\"\naddress_a = \"{sa}\"\naddress_b = \"{sb}\"\nadmin = \"{sadmin}\"\n"));
        for d in 0..2 {
            let path = dir.path().join(format!("s{s}d{d}.img"));
            std::fs::File::create(&path)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            rack.push_str(&format!(
                "[[sled.device]]\npath = \"{}\"\nsize_bytes = {}\n",
                path.display(),
                8 << 20
            ));
            if s == 1 {
                devices.push(path);
            }
        }
    }
    let path = dir.path().join("rack.toml");
    std::fs::write(&path, rack).unwrap();
    Unit {
        rack: path,
        a,
        b,
        admin,
        devices,
        _dir: dir,
    }
}

fn config(rack: &Path, sled_id: &str) -> SledControllerConfig {
    SledControllerConfig {
        rack_file: rack.to_path_buf(),
        sled_id: sled_id.into(),
        io_engine: Some("sync".into()),
        scrub_bytes_per_second: 1 << 30,
        scrub_pass_interval_ms: 50,
        device_timeout_ms: 30_000,
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// Polls `check` until it holds. The 30 s bound only ends a test whose
/// condition never comes; a loaded 2-core CI machine has taken over 10 s to
/// format two devices and bind a listener.
async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn call(addr: SocketAddr, request: SledRequest) -> SledResponse {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(&Message::Sled(request).to_frame(7, false))
        .await
        .unwrap();
    let mut frames = FramedRead::new(read, FrameCodec);
    let frame = frames.next().await.unwrap().unwrap();
    match Message::from_frame(&frame).unwrap() {
        Message::SledReply(r) => r,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_both_networks_and_recovers_a_blocked_one() {
    let u = unit();
    // Network B's address is taken when the daemon starts.
    let blocker = std::net::TcpListener::bind(u.b).unwrap();
    let token = CancellationToken::new();
    let daemon = tokio::spawn(run(config(&u.rack, "sled-1"), token.clone()));
    wait_for("health", async || {
        matches!(http_get(u.admin, "/health").await, Some((200, _)))
    })
    .await;
    let (_, body) = http_get(u.admin, "/health").await.unwrap();
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["sled_id"], "sled-1");
    assert_eq!(health["devices"].as_array().unwrap().len(), 2);
    let (_, metrics) = http_get(u.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("rackblock_sled_listener_up{network=\"b\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rackblock_sled_listener_up{network=\"a\"} 1"),
        "{metrics}"
    );
    // Network A serves.
    let SledResponse::Inventory(inv) = call(u.a, SledRequest::Inventory).await else {
        panic!()
    };
    assert_eq!(
        (
            inv.sled_id.as_str(),
            inv.devices.len(),
            inv.column_size_bytes
        ),
        ("sled-1", 2, 1 << 20)
    );
    let SledResponse::Allocated(cols) = call(
        u.a,
        SledRequest::AllocateColumns {
            column_count: 2,
            device: None,
        },
    )
    .await
    else {
        panic!()
    };
    assert_eq!(cols.len(), 2);
    // Free B's address: the daemon binds it within a couple of seconds.
    drop(blocker);
    wait_for("listener b", async || {
        http_get(u.admin, "/metrics")
            .await
            .is_some_and(|(_, m)| m.contains("rackblock_sled_listener_up{network=\"b\"} 1"))
    })
    .await;
    let SledResponse::ColumnStatus(s) =
        call(u.b, SledRequest::ColumnStatus { column: cols[0] }).await
    else {
        panic!()
    };
    assert_eq!(s.state, proto::sled::ColumnState::Allocated);
    let (_, metrics) = http_get(u.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("rackblock_sled_network_requests_total{network=\"b\"} 1"),
        "{metrics}"
    );
    // Not a sled request.
    let stream = tokio::net::TcpStream::connect(u.a).await.unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(&Message::SledReply(SledResponse::Freed).to_frame(1, false))
        .await
        .unwrap();
    drop(FramedRead::new(read, FrameCodec));
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_configuration_errors() {
    let u = unit();
    let err = run(config(&u.rack, "sled-9"), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SledControllerError::UnknownSled { .. }),
        "{err}"
    );
    let err = run(
        config(Path::new("/nonexistent/rack.toml"), "sled-1"),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/rack.toml"), "{err}");
    // Device 0 of sled-1 formatted as sled-2's: refused, and left alone.
    let dev = crate::common::file_device(&u.devices[0], hardware::EngineChoice::Sync, 8 << 20);
    let identity = sled_controller::store::DeviceIdentity {
        unit_name: "t".into(),
        sled_id: "sled-2".into(),
        device_index: 0,
    };
    drop(
        sled_controller::store::Store::open(
            dev,
            &identity,
            &sled_controller::store::StoreOptions::new(1 << 20),
            std::sync::Arc::new(sled_controller::metrics::Metrics::new()),
        )
        .await
        .unwrap(),
    );
    let err = run(config(&u.rack, "sled-1"), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("sled-2") && err.to_string().contains("s1d0.img"),
        "{err}"
    );
}
