//! Configuration of `rackblock zonal --config FILE`.
//!
//! A small TOML file: where to listen, where the store lives, the API
//! tokens, and the units of the zone.
//!
//! **Tokens.** Every `/v1` request presents a bearer token with a scope:
//! `admin` (everything), `read-only` (GET only) or `attach` (a host's:
//! attach and detach of the volumes its entry lists, for the host it names,
//! nothing else; see `crate::api`). The plane keeps only
//! their SHA-256 digests in memory, and `[[tokens]]` entries give only the
//! digest (`rackblock zonal-token new` makes a token and its entry), so
//! neither the config nor the process holds a usable token; `admin_token`
//! and `admin_token_file` are still read (admin scope) and hashed at load.
//! SHA-256, not a password hash such as argon2: the tokens are 128-bit
//! random strings, which no dictionary or brute force can search, so a slow
//! hash would only slow every request. A unit is described by its rack file
//! (the same file its head nodes and sleds read), so the zonal plane reaches
//! the unit's head nodes on both networks without a second copy of their
//! addresses.
//!
//! **TLS.** With `tls_cert` and `tls_key` the API (and `/health`,
//! `/metrics`) is served over HTTPS only; bearer tokens then never cross
//! the network in clear. Clients trust the CA that signed the certificate
//! (`rackblock --zonal https://… --zonal-ca ca.pem`). Without them it is
//! plain HTTP, for a loopback-only plane. Unknown fields are errors. Example: `deploy/zonal.example.toml`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hardware::config::ConfigError as FileError;
use serde::Deserialize;
use thiserror::Error;

/// Default pause between two polls of a unit's status: 5 s.
pub const DEFAULT_REPORT_INTERVAL_MS: u64 = 5_000;
/// Shortest admin token accepted, in bytes.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

fn default_report_interval_ms() -> u64 {
    DEFAULT_REPORT_INTERVAL_MS
}

/// `rackblock zonal --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZonalConfig {
    /// HTTP address of the API, `/health` and `/metrics` (e.g. "0.0.0.0:9000").
    pub listen: SocketAddr,
    /// Directory of the embedded store (`<data_dir>/zonal.redb`); created
    /// if absent.
    pub data_dir: PathBuf,
    /// Bearer token every `/v1/...` request must present
    /// (`Authorization: Bearer <token>`), at least 16 bytes. Exactly one of
    /// `admin_token` and `admin_token_file` must be set.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// A file holding the admin token (surrounding whitespace ignored); keeps
    /// the secret out of the config file.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Further tokens, by digest and scope (module docs).
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// The units of the zone.
    #[serde(default)]
    pub units: Vec<UnitConfig>,
    /// Pause between two polls of every unit's status, in milliseconds.
    #[serde(default = "default_report_interval_ms")]
    pub report_interval_ms: u64,
    /// Serve the API over HTTPS with this certificate chain (PEM); with
    /// `tls_key`. When set, `listen` speaks only TLS: plain HTTP requests
    /// are closed without an answer (module docs: TLS).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Attachments made by this plane expire this long after they were
    /// made or last renewed (head nodes renew one whenever its host reads
    /// its partition map past half of it, which a running agent does every
    /// 2 s), so the credential of a host that is gone lapses on its own.
    /// 5 s ..= 30 days; default: none (an attachment lasts until detached).
    #[serde(default)]
    pub attachment_ttl_ms: Option<u64>,
}

/// What a zonal API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Every request.
    Admin,
    /// GET requests only (listings, descriptions, unit status).
    ReadOnly,
    /// A host's token: attach (`POST .../attach`) and detach (`DELETE
    /// .../attachments/{id}`) of the volumes the entry lists, with the
    /// entry's `host` (if set) as the attachment's host; nothing else.
    Attach,
}

