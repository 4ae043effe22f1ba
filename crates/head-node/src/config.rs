//! Configuration of `rackblock head-node --config FILE`.
//!
//! A small TOML file; addresses and membership come from the rack file it
//! points to, so the two cannot disagree. Unknown fields are errors.
//! Example: `deploy/head-node.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use local_control_plane::node::{
    DEFAULT_ELECTION_TIMEOUT_MAX_MS, DEFAULT_ELECTION_TIMEOUT_MIN_MS,
    DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_NODE_DOWN_AFTER_MS,
};
use serde::Deserialize;
use thiserror::Error;

/// `rackblock head-node --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadNodeConfig {
    /// The unit's rack description (`hardware::rack::Rack` TOML): the head
    /// nodes (Raft members, in order: the first 3, or 5, are voters), their
    /// addresses on networks A and B and admin addresses, and the sleds.
    pub rack_file: PathBuf,
    /// Which `[[head_node]]` of the rack file this process is.
    pub head_node_id: String,
    /// Local storage of this head node: the Raft log, vote and state
    /// machine live in `<data_dir>/raft`.
    pub data_dir: PathBuf,
    /// Raft heartbeat interval in milliseconds (default 100).
    #[serde(default)]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomised Raft election timeout in milliseconds
    /// (default 1500). Must exceed the heartbeat interval.
    #[serde(default)]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the election timeout in milliseconds (default 3000).
    #[serde(default)]
    pub election_timeout_max_ms: Option<u64>,
    /// The leader declares a head node or sled Down when both of its
    /// network paths have been down this long, in milliseconds (default
    /// 3000). One path down is only a path fault.
    #[serde(default)]
    pub node_down_after_ms: Option<u64>,
    /// Bind network A here instead of the rack's `address_a`, e.g. behind
    /// a NAT or a test proxy that owns the rack address. Peers still dial
    /// the rack address.
    #[serde(default)]
    pub listen_a: Option<SocketAddr>,
    /// Bind network B here instead of the rack's `address_b` (as `listen_a`).
    #[serde(default)]
    pub listen_b: Option<SocketAddr>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} does not parse: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl HeadNodeConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.head_node_id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "head_node_id",
                reason: "must not be empty".into(),
            });
        }
        let heartbeat = self.heartbeat_interval().as_millis();
        let min = self.election_timeout_min().as_millis();
        let max = self.election_timeout_max().as_millis();
        if heartbeat == 0 {
            return Err(ConfigError::Invalid {
                field: "heartbeat_interval_ms",
                reason: "must be positive".into(),
            });
        }
        if min <= heartbeat {
            return Err(ConfigError::Invalid {
                field: "election_timeout_min_ms",
                reason: format!("{min} must exceed the heartbeat interval {heartbeat}"),
            });
        }
        if max <= min {
            return Err(ConfigError::Invalid {
                field: "election_timeout_max_ms",
                reason: format!("{max} must exceed election_timeout_min_ms {min}"),
            });
        }
        if self.node_down_after().is_zero() {
            return Err(ConfigError::Invalid {
                field: "node_down_after_ms",
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(
            self.heartbeat_interval_ms
                .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS),
        )
    }

    pub fn election_timeout_min(&self) -> Duration {
        Duration::from_millis(
            self.election_timeout_min_ms
                .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MIN_MS),
        )
    }

    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(
            self.election_timeout_max_ms
                .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MAX_MS),
        )
    }

    pub fn node_down_after(&self) -> Duration {
        Duration::from_millis(
            self.node_down_after_ms
                .unwrap_or(DEFAULT_NODE_DOWN_AFTER_MS),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_unknown_fields_and_timings() {
        let c: HeadNodeConfig =
            toml::from_str("rack_file = \"/r.toml\"\nhead_node_id = \"hn-1\"\ndata_dir = \"/d\"\n")
                .unwrap();
        c.validate().unwrap();
        assert_eq!(c.heartbeat_interval(), Duration::from_millis(100));
        assert_eq!(c.election_timeout_min(), Duration::from_millis(1500));
        assert_eq!(c.election_timeout_max(), Duration::from_millis(3000));
        assert_eq!(c.node_down_after(), Duration::from_millis(3000));
        assert!(toml::from_str::<HeadNodeConfig>(
            "rack_file = \"/r\"\nhead_node_id = \"h\"\ndata_dir = \"/d\"\nbogus = 1\n"
        )
        .is_err());
        let bad = HeadNodeConfig {
            election_timeout_min_ms: Some(50),
            ..c.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                field: "election_timeout_min_ms",
                ..
            })
        ));
        let bad = HeadNodeConfig {
            election_timeout_max_ms: Some(300),
            ..c
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn example_config_in_deploy_loads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/head-node.example.toml");
        let c = HeadNodeConfig::load(&path).unwrap();
        assert_eq!(c.head_node_id, "hn-1");
    }
}
