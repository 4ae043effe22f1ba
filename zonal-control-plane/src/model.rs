//! Records of the zonal store and the pure rules over them: what a valid
//! volume spec is, how much raw capacity a volume needs, and placement.
//!
//! Volume life cycle:
//!
//! ```text
//!  create ──▶ Creating ──RegisterVolume applied──▶ Available ──delete──▶ Deleting
//!               │  (the name and id are reserved      │                      │
//!               │   before the unit is asked)         │   DeleteVolume applied (the
//!               │                                     │   unit frees the columns in
//!               │                                     │   the background) ──▶ Deleted
//!               │                                     └─ attach/detach (attachments)
//!               ├─ unit refused / unreachable ──▶ record removed (name free again)
//!               └─ outcome unknown ──▶ stays Creating; repeating the same create
//!                  re-sends RegisterVolume with the same id (an AlreadyExists for
//!                  that id means the first attempt was applied)
//! ```
//!
//! Delete is refused while attachments exist unless forced (the unit then
//! revokes them). A unit that cannot be reached leaves the record
//! `Deleting`; repeating the delete settles it. A delete the unit refuses
//! restores the previous state.
//!
//! Placement ([`rank_units`]) is a pure function of the last unit reports:
//! among reachable units that offer the erasure code and whose allocatable
//! bytes hold `size × (k+m)/k`, the most allocatable bytes first, then the
//! fewest volumes, then the name (deterministic).

use std::fmt;

use proto::BLOCK_SIZE_BYTES;
use serde::{Deserialize, Serialize};

/// Default partition size: 1 GiB.
pub const DEFAULT_PARTITION_SIZE_BYTES: u64 = 1 << 30;
/// Default erasure code.
pub const DEFAULT_ERASURE_CODE: ErasureCode = ErasureCode { k: 4, m: 2 };
/// Longest volume or host name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// `k` data + `m` parity columns per extent; written "k+m" on the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErasureCode {
    pub k: u8,
    pub m: u8,
}

impl ErasureCode {
    /// Parses "k+m" with k >= 1, m >= 1 and k+m within the unit's bound.
    pub fn parse(text: &str) -> Result<ErasureCode, String> {
        let bad = || {
            format!(
                "{text:?} is not \"k+m\" with k >= 1, m >= 1 and k+m <= {}",
                local_control_plane::state::MAX_CODE_WIDTH
            )
        };
        let (k, m) = text.trim().split_once('+').ok_or_else(bad)?;
        let k: u8 = k.trim().parse().map_err(|_| bad())?;
        let m: u8 = m.trim().parse().map_err(|_| bad())?;
        let code = ErasureCode { k, m };
        if k == 0 || m == 0 || code.width() > local_control_plane::state::MAX_CODE_WIDTH {
            return Err(bad());
        }
        Ok(code)
    }

    pub fn width(self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }
}

impl fmt::Display for ErasureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

impl From<hardware::rack::ErasureCode> for ErasureCode {
    fn from(code: hardware::rack::ErasureCode) -> Self {
        ErasureCode {
            k: code.k,
            m: code.m,
        }
    }
}

/// What a create request asks for; two creates with the same name are the
/// same request when their specs are equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub size_bytes: u64,
    pub partition_size_bytes: u64,
    pub erasure_code: ErasureCode,
    /// QoS limits (IOPS, bandwidth, bursts) the unit records with the
    /// volume and attach agents enforce; `None`: unlimited. Changed by
    /// `modify` afterwards (the spec is the volume as it is now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<proto::qos::VolumeQos>,
    /// A writable clone of this snapshot (`"from_snapshot": "VOL@SNAP"`):
    /// created in the parent's unit with the parent's size, partition
    /// size and erasure code; its unwritten blocks read as the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<SnapshotSource>,
}

/// The parent snapshot of a clone: snapshot `snapshot` of volume `volume`
/// (names), and the parent's id in its unit once resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSource {
    pub volume: String,
    pub snapshot: String,
    /// The parent volume's id (filled in by the create).
    #[serde(default)]
    pub volume_id: u64,
}