/// A token the API accepts, known by its SHA-256 only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// SHA-256 of the token, 64 hex digits.
    pub sha256: String,
    pub scope: Scope,
    /// `attach` scope: the volumes (by name) the token may attach and
    /// detach; required, and only for that scope.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// `attach` scope: the only host name its attachments may carry, and
    /// whose attachments alone it may detach (default: any).
    #[serde(default)]
    pub host: Option<String>,
}

/// What one accepted token may do, by its digest (what the API checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub digest: [u8; 32],
    pub scope: Scope,
    /// `Attach` scope: the volumes it may attach and detach.
    pub volumes: BTreeSet<String>,
    /// `Attach` scope: the host its attachments must name.
    pub host: Option<String>,
}

impl TokenGrant {
    fn new(digest: [u8; 32], scope: Scope) -> TokenGrant {
        TokenGrant {
            digest,
            scope,
            volumes: BTreeSet::new(),
            host: None,
        }
    }
}

/// SHA-256 of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).into()
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// One unit (rack) of the zone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConfig {
    /// Name of the unit in the zone's API; should match `[unit] name` of
    /// the rack file (a mismatch is logged, not refused).
    pub name: String,
    /// The unit's rack description (`hardware::rack::Rack` TOML): its head
    /// nodes' addresses on networks A and B and the erasure codes it offers.
    pub rack_file: PathBuf,
    /// Where this zonal plane's operator key for the unit is
    /// (`operator.zonal.key`, else one derived from `unit.key`; see
    /// SECURITY.md). Default: `credentials/` beside the rack file.
    #[serde(default)]
    pub credentials_dir: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the unit's host-port
    /// certificates: every attach answer carries it (`unit_ca_pem`), so an
    /// attach agent reaches the host ports over TLS with no `--unit-ca` of
    /// its own. Default: none (hosts reach the host ports over plain TCP,
    /// or with their own `--unit-ca`).
    #[serde(default)]
    pub host_ca: Option<PathBuf>,
}

/// The operator name the zonal plane authenticates as with every unit.
pub const ZONAL_OPERATOR: &str = "zonal";

/// Why the zonal config cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file cannot be read or parsed, or a field is invalid: the
    /// errors every daemon's config has.
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot read admin_token_file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::File(FileError::Invalid {
        field,
        reason: reason.into(),
    })
}

