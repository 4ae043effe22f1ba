//! Operators' index queries of a volume's snapshots: the changed ranges
//! between two views, the allocation map of one view (what an export
//! reads; the rest reads as zeros), and the space each snapshot holds. Used by the CLI
//! (`rackblock snapshot diff|describe|list`) and the zonal plane.
//!
//! ```text
//! LcpClient ── PartitionMap{volume} ──▶ leader: every partition's primary and epoch
//! for each partition, in order:
//!   HostSnapshotDiff{from, to, start, max_ranges} ──▶ its primary's unit port
//!   (or HostSnapshotMap{view, start, max_ranges}: the allocation map)
//!        ◀── HostDiff{ranges, next}     (again from `next` until None)
//!   NotPrimary / StaleEpoch / Fenced / unreachable ─▶ re-read the map, retry
//! ranges ─▶ DiffMerger (adjacent ranges of one kind joined, across pages
//!           and partitions) ─▶ the caller
//! ```
//!
//! The primaries answer from their indexes (no data read), one bounded
//! page at a time ([`DIFF_PAGE_RANGES`] ranges, at most 1 GiB of volume
//! scanned under a partition's lock). The requests go on the unit port
//! with the operator's credential (the head node serves these kinds to
//! operators and head nodes only, never on the host port): they name no
//! attachment and read no data.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::volume::{
    AttachmentCredential, ChangedRange, HostError, HostOp, HostReply, HostRequest,
};
use proto::Message;

use crate::client::{ClientError, LcpClient};
use crate::state::{PartitionMap, VolumeId};

/// Ranges asked for per diff page.
pub const DIFF_PAGE_RANGES: u32 = 4096;
/// Tries per partition request (the map is re-read between them).
const ATTEMPTS: usize = 6;
/// Pause before a retry (a failover takes about this order of time).
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Most pages read from one partition (a guard against a primary whose
/// `next` does not advance).
const MAX_PAGES_PER_PARTITION: usize = 1 << 20;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("volume {volume}'s partition map: {source}")]
    Map {
        volume: VolumeId,
        source: ClientError,
    },
    #[error("partition {volume}/{partition}: {reason}")]
    Partition {
        volume: VolumeId,
        partition: u32,
        reason: String,
    },
}

/// Joins the ranges of a diff read page by page and partition by
/// partition into maximal ranges (adjacent ranges of one kind merged).
/// Ranges must come in offset order and not overlap.
#[derive(Debug, Default)]
pub struct DiffMerger {
    ranges: Vec<ChangedRange>,
}

impl DiffMerger {
    /// Adds the next range (empty ones are ignored).
    pub fn push(&mut self, range: ChangedRange) -> Result<(), String> {
        if range.len_bytes == 0 {
            return Ok(());
        }
        match self.ranges.last_mut() {
            Some(last) if last.offset_bytes + last.len_bytes > range.offset_bytes => Err(format!(
                "range at {} overlaps or precedes the one at {}+{}",
                range.offset_bytes, last.offset_bytes, last.len_bytes
            )),
            Some(last)
                if last.offset_bytes + last.len_bytes == range.offset_bytes
                    && last.zero == range.zero =>
            {
                last.len_bytes += range.len_bytes;
                Ok(())
            }
            _ => {
                self.ranges.push(range);
                Ok(())
            }
        }
    }

    pub fn finish(self) -> Vec<ChangedRange> {
        self.ranges
    }
}

/// One snapshot's space over a volume's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotSpace {
    /// Bytes its copy-on-write layers map.
    pub pinned_bytes: u64,
    /// Bytes no other snapshot maps (what deleting it frees).
    pub exclusive_bytes: u64,
    /// Partitions that hold it.
    pub partitions: u32,
}

fn query(entry_volume: VolumeId, partition: u32, epoch: u64, op: HostOp) -> Message {
    Message::Host(HostRequest {
        volume: entry_volume,
        partition,
        epoch,
        // Not an attachment's: the unit port serves these kinds to
        // authenticated operators and head nodes and checks none.
        credential: AttachmentCredential::NONE,
        op,
    })
}

/// Asks partition `partition`'s primary `op` (built for its epoch),
/// following failovers: the map is re-read after a refusal that says the
/// primary moved, or an unreachable node.
async fn ask(
    client: &LcpClient,
    map: &mut PartitionMap,
    partition: u32,
    op: impl Fn() -> HostOp,
) -> Result<HostReply, QueryError> {
    let volume = map.volume;
    let fail = |reason: String| QueryError::Partition {
        volume,
        partition,
        reason,
    };
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(RETRY_PAUSE).await;
            *map = client
                .partition_map(volume)
                .await
                .map_err(|source| QueryError::Map { volume, source })?;
        }
        let entry = map
            .partitions
            .iter()
            .find(|p| p.index == partition)
            .ok_or_else(|| fail("not in the partition map".into()))?;
        let node = entry.primary.id.0.clone();
        let request = query(volume, partition, entry.epoch, op());
        match client.call_head_node(&node, request).await {
            Ok(Message::HostReply(HostReply::Error(error))) if retryable(&error) => {
                last = format!("{node}: {error}");
            }
            Ok(Message::HostReply(HostReply::Error(error))) => {
                return Err(fail(format!("{node}: {error}")))
            }
            Ok(Message::HostReply(reply)) => return Ok(reply),
            Ok(other) => return Err(fail(format!("{node}: unexpected answer {other:?}"))),
            Err(error) => last = error.to_string(),
        }
    }
    Err(fail(format!("no answer after {ATTEMPTS} tries: {last}")))
}

