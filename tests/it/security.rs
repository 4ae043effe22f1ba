//! Who may speak on which port (SECURITY.md), against real processes:
//! the host port refuses and counts every Raft, control-plane, replication
//! and sled message; the unit port handles nothing from a peer that has
//! not authenticated; a sled refuses a claim from anyone but a head node
//! of its unit. (A revoked attachment reading and writing through the host
//! port: `cli_verbs::missing_wrong_and_detached_tokens_are_refused_and_write_nothing`.)

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use local_control_plane::client::{request_message, LcpRequest};
use local_control_plane::Command;
use proto::auth::{Credential, Key, Role};
use proto::lcp::RaftRpcKind;
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::sled::{ColumnState, PartitionId, SledRequest, SledResponse};
use proto::volume::ReplicaRequest;
use proto::Message;
use tests::{http_get, HeadNodeOptions, TestUnit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn unit() -> TestUnit {
    unit_of(1)
}

fn unit_of(head_nodes: u32) -> TestUnit {
    TestUnit::build(
        HeadNodeOptions {
            count: head_nodes,
            ..HeadNodeOptions::default()
        },
        2,
        "1+1",
        256 << 20,
        16 << 20,
    )
}

/// Sends `frame` on a fresh plain connection and reads until the server
/// closes it (bounded): the bytes that came back.
async fn send_plain(address: SocketAddr, frame: Bytes) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(&frame).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server neither answered nor closed within 10 s");
    if read.is_err() {
        // Reset by the server: nothing usable came back either.
        return Vec::new();
    }
    answer
}