impl ZonalConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        hardware::config::load_toml(path, Self::validate)
    }

    /// Parses and validates config text (the token file, if any, is read
    /// by [`ZonalConfig::admin_token`]).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| FileError::Parse {
            path: PathBuf::from("<inline>"),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let admin_digests = self.tokens.iter().any(|t| t.scope == Scope::Admin);
        match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "admin_token",
                    "set admin_token or admin_token_file, not both",
                ))
            }
            (None, None) if !admin_digests => {
                return Err(invalid(
                    "admin_token",
                    "one of admin_token, admin_token_file or an admin [[tokens]] entry is required",
                ))
            }
            (Some(token), None) => check_token(token)?,
            (None, Some(_)) | (None, None) => {}
        }
        for token in &self.tokens {
            if parse_digest(&token.sha256).is_none() {
                return Err(invalid("tokens.sha256", "must be 64 hex digits"));
            }
            let attach = token.scope == Scope::Attach;
            if attach && token.volumes.is_empty() {
                return Err(invalid(
                    "tokens.volumes",
                    "an attach-scoped token must list the volumes it may attach",
                ));
            }
            if !attach && (!token.volumes.is_empty() || token.host.is_some()) {
                return Err(invalid(
                    "tokens.volumes",
                    "volumes and host belong to attach-scoped tokens only",
                ));
            }
            if token
                .host
                .as_deref()
                .is_some_and(|h| h.trim().is_empty() || h.len() > 256)
            {
                return Err(invalid("tokens.host", "must be 1..=256 bytes, not blank"));
            }
        }
        if let Some(ttl) = self.attachment_ttl_ms {
            use local_control_plane::state::{MAX_ATTACHMENT_TTL_MS, MIN_ATTACHMENT_TTL_MS};
            if !(MIN_ATTACHMENT_TTL_MS..=MAX_ATTACHMENT_TTL_MS).contains(&ttl) {
                return Err(invalid(
                    "attachment_ttl_ms",
                    format!("must be {MIN_ATTACHMENT_TTL_MS}..={MAX_ATTACHMENT_TTL_MS}"),
                ));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid(
                "tls_cert",
                "tls_cert and tls_key go together: set both or neither",
            ));
        }
        if self.report_interval_ms == 0 {
            return Err(invalid("report_interval_ms", "must be positive"));
        }
        let mut names = BTreeSet::new();
        for unit in &self.units {
            if unit.name.trim().is_empty() || unit.name.len() > 256 {
                return Err(invalid("units.name", "must be 1..=256 bytes, not blank"));
            }
            if !names.insert(unit.name.as_str()) {
                return Err(invalid(
                    "units.name",
                    format!("unit {:?} is listed twice", unit.name),
                ));
            }
        }
        Ok(())
    }

    /// What every accepted token may do, by digest (module docs).
    pub fn token_digests(&self) -> Result<Vec<TokenGrant>, ConfigError> {
        let mut digests = Vec::with_capacity(self.tokens.len() + 1);
        if self.admin_token.is_some() || self.admin_token_file.is_some() {
            digests.push(TokenGrant::new(
                token_digest(&self.admin_token()?),
                Scope::Admin,
            ));
        }
        for token in &self.tokens {
            let digest = parse_digest(&token.sha256)
                .ok_or_else(|| invalid("tokens.sha256", "must be 64 hex digits"))?;
            digests.push(TokenGrant {
                digest,
                scope: token.scope,
                volumes: token.volumes.iter().cloned().collect(),
                host: token.host.clone(),
            });
        }
        Ok(digests)
    }

    /// The admin token: `admin_token`, else the trimmed contents of
    /// `admin_token_file`.
    pub fn admin_token(&self) -> Result<String, ConfigError> {
        match (&self.admin_token, &self.admin_token_file) {
            (Some(token), _) => Ok(token.clone()),
            (None, Some(path)) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                let token = text.trim().to_owned();
                check_token(&token)?;
                Ok(token)
            }
            (None, None) => Err(invalid(
                "admin_token",
                "one of admin_token and admin_token_file is required",
            )),
        }
    }
}

