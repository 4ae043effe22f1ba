//! A sled controller process: durability across `kill -9`, fencing across
//! restart, metrics and health.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::sled::{ColumnId, PartitionId, SledError, SledRequest, SledResponse};
use proto::Message;
use tests::{http_get, TestUnit};

pub fn link(sled: &tests::TestSled) -> Arc<PeerLink> {
    PeerLink::new(
        sled.id.clone(),
        sled.address_a,
        sled.address_b,
        LinkConfig {
            auth: Some(sled.member()),
            ..LinkConfig::default()
        },
        LinkMetrics::unregistered(),
    )
}

pub async fn call(link: &PeerLink, request: SledRequest) -> SledResponse {
    let idempotent = request.is_idempotent();
    match link.call(Message::Sled(request), idempotent).await {
        Ok(Message::SledReply(response)) => response,
        other => panic!("unexpected {other:?}"),
    }
}

/// `blocks` blocks of [`tests::pattern`] from `seed` and their CRCs.
pub fn block_data(seed: u64, blocks: usize) -> (Bytes, Vec<u32>) {
    let data = tests::pattern(seed, blocks as u64 * 4096);
    let crcs = data.chunks(4096).map(crc32c::crc32c).collect();
    (Bytes::from(data), crcs)
}

pub async fn allocate_and_claim(link: &PeerLink, partition: PartitionId, epoch: u64) -> ColumnId {
    let SledResponse::Allocated(columns) = call(
        link,
        SledRequest::AllocateColumns {
            column_count: 1,
            device: None,
        },
    )
    .await
    else {
        panic!("allocate failed")
    };
    let column = columns[0];
    let reply = call(
        link,
        SledRequest::Claim {
            column,
            partition,
            epoch,
        },
    )
    .await;
    assert!(matches!(reply, SledResponse::Claimed { .. }), "{reply:?}");
    column
}

const P: PartitionId = PartitionId {
    volume: 7,
    index: 3,
};
/// 64 KiB chunks that fit a 16 MiB test column.
const CHUNKS_PER_COLUMN: u64 = 256;

/// Appends acknowledged before `kill -9` are all readable after restart,
/// including ones racing the kill; and the epoch survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_kill_9() {
    let unit = TestUnit::new(2, "1+1", 256 << 20, 16 << 20);
    let mut sled = unit.start_sled(0);
    let link = link(&unit.sleds[0]);
    let columns = [
        allocate_and_claim(&link, P, 5).await,
        allocate_and_claim(&link, P, 5).await,
    ];
    // Two writers append 64 KiB chunks until the sled dies; each remembers
    // what was acknowledged.
    let acked_total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for (w, column) in columns.iter().copied().enumerate() {
        let link = link.clone();
        let acked_total = acked_total.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..CHUNKS_PER_COLUMN {
                let (data, block_crcs) = block_data(w as u64 * 1000 + i, 16);
                let offset = i * 65536;
                let request = SledRequest::Append {
                    column,
                    partition: P,
                    epoch: 5,
                    offset_bytes: offset,
                    data: data.clone(),
                    block_crcs,
                };
                match link.call(Message::Sled(request), true).await {
                    Ok(Message::SledReply(SledResponse::Appended { length_bytes })) => {
                        assert_eq!(length_bytes, offset + 65536);
                        acked.push((offset, data));
                        acked_total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
            (column, acked)
        }));
    }
    // Kill while the writers are mid-stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked_total.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "writers made no progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sled.kill9();
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.unwrap());
    }
    let total: usize = results.iter().map(|(_, acked)| acked.len()).sum();
    assert!(total >= 20, "nothing was acknowledged before the kill");
    assert!(
        results
            .iter()
            .any(|(_, acked)| (acked.len() as u64) < CHUNKS_PER_COLUMN),
        "the kill did not interrupt any writer"
    );
    link.close();

    let _sled = unit.start_sled(0);
    let link = self::link(&unit.sleds[0]);
    for (column, acked) in &results {
        for (offset, data) in acked {
            let reply = call(
                &link,
                SledRequest::Read {
                    column: *column,
                    offset_bytes: *offset,
                    len_bytes: 65536,
                },
            )
            .await;
            let SledResponse::Data { data: read, .. } = reply else {
                panic!("{reply:?}")
            };
            assert_eq!(&read, data, "column {column:?} offset {offset}");
        }
        // The epoch survived too.
        let reply = call(
            &link,
            SledRequest::Append {
                column: *column,
                partition: P,
                epoch: 4,
                offset_bytes: 0,
                data: block_data(1, 1).0,
                block_crcs: block_data(1, 1).1,
            },
        )
        .await;
        assert_eq!(
            reply,
            SledResponse::Error(SledError::Fenced { current_epoch: 5 })
        );
    }
}

