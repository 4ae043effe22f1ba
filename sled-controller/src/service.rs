//! The sled: its device stores behind the wire protocol.
//!
//! [`Sled`] maps each [`SledRequest`] to the store of the column's device and
//! the store's answer to a [`SledResponse`]; typed [`SledError`]s travel as
//! `SledResponse::Error`. A device that failed at open or later answers
//! `DeviceFailed` for its columns while the other devices keep serving.
//! Allocation without a device spreads the columns over healthy devices,
//! each next column going to the device with the most free columns left
//! (ties rotate), and is all-or-nothing.
//!
//! [`SledHandler`] adapts a shared `Sled` to `proto::server::Handler` for
//! one network (so requests are counted per network).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::future::{join_all, BoxFuture};
use proto::sled::{
    ColumnId, DeviceInventory, DeviceState, ScrubReport, SledError, SledInventory, SledRequest,
    SledResponse,
};
use proto::Message;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Network};
use crate::scrub::Scrubber;
use crate::store::Store;

/// A device that could not be opened.
#[derive(Debug, Clone)]
pub struct FailedDevice {
    pub device: u16,
    pub path: String,
    pub size_bytes: u64,
    pub reason: String,
}

/// One device slot of the sled.
#[derive(Debug, Clone)]
pub enum DeviceSlot {
    Open(Arc<Store>),
    Failed(FailedDevice),
}

impl DeviceSlot {
    pub fn index(&self) -> u16 {
        match self {
            DeviceSlot::Open(s) => s.device_index(),
            DeviceSlot::Failed(f) => f.device,
        }
    }

    pub fn inventory(&self) -> DeviceInventory {
        match self {
            DeviceSlot::Open(s) => s.inventory(),
            DeviceSlot::Failed(f) => DeviceInventory {
                device: f.device,
                path: f.path.clone(),
                size_bytes: f.size_bytes,
                column_count: 0,
                free_columns: 0,
                state: DeviceState::Failed,
            },
        }
    }

    fn healthy_store(&self) -> Option<&Arc<Store>> {
        match self {
            DeviceSlot::Open(s) if !s.is_failed() => Some(s),
            _ => None,
        }
    }
}

/// All devices of one sled.
#[derive(Debug)]
pub struct Sled {
    sled_id: String,
    column_size_bytes: u64,
    devices: Vec<DeviceSlot>,
    metrics: Arc<Metrics>,
    scrubber: Scrubber,
    rotate: AtomicUsize,
}

fn op_name(request: &SledRequest) -> &'static str {
    match request {
        SledRequest::Inventory => "inventory",
        SledRequest::AllocateColumns { .. } => "allocate",
        SledRequest::FreeColumn { .. } => "free",
        SledRequest::Claim { .. } => "claim",
        SledRequest::Append { .. } => "append",
        SledRequest::Read { .. } => "read",
        SledRequest::ColumnStatus { .. } => "status",
        SledRequest::ScrubReport => "scrub_report",
    }
}

fn result_name(response: &SledResponse) -> &'static str {
    match response {
        SledResponse::Error(e) => match e {
            SledError::Fenced { .. } => "fenced",
            SledError::WrongPartition { .. } => "wrong_partition",
            SledError::NoSuchColumn { .. } => "no_such_column",
            SledError::BadColumnState { .. } => "bad_column_state",
            SledError::OffsetMismatch { .. } => "offset_mismatch",
            SledError::OutOfRange { .. } => "out_of_range",
            SledError::ChecksumMismatch { .. } => "checksum_mismatch",
            SledError::DeviceFailed { .. } => "device_failed",
            SledError::NoSpace => "no_space",
            SledError::BadRequest { .. } => "bad_request",
            SledError::Io { .. } => "io",
        },
        _ => "ok",
    }
}

impl Sled {
    /// `devices` must be indexed by their position (device `i` at `i`).
    pub fn new(
        sled_id: String,
        column_size_bytes: u64,
        devices: Vec<DeviceSlot>,
        metrics: Arc<Metrics>,
    ) -> Self {
        for (i, d) in devices.iter().enumerate() {
            assert_eq!(d.index() as usize, i, "device slots must be in index order");
            metrics.set_device_up(d.index(), d.healthy_store().is_some());
            if let DeviceSlot::Open(s) = d {
                metrics.set_free_columns(s.device_index(), s.free_count());
            }
        }
        let scrubber = Scrubber::new(metrics.clone());
        Self {
            sled_id,
            column_size_bytes,
            devices,
            metrics,
            scrubber,
            rotate: AtomicUsize::new(0),
        }
    }

