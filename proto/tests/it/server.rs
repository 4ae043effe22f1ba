//! Server behaviour seen by raw TCP clients.

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use proto::frame::decode_frame;
use proto::sled::SledResponse;
use proto::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::{data_offset, read, start_server};

async fn read_message(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<(u64, Message)> {
    loop {
        if let Some(frame) = decode_frame(buf).unwrap() {
            assert!(frame.header.is_response());
            return Some((
                frame.header.request_id,
                Message::from_frame(&frame).unwrap(),
            ));
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            return None;
        }
    }
}

/// Reads until the server ends the connection: it must close it (EOF, or
/// a reset when it closed with our bytes unread) within 5 s, not keep it
/// open or fail it some other way, and send nothing on it.
async fn closed_without_answer(stream: &mut TcpStream, what: &str) {
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink))
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection is still open after 5 s"));
    if let Err(error) = ended {
        assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
            "{what}: the connection failed with {error} instead of being closed"
        );
    }
    assert!(
        sink.is_empty(),
        "{what}: answered with {} bytes",
        sink.len()
    );
}

#[tokio::test]
async fn answers_ping_and_pipelined_requests_out_of_order() {
    let server = start_server("127.0.1.60").await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let mut buf = BytesMut::new();
    stream
        .write_all(&Message::Ping { nonce: 99 }.to_frame(1, false))
        .await
        .unwrap();
    assert_eq!(
        read_message(&mut stream, &mut buf).await,
        Some((1, Message::Pong { nonce: 99 }))
    );

    // Earlier requests sleep longer, so answers overtake each other.
    let count = 20u64;
    for id in 0..count {
        let delay_us = ((count - id) * 2000) as u32;
        stream
            .write_all(&read(id * 10, delay_us).to_frame(100 + id, false))
            .await
            .unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..count {
        let (request_id, response) = read_message(&mut stream, &mut buf).await.unwrap();
        assert_eq!(
            data_offset(&response),
            (request_id - 100) * 10,
            "response matches its request id"
        );
        order.push(request_id);
    }
    assert_eq!(
        order.iter().copied().collect::<HashSet<_>>().len(),
        count as usize
    );
    assert_ne!(
        order,
        (100..100 + count).collect::<Vec<_>>(),
        "responses came back out of order"
    );
}

#[tokio::test]
async fn bad_frame_closes_only_that_connection() {
    let server = start_server("127.0.1.61").await;
    let mut good = TcpStream::connect(server.address).await.unwrap();
    let mut bad = TcpStream::connect(server.address).await.unwrap();

    // Corrupt one body byte of a valid frame: checksum error.
    let mut frame = read(1, 0).to_frame(7, false).to_vec();
    let last = frame.len() - 1;
    frame[last] ^= 0x40;
    bad.write_all(&frame).await.unwrap();
    closed_without_answer(&mut bad, "a frame failing its checksum").await;

    let mut buf = BytesMut::new();
    good.write_all(&read(5, 0).to_frame(8, false))
        .await
        .unwrap();
    let (request_id, response) = read_message(&mut good, &mut buf).await.unwrap();
    assert_eq!((request_id, data_offset(&response)), (8, 5));
    assert_eq!(server.metrics.bad_frames_total(), 1);

    // Junk that is not even a header, and a response sent as a request.
    for junk in [
        vec![0u8; 40],
        Message::SledReply(SledResponse::Freed)
            .to_frame(3, true)
            .to_vec(),
    ] {
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        stream.write_all(&junk).await.unwrap();
        closed_without_answer(&mut stream, &format!("junk {:02x?}", &junk[..8])).await;
    }
    assert_eq!(server.metrics.bad_frames_total(), 3);

    // Still serving.
    let mut fresh = TcpStream::connect(server.address).await.unwrap();
    fresh
        .write_all(&Message::Ping { nonce: 1 }.to_frame(9, false))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    assert_eq!(
        read_message(&mut fresh, &mut buf).await,
        Some((9, Message::Pong { nonce: 1 }))
    );
}

/// Answers Raft, LCP and sled inventory requests with the name of the
/// thread its `handle` ran on (the connection's task).
struct ThreadRecorder;

impl proto::server::Handler for ThreadRecorder {
    fn handle(&self, request: Message) -> futures::future::BoxFuture<'static, Message> {
        let thread = bytes::Bytes::from(
            std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string(),
        );
        let reply = match request {
            Message::Raft { .. } => Message::RaftReply { payload: thread },
            Message::Lcp { .. } => Message::LcpReply { payload: thread },
            _ => Message::SledReply(SledResponse::Error(proto::sled::SledError::Io {
                reason: String::from_utf8_lossy(&thread).into_owned(),
            })),
        };
        Box::pin(async move { reply })
    }
}