/// A claim at a higher epoch fences the old owner, across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_persists_across_restart() {
    let unit = TestUnit::new(2, "1+1", 256 << 20, 16 << 20);
    let mut sled = unit.start_sled(0);
    let link = link(&unit.sleds[0]);
    let column = allocate_and_claim(&link, P, 3).await;
    let (data, block_crcs) = block_data(9, 2);
    let append = |epoch, offset| SledRequest::Append {
        column,
        partition: P,
        epoch,
        offset_bytes: offset,
        data: data.clone(),
        block_crcs: block_crcs.clone(),
    };
    assert_eq!(
        call(&link, append(3, 0)).await,
        SledResponse::Appended { length_bytes: 8192 }
    );
    // The new primary claims at epoch 4.
    let reply = call(
        &link,
        SledRequest::Claim {
            column,
            partition: P,
            epoch: 4,
        },
    )
    .await;
    assert!(
        matches!(
            reply,
            SledResponse::Claimed {
                epoch: 4,
                length_bytes: 8192
            }
        ),
        "{reply:?}"
    );
    assert!(sled.terminate(), "clean shutdown on SIGTERM");
    link.close();

    let _sled = unit.start_sled(0);
    let link = self::link(&unit.sleds[0]);
    assert_eq!(
        call(&link, append(3, 8192)).await,
        SledResponse::Error(SledError::Fenced { current_epoch: 4 })
    );
    assert_eq!(
        call(
            &link,
            SledRequest::Claim {
                column,
                partition: P,
                epoch: 2
            }
        )
        .await,
        SledResponse::Error(SledError::Fenced { current_epoch: 4 })
    );
    assert_eq!(
        call(
            &link,
            SledRequest::FreeColumn {
                column,
                partition: P,
                epoch: 3
            }
        )
        .await,
        SledResponse::Error(SledError::Fenced { current_epoch: 4 })
    );
    assert_eq!(
        call(&link, append(4, 8192)).await,
        SledResponse::Appended {
            length_bytes: 16384
        }
    );
    let other = PartitionId {
        volume: 8,
        index: 0,
    };
    assert!(matches!(
        call(
            &link,
            SledRequest::Claim {
                column,
                partition: other,
                epoch: 9
            }
        )
        .await,
        SledResponse::Error(SledError::WrongPartition { .. })
    ));
}

/// A byte flipped in the device file is a checksum error, never wrong data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_device_file_is_a_checksum_error() {
    let unit = TestUnit::new(2, "1+1", 256 << 20, 16 << 20);
    let mut sled = unit.start_sled(0);
    let link = link(&unit.sleds[0]);
    let column = allocate_and_claim(&link, P, 1).await;
    // A recognisable pattern, so the test can find the block in the file.
    let mut pattern = vec![0u8; 4 * 4096];
    for (i, chunk) in pattern.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(0x00C0_FFEE_0000_0000_u64 | i as u64).to_le_bytes());
    }
    let crcs = pattern.chunks(4096).map(crc32c::crc32c).collect();
    let reply = call(
        &link,
        SledRequest::Append {
            column,
            partition: P,
            epoch: 1,
            offset_bytes: 0,
            data: Bytes::from(pattern.clone()),
            block_crcs: crcs,
        },
    )
    .await;
    assert_eq!(
        reply,
        SledResponse::Appended {
            length_bytes: 16384
        }
    );
    assert!(sled.terminate());
    link.close();

    // Find the third block in whichever device file holds it and flip a bit.
    let needle = &pattern[2 * 4096..2 * 4096 + 64];
    let mut flipped = false;
    for path in &unit.sleds[0].devices {
        let mut bytes = std::fs::read(path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at + 100] ^= 0x10;
            std::fs::write(path, bytes).unwrap();
            flipped = true;
        }
    }
    assert!(flipped, "pattern not found in the device files");

    let _sled = unit.start_sled(0);
    let link = self::link(&unit.sleds[0]);
    let reply = call(
        &link,
        SledRequest::Read {
            column,
            offset_bytes: 0,
            len_bytes: 16384,
        },
    )
    .await;
    match reply {
        SledResponse::Error(SledError::ChecksumMismatch {
            block_offsets_bytes: block_offsets,
            ..
        }) => {
            assert_eq!(block_offsets, vec![8192]);
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    // The good blocks still read.
    let reply = call(
        &link,
        SledRequest::Read {
            column,
            offset_bytes: 0,
            len_bytes: 8192,
        },
    )
    .await;
    let SledResponse::Data { data, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(&data[..], &pattern[..8192]);
    let (status, metrics) = http_get(unit.sleds[0].admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("rackblock_sled_checksum_errors_total"))
        .unwrap_or_else(|| panic!("no checksum metric in:\n{metrics}"));
    assert!(!line.ends_with(" 0"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served() {
    let unit = TestUnit::new(2, "1+1", 256 << 20, 16 << 20);
    let _sled = unit.start_sled(0);
    let (status, body) = http_get(unit.sleds[0].admin, "/health").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"ok\""), "{body}");
    let link = link(&unit.sleds[0]);
    let SledResponse::Inventory(inventory) = call(&link, SledRequest::Inventory).await else {
        panic!()
    };
    assert_eq!(inventory.devices.len(), 2);
    assert_eq!(inventory.sled_id, "sled-1");
    let (status, metrics) = http_get(unit.sleds[0].admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "rackblock_sled_listener_up",
        "rackblock_sled_checksum_errors_total",
        "rackblock_sled_device_up",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
}
