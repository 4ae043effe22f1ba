//! The daemon: startup, both networks (one blocked at start), admin
//! endpoints, fatal configuration errors, shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
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
    proto::auth::init_credentials(
        &proto::auth::default_credentials_dir(&path),
        &["sled-1".into(), "sled-2".into()],
        &[],
        false,
    )
    .unwrap();
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
        credentials_dir: None,
        fault_control_file: None,
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

/// The unit key of the rack at `rack` (a head node's credential).
fn member(rack: &Path) -> proto::auth::Credential {
    proto::auth::load_credential(
        &proto::auth::default_credentials_dir(rack),
        proto::auth::Role::HeadNode,
        "hn-1",
    )
    .unwrap()
}

/// One request over an authenticated connection (as a head node).
async fn call_as(
    credential: &proto::auth::Credential,
    addr: SocketAddr,
    request: SledRequest,
) -> SledResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut keys = proto::auth::client_handshake(&mut stream, credential)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let frame = Message::Sled(request).to_frame(7, false);
    write.write_all(&frame).await.unwrap();
    write.write_all(&keys.send.seal(&frame)).await.unwrap();
    let mut frames = FramedRead::new(read, proto::auth::AuthCodec::new(Some(keys.receive)));
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
    let SledResponse::Inventory(inv) = call_as(&member(&u.rack), u.a, SledRequest::Inventory).await
    else {
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
    let SledResponse::Allocated(cols) = call_as(
        &member(&u.rack),
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
    let SledResponse::ColumnStatus(s) = call_as(
        &member(&u.rack),
        u.b,
        SledRequest::ColumnStatus { column: cols[0] },
    )
    .await
    else {
        panic!()
    };
    assert_eq!(s.state, proto::sled::ColumnState::Allocated);
    let (_, metrics) = http_get(u.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("rackblock_sled_network_requests_total{network=\"b\"} 1"),
        "{metrics}"
    );
    // A claim from anyone but a head node of the unit is never handled:
    // no handshake at all, a stranger's unit key, another sled's key.
    let claim = SledRequest::Claim {
        column: cols[0],
        partition: proto::sled::PartitionId {
            volume: 1,
            index: 0,
        },
        epoch: 1 << 40,
    };
    let mut stream = tokio::net::TcpStream::connect(u.a).await.unwrap();
    stream
        .write_all(&Message::Sled(claim.clone()).to_frame(1, false))
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        read.is_err() || answer.is_empty(),
        "an unauthenticated claim got {} bytes back",
        answer.len()
    );
    let stranger = proto::auth::Credential::Member {
        id: "hn-1".into(),
        unit_key: proto::auth::Key::random().unwrap(),
    };
    let other_sled = proto::auth::load_credential(
        &proto::auth::default_credentials_dir(&u.rack),
        proto::auth::Role::Sled,
        "sled-2",
    )
    .unwrap();
    for credential in [stranger, other_sled] {
        let mut stream = tokio::net::TcpStream::connect(u.a).await.unwrap();
        let refused = proto::auth::client_handshake(&mut stream, &credential).await;
        assert!(refused.is_err(), "{credential:?} authenticated to a sled");
    }
    let (_, metrics) = http_get(u.admin, "/metrics").await.unwrap();
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("rackblock_server_bad_frames_total{reason=\"unauthenticated\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 3.0, "{metrics}");
    let SledResponse::ColumnStatus(s) = call_as(
        &member(&u.rack),
        u.a,
        SledRequest::ColumnStatus { column: cols[0] },
    )
    .await
    else {
        panic!()
    };
    assert_eq!(
        (s.state, s.epoch),
        (proto::sled::ColumnState::Allocated, 0),
        "the refused claims changed nothing"
    );
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