fn answered_on(message: &Message) -> String {
    match message {
        Message::RaftReply { payload } | Message::LcpReply { payload } => {
            String::from_utf8_lossy(payload).into_owned()
        }
        Message::SledReply(SledResponse::Error(proto::sled::SledError::Io { reason })) => {
            reason.clone()
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

/// A connection whose first request (after a Ping) is a control one moves
/// to the control runtime with the requests already buffered behind it;
/// one whose first request is data stays, whatever follows.
#[test]
fn control_connections_move_to_the_control_runtime() {
    let runtime = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap()
    };
    let control = runtime("control-rt");
    let data = runtime("data-rt");
    let control_handle = control.handle().clone();
    data.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.1.61:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(proto::server::serve(
            listener,
            std::sync::Arc::new(ThreadRecorder),
            proto::server::ServerConfig {
                control_runtime: Some(control_handle),
                ..proto::server::ServerConfig::default()
            },
            stop.clone(),
        ));
        let raft = || Message::Raft {
            rpc: proto::lcp::RaftRpcKind::AppendEntries,
            payload: bytes::Bytes::from_static(b"{}"),
        };
        let lcp = Message::Lcp {
            idempotent: true,
            payload: bytes::Bytes::from_static(b"{}"),
        };
        let inventory = Message::Sled(proto::sled::SledRequest::Inventory);

        // Control: Ping, then three requests in one write (the last two are
        // in the read buffer when the connection moves).
        let mut stream = TcpStream::connect(address).await.unwrap();
        let mut buf = BytesMut::new();
        let mut batch = Vec::new();
        batch.extend_from_slice(&Message::Ping { nonce: 7 }.to_frame(1, false));
        batch.extend_from_slice(&raft().to_frame(2, false));
        batch.extend_from_slice(&raft().to_frame(3, false));
        batch.extend_from_slice(&lcp.to_frame(4, false));
        stream.write_all(&batch).await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(read_message(&mut stream, &mut buf).await.unwrap());
        }
        answers.sort_by_key(|(id, _)| *id);
        assert_eq!(answers[0], (1, Message::Pong { nonce: 7 }));
        for (id, answer) in &answers[1..] {
            assert!(
                answered_on(answer).starts_with("control-rt"),
                "request {id} of a control connection ran on {}",
                answered_on(answer)
            );
        }
        // Later requests, and pings, are served there too.
        stream.write_all(&raft().to_frame(5, false)).await.unwrap();
        let (id, answer) = read_message(&mut stream, &mut buf).await.unwrap();
        assert_eq!(id, 5);
        assert!(answered_on(&answer).starts_with("control-rt"));
        stream
            .write_all(&Message::Ping { nonce: 8 }.to_frame(6, false))
            .await
            .unwrap();
        assert_eq!(
            read_message(&mut stream, &mut buf).await,
            Some((6, Message::Pong { nonce: 8 }))
        );

        // Data first: stays on the accepting runtime, control requests too.
        let mut stream = TcpStream::connect(address).await.unwrap();
        let mut buf = BytesMut::new();
        stream
            .write_all(&inventory.to_frame(1, false))
            .await
            .unwrap();
        let (_, answer) = read_message(&mut stream, &mut buf).await.unwrap();
        assert!(answered_on(&answer).starts_with("data-rt"));
        stream.write_all(&raft().to_frame(2, false)).await.unwrap();
        let (_, answer) = read_message(&mut stream, &mut buf).await.unwrap();
        assert!(
            answered_on(&answer).starts_with("data-rt"),
            "a data connection moved: {}",
            answered_on(&answer)
        );
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    });
    control.shutdown_timeout(Duration::from_secs(1));
}