/// The sum of `metric` samples at `admin` whose labels contain every one
/// of `labels`.
fn metric_sum(admin: SocketAddr, metric: &str, labels: &[&str]) -> f64 {
    let (_, text) = http_get(admin, "/metrics").expect("metrics");
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn register_volume() -> Message {
    request_message(&LcpRequest::Command(Command::RegisterVolume {
        volume: 7,
        name: "intruder".into(),
        size_bytes: 16 << 20,
        partition_size_bytes: 16 << 20,
        k: 1,
        m: 1,
    }))
    .unwrap()
}

/// One message of each kind a host must never send.
fn unit_messages() -> Vec<(&'static str, Message)> {
    let partition = PartitionId {
        volume: 1,
        index: 0,
    };
    vec![
        (
            "raft",
            Message::Raft {
                rpc: RaftRpcKind::Vote,
                payload: Bytes::from_static(b"{}"),
            },
        ),
        ("control plane", register_volume()),
        (
            "replication",
            Message::Replica(ReplicaRequest::Append {
                partition,
                epoch: u64::MAX,
                records: Vec::new(),
            }),
        ),
        (
            "sled",
            Message::Sled(SledRequest::Claim {
                column: proto::sled::ColumnId {
                    device: 0,
                    index: 0,
                },
                partition,
                epoch: u64::MAX,
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_unit_ports_refuse_what_a_peer_may_not_send() {
    let unit = unit();
    let _sleds = unit.start_sleds();
    let _heads = unit.start_head_nodes();
    let head = &unit.head_nodes[0];

    // Host port: every unit message closes the connection unanswered, and
    // is counted.
    for (what, message) in unit_messages() {
        let answer = send_plain(head.host, message.to_frame(1, false)).await;
        assert!(answer.is_empty(), "the host port answered a {what} message");
    }
    let refused = metric_sum(
        head.admin,
        "rackblock_server_bad_frames_total",
        &["port=\"host\"", "reason=\"refused_kind\""],
    );
    assert!(refused >= 4.0, "host-port refusals counted: {refused}");

    // Unit port, no handshake: nothing is handled, whatever the message.
    for (what, message) in unit_messages() {
        let answer = send_plain(head.address_a, message.to_frame(1, false)).await;
        assert!(
            answer.is_empty(),
            "the unit port answered an unauthenticated {what} message"
        );
    }
    // A stranger's unit key, and a sled's own key (sleds may not speak to
    // head nodes): the handshake fails, nothing is handled.
    let stranger = Credential::Member {
        id: "hn-1".into(),
        unit_key: Key::random().unwrap(),
    };
    let sled = proto::auth::load_credential(&unit.credentials_dir(), Role::Sled, "sled-1").unwrap();
    for credential in [stranger, sled] {
        let mut stream = tokio::net::TcpStream::connect(head.address_b)
            .await
            .unwrap();
        let result = proto::auth::client_handshake(&mut stream, &credential).await;
        assert!(
            result.is_err(),
            "{credential:?} authenticated on the unit port"
        );
    }
    let unauthenticated = metric_sum(
        head.admin,
        "rackblock_server_bad_frames_total",
        &["port=\"unit\"", "reason=\"unauthenticated\""],
    );
    assert!(
        unauthenticated >= 6.0,
        "unit-port handshake refusals: {unauthenticated}"
    );

    // An operator may use the control plane but not speak Raft.
    let operator = proto::auth::operator_credential(&unit.credentials_dir(), "operator").unwrap();
    let link = PeerLink::new(
        head.id.clone(),
        head.address_a,
        head.address_b,
        LinkConfig {
            auth: Some(std::sync::Arc::new(operator)),
            ..LinkConfig::default()
        },
        LinkMetrics::unregistered(),
    );
    let status = request_message(&LcpRequest::RaftStatus).unwrap();
    assert!(matches!(
        link.call(status, true).await,
        Ok(Message::LcpReply { .. })
    ));
    let vote = Message::Raft {
        rpc: RaftRpcKind::Vote,
        payload: Bytes::from_static(b"{}"),
    };
    assert!(
        link.call(vote, false).await.is_err(),
        "an operator spoke Raft"
    );
    link.close();
    let refused_kind = metric_sum(
        head.admin,
        "rackblock_server_bad_frames_total",
        &["port=\"unit\"", "reason=\"refused_kind\""],
    );
    assert!(refused_kind >= 1.0, "{refused_kind}");

    // None of it reached the control plane: no volume 7.
    let lcp = unit.lcp_client();
    let map = lcp.partition_map(7).await;
    assert!(
        map.is_err(),
        "an unauthenticated RegisterVolume was applied: {map:?}"
    );
    lcp.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_refuses_a_claim_from_a_non_member() {
    let unit = unit();
    let _sled = unit.start_sled(0);
    let sled = &unit.sleds[0];
    let member = PeerLink::new(
        sled.id.clone(),
        sled.address_a,
        sled.address_b,
        LinkConfig {
            auth: Some(sled.member()),
            ..LinkConfig::default()
        },
        LinkMetrics::unregistered(),
    );
    let Ok(Message::SledReply(SledResponse::Allocated(columns))) = member
        .call(
            Message::Sled(SledRequest::AllocateColumns {
                column_count: 1,
                device: None,
            }),
            false,
        )
        .await
    else {
        panic!("a member could not allocate");
    };
    let column = columns[0];
    let claim = Message::Sled(SledRequest::Claim {
        column,
        partition: PartitionId {
            volume: 9,
            index: 0,
        },
        epoch: 1 << 40,
    });
    // No handshake.
    assert!(send_plain(sled.address_a, claim.to_frame(1, false))
        .await
        .is_empty());
    // An operator (keys only for head nodes), the other sled, a stranger.
    let dir = unit.credentials_dir();
    let outsiders = [
        proto::auth::operator_credential(&dir, "operator").unwrap(),
        proto::auth::load_credential(&dir, Role::Sled, "sled-2").unwrap(),
        Credential::Member {
            id: "hn-1".into(),
            unit_key: Key::random().unwrap(),
        },
    ];
    for credential in outsiders {
        let link = PeerLink::new(
            sled.id.clone(),
            sled.address_a,
            sled.address_b,
            LinkConfig {
                auth: Some(std::sync::Arc::new(credential)),
                connect_timeout: Duration::from_secs(2),
                ..LinkConfig::default()
            },
            LinkMetrics::unregistered(),
        );
        assert!(link.call(claim.clone(), false).await.is_err());
        link.close();
    }
    let Ok(Message::SledReply(SledResponse::ColumnStatus(status))) = member
        .call(Message::Sled(SledRequest::ColumnStatus { column }), true)
        .await
    else {
        panic!("a member could not read the column's status");
    };
    assert_eq!(
        (status.state, status.partition),
        (ColumnState::Allocated, None),
        "a refused claim changed the column"
    );
    let unauthenticated = metric_sum(
        sled.admin,
        "rackblock_server_bad_frames_total",
        &["reason=\"unauthenticated\""],
    );
    assert!(unauthenticated >= 4.0, "{unauthenticated}");
    member.close();
}

/// Runs `rackblock ARGS` to completion: (exit code, stdout, stderr).
fn rackblock(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(tests::rackblock_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `attach --rack` without the zonal plane: the host gets an attachment an
/// operator minted (`rackblock attachment create`) and nothing else; the
/// agent serves with it over the host ports, and refuses to start without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_with_an_operator_minted_attachment() {
    // A volume needs a primary and a secondary head node.
    let unit = unit_of(2);
    let _sleds = unit.start_sleds();
    let _heads = unit.start_head_nodes();
    let lcp = unit.lcp_client();
    tests::register_volume(
        &lcp,
        Command::RegisterVolume {
            volume: 3,
            name: "hosted".into(),
            size_bytes: 16 << 20,
            partition_size_bytes: 16 << 20,
            k: 1,
            m: 1,
        },
        Duration::from_secs(30),
    )
    .await;
    lcp.close();
    unit.wait_datapaths_ready(&_heads, Duration::from_secs(30));
    let rack = unit.rack_path.to_str().unwrap().to_owned();
    let file = unit.dir.path().join("hosted.attachment");
    let file_text = file.to_str().unwrap().to_owned();
    // No attachment: a usage error, not unit-port access.
    let listen = SocketAddr::from(([127, 0, 0, 1], tests::next_port())).to_string();
    let (code, _, stderr) = rackblock(&["attach", "hosted", "--rack", &rack, "--listen", &listen]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = rackblock(&[
        "attachment",
        "create",
        "3",
        "--rack",
        &rack,
        "--host",
        "h1",
        "--out",
        &file_text,
    ]);
    assert_eq!(code, 0, "{stderr}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let agent = tests::Daemon::spawn(
        "attach-hosted",
        &[
            "attach",
            "hosted",
            "--rack",
            &rack,
            "--attachment-file",
            &file_text,
            "--listen",
            &listen,
        ],
        unit.dir.path(),
    );
    let nbd: SocketAddr = listen.parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !client::nbd::server_greets(nbd) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent does not serve: {}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its I/O went to the host port: the head node served host requests
    // there (the map at least), and none of its unit-port connections came
    // from the agent (it has no credential to make one).
    let host_requests: f64 = unit
        .head_nodes
        .iter()
        .map(|head| {
            metric_sum(
                head.admin,
                "rackblock_server_requests_total",
                &["port=\"host\""],
            )
        })
        .sum();
    assert!(host_requests >= 1.0, "{host_requests}");
    drop(agent);
}