impl SnapshotSource {
    /// Parses `VOL@SNAP`.
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        match text.split_once('@') {
            Some((volume, snapshot)) if !volume.is_empty() && !snapshot.is_empty() => Ok(Self {
                volume: volume.to_owned(),
                snapshot: snapshot.to_owned(),
                volume_id: 0,
            }),
            _ => Err(FieldError::new(
                "from_snapshot",
                format!("{text:?} is not VOLUME@SNAPSHOT"),
            )),
        }
    }
}

impl std::fmt::Display for SnapshotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

/// A change of a volume's QoS limits (`PATCH /v1/volumes/{name}`, JSON
/// merge-patch style): per field `None` keeps it, `Some(None)` removes
/// it, `Some(Some(v))` sets it; `clear_all` first removes every limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QosPatch {
    pub clear_all: bool,
    pub iops: Option<Option<u64>>,
    pub bandwidth_bytes_per_second: Option<Option<u64>>,
    pub burst_iops: Option<Option<u64>>,
    pub burst_bandwidth_bytes_per_second: Option<Option<u64>>,
    pub burst_length_ms: Option<Option<u64>>,
}

impl QosPatch {
    /// The limits after the patch (`None`: unlimited). Not validated.
    pub fn apply(&self, current: Option<proto::qos::VolumeQos>) -> Option<proto::qos::VolumeQos> {
        let mut qos = if self.clear_all {
            proto::qos::VolumeQos::default()
        } else {
            current.unwrap_or_default()
        };
        let set = |field: &mut Option<u64>, change: Option<Option<u64>>| {
            if let Some(value) = change {
                *field = value;
            }
        };
        set(&mut qos.iops, self.iops);
        set(
            &mut qos.bandwidth_bytes_per_second,
            self.bandwidth_bytes_per_second,
        );
        set(&mut qos.burst_iops, self.burst_iops);
        set(
            &mut qos.burst_bandwidth_bytes_per_second,
            self.burst_bandwidth_bytes_per_second,
        );
        set(&mut qos.burst_length_ms, self.burst_length_ms);
        qos.normalized()
    }
}

/// A field of a request that is not acceptable, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        FieldError {
            field,
            reason: reason.into(),
        }
    }
}

/// Names: 1..=128 bytes of ASCII letters, digits, '.', '_' and '-', not
/// starting with '.' or '-' (they end up in URLs, NBD export names and logs).
pub fn check_name(field: &'static str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be 1..={MAX_NAME_BYTES} bytes"),
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(FieldError::new(field, "must not start with '.' or '-'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(FieldError::new(
            field,
            format!("character {bad:?} not allowed (letters, digits, '.', '_', '-')"),
        ));
    }
    Ok(())
}

/// A size field: positive multiple of [`BLOCK_SIZE_BYTES`] (the volume block
/// size).
pub fn check_size(field: &'static str, bytes: u64) -> Result<(), FieldError> {
    if bytes == 0 || bytes % BLOCK_SIZE_BYTES != 0 {
        return Err(FieldError::new(
            field,
            format!("{bytes} is not a positive multiple of {BLOCK_SIZE_BYTES}"),
        ));
    }
    Ok(())
}

impl VolumeSpec {
    /// Checks everything the unit would check, so that bad input is a 400
    /// from here and never a round trip to a unit.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_name("name", &self.name)?;
        check_size("size_bytes", self.size_bytes)?;
        check_size("partition_size_bytes", self.partition_size_bytes)?;
        let partitions = self.size_bytes.div_ceil(self.partition_size_bytes);
        let bound = local_control_plane::state::MAX_PARTITIONS_PER_VOLUME;
        if partitions > bound {
            return Err(FieldError::new(
                "size_bytes",
                format!("{partitions} partitions of {} bytes exceed the bound of {bound}; use a larger partition_size_bytes", self.partition_size_bytes),
            ));
        }
        if raw_bytes(self.size_bytes, self.erasure_code).is_none() {
            return Err(FieldError::new("size_bytes", "too large"));
        }
        check_qos(self.qos.as_ref())
    }
}

