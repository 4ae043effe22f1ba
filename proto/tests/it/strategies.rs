//! proptest strategies for every wire type.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proto::lcp::RaftRpcKind;
use proto::sled::*;
use proto::volume::*;
use proto::Message;

pub fn column() -> impl Strategy<Value = ColumnId> {
    (any::<u16>(), any::<u32>()).prop_map(|(device, index)| ColumnId { device, index })
}

pub fn partition() -> impl Strategy<Value = PartitionId> {
    (any::<u64>(), any::<u32>()).prop_map(|(volume, partition)| PartitionId {
        volume,
        index: partition,
    })
}

pub fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..1024).prop_map(Bytes::from)
}

pub fn crcs() -> impl Strategy<Value = Vec<u32>> {
    vec(any::<u32>(), 0..8)
}

pub fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

pub fn column_state() -> impl Strategy<Value = ColumnState> {
    prop_oneof![
        Just(ColumnState::Free),
        Just(ColumnState::Allocated),
        Just(ColumnState::Claimed)
    ]
}

pub fn device_state() -> impl Strategy<Value = DeviceState> {
    prop_oneof![Just(DeviceState::Healthy), Just(DeviceState::Failed)]
}

pub fn sled_request() -> impl Strategy<Value = SledRequest> {
    prop_oneof![
        Just(SledRequest::Inventory),
        (any::<u32>(), any::<Option<u16>>()).prop_map(|(count, device)| {
            SledRequest::AllocateColumns {
                column_count: count,
                device,
            }
        }),
        (column(), partition(), any::<u64>()).prop_map(|(column, partition, epoch)| {
            SledRequest::FreeColumn {
                column,
                partition,
                epoch,
            }
        }),
        (column(), partition(), any::<u64>()).prop_map(|(column, partition, epoch)| {
            SledRequest::Claim {
                column,
                partition,
                epoch,
            }
        }),
        (
            column(),
            partition(),
            any::<u64>(),
            any::<u64>(),
            payload(),
            crcs()
        )
            .prop_map(|(column, partition, epoch, offset, data, block_crcs)| {
                SledRequest::Append {
                    column,
                    partition,
                    epoch,
                    offset_bytes: offset,
                    data,
                    block_crcs,
                }
            }),
        (column(), any::<u64>(), any::<u32>()).prop_map(|(column, offset, len)| {
            SledRequest::Read {
                column,
                offset_bytes: offset,
                len_bytes: len,
            }
        }),
        column().prop_map(|column| SledRequest::ColumnStatus { column }),
        Just(SledRequest::ScrubReport),
    ]
}

pub fn sled_error() -> impl Strategy<Value = SledError> {
    prop_oneof![
        any::<u64>().prop_map(|current_epoch| SledError::Fenced { current_epoch }),
        (column(), partition())
            .prop_map(|(column, owner)| SledError::WrongPartition { column, owner }),
        column().prop_map(|column| SledError::NoSuchColumn { column }),
        (column(), column_state())
            .prop_map(|(column, state)| SledError::BadColumnState { column, state }),
        (column(), any::<u64>(), any::<u64>()).prop_map(|(column, offset, length_bytes)| {
            SledError::OffsetMismatch {
                column,
                offset_bytes: offset,
                length_bytes,
            }
        }),
        (
            column(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(column, offset, len, length_bytes, column_size_bytes)| {
                SledError::OutOfRange {
                    column,
                    offset_bytes: offset,
                    len_bytes: len,
                    length_bytes,
                    column_size_bytes,
                }
            }),
        (column(), vec(any::<u64>(), 0..8)).prop_map(|(column, block_offsets)| {
            SledError::ChecksumMismatch {
                column,
                block_offsets_bytes: block_offsets,
            }
        }),
        any::<u16>().prop_map(|device| SledError::DeviceFailed { device }),
        Just(SledError::NoSpace),
        text().prop_map(|reason| SledError::BadRequest { reason }),
        text().prop_map(|reason| SledError::Io { reason }),
    ]
}

pub fn device_inventory() -> impl Strategy<Value = DeviceInventory> {
    (
        any::<u16>(),
        text(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        device_state(),
    )
        .prop_map(
            |(device, path, size_bytes, column_count, free_columns, state)| DeviceInventory {
                device,
                path,
                size_bytes,
                column_count,
                free_columns,
                state,
            },
        )
}

pub fn sled_response() -> impl Strategy<Value = SledResponse> {
    prop_oneof![
        (text(), any::<u64>(), vec(device_inventory(), 0..4)).prop_map(
            |(sled_id, column_size_bytes, devices)| {
                SledResponse::Inventory(SledInventory {
                    sled_id,
                    column_size_bytes,
                    devices,
                })
            }
        ),
        vec(column(), 0..8).prop_map(SledResponse::Allocated),
        Just(SledResponse::Freed),
        (any::<u64>(), any::<u64>()).prop_map(|(epoch, length_bytes)| SledResponse::Claimed {
            epoch,
            length_bytes
        }),
        any::<u64>().prop_map(|length_bytes| SledResponse::Appended { length_bytes }),
        (payload(), crcs()).prop_map(|(data, block_crcs)| SledResponse::Data { data, block_crcs }),
        (
            column(),
            column_state(),
            proptest::option::of(partition()),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(column, state, partition, epoch, length_bytes)| {
                SledResponse::ColumnStatus(ColumnStatus {
                    column,
                    state,
                    partition,
                    epoch,
                    length_bytes,
                })
            }),
        (
            any::<u64>(),
            any::<u64>(),
            vec((column(), any::<u64>()), 0..6)
        )
            .prop_map(|(passes, bytes_verified, bad)| SledResponse::ScrubReport(
                ScrubReport {
                    passes,
                    bytes_verified,
                    bad_blocks: bad
                        .into_iter()
                        .map(|(column, offset)| BadBlock {
                            column,
                            offset_bytes: offset
                        })
                        .collect(),
                }
            )),
        sled_error().prop_map(SledResponse::Error),
    ]
}

pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        sled_request().prop_map(Message::Sled),
        sled_response().prop_map(Message::SledReply),
        (raft_rpc_kind(), payload()).prop_map(|(rpc, payload)| Message::Raft { rpc, payload }),
        payload().prop_map(|payload| Message::RaftReply { payload }),
        (any::<bool>(), payload()).prop_map(|(idempotent, payload)| Message::Lcp {
            idempotent,
            payload
        }),
        payload().prop_map(|payload| Message::LcpReply { payload }),
        host_request().prop_map(Message::Host),
        host_reply().prop_map(Message::HostReply),
        replica_request().prop_map(Message::Replica),
        replica_reply().prop_map(Message::ReplicaReply),
        (any::<u64>(), credential())
            .prop_map(|(volume, credential)| Message::HostMap { volume, credential }),
        payload().prop_map(|payload| Message::HostMapReply { payload }),
        (any::<u64>(), credential(), payload()).prop_map(|(volume, credential, payload)| {
            Message::HostReservations {
                volume,
                credential,
                payload,
            }
        }),
        payload().prop_map(|payload| Message::HostReservationsReply { payload }),
    ]
}

