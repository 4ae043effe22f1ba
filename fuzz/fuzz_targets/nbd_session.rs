//! One NBD client connection, the whole session: the input is what the
//! client sends (greeting flags, options, requests with payloads, in any
//! order and any amount), served by the real `NbdServer` over an in-memory
//! stream against a 1 MiB memory export. The server must answer or hang
//! up, never panic, never buffer what an option or request only announces,
//! and finish when the client's bytes end.
//!
//! The first input byte steers the harness so that the fuzzer also spends
//! its time past the handshake: 0 sends the rest as is; 1 prefixes a valid
//! handshake (fixed newstyle, no zeroes, `NBD_OPT_EXPORT_NAME vol0`, simple
//! replies); 2 also negotiates structured replies first.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use client::nbd::wire::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPTION_MAGIC, OPT_EXPORT_NAME, OPT_STRUCTURED_REPLY,
};
use client::nbd::{MemoryBackend, NbdBackend, NbdConfig, NbdServer};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

fn server() -> &'static NbdServer {
    static SERVER: OnceLock<NbdServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut exports: BTreeMap<String, Arc<dyn NbdBackend>> = BTreeMap::new();
        exports.insert("vol0".into(), Arc::new(MemoryBackend::new(1 << 20)));
        exports.insert("vol1".into(), Arc::new(MemoryBackend::new(64 << 10)));
        let config = NbdConfig {
            max_payload_bytes: 64 << 10,
            max_in_flight_bytes_per_connection: 256 << 10,
            max_option_bytes: 8 << 10,
            ..NbdConfig::default()
        };
        NbdServer::new(exports, config).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (mut client, served) = tokio::io::duplex(64 << 10);
        let session = tokio::spawn(async move {
            let _ = server().serve_stream(served).await;
        });
        let Some((&steer, rest)) = data.split_first() else {
            return;
        };
        let mut input = Vec::with_capacity(rest.len() + 64);
        if steer % 3 != 0 {
            input.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
            let mut option = |code: u32, data: &[u8]| {
                input.extend_from_slice(&OPTION_MAGIC.to_be_bytes());
                input.extend_from_slice(&code.to_be_bytes());
                input.extend_from_slice(&(data.len() as u32).to_be_bytes());
                input.extend_from_slice(data);
            };
            if steer % 3 == 2 {
                option(OPT_STRUCTURED_REPLY, b"");
            }
            option(OPT_EXPORT_NAME, b"vol0");
        }
        input.extend_from_slice(rest);
        let (mut read_half, mut write_half) = tokio::io::split(&mut client);
        let send = async move {
            let _ = write_half.write_all(&input).await;
            let _ = write_half.shutdown().await;
        };
        let receive = async move {
            let mut sink = Vec::new();
            let _ = read_half.read_to_end(&mut sink).await;
        };
        // Bounded: the server ends when the input does (EOF), or hangs up.
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(send, receive);
        })
        .await;
        assert!(done.is_ok(), "NBD session did not end after its input");
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert!(matches!(ended, Ok(Ok(()))), "NBD session task did not end");
    });
});
