//! One iSCSI initiator connection, the whole session: the input is what
//! the initiator sends (login PDUs, text, SCSI commands, Data-Out, NOP,
//! task management, logout, in any order), served by the real
//! `IscsiServer` over an in-memory stream against a 1 MiB memory LUN. The
//! target must answer or hang up, never panic, and end when the
//! initiator's bytes end. This covers the PDU parser (basic header, AHS,
//! padding, digests once negotiated), the login state machine and the
//! SCSI command decoder.
//!
//! The first input byte steers the harness so that the fuzzer also spends
//! its time past the login: 0 sends the rest as is; 1 prefixes a valid
//! login (operational stage straight to full feature phase, normal
//! session, no digests); 2 does the same with header and data digests
//! (CRC-32C) offered, so the parser's digest paths are reached too.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use client::iscsi::{IscsiConfig, IscsiServer};
use client::nbd::MemoryBackend;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TARGET: &str = "iqn.2026-12.io.rackblock:fuzz";

/// A current-thread runtime on paused time: the clock moves only when
/// every task waits, so the harness's bounds below catch a session that
/// waits for nothing (a hang) and never a slow one on a loaded machine
/// (a 10 s wall-clock bound once reported a "hang" that ran in 1 ms).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    })
}

fn server() -> &'static IscsiServer {
    static SERVER: OnceLock<IscsiServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let config = IscsiConfig {
            target_name: TARGET.into(),
            chap: None,
            portals: vec!["127.0.0.1:3260".parse().unwrap()],
            max_connections: 4,
        };
        IscsiServer::new(config, Arc::new(MemoryBackend::new(1 << 20)), 7).unwrap()
    })
}

/// A Login Request PDU: immediate, transit from the operational stage to
/// full feature phase, with `text` as its data segment.
fn login_pdu(text: &str) -> Vec<u8> {
    let data = text.as_bytes();
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x40 | 0x03; // immediate | Login Request
    pdu[1] = 0x80 | (1 << 2) | 3; // T | CSG operational | NSG full feature
    let len = data.len() as u32;
    pdu[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x80, 0, 0, 0x01, 0, 0x01]); // ISID (random format)
    pdu[16..20].copy_from_slice(&1u32.to_be_bytes()); // ITT
    pdu.extend_from_slice(data);
    pdu.resize(pdu.len() + (4 - data.len() % 4) % 4, 0);
    pdu
}

fuzz_target!(|data: &[u8]| {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    runtime().block_on(async {
        let (mut initiator, served) = tokio::io::duplex(64 << 10);
        let session = tokio::spawn(async move {
            let _ = server().serve_stream(served).await;
        });
        let mut input = Vec::with_capacity(rest.len() + 256);
        if steer % 3 != 0 {
            let digests = if steer % 3 == 2 { "CRC32C" } else { "None" };
            let text = format!(
                "InitiatorName=iqn.2026-12.io.fuzz:initiator\0SessionType=Normal\0\
                 TargetName={TARGET}\0HeaderDigest={digests}\0DataDigest={digests}\0\
                 MaxRecvDataSegmentLength=65536\0"
            );
            input.extend_from_slice(&login_pdu(&text));
        }
        input.extend_from_slice(rest);
        let (mut read_half, mut write_half) = tokio::io::split(&mut initiator);
        let send = async move {
            let _ = write_half.write_all(&input).await;
            let _ = write_half.shutdown().await;
        };
        let receive = async move {
            let mut sink = Vec::new();
            let _ = read_half.read_to_end(&mut sink).await;
        };
        // Bounded: the target ends when the input does (EOF), or hangs up.
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(send, receive);
        })
        .await;
        assert!(done.is_ok(), "iSCSI session did not end after its input");
        drop(initiator);
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "iSCSI session task did not end"
        );
    });
});
