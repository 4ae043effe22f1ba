//! A volume's QoS limits as the unit records them: an IOPS and a bandwidth
//! limit, each with an optional burst. The local control plane keeps them
//! in the volume's replicated record (`SetVolumeQos`) and hands them out
//! with the partition map; the attach agent enforces them
//! (`client/src/qos.rs`: a sustained and a peak [`rate::TokenBucket`]
//! per dimension, requests wait and never fail); the zonal API and the
//! CLI validate them with [`VolumeQos::validate`] before sending.
//!
//! * An operation of up to [`IO_COST_BYTES`] costs one I/O; a larger one
//!   costs one per started 256 KiB (the EBS convention), and its length in
//!   bytes of bandwidth. Flush costs nothing.
//! * With a burst, an idle volume may run at the burst rate for
//!   `burst_length_ms` (default [`DEFAULT_BURST_LENGTH_MS`]) before it
//!   decays to the limit; the burst credit is earned back at the limit.
//!
//! [`rate::TokenBucket`]: crate::rate::TokenBucket

/// An I/O of up to this many bytes costs one I/O of the IOPS limit.
pub const IO_COST_BYTES: u64 = 256 << 10;
/// Burst length when a burst is given without one.
pub const DEFAULT_BURST_LENGTH_MS: u64 = 1_000;
/// Bounds of what a record may hold (far beyond any device; they keep the
/// bucket arithmetic in range).
pub const MAX_IOPS: u64 = 100_000_000;
pub const MAX_BANDWIDTH_BYTES_PER_SECOND: u64 = 1 << 40;
pub const MAX_BURST_LENGTH_MS: u64 = 3_600_000;

/// The QoS limits of one volume; `None` fields are unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(deny_unknown_fields)
)]
pub struct VolumeQos {
    /// Sustained I/Os per second, reads and writes together.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub iops: Option<u64>,
    /// Sustained bytes per second, reads and writes together.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub bandwidth_bytes_per_second: Option<u64>,
    /// Peak I/Os per second while a burst lasts (needs `iops`, at least it).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub burst_iops: Option<u64>,
    /// Peak bytes per second while a burst lasts (needs
    /// `bandwidth_bytes_per_second`, at least it).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub burst_bandwidth_bytes_per_second: Option<u64>,
    /// How long a full burst credit sustains the burst rate (needs a
    /// burst); default [`DEFAULT_BURST_LENGTH_MS`].
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub burst_length_ms: Option<u64>,
}

/// Why a set of limits is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosSpecError {
    #[error("{field} must be at least 1 (leave it out for no limit)")]
    Zero { field: &'static str },
    #[error("{field} {value} is above the bound {max}")]
    TooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{field} needs {needs}")]
    BurstWithoutLimit {
        field: &'static str,
        needs: &'static str,
    },
    #[error("{field} {burst} is below the limit {limit}")]
    BurstBelowLimit {
        field: &'static str,
        limit: u64,
        burst: u64,
    },
    #[error("burst_length_ms needs burst_iops or burst_bandwidth_bytes_per_second")]
    BurstLengthWithoutBurst,
}

impl QosSpecError {
    /// The field at fault (for API errors).
    pub fn field(&self) -> &'static str {
        match self {
            QosSpecError::Zero { field }
            | QosSpecError::TooLarge { field, .. }
            | QosSpecError::BurstWithoutLimit { field, .. }
            | QosSpecError::BurstBelowLimit { field, .. } => field,
            QosSpecError::BurstLengthWithoutBurst => "burst_length_ms",
        }
    }
}

