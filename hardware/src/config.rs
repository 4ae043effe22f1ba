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

/// Reads and parses `path`, then checks the values with the daemon's
/// `validate`.
pub fn load_toml<T, E>(path: &Path, validate: impl FnOnce(&T) -> Result<(), E>) -> Result<T, E>
where
    T: DeserializeOwned,
    E: From<ConfigError>,
{
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    validate(&config)?;
    Ok(config)
}

/// The settings a config example states at a value other than the code's
/// default, as `key = value` lines.
///
/// Each daemon's example under `deploy/` states optional settings only at
/// their defaults, so that the code stays the one source of every default;
/// each daemon's config tests call this on its example. `resolve` turns
/// config text into the settings the daemon would run with (every default
/// filled in), or `None` if the text is not a valid config. A stated key is
/// at its default when the example without it resolves to the same
/// settings. Keys of tables are tried one level down (`unit.name`); arrays
/// of tables as a whole. Not tried: `site_keys` (settings without a default
/// that an example fills in for a site, such as the units of a zone), and
/// keys the example cannot do without (without them it does not resolve).
///
/// An error if the example itself does not parse or resolve.
pub fn keys_not_at_default<T: PartialEq>(
    example: &str,
    site_keys: &[&str],
    resolve: impl Fn(&str) -> Option<T>,
) -> Result<Vec<String>, String> {
    let table: toml::Table = toml::from_str(example).map_err(|e| e.to_string())?;
    let whole = resolve(example).ok_or("the example is not a valid config")?;
    let mut paths: Vec<(String, Option<String>)> = Vec::new();
    for (key, value) in &table {
        match value {
            toml::Value::Table(inner) => {
                paths.extend(inner.keys().map(|k| (key.clone(), Some(k.clone()))));
            }
            _ => paths.push((key.clone(), None)),
        }
    }
    let mut differing = Vec::new();
    for (key, inner) in paths {
        let dotted = match &inner {
            Some(k) => format!("{key}.{k}"),
            None => key.clone(),
        };
        if site_keys.contains(&dotted.as_str()) {
            continue;
        }
        let mut without = table.clone();
        let removed = match (&inner, without.get_mut(&key)) {
            (Some(k), Some(toml::Value::Table(t))) => t.remove(k),
            (None, _) => without.remove(&key),
            _ => None,
        };
        let Some(removed) = removed else { continue };
        let text = toml::to_string(&without).map_err(|e| e.to_string())?;
        match resolve(&text) {
            Some(settings) if settings != whole => {
                differing.push(format!("{dotted} = {removed}"));
            }
            // At the default, or required.
            _ => {}
        }
    }
    Ok(differing)
}

/// The check each daemon's config tests run on its example under `deploy/`:
/// panics unless the example at `path` states every optional setting at
/// its default ([`keys_not_at_default`] finds nothing). To show the check
/// has teeth, returns what it finds in the example with the text
/// `drift.0` replaced by `drift.1`; the caller asserts on that.
#[track_caller]
pub fn assert_example_at_defaults<T: PartialEq>(
    path: &Path,
    site_keys: &[&str],
    drift: (&str, &str),
    resolve: impl Fn(&str) -> Option<T>,
) -> Vec<String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let differing = keys_not_at_default(&text, site_keys, &resolve)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        differing.is_empty(),
        "{} states settings that are not the code's defaults: {differing:?}; \
         fix the example (or comment the setting out), not the test",
        path.display()
    );
    let drifted = text.replace(drift.0, drift.1);
    keys_not_at_default(&drifted, site_keys, &resolve)
        .unwrap_or_else(|e| panic!("{} with {drift:?}: {e}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        name: String,
        #[serde(default = "ten")]
        count: u32,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        flag: bool,
    }

    fn ten() -> u32 {
        10
    }

    fn resolve(text: &str) -> Option<Example> {
        toml::from_str(text).ok()
    }

    #[test]
    fn keys_not_at_default_names_each_stated_value_that_is_not_the_default() {
        let at_default = "name = \"a\"\ncount = 10\n[inner]\nflag = false\n";
        assert_eq!(
            keys_not_at_default(at_default, &[], resolve).unwrap(),
            Vec::<String>::new()
        );
        let drifted = "name = \"a\"\ncount = 50\n[inner]\nflag = true\n";
        assert_eq!(
            keys_not_at_default(drifted, &[], resolve).unwrap(),
            vec!["count = 50".to_owned(), "inner.flag = true".to_owned()]
        );
        assert_eq!(
            keys_not_at_default(drifted, &["count", "inner.flag"], resolve).unwrap(),
            Vec::<String>::new()
        );
        assert!(keys_not_at_default("count = 1\n", &[], resolve).is_err());
    }
}
