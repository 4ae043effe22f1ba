//! The unit port's authentication (`proto::auth`): the handshake messages
//! on both sides and the MAC-checked frame stream after it.
//!
//! The first input byte steers the harness:
//! * 0: the rest is what a client sends to a head node's unit port (hello,
//!   proof, frames): the server must refuse it or, never here without the
//!   key, accept it; it must not panic or wait for more than it was sent.
//! * 1: the rest is what a server answers an operator's client handshake.
//! * 2: a real handshake (operator → head node) runs first; the rest is a
//!   frame stream the harness seals with the connection's frame MAC, and
//!   whose frame CRCs it fixes up when the second byte is odd, so the
//!   fuzzer reaches the frame and message decoders behind the MAC. Each
//!   frame is cut where its header says it ends; a header that does not
//!   parse, or a frame longer than the input, is sent raw and ends the
//!   stream.
#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::auth::{client_handshake, server_handshake, AuthCodec, Credential, Key, KEY_BYTES};
use proto::frame::{peek_frame_len, HEADER_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn unit_key() -> Key {
    Key::from_bytes([0x5a; KEY_BYTES])
}

fn head_node() -> Credential {
    Credential::Member {
        id: "hn-1".into(),
        unit_key: unit_key(),
    }
}

fn operator() -> Credential {
    Credential::Operator {
        name: "zonal".into(),
        key: proto::auth::operator_key(&unit_key(), "zonal"),
    }
}

/// Decodes every frame `codec` finds in `bytes`; stops at the first error.
fn drain(mut codec: AuthCodec, bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    for _ in 0..=bytes.len() {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                let _ = proto::Message::from_frame(&frame);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

async fn server_raw(input: &[u8]) {
    let (mut client, mut server) = tokio::io::duplex(input.len() + 4096);
    client.write_all(input).await.unwrap();
    client.shutdown().await.unwrap();
    if let Ok(auth) = server_handshake(&mut server, &head_node()).await {
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
        drain(AuthCodec::new(Some(auth.receive)), &rest);
    }
}

async fn client_raw(input: &[u8]) {
    let (mut client, mut server) = tokio::io::duplex(input.len() + 4096);
    server.write_all(input).await.unwrap();
    server.shutdown().await.unwrap();
    if let Ok(auth) = client_handshake(&mut client, &operator()).await {
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        drain(AuthCodec::new(Some(auth.receive)), &rest);
    }
}

async fn frames(input: &[u8]) {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let (mut client, mut server) = tokio::io::duplex(4096);
    let operator = operator();
    let head_node = head_node();
    let (sent, received) = tokio::join!(
        client_handshake(&mut client, &operator),
        server_handshake(&mut server, &head_node)
    );
    let (Ok(mut sent), Ok(received)) = (sent, received) else {
        panic!("a handshake between a unit's own members failed");
    };
    assert_eq!(received.peer.id, "zonal");
    let mut stream = Vec::with_capacity(rest.len() + 64);
    let mut at = 0;
    while at < rest.len() {
        let buf = BytesMut::from(&rest[at..]);
        let frame_len = match peek_frame_len(&buf) {
            Ok(Some(len)) if at + len <= rest.len() => len,
            _ => {
                stream.extend_from_slice(&rest[at..]);
                break;
            }
        };
        let mut frame = rest[at..at + frame_len].to_vec();
        if flags & 1 == 1 {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..28]), &frame[HEADER_BYTES..]);
            frame[28..32].copy_from_slice(&crc.to_le_bytes());
        }
        let tag = sent.send.seal(&frame);
        stream.extend_from_slice(&frame);
        stream.extend_from_slice(&tag);
        at += frame_len;
    }
    drain(AuthCodec::new(Some(received.receive)), &stream);
}

fuzz_target!(|data: &[u8]| {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    runtime().block_on(async {
        match steer % 3 {
            0 => server_raw(rest).await,
            1 => client_raw(rest).await,
            _ => frames(rest).await,
        }
    });
});
