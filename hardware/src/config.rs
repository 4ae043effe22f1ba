//! Reading a daemon's TOML config file.
//!
//! The sled controller and the head node load their configs the same way:
//! read the file, parse it into a `#[serde(deny_unknown_fields)]` struct,
//! then let the daemon validate field values. One error type names the file
//! or the field that is wrong.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
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

/// Reads and parses `path`; the caller validates the values.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}