pub fn raft_rpc_kind() -> impl Strategy<Value = RaftRpcKind> {
    proptest::sample::select(RaftRpcKind::ALL.to_vec())
}

pub fn address() -> impl Strategy<Value = std::net::SocketAddr> {
    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(ip.into(), port))),
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
            |(ip, port, flowinfo, scope_id)| SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flowinfo,
                scope_id
            ))
        ),
    ]
}

pub fn node_hint() -> impl Strategy<Value = NodeHint> {
    (text(), address(), address()).prop_map(|(node_id, address_a, address_b)| NodeHint {
        node_id,
        address_a,
        address_b,
    })
}

pub fn host_op() -> impl Strategy<Value = HostOp> {
    prop_oneof![
        (any::<u64>(), any::<u32>()).prop_map(|(offset_bytes, len)| HostOp::Read {
            offset_bytes,
            len_bytes: len
        }),
        (any::<u64>(), any::<u64>(), payload(), crcs(), any::<bool>()).prop_map(
            |(write_id, offset_bytes, data, crcs, fua)| HostOp::Write {
                write_id,
                offset_bytes,
                data,
                crcs,
                fua
            }
        ),
        Just(HostOp::Flush),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(write_id, offset_bytes, len)| {
            HostOp::Trim {
                write_id,
                offset_bytes,
                len_bytes: len,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(write_id, offset_bytes, len)| {
            HostOp::WriteZeroes {
                write_id,
                offset_bytes,
                len_bytes: len,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(snapshot, offset_bytes, len)| {
            HostOp::ReadSnapshot {
                snapshot,
                offset_bytes,
                len_bytes: len,
            }
        }),
        (any::<u64>(), 0u8..3, any::<u32>()).prop_map(|(snapshot, tag, hold_ms)| {
            HostOp::SnapshotControl {
                snapshot,
                action: match tag {
                    0 => SnapshotAction::Cut { hold_ms },
                    1 => SnapshotAction::Release,
                    _ => SnapshotAction::Drop,
                },
            }
        }),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(from, to, start_bytes, max_ranges)| HostOp::SnapshotDiff {
                from,
                to,
                start_bytes,
                max_ranges,
            }),
        Just(HostOp::SnapshotUsage),
        (
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(view, start_bytes, max_ranges)| HostOp::SnapshotMap {
                view,
                start_bytes,
                max_ranges,
            }),
    ]
}

pub fn credential() -> impl Strategy<Value = AttachmentCredential> {
    (any::<u64>(), any::<[u8; 16]>()).prop_map(|(attachment, token)| AttachmentCredential {
        attachment,
        token: AttachmentToken(token),
    })
}

pub fn host_request() -> impl Strategy<Value = HostRequest> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        credential(),
        host_op(),
    )
        .prop_map(|(volume, partition, epoch, credential, op)| HostRequest {
            volume,
            partition,
            epoch,
            credential,
            op,
        })
}