fn retryable(error: &HostError) -> bool {
    error.needs_map_refresh() || matches!(error, HostError::Unavailable { .. })
}

/// The ranges of volume `volume` that read differently in view `to` than
/// in view `from` (`None`: the live volume, `Some(id)`: snapshot `id`),
/// merged, in offset order (module docs).
pub async fn volume_diff(
    client: &LcpClient,
    volume: VolumeId,
    from: Option<u64>,
    to: Option<u64>,
) -> Result<Vec<ChangedRange>, QueryError> {
    paged_ranges(client, volume, "diff", |start_bytes| HostOp::SnapshotDiff {
        from,
        to,
        start_bytes,
        max_ranges: DIFF_PAGE_RANGES,
    })
    .await
}

/// The allocation map of volume `volume` in view `view` (`None`: the
/// live volume, `Some(id)`: snapshot `id`): the ranges that may hold data,
/// merged, in offset order; every byte outside reads as zeros (never
/// written, or trimmed), so a reader of the view (`snapshot export`)
/// skips it without a read. A clone's ranges still read from its parent
/// snapshot are in (module docs).
pub async fn volume_map(
    client: &LcpClient,
    volume: VolumeId,
    view: Option<u64>,
) -> Result<Vec<ChangedRange>, QueryError> {
    paged_ranges(client, volume, "map", |start_bytes| HostOp::SnapshotMap {
        view,
        start_bytes,
        max_ranges: DIFF_PAGE_RANGES,
    })
    .await
}

/// Every partition's pages of a range query (`page(start_bytes)`, answered
/// [`HostReply::Diff`]), merged.
async fn paged_ranges(
    client: &LcpClient,
    volume: VolumeId,
    what: &str,
    page: impl Fn(u64) -> HostOp,
) -> Result<Vec<ChangedRange>, QueryError> {
    let mut map = client
        .partition_map(volume)
        .await
        .map_err(|source| QueryError::Map { volume, source })?;
    let mut merger = DiffMerger::default();
    let indexes: Vec<u32> = map.partitions.iter().map(|p| p.index).collect();
    for partition in indexes {
        let mut start = u64::from(partition) * map.partition_size_bytes;
        let mut pages = 0;
        loop {
            let reply = ask(client, &mut map, partition, || page(start)).await?;
            let HostReply::Diff {
                ranges,
                next_offset_bytes,
            } = reply
            else {
                return Err(QueryError::Partition {
                    volume,
                    partition,
                    reason: format!("a {what} answered {reply:?}"),
                });
            };
            for range in ranges {
                merger.push(range).map_err(|reason| QueryError::Partition {
                    volume,
                    partition,
                    reason,
                })?;
            }
            pages += 1;
            match next_offset_bytes {
                Some(next) if next > start && pages < MAX_PAGES_PER_PARTITION => start = next,
                Some(next) => {
                    return Err(QueryError::Partition {
                        volume,
                        partition,
                        reason: format!("{what} page at {start} gave next page {next}"),
                    })
                }
                None => break,
            }
        }
    }
    Ok(merger.finish())
}

/// Every snapshot of volume `volume` with the bytes it pins and holds
/// exclusively, summed over the partitions.
pub async fn volume_usage(
    client: &LcpClient,
    volume: VolumeId,
) -> Result<BTreeMap<u64, SnapshotSpace>, QueryError> {
    let mut map = client
        .partition_map(volume)
        .await
        .map_err(|source| QueryError::Map { volume, source })?;
    let mut out: BTreeMap<u64, SnapshotSpace> = BTreeMap::new();
    let indexes: Vec<u32> = map.partitions.iter().map(|p| p.index).collect();
    for partition in indexes {
        match ask(client, &mut map, partition, || HostOp::SnapshotUsage).await? {
            HostReply::SnapshotUsage { snapshots } => {
                for s in snapshots {
                    let space = out.entry(s.snapshot).or_default();
                    space.pinned_bytes += s.pinned_bytes;
                    space.exclusive_bytes += s.exclusive_bytes;
                    space.partitions += 1;
                }
            }
            other => {
                return Err(QueryError::Partition {
                    volume,
                    partition,
                    reason: format!("a usage query answered {other:?}"),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(offset_bytes: u64, len_bytes: u64, zero: bool) -> ChangedRange {
        ChangedRange {
            offset_bytes,
            len_bytes,
            zero,
        }
    }

    /// Pages and partitions split ranges anywhere: the merger joins the
    /// adjacent ones of one kind, keeps a zero range apart from a data
    /// range it touches, and refuses ranges out of order.
    #[test]
    fn merger_joins_split_ranges_of_one_kind_only() {
        let mut m = DiffMerger::default();
        for range in [
            r(0, 4096, false),
            r(4096, 8192, false), // the next page continues it
            r(12288, 4096, true), // touches, but zeros
            r(16384, 0, false),   // empty: ignored
            r(16384, 4096, true), // the next partition continues the zeros
            r(65536, 4096, false),
        ] {
            m.push(range).unwrap();
        }
        assert_eq!(
            m.finish(),
            vec![
                r(0, 12288, false),
                r(12288, 8192, true),
                r(65536, 4096, false)
            ]
        );
        let mut m = DiffMerger::default();
        m.push(r(8192, 4096, false)).unwrap();
        assert!(m.push(r(4096, 4096, false)).is_err());
        assert!(m.push(r(8192, 4096, true)).is_err());
    }
}
