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