fn check_token(token: &str) -> Result<(), ConfigError> {
    if token.len() < MIN_ADMIN_TOKEN_BYTES {
        return Err(invalid(
            "admin_token",
            format!("must be at least {MIN_ADMIN_TOKEN_BYTES} bytes"),
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "admin_token",
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str = "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/z\"\n";

    #[test]
    fn defaults_unknown_fields_and_token_rules() {
        let c = ZonalConfig::from_toml_str(&format!("{BASE}admin_token = \"0123456789abcdef\"\n"))
            .unwrap();
        assert_eq!(c.report_interval_ms, DEFAULT_REPORT_INTERVAL_MS);
        assert!(c.units.is_empty());
        assert_eq!(c.admin_token().unwrap(), "0123456789abcdef");

        let unknown = ZonalConfig::from_toml_str(&format!(
            "{BASE}admin_token = \"0123456789abcdef\"\nbogus = 1\n"
        ));
        assert!(matches!(
            unknown,
            Err(ConfigError::File(FileError::Parse { .. }))
        ));
        let unknown_in_unit = ZonalConfig::from_toml_str(&format!(
            "{BASE}admin_token = \"0123456789abcdef\"\n[[units]]\nname = \"u\"\nrack_file = \"/r\"\nextra = 2\n"
        ));
        assert!(matches!(
            unknown_in_unit,
            Err(ConfigError::File(FileError::Parse { .. }))
        ));
        let missing = ZonalConfig::from_toml_str(BASE);
        assert!(matches!(
            missing,
            Err(ConfigError::File(FileError::Invalid {
                field: "admin_token",
                ..
            }))
        ));
        let half_tls = ZonalConfig::from_toml_str(&format!(
            "{BASE}admin_token = \"0123456789abcdef\"\ntls_cert = \"/c.pem\"\n"
        ));
        assert!(matches!(
            half_tls,
            Err(ConfigError::File(FileError::Invalid {
                field: "tls_cert",
                ..
            }))
        ));
        let short = ZonalConfig::from_toml_str(&format!("{BASE}admin_token = \"short\"\n"));
        assert!(matches!(
            short,
            Err(ConfigError::File(FileError::Invalid { .. }))
        ));
        let twice = ZonalConfig::from_toml_str(&format!(
            "{BASE}admin_token = \"0123456789abcdef\"\n[[units]]\nname = \"u\"\nrack_file = \"/r\"\n[[units]]\nname = \"u\"\nrack_file = \"/s\"\n"
        ));
        assert!(matches!(
            twice,
            Err(ConfigError::File(FileError::Invalid {
                field: "units.name",
                ..
            }))
        ));
    }

    #[test]
    fn attach_scoped_tokens_list_their_volumes() {
        let digest = "0".repeat(64);
        let entry = |extra: &str, scope: &str| {
            ZonalConfig::from_toml_str(&format!(
                "{BASE}admin_token = \"0123456789abcdef\"\n[[tokens]]\nsha256 = \"{digest}\"\nscope = \"{scope}\"\n{extra}"
            ))
        };
        let ok = entry("volumes = [\"a\", \"b\"]\nhost = \"h1\"\n", "attach").unwrap();
        let grants = ok.token_digests().unwrap();
        assert_eq!(grants[1].scope, Scope::Attach);
        assert_eq!(grants[1].volumes.len(), 2);
        assert_eq!(grants[1].host.as_deref(), Some("h1"));
        for (extra, scope) in [
            ("", "attach"),
            ("volumes = [\"a\"]\n", "admin"),
            ("host = \"h\"\n", "read-only"),
            ("volumes = [\"a\"]\nhost = \" \"\n", "attach"),
        ] {
            assert!(
                matches!(
                    entry(extra, scope),
                    Err(ConfigError::File(FileError::Invalid { .. }))
                ),
                "{scope} with {extra:?} accepted"
            );
        }
        let ttl = |ms: u64| {
            ZonalConfig::from_toml_str(&format!(
                "{BASE}admin_token = \"0123456789abcdef\"\nattachment_ttl_ms = {ms}\n"
            ))
        };
        assert_eq!(ttl(60_000).unwrap().attachment_ttl_ms, Some(60_000));
        assert!(ttl(10).is_err());
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  fedcba9876543210fedcba\n").unwrap();
        let c = ZonalConfig::from_toml_str(&format!(
            "{BASE}admin_token_file = \"{}\"\n",
            path.display()
        ))
        .unwrap();
        assert_eq!(c.admin_token().unwrap(), "fedcba9876543210fedcba");
    }

    #[test]
    fn example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/zonal.example.toml");
        let c = ZonalConfig::load(&path).unwrap();
        assert_eq!(c.units.len(), 1);
    }

    /// The code is the one source of defaults: every optional setting the
    /// example states must be the value the daemon uses without it. The
    /// token and the units have no default; the example fills them in.
    #[test]
    fn example_config_in_deploy_states_only_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/zonal.example.toml");
        // Serde fills in the defaults, so the parsed config is what the
        // daemon runs with.
        let resolve = |text: &str| ZonalConfig::from_toml_str(text).ok();
        let site = [
            "admin_token",
            "admin_token_file",
            "units",
            "tls_cert",
            "tls_key",
            "attachment_ttl_ms",
        ];
        let drift = ("report_interval_ms = ", "report_interval_ms = 1");
        let drifted = hardware::config::assert_example_at_defaults(&path, &site, drift, resolve);
        assert_eq!(drifted.len(), 1);
    }
}