    pub fn sled_id(&self) -> &str {
        &self.sled_id
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    /// Stores that opened (failed or not).
    pub fn stores(&self) -> Vec<Arc<Store>> {
        self.devices
            .iter()
            .filter_map(|d| match d {
                DeviceSlot::Open(s) => Some(s.clone()),
                DeviceSlot::Failed(_) => None,
            })
            .collect()
    }

    pub fn healthy_device_count(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.healthy_store().is_some())
            .count()
    }

    pub fn inventory(&self) -> SledInventory {
        SledInventory {
            sled_id: self.sled_id.clone(),
            column_size_bytes: self.column_size_bytes,
            devices: self.devices.iter().map(DeviceSlot::inventory).collect(),
        }
    }

    pub fn scrub_report(&self) -> ScrubReport {
        self.scrubber.report()
    }

    /// Runs one full unthrottled scrub pass (tests) and returns the report.
    pub async fn scrub_now(&self) -> ScrubReport {
        self.scrubber
            .pass(&self.stores(), None, &CancellationToken::new())
            .await;
        self.scrubber.report()
    }

    /// The background scrubber loop (see [`Scrubber::run`]).
    pub async fn run_scrubber(
        &self,
        bytes_per_second: u64,
        pass_interval: std::time::Duration,
        cancel: CancellationToken,
    ) {
        self.scrubber
            .run(self.stores(), bytes_per_second, pass_interval, cancel)
            .await;
    }

    fn store(&self, column: ColumnId) -> Result<&Arc<Store>, SledError> {
        match self.devices.get(column.device as usize) {
            None => Err(SledError::NoSuchColumn { column }),
            Some(DeviceSlot::Failed(f)) => Err(SledError::DeviceFailed { device: f.device }),
            Some(DeviceSlot::Open(s)) => Ok(s),
        }
    }

    /// Answers one request.
    pub async fn handle_request(&self, request: SledRequest) -> SledResponse {
        let started = Instant::now();
        let op = op_name(&request);
        let response = match self.dispatch(request).await {
            Ok(r) => r,
            Err(e) => SledResponse::Error(e),
        };
        self.metrics
            .record_op(op, result_name(&response), started.elapsed());
        response
    }

    async fn dispatch(&self, request: SledRequest) -> Result<SledResponse, SledError> {
        Ok(match request {
            SledRequest::Inventory => SledResponse::Inventory(self.inventory()),
            SledRequest::AllocateColumns {
                column_count: count,
                device,
            } => SledResponse::Allocated(self.allocate(count, device).await?),
            SledRequest::FreeColumn {
                column,
                partition,
                epoch,
            } => {
                self.store(column)?
                    .free(column.index, partition, epoch)
                    .await?;
                self.scrubber.forget_column(column, 0);
                SledResponse::Freed
            }
            SledRequest::Claim {
                column,
                partition,
                epoch,
            } => {
                let (epoch, length_bytes) = self
                    .store(column)?
                    .claim(column.index, partition, epoch)
                    .await?;
                if length_bytes == 0 {
                    self.scrubber.forget_column(column, 0);
                }
                SledResponse::Claimed {
                    epoch,
                    length_bytes,
                }
            }
            SledRequest::Append {
                column,
                partition,
                epoch,
                offset_bytes: offset,
                data,
                block_crcs,
            } => {
                let length_bytes = self
                    .store(column)?
                    .append(column.index, partition, epoch, offset, &data, &block_crcs)
                    .await?;
                // Rewritten from `offset` on: older findings there are stale.
                self.scrubber.forget_column(column, offset);
                SledResponse::Appended { length_bytes }
            }
            SledRequest::Read {
                column,
                offset_bytes: offset,
                len_bytes: len,
            } => {
                let read = self
                    .store(column)?
                    .read(column.index, offset, u64::from(len))
                    .await;
                // Corruption a client read found joins the scrub report,
                // so the leader schedules its repair like a scrub finding.
                if let Err(SledError::ChecksumMismatch {
                    column,
                    block_offsets_bytes,
                }) = &read
                {
                    for at in block_offsets_bytes {
                        self.scrubber.record_bad_block(*column, *at);
                    }
                }
                let (data, block_crcs) = read?;
                SledResponse::Data { data, block_crcs }
            }
            SledRequest::ColumnStatus { column } => {
                SledResponse::ColumnStatus(self.store(column)?.status(column.index).await?)
            }
            SledRequest::ScrubReport => SledResponse::ScrubReport(self.scrubber.report()),
        })
    }