/// A unit-port client from `ip`: connect, authenticate as head node `id`.
async fn member_from(
    ip: &str,
    address: std::net::SocketAddr,
    id: &str,
) -> std::io::Result<(TcpStream, proto::auth::Authenticated)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{ip}:0").parse().unwrap())?;
    let mut stream = socket.connect(address).await?;
    let credential = proto::auth::Credential::Member {
        id: id.into(),
        unit_key: proto::auth::Key::from_bytes([9; proto::auth::KEY_BYTES]),
    };
    let auth = proto::auth::client_handshake(&mut stream, &credential)
        .await
        .map_err(std::io::Error::other)?;
    Ok((stream, auth))
}

/// A sealed Ping on an authenticated connection is answered with a Pong
/// whose tag checks.
async fn ping_authenticated(stream: &mut TcpStream, auth: proto::auth::Authenticated) {
    use tokio_util::codec::Decoder as _;
    let mut send = auth.send;
    let frame = Message::Ping { nonce: 7 }.to_frame(1, false);
    let tag = send.seal(&frame);
    stream.write_all(&frame).await.unwrap();
    stream.write_all(&tag).await.unwrap();
    let mut codec = proto::auth::AuthCodec::new(Some(auth.receive));
    let mut buf = BytesMut::new();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(frame) = codec.decode(&mut buf).unwrap() {
                return Message::from_frame(&frame).unwrap();
            }
            assert!(stream.read_buf(&mut buf).await.unwrap() > 0, "closed");
        }
    })
    .await
    .expect("no Pong within 5 s");
    assert_eq!(pong, Message::Pong { nonce: 7 });
}