/// QoS limits as the unit would check them (`qos.FIELD` names the field).
pub fn check_qos(qos: Option<&proto::qos::VolumeQos>) -> Result<(), FieldError> {
    let Some(qos) = qos else { return Ok(()) };
    qos.validate().map_err(|error| {
        let field = match error.field() {
            "iops" => "qos.iops",
            "burst_iops" => "qos.burst_iops",
            "bandwidth_bytes_per_second" => "qos.bandwidth_bytes_per_second",
            "burst_bandwidth_bytes_per_second" => "qos.burst_bandwidth_bytes_per_second",
            _ => "qos.burst_length_ms",
        };
        FieldError::new(field, error.to_string())
    })
}

impl VolumeSpec {
    /// Raw bytes the volume occupies on sleds once fully written.
    pub fn raw_bytes(&self) -> u64 {
        raw_bytes(self.size_bytes, self.erasure_code).unwrap_or(u64::MAX)
    }
}

/// `size × (k+m)/k`, rounded up; `None` if it does not fit in a u64.
pub fn raw_bytes(size_bytes: u64, code: ErasureCode) -> Option<u64> {
    if code.k == 0 {
        return None;
    }
    let raw = u128::from(size_bytes) * (u128::from(code.k) + u128::from(code.m));
    u64::try_from(raw.div_ceil(u128::from(code.k))).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    Creating,
    Available,
    /// Delete requested, not yet confirmed by the unit (repeat the delete).
    Deleting,
    Deleted,
}

impl VolumeState {
    pub const ALL: [VolumeState; 4] = [
        VolumeState::Creating,
        VolumeState::Available,
        VolumeState::Deleting,
        VolumeState::Deleted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Available => "available",
            VolumeState::Deleting => "deleting",
            VolumeState::Deleted => "deleted",
        }
    }
}

/// One host's attachment of a volume. The token is returned once, by the
/// attach call, and kept nowhere: the store holds its SHA-256 (as the unit
/// does); listings show neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: u64,
    pub host: String,
    /// SHA-256 of the token, 64 hex digits. (Records written before this
    /// field held the token itself under `token`.)
    #[serde(alias = "token")]
    pub token_sha256: String,
    pub created_at_ms: u64,
}

/// A volume as the zonal store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Allocated monotonically by the zonal store, never reused; also the
    /// unit's volume id.
    pub id: u64,
    pub spec: VolumeSpec,
    pub unit: String,
    pub state: VolumeState,
    pub created_at_ms: u64,
    pub attachments: Vec<Attachment>,
}

/// Capacity of a unit as its last report gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub free_bytes: u64,
    pub used_bytes: u64,
    /// Free bytes on Up devices of Up sleds: what new extents can use.
    pub allocatable_bytes: u64,
}

/// The zonal plane's view of a unit, refreshed by every poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub name: String,
    /// The last poll got an answer.
    pub reachable: bool,
    /// "ok" (every head node and sled Up), "degraded", "unreachable", or
    /// "unknown" (never polled).
    pub health: String,
    /// Name of the LCP leader at the last successful report.
    pub leader: Option<String>,
    /// Capacity at the last successful report (kept while unreachable).
    pub capacity: Capacity,
    pub head_nodes_up: usize,
    pub head_nodes: usize,
    pub sleds_up: usize,
    pub sleds: usize,
    /// Volumes the unit's LCP knows.
    pub lcp_volumes: usize,
    /// Time of the last successful report (unix ms).
    pub reported_at_ms: Option<u64>,
    /// Time of the last poll, answered or not (unix ms).
    pub checked_at_ms: Option<u64>,
    /// Why the last poll failed.
    pub last_error: Option<String>,
}