    /// Allocates `count` columns, all or nothing.
    pub async fn allocate(
        &self,
        count: u32,
        device: Option<u16>,
    ) -> Result<Vec<ColumnId>, SledError> {
        const MAX_ALLOCATE: u32 = 4096;
        if count == 0 || count > MAX_ALLOCATE {
            return Err(SledError::BadRequest {
                reason: format!("allocate count {count} not in 1..={MAX_ALLOCATE}"),
            });
        }
        if let Some(d) = device {
            let store = match self.devices.get(d as usize) {
                None => {
                    return Err(SledError::BadRequest {
                        reason: format!("no device {d} on sled {}", self.sled_id),
                    })
                }
                Some(DeviceSlot::Failed(_)) => return Err(SledError::DeviceFailed { device: d }),
                Some(DeviceSlot::Open(s)) => s,
            };
            let indexes = store.allocate(count).await?;
            return Ok(indexes
                .into_iter()
                .map(|index| ColumnId { device: d, index })
                .collect());
        }
        // Plan: each column to the healthy device with the most free left.
        let healthy: Vec<&Arc<Store>> = self
            .devices
            .iter()
            .filter_map(DeviceSlot::healthy_store)
            .collect();
        let mut left: Vec<u32> = healthy.iter().map(|s| s.free_count()).collect();
        let mut share = vec![0u32; healthy.len()];
        let n = healthy.len();
        let rotate = if n == 0 {
            0
        } else {
            self.rotate.fetch_add(1, Ordering::Relaxed) % n
        };
        for _ in 0..count {
            let pick = (0..n)
                .map(|k| (k + rotate) % n)
                .filter(|&i| left[i] > 0)
                .max_by_key(|&i| (left[i], std::cmp::Reverse((i + n - rotate) % n)));
            let Some(i) = pick else {
                return Err(SledError::NoSpace);
            };
            left[i] -= 1;
            share[i] += 1;
        }
        let results = join_all(
            healthy
                .iter()
                .zip(&share)
                .filter(|(_, n)| **n > 0)
                .map(|(s, n)| async move { (s, s.allocate(*n).await) }),
        )
        .await;
        let mut out = Vec::with_capacity(count as usize);
        let mut error = None;
        for (store, result) in &results {
            match result {
                Ok(indexes) => out.extend(indexes.iter().map(|&index| ColumnId {
                    device: store.device_index(),
                    index,
                })),
                Err(e) => error = Some(e.clone()),
            }
        }
        if let Some(e) = error {
            // Roll back: an Allocated column can be freed with any epoch.
            for column in &out {
                if let Ok(store) = self.store(*column) {
                    let _ = store
                        .free(
                            column.index,
                            proto::sled::PartitionId {
                                volume: 0,
                                index: 0,
                            },
                            0,
                        )
                        .await;
                }
            }
            return Err(e);
        }
        Ok(out)
    }
}

/// `proto::server::Handler` for one network.
#[derive(Debug, Clone)]
pub struct SledHandler {
    pub sled: Arc<Sled>,
    pub network: Option<Network>,
}

impl proto::server::Handler for SledHandler {
    fn handle(&self, request: Message) -> BoxFuture<'static, Message> {
        let sled = self.sled.clone();
        if let Some(network) = self.network {
            sled.metrics
                .requests_by_network
                .get_or_create(&crate::metrics::NetworkLabels {
                    network: network.name(),
                })
                .inc();
        }
        Box::pin(async move {
            match request {
                // Handled inside the connection's task (no spawn: a hand-off
                // per request cost more CPU than the request itself). A call
                // whose connection breaks still runs to completion (the
                // server is configured with `finish_abandoned_requests`): a
                // mutation abandoned halfway would leave in-memory state
                // behind the device's until the next restart.
                Message::Sled(request) => Message::SledReply(sled.handle_request(request).await),
                other => Message::SledReply(SledResponse::Error(SledError::BadRequest {
                    reason: format!(
                        "sled controller does not serve message kind {:#06x}",
                        other.kind()
                    ),
                })),
            }
        })
    }
}