pub fn host_error() -> impl Strategy<Value = HostError> {
    prop_oneof![
        proptest::option::of(node_hint()).prop_map(|hint| HostError::NotPrimary { hint }),
        any::<u64>().prop_map(|current| HostError::StaleEpoch { current }),
        any::<u64>().prop_map(|current| HostError::Fenced { current }),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(offset_bytes, len, partition_start, partition_end)| HostError::OutOfRange {
                offset_bytes,
                len_bytes: len,
                partition_start_bytes: partition_start,
                partition_end_bytes: partition_end
            }
        ),
        any::<u64>().prop_map(|offset_bytes| HostError::ChecksumMismatch { offset_bytes }),
        text().prop_map(|reason| HostError::Unavailable { reason }),
        text().prop_map(|reason| HostError::BadRequest { reason }),
        text().prop_map(|reason| HostError::Io { reason }),
        any::<u64>().prop_map(|attachment| HostError::Unauthorized { attachment }),
    ]
}

pub fn host_reply() -> impl Strategy<Value = HostReply> {
    prop_oneof![
        (payload(), crcs()).prop_map(|(data, crcs)| HostReply::Data { data, crcs }),
        Just(HostReply::Done),
        any::<u64>().prop_map(|cut| HostReply::Cut { cut }),
        (
            vec(
                (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                    |(offset_bytes, len_bytes, zero)| ChangedRange {
                        offset_bytes,
                        len_bytes,
                        zero,
                    }
                ),
                0..8
            ),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(ranges, next_offset_bytes)| HostReply::Diff {
                ranges,
                next_offset_bytes,
            }),
        vec(
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(snapshot, cut, pinned_bytes, exclusive_bytes)| SnapshotUsage {
                    snapshot,
                    cut,
                    pinned_bytes,
                    exclusive_bytes,
                }
            ),
            0..8
        )
        .prop_map(|snapshots| HostReply::SnapshotUsage { snapshots }),
        host_error().prop_map(HostReply::Error),
    ]
}

pub fn replica_record() -> impl Strategy<Value = ReplicaRecord> {
    (
        any::<u64>(),
        prop_oneof![
            Just(ReplicaRecordKind::Write),
            Just(ReplicaRecordKind::Unmap),
            Just(ReplicaRecordKind::Snapshot),
            Just(ReplicaRecordKind::Direct)
        ],
        any::<u64>(),
        any::<u32>(),
        crcs(),
        payload(),
    )
        .prop_map(|(sequence, kind, lba, blocks, crcs, data)| ReplicaRecord {
            sequence,
            kind,
            lba,
            blocks,
            crcs,
            data,
        })
}

pub fn flushed_range() -> impl Strategy<Value = FlushedRange> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u16>(),
        any::<u64>(),
    )
        .prop_map(
            |(lba, blocks, sequence, extent, column, offset_bytes)| FlushedRange {
                lba,
                blocks,
                sequence,
                extent,
                column,
                offset_bytes,
            },
        )
}

pub fn replica_request() -> impl Strategy<Value = ReplicaRequest> {
    prop_oneof![
        (partition(), any::<u64>(), vec(replica_record(), 0..4)).prop_map(
            |(partition, epoch, records)| ReplicaRequest::Append {
                partition,
                epoch,
                records
            }
        ),
        (
            partition(),
            any::<u64>(),
            any::<u64>(),
            vec(flushed_range(), 0..6)
        )
            .prop_map(|(partition, epoch, up_to_sequence, mappings)| {
                ReplicaRequest::FlushCommit {
                    partition,
                    epoch,
                    up_to_sequence,
                    mappings,
                }
            }),
        partition().prop_map(|partition| ReplicaRequest::Status { partition }),
    ]
}

pub fn replica_error() -> impl Strategy<Value = ReplicaError> {
    prop_oneof![
        any::<u64>().prop_map(|current| ReplicaError::StaleEpoch { current }),
        any::<u64>().prop_map(|expected_sequence| ReplicaError::Gap { expected_sequence }),
        Just(ReplicaError::NotSecondary),
        Just(ReplicaError::LogFull),
        text().prop_map(|reason| ReplicaError::Io { reason }),
        text().prop_map(|reason| ReplicaError::BadRequest { reason }),
    ]
}

pub fn replica_reply() -> impl Strategy<Value = ReplicaReply> {
    prop_oneof![
        any::<u64>().prop_map(|up_to_sequence| ReplicaReply::Appended { up_to_sequence }),
        Just(ReplicaReply::Committed),
        (any::<u64>(), any::<u64>()).prop_map(|(highest_epoch, highest_sequence)| {
            ReplicaReply::Status {
                highest_epoch,
                highest_sequence,
            }
        }),
        replica_error().prop_map(ReplicaReply::Error),
    ]
}