/// The unit port's handshake caps (issue 15 item 5): 200 idle connections
/// from one address hold at most `max_handshakes_per_peer` handshake
/// slots, the rest are closed on accept and counted, and a member from
/// another address is authenticated and served meanwhile. Idle connections
/// from enough addresses fill the listener's cap (counted too); once they
/// go, members get in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshakes_are_capped_per_peer_and_per_listener() {
    use proto::server::{serve_with_metrics, Access, ServerConfig, ServerMetrics};
    let listener = tokio::net::TcpListener::bind("127.0.3.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let credential = std::sync::Arc::new(proto::auth::Credential::Member {
        id: "hn-1".into(),
        unit_key: proto::auth::Key::from_bytes([9; proto::auth::KEY_BYTES]),
    });
    let metrics = ServerMetrics::unregistered();
    let stop = tokio_util::sync::CancellationToken::new();
    let config = ServerConfig {
        access: Access::Authenticated {
            credential,
            allow: |_, _| true,
        },
        max_handshakes: 16,
        max_handshakes_per_peer: 4,
        ..ServerConfig::default()
    };
    let server = tokio::spawn(serve_with_metrics(
        listener,
        std::sync::Arc::new(crate::net::TestHandler),
        config,
        stop.clone(),
        metrics.clone(),
    ));
    let idle_from = |ip: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(address).await.unwrap()
    };

    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(idle_from("127.0.3.2").await);
    }
    assert!(
        crate::net::wait_until(Duration::from_secs(10), || metrics
            .handshakes_refused("peer_cap")
            == 196)
        .await,
        "peer_cap refusals: {}",
        metrics.handshakes_refused("peer_cap")
    );
    let (mut stream, auth) = member_from("127.0.3.3", address, "hn-2").await.unwrap();
    ping_authenticated(&mut stream, auth).await;
    drop(stream);

    // 4 slots held by 127.0.3.2; 12 more from three addresses fill the 16.
    for ip in ["127.0.3.4", "127.0.3.5", "127.0.3.6"] {
        for _ in 0..4 {
            idle.push(idle_from(ip).await);
        }
    }
    let _extra = idle_from("127.0.3.7").await;
    assert!(
        crate::net::wait_until(Duration::from_secs(10), || metrics
            .handshakes_refused("listener_cap")
            >= 1)
        .await,
        "no listener_cap refusal with the cap full"
    );
    assert_eq!(metrics.bad_frames("unauthenticated"), 0);

    // The idle connections go (EOF ends their handshakes): members get in.
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut stream, auth) = loop {
        match member_from("127.0.3.8", address, "hn-3").await {
            Ok(member) => break member,
            Err(error) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "member still kept out: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    ping_authenticated(&mut stream, auth).await;
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// A host port's connection caps and idle timeout (issue 15 item 5): 200
/// idle connections from one address hold at most `per_peer` of the
/// listener's connections, the rest are closed on accept and counted; a
/// host on another address is served meanwhile; the idle ones are closed
/// by the idle timeout, after which their address gets in again. Addresses
/// enough to fill `total` get `listener_cap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_connections_are_capped_and_idle_ones_closed() {
    use proto::server::{serve_with_metrics, Access, ConnectionCaps, ServerConfig, ServerMetrics};
    let listener = tokio::net::TcpListener::bind("127.0.4.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let metrics = ServerMetrics::unregistered();
    let stop = tokio_util::sync::CancellationToken::new();
    let config = ServerConfig {
        access: Access::Kinds(|kind| kind == proto::message::kind::PING),
        max_connections: Some(ConnectionCaps {
            total: 16,
            per_peer: 4,
        }),
        idle_timeout: Some(Duration::from_secs(2)),
        ..ServerConfig::default()
    };
    let server = tokio::spawn(serve_with_metrics(
        listener,
        std::sync::Arc::new(crate::net::TestHandler),
        config,
        stop.clone(),
        metrics.clone(),
    ));
    let connect_from = |ip: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(address).await.unwrap()
    };
    let ping = |mut stream: TcpStream| async move {
        let frame = Message::Ping { nonce: 7 }.to_frame(1, false);
        stream.write_all(&frame).await.ok()?;
        let mut buf = BytesMut::new();
        read_message(&mut stream, &mut buf).await.map(|(_, m)| m)
    };

    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(connect_from("127.0.4.2").await);
    }
    assert!(
        crate::net::wait_until(Duration::from_secs(10), || metrics
            .connections_refused("peer_cap")
            == 196)
        .await,
        "peer_cap refusals: {}",
        metrics.connections_refused("peer_cap")
    );
    assert_eq!(
        ping(connect_from("127.0.4.3").await).await,
        Some(Message::Pong { nonce: 7 }),
        "a host on another address is kept out"
    );

    // The idle timeout closes the four that got in (EOF on each, bounded).
    let mut closed = 0;
    for stream in idle.iter_mut() {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    // The 196 refused read EOF at once; the 4 accepted after the timeout.
    assert_eq!(closed, 200, "idle connections left open");
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if ping(connect_from("127.0.4.2").await).await == Some(Message::Pong { nonce: 7 }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "127.0.4.2 still kept out after its idle connections were closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Four addresses fill the listener's 16; a fifth is refused.
    let mut held = Vec::new();
    for ip in ["127.0.4.4", "127.0.4.5", "127.0.4.6", "127.0.4.7"] {
        for _ in 0..4 {
            held.push(connect_from(ip).await);
        }
    }
    assert_eq!(ping(connect_from("127.0.4.8").await).await, None);
    assert!(
        crate::net::wait_until(Duration::from_secs(10), || {
            metrics.connections_refused("listener_cap") >= 1
        })
        .await,
        "no listener_cap refusal with the cap full"
    );
    drop(held);
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// Answers every sled `Read` with [`BIG_ANSWER_BYTES`] of data (the
/// request's offset in the first 8 bytes) and counts the requests it was
/// given: what the server handled, whatever became of the answers.
struct BigAnswers {
    handled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Size of a [`BigAnswers`] response's data: large enough that the
/// kernel's socket buffers hold only a few of them.
const BIG_ANSWER_BYTES: usize = 1 << 20;

impl proto::server::Handler for BigAnswers {
    fn handle(&self, request: Message) -> futures::future::BoxFuture<'static, Message> {
        self.handled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let reply = match request {
            Message::Sled(proto::sled::SledRequest::Read { offset_bytes, .. }) => {
                let mut data = vec![0u8; BIG_ANSWER_BYTES];
                data[..8].copy_from_slice(&offset_bytes.to_le_bytes());
                Message::SledReply(SledResponse::Data {
                    data: bytes::Bytes::from(data),
                    block_crcs: vec![],
                })
            }
            _ => Message::SledReply(SledResponse::Freed),
        };
        Box::pin(async move { reply })
    }
}

/// The largest send buffer the kernel autotunes a TCP socket to
/// (`tcp_wmem`'s third field); 16 MiB if it cannot be read.
fn tcp_send_buffer_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(16 << 20)
}

/// The bounded response queue: a client that sends many requests and never
/// reads the answers gets at most `max_in_flight_per_connection` handled
/// beyond what the kernel's buffers hold; then the server stops reading
/// from it (TCP pushes back), so its memory stays bounded whatever the
/// client sends. Another client is served meanwhile, and the slow client
/// loses nothing: once it reads, every answer arrives, and the rest of its
/// requests are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_pushed_back_not_buffered() {
    use std::sync::atomic::Ordering;
    const MAX_IN_FLIGHT: usize = 8;
    const REQUESTS: usize = 1000;
    let listener = tokio::net::TcpListener::bind("127.0.4.20:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(proto::server::serve_with_metrics(
        listener,
        std::sync::Arc::new(BigAnswers {
            handled: handled.clone(),
        }),
        proto::server::ServerConfig {
            max_in_flight_per_connection: MAX_IN_FLIGHT,
            ..proto::server::ServerConfig::default()
        },
        stop.clone(),
        proto::server::ServerMetrics::unregistered(),
    ));

    // A fixed receive buffer (no autotuning), so the bound below is known.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    let receive_buffer = socket.recv_buffer_size().unwrap() as usize;
    let mut slow = socket.connect(address).await.unwrap();
    let mut requests = Vec::new();
    for id in 0..REQUESTS as u64 {
        requests.extend_from_slice(&read(id, 0).to_frame(id, false));
    }
    // About 70 KiB: the server's receive buffer takes it all even once the
    // server has stopped reading.
    tokio::time::timeout(Duration::from_secs(10), slow.write_all(&requests))
        .await
        .expect("writing the requests blocked")
        .unwrap();

    // Wait (bounded) for the count to settle: unchanged for a second.
    let bound = MAX_IN_FLIGHT + (tcp_send_buffer_max() + receive_buffer) / BIG_ANSWER_BYTES + 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = handled.load(Ordering::SeqCst);
        assert!(
            now <= bound,
            "{now} requests handled for a client that reads nothing (bound {bound})"
        );
        if now == last && now >= MAX_IN_FLIGHT {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the handled count did not settle: {now}"
        );
        last = now;
    }
    let settled = handled.load(Ordering::SeqCst);
    assert!(settled < REQUESTS);

    // Another client is answered while the slow one is held.
    let mut other = TcpStream::connect(address).await.unwrap();
    other
        .write_all(&read(77, 0).to_frame(1, false))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let (id, answer) = read_message(&mut other, &mut buf).await.unwrap();
    assert_eq!((id, data_offset(&answer)), (1, 77));
    // (Not `settled + 1` exactly: a starved server task may still have
    // handled one more of the slow client's within the bound.)
    assert!(handled.load(Ordering::SeqCst) <= bound + 1);

    // Back-pressure, not loss: every answer arrives once it reads.
    let mut buf = BytesMut::new();
    let mut seen = HashSet::new();
    for _ in 0..REQUESTS {
        let (id, answer) = read_message(&mut slow, &mut buf)
            .await
            .expect("the slow client's connection closed");
        assert_eq!(data_offset(&answer), id);
        assert!(seen.insert(id), "answer {id} twice");
    }
    assert_eq!(handled.load(Ordering::SeqCst), REQUESTS + 1);
    stop.cancel();
    server.await.unwrap().unwrap();
}