impl VolumeQos {
    /// Nothing limited.
    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bandwidth_bytes_per_second.is_none()
    }

    /// `None` for no limits (how a record stores "unlimited").
    pub fn normalized(self) -> Option<VolumeQos> {
        (!self.is_unlimited()).then_some(self)
    }

    /// The burst length in force.
    pub fn burst_length_ms(&self) -> u64 {
        self.burst_length_ms.unwrap_or(DEFAULT_BURST_LENGTH_MS)
    }

    pub fn validate(&self) -> Result<(), QosSpecError> {
        let bounded = |field: &'static str, value: Option<u64>, max: u64| match value {
            Some(0) => Err(QosSpecError::Zero { field }),
            Some(value) if value > max => Err(QosSpecError::TooLarge { field, value, max }),
            _ => Ok(()),
        };
        bounded("iops", self.iops, MAX_IOPS)?;
        bounded("burst_iops", self.burst_iops, MAX_IOPS)?;
        bounded(
            "bandwidth_bytes_per_second",
            self.bandwidth_bytes_per_second,
            MAX_BANDWIDTH_BYTES_PER_SECOND,
        )?;
        bounded(
            "burst_bandwidth_bytes_per_second",
            self.burst_bandwidth_bytes_per_second,
            MAX_BANDWIDTH_BYTES_PER_SECOND,
        )?;
        bounded("burst_length_ms", self.burst_length_ms, MAX_BURST_LENGTH_MS)?;
        let burst = |field, needs, limit: Option<u64>, burst: Option<u64>| match (limit, burst) {
            (None, Some(_)) => Err(QosSpecError::BurstWithoutLimit { field, needs }),
            (Some(limit), Some(burst)) if burst < limit => Err(QosSpecError::BurstBelowLimit {
                field,
                limit,
                burst,
            }),
            _ => Ok(()),
        };
        burst("burst_iops", "iops", self.iops, self.burst_iops)?;
        burst(
            "burst_bandwidth_bytes_per_second",
            "bandwidth_bytes_per_second",
            self.bandwidth_bytes_per_second,
            self.burst_bandwidth_bytes_per_second,
        )?;
        if self.burst_length_ms.is_some()
            && self.burst_iops.is_none()
            && self.burst_bandwidth_bytes_per_second.is_none()
        {
            return Err(QosSpecError::BurstLengthWithoutBurst);
        }
        Ok(())
    }
}

/// The I/O cost of an operation of `len` bytes (at least one).
pub fn io_cost(len: u64) -> u64 {
    len.div_ceil(IO_COST_BYTES).max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_refused_limits() {
        let ok = VolumeQos {
            iops: Some(1_000),
            burst_iops: Some(3_000),
            burst_length_ms: Some(10_000),
            bandwidth_bytes_per_second: Some(50 << 20),
            ..VolumeQos::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.normalized(), Some(ok));
        assert_eq!(VolumeQos::default().normalized(), None);
        let refused = |qos: VolumeQos| qos.validate().unwrap_err();
        assert_eq!(
            refused(VolumeQos {
                iops: Some(0),
                ..VolumeQos::default()
            }),
            QosSpecError::Zero { field: "iops" }
        );
        assert_eq!(
            refused(VolumeQos {
                iops: Some(100),
                burst_iops: Some(50),
                ..VolumeQos::default()
            })
            .field(),
            "burst_iops"
        );
        assert!(matches!(
            refused(VolumeQos {
                burst_bandwidth_bytes_per_second: Some(1 << 20),
                ..VolumeQos::default()
            }),
            QosSpecError::BurstWithoutLimit { .. }
        ));
        assert_eq!(
            refused(VolumeQos {
                iops: Some(100),
                burst_length_ms: Some(5),
                ..VolumeQos::default()
            }),
            QosSpecError::BurstLengthWithoutBurst
        );
        assert!(matches!(
            refused(VolumeQos {
                iops: Some(MAX_IOPS + 1),
                ..VolumeQos::default()
            }),
            QosSpecError::TooLarge { .. }
        ));
    }

    #[test]
    fn io_costs_count_started_256k() {
        assert_eq!(io_cost(0), 1);
        assert_eq!(io_cost(4096), 1);
        assert_eq!(io_cost(256 << 10), 1);
        assert_eq!(io_cost((256 << 10) + 1), 2);
        assert_eq!(io_cost(1 << 20), 4);
    }
}