impl UnitRecord {
    /// A configured unit that was never polled.
    pub fn unknown(name: &str) -> UnitRecord {
        UnitRecord {
            name: name.to_owned(),
            reachable: false,
            health: "unknown".into(),
            leader: None,
            capacity: Capacity::default(),
            head_nodes_up: 0,
            head_nodes: 0,
            sleds_up: 0,
            sleds: 0,
            lcp_volumes: 0,
            reported_at_ms: None,
            checked_at_ms: None,
            last_error: None,
        }
    }
}

/// A unit as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub reachable: bool,
    pub allocatable_bytes: u64,
    /// Live volumes the zonal store placed there.
    pub volumes: usize,
    /// Erasure codes the unit's rack offers.
    pub codes: Vec<ErasureCode>,
    /// Must not be chosen (e.g. a volume of the same name is still being
    /// deleted there and holds the name until the unit confirms).
    pub excluded: bool,
}

/// Units that can take a volume needing `raw_bytes` with `code`, best first;
/// or, if none can, why each was passed over.
pub fn rank_units(
    candidates: &[Candidate],
    raw_bytes: u64,
    code: ErasureCode,
) -> Result<Vec<String>, String> {
    let mut fitting: Vec<&Candidate> = Vec::new();
    let mut reasons = Vec::new();
    for c in candidates {
        let why = if !c.reachable {
            Some("unreachable".to_owned())
        } else if c.excluded {
            Some("still deleting a volume of that name".to_owned())
        } else if !c.codes.contains(&code) {
            Some(format!("does not offer erasure code {code}"))
        } else if c.allocatable_bytes < raw_bytes {
            Some(format!(
                "{} allocatable bytes < {raw_bytes} needed",
                c.allocatable_bytes
            ))
        } else {
            None
        };
        match why {
            Some(why) => reasons.push(format!("{}: {why}", c.name)),
            None => fitting.push(c),
        }
    }
    if fitting.is_empty() {
        if reasons.is_empty() {
            return Err("the zone has no units".into());
        }
        return Err(reasons.join("; "));
    }
    fitting.sort_by(|a, b| {
        b.allocatable_bytes
            .cmp(&a.allocatable_bytes)
            .then(a.volumes.cmp(&b.volumes))
            .then(a.name.cmp(&b.name))
    });
    Ok(fitting.into_iter().map(|c| c.name.clone()).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn unit(name: &str, free: u64, volumes: usize) -> Candidate {
        Candidate {
            name: name.into(),
            reachable: true,
            allocatable_bytes: free,
            volumes,
            codes: vec![DEFAULT_ERASURE_CODE],
            excluded: false,
        }
    }

    #[test]
    fn codes_and_raw_bytes() {
        assert_eq!(
            ErasureCode::parse("4+2").unwrap(),
            ErasureCode { k: 4, m: 2 }
        );
        assert_eq!(ErasureCode::parse(" 10 + 4 ").unwrap().to_string(), "10+4");
        for bad in ["", "4", "0+2", "4+0", "4-2", "30+3", "a+b"] {
            assert!(ErasureCode::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(raw_bytes(4096, DEFAULT_ERASURE_CODE), Some(6144));
        assert_eq!(raw_bytes(1, ErasureCode { k: 3, m: 1 }), Some(2));
        assert_eq!(raw_bytes(u64::MAX, DEFAULT_ERASURE_CODE), None);
    }

    #[test]
    fn spec_validation_names_the_field() {
        let ok = VolumeSpec {
            name: "vol-0".into(),
            size_bytes: 1 << 30,
            partition_size_bytes: DEFAULT_PARTITION_SIZE_BYTES,
            erasure_code: DEFAULT_ERASURE_CODE,
            qos: None,
            from_snapshot: None,
        };
        assert!(ok.validate().is_ok());
        let field = |spec: VolumeSpec| spec.validate().unwrap_err().field;
        assert_eq!(
            field(VolumeSpec {
                qos: Some(proto::qos::VolumeQos {
                    iops: Some(1000),
                    burst_iops: Some(10),
                    ..Default::default()
                }),
                ..ok.clone()
            }),
            "qos.burst_iops"
        );
        assert_eq!(
            field(VolumeSpec {
                qos: Some(proto::qos::VolumeQos {
                    bandwidth_bytes_per_second: Some(0),
                    ..Default::default()
                }),
                ..ok.clone()
            }),
            "qos.bandwidth_bytes_per_second"
        );

        assert_eq!(
            field(VolumeSpec {
                size_bytes: 0,
                ..ok.clone()
            }),
            "size_bytes"
        );
        assert_eq!(
            field(VolumeSpec {
                size_bytes: 4097,
                ..ok.clone()
            }),
            "size_bytes"
        );
        assert_eq!(
            field(VolumeSpec {
                partition_size_bytes: 100,
                ..ok.clone()
            }),
            "partition_size_bytes"
        );
        assert_eq!(
            field(VolumeSpec {
                name: "a b".into(),
                ..ok.clone()
            }),
            "name"
        );
        assert_eq!(
            field(VolumeSpec {
                name: "-x".into(),
                ..ok.clone()
            }),
            "name"
        );
        assert_eq!(
            field(VolumeSpec {
                size_bytes: 1 << 40,
                partition_size_bytes: 4096,
                ..ok
            }),
            "size_bytes"
        );
    }

    #[test]
    fn ranking_prefers_free_space_then_fewer_volumes() {
        let units = [unit("a", 100, 0), unit("b", 300, 5), unit("c", 300, 1)];
        assert_eq!(
            rank_units(&units, 50, DEFAULT_ERASURE_CODE).unwrap(),
            ["c", "b", "a"]
        );
        assert_eq!(
            rank_units(&units, 200, DEFAULT_ERASURE_CODE).unwrap(),
            ["c", "b"]
        );
        let err = rank_units(&units, 1000, DEFAULT_ERASURE_CODE).unwrap_err();
        assert!(err.contains("a: 100 allocatable bytes"), "{err}");
        let mut down = unit("d", 1000, 0);
        down.reachable = false;
        let err = rank_units(&[down], 1, DEFAULT_ERASURE_CODE).unwrap_err();
        assert!(err.contains("d: unreachable"), "{err}");
        let err = rank_units(&units, 1, ErasureCode { k: 8, m: 3 }).unwrap_err();
        assert!(err.contains("does not offer erasure code 8+3"), "{err}");
        assert!(rank_units(&[], 1, DEFAULT_ERASURE_CODE).is_err());
    }

    proptest! {
        /// The first choice fits, is eligible, and no eligible unit has more
        /// allocatable bytes; every eligible unit is ranked.
        #[test]
        fn first_choice_is_an_eligible_unit_with_the_most_space(
            units in proptest::collection::vec((0u64..1000, 0usize..5, any::<bool>(), any::<bool>()), 0..8),
            needed in 0u64..1000,
        ) {
            let candidates: Vec<Candidate> = units.iter().enumerate().map(|(i, (free, volumes, reachable, excluded))| Candidate {
                reachable: *reachable,
                excluded: *excluded,
                ..unit(&format!("u{i}"), *free, *volumes)
            }).collect();
            let eligible: Vec<&Candidate> = candidates.iter()
                .filter(|c| c.reachable && !c.excluded && c.allocatable_bytes >= needed)
                .collect();
            match rank_units(&candidates, needed, DEFAULT_ERASURE_CODE) {
                Ok(ranked) => {
                    prop_assert_eq!(ranked.len(), eligible.len());
                    let first = candidates.iter().find(|c| c.name == ranked[0]).unwrap();
                    prop_assert!(eligible.iter().any(|c| c.name == first.name));
                    prop_assert!(eligible.iter().all(|c| c.allocatable_bytes <= first.allocatable_bytes));
                }
                Err(_) => prop_assert!(eligible.is_empty()),
            }
        }
    }
}
