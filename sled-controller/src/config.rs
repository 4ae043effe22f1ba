//! Configuration of `rackblock sled-controller --config FILE`.
//!
//! A small TOML file; everything about the hardware (addresses, devices,
//! column size) lives in the rack file it points to, so the two cannot
//! disagree. Unknown fields are errors. Example:
//! `deploy/sled-controller.example.toml`.

use std::path::{Path, PathBuf};

use hardware::EngineChoice;
use serde::Deserialize;

/// Default scrub rate: 32 MiB/s.
pub const DEFAULT_SCRUB_BYTES_PER_SECOND: u64 = 32 << 20;
/// Default pause between scrub passes: one minute.
pub const DEFAULT_SCRUB_PASS_INTERVAL_MS: u64 = 60_000;

/// Default deadline of one device operation: a device that does not
/// complete an operation within it is failed (hardware::TimedDevice).
pub const DEFAULT_DEVICE_TIMEOUT_MS: u64 = hardware::DEFAULT_DEVICE_TIMEOUT.as_millis() as u64;
/// Smallest deadline accepted: below it a busy but healthy disk would be
/// failed.
pub const MIN_DEVICE_TIMEOUT_MS: u64 = 100;

fn default_device_timeout_ms() -> u64 {
    DEFAULT_DEVICE_TIMEOUT_MS
}

fn default_scrub_bytes_per_second() -> u64 {
    DEFAULT_SCRUB_BYTES_PER_SECOND
}

fn default_scrub_pass_interval_ms() -> u64 {
    DEFAULT_SCRUB_PASS_INTERVAL_MS
}

/// `rackblock sled-controller --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SledControllerConfig {
    /// The unit's rack description (`hardware::rack::Rack` TOML): addresses
    /// on networks A and B, admin address, devices and column size.
    pub rack_file: PathBuf,
    /// Which `[[sled]]` of the rack file this process is.
    pub sled_id: String,
    /// I/O engine: "auto" | "uring" | "sync". Default: `RACKBLOCK_IO_ENGINE`,
    /// else auto (io_uring, falling back to pread/pwrite).
    #[serde(default)]
    pub io_engine: Option<String>,
    /// Background scrub rate in bytes per second; 0 disables the scrubber.
    #[serde(default = "default_scrub_bytes_per_second")]
    pub scrub_bytes_per_second: u64,
    /// Pause between two scrub passes, in milliseconds.
    #[serde(default = "default_scrub_pass_interval_ms")]
    pub scrub_pass_interval_ms: u64,
    /// Deadline of one device operation in milliseconds; a device that
    /// does not complete an operation in time (a hung disk) is marked
    /// failed like one returning I/O errors. At least 100.
    #[serde(default = "default_device_timeout_ms")]
    pub device_timeout_ms: u64,
    /// Directory of the unit's credentials (`proto::auth`: this sled reads
    /// `sled.<sled_id>.key` there). Default: `credentials/` beside the rack
    /// file. The sled controller does not start without its key.
    #[serde(default)]
    pub credentials_dir: Option<PathBuf>,
    /// **Tests only** (never set in production): every device is wrapped in
    /// a fault-injection device driven by this file, read every 100 ms
    /// (`hardware::FaultControl::follow_file`): `eio` fails every write
    /// with EIO (the store then fails the device: its columns answer
    /// `DeviceFailed`), `hang` delays every operation by an hour
    /// (`device_timeout_ms` fails the device), anything else (an empty or
    /// missing file) is healthy. A failed device stays failed until the
    /// sled controller restarts. The head node's write log has the same
    /// hook (`RACKBLOCK_TEST_WAL_FAULT_FILE`).
    #[serde(default)]
    pub fault_control_file: Option<PathBuf>,
}

pub use hardware::config::ConfigError;

impl SledControllerConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        hardware::config::load_toml(path, Self::validate)
    }

    /// Where the unit's credentials are (`credentials_dir`).
    pub fn credentials_dir(&self) -> PathBuf {
        self.credentials_dir
            .clone()
            .unwrap_or_else(|| proto::auth::default_credentials_dir(&self.rack_file))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sled_id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "sled_id",
                reason: "must not be empty".into(),
            });
        }
        if self.device_timeout_ms < MIN_DEVICE_TIMEOUT_MS {
            return Err(ConfigError::Invalid {
                field: "device_timeout_ms",
                reason: format!(
                    "{} is below the minimum of {MIN_DEVICE_TIMEOUT_MS}",
                    self.device_timeout_ms
                ),
            });
        }
        self.engine()?;
        Ok(())
    }

    /// The deadline of one device operation.
    pub fn device_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.device_timeout_ms)
    }

    /// The I/O engine to use (config, else the environment, else auto).
    pub fn engine(&self) -> Result<EngineChoice, ConfigError> {
        match &self.io_engine {
            Some(value) => value
                .parse()
                .map_err(|e: hardware::DeviceError| ConfigError::Invalid {
                    field: "io_engine",
                    reason: e.to_string(),
                }),
            None => EngineChoice::from_env().map_err(|e| ConfigError::Invalid {
                field: "io_engine (RACKBLOCK_IO_ENGINE)",
                reason: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: SledControllerConfig =
            toml::from_str("rack_file = \"/r.toml\"\nsled_id = \"s1\"\n").unwrap();
        assert_eq!(c.scrub_bytes_per_second, 32 << 20);
        assert_eq!(c.scrub_pass_interval_ms, 60_000);
        assert_eq!(c.io_engine, None);
        assert_eq!(c.device_timeout_ms, 30_000);
        let hasty = SledControllerConfig {
            device_timeout_ms: 10,
            ..c.clone()
        };
        assert!(matches!(
            hasty.validate(),
            Err(ConfigError::Invalid {
                field: "device_timeout_ms",
                ..
            })
        ));
        assert!(toml::from_str::<SledControllerConfig>(
            "rack_file = \"/r\"\nsled_id = \"s\"\nbogus = 1\n"
        )
        .is_err());
        let bad = SledControllerConfig {
            io_engine: Some("turbo".into()),
            ..c
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                field: "io_engine",
                ..
            })
        ));
    }

    #[test]
    fn example_config_in_deploy_loads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sled-controller.example.toml");
        let c = SledControllerConfig::load(&path).unwrap();
        assert_eq!(c.sled_id, "sled-1");
        assert_eq!(c.io_engine, None, "the engine is the environment's choice");
    }

    /// The code is the one source of defaults: every optional setting the
    /// example states must be the value the daemon uses without it.
    #[test]
    fn example_config_in_deploy_states_only_defaults() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sled-controller.example.toml");
        // Serde fills in the defaults, so the parsed config is what the
        // daemon runs with.
        let resolve = |text: &str| {
            let config: SledControllerConfig = toml::from_str(text).ok()?;
            config.validate().ok()?;
            Some(config)
        };
        let drift = ("device_timeout_ms = ", "device_timeout_ms = 1");
        let drifted = hardware::config::assert_example_at_defaults(&path, &[], drift, resolve);
        assert_eq!(drifted.len(), 1);
    }
}
