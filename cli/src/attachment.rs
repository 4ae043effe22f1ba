//! `rackblock attachment create|revoke`: attachments minted by an operator
//! for hosts that attach without the zonal plane (`rackblock attach --rack
//! FILE --attachment-file F`), and `rackblock rack init-credentials`.
//!
//! `create` registers a fresh attachment (random id with the top bit set,
//! random 128-bit token; the unit keeps only the token's SHA-256) through
//! the unit's control plane with the operator's credential, and writes the
//! **attachment file** (mode 0600): `volume_id`, `attachment_id` and the
//! token (hex) as `key = value` lines, and `unit_ca_pem`, the PEM of the
//! CA that signed the head nodes' host-port certificates (one line, its
//! newlines written `\n`) when `--unit-ca FILE` (env `RACKBLOCK_UNIT_CA`,
//! which `rackblock up` tells operators to export) names it. That file, the rack file's host ports and nothing else is what the
//! host needs (SECURITY.md): the agent then reaches the host ports over
//! TLS trusting that CA, with no `--unit-ca` of its own. With `--ttl`
//! the attachment expires unless its host keeps reading its partition map
//! (a running agent renews it every 2 s through the head nodes;
//! SECURITY.md: expiring attachments). `revoke`
//! removes the attachment: from then on head nodes refuse its reads,
//! writes and partition-map requests.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use hardware::rack::Rack;
use proto::volume::{AttachmentCredential, AttachmentToken};

use crate::error::CliError;
use crate::ops::RackArg;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub rack: RackArg,
    /// The volume's id in the unit.
    pub volume_id: u64,
    /// Host name recorded with the attachment.
    #[arg(long, default_value = "host")]
    pub host: String,
    /// Write the attachment file here (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The CA certificate (PEM) of the head nodes' host ports, carried in
    /// the attachment file: the host's agent then reaches them over TLS
    /// with no --unit-ca of its own (default: none).
    #[arg(long, env = "RACKBLOCK_UNIT_CA", value_name = "FILE")]
    pub unit_ca: Option<PathBuf>,
    /// The attachment expires this long after it is made unless its host
    /// keeps reading its partition map (a running agent does, every 2 s,
    /// and so renews it); 5s..30d. Default: no expiry.
    #[arg(long, value_parser = crate::text::parse_duration)]
    pub ttl: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub rack: RackArg,
    /// The volume's id in the unit.
    pub volume_id: u64,
    /// The attachment to revoke.
    pub attachment_id: u64,
}

#[derive(Debug, clap::Args)]
pub struct InitCredentialsArgs {
    /// The unit's rack file (its sleds get keys).
    #[arg(long, env = "RACKBLOCK_RACK")]
    pub rack: PathBuf,
    /// Where to write them (default: `credentials/` beside the rack file).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Operator keys to issue (repeatable; default `operator` and `zonal`).
    #[arg(long = "operator")]
    pub operators: Vec<String>,
    /// Make a new unit key (and so every key): restart every member after
    /// copying the new files out (deploy/README.md: rotation).
    #[arg(long)]
    pub rotate: bool,
}

/// What an attachment file holds (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentFile {
    pub volume_id: u64,
    pub credential: AttachmentCredential,
    /// The unit CA's PEM text, if the file carries it.
    pub unit_ca_pem: Option<String>,
}

/// The attachment file's text.
fn file_text(file: &AttachmentFile) -> String {
    let mut text = format!(
        "volume_id = {}\nattachment_id = {}\nattachment_token = \"{}\"\n",
        file.volume_id,
        file.credential.attachment,
        file.credential.token.to_hex()
    );
    if let Some(pem) = &file.unit_ca_pem {
        text.push_str(&format!(
            "unit_ca_pem = \"{}\"\n",
            pem.trim_end().replace('\n', "\\n")
        ));
    }
    text
}

/// The CA an attachment should carry (`create`'s `--unit-ca`, module docs):
/// its PEM text, checked to hold certificates.
fn unit_ca_for(args: &CreateArgs) -> Result<Option<String>, CliError> {
    let Some(path) = &args.unit_ca else {
        return Ok(None);
    };
    let pem = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("--unit-ca {}: {e}", path.display())))?;
    proto::tls::certs_from_pem(pem.as_bytes(), path)
        .map_err(|e| CliError::Usage(format!("--unit-ca: {e}")))?;
    Ok(Some(pem))
}

/// Reads an attachment file.
pub fn read_file(path: &Path) -> Result<AttachmentFile, CliError> {
    let bad = |reason: String| CliError::Usage(format!("{}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let (mut volume, mut attachment, mut token, mut unit_ca_pem) = (None, None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| bad(format!("not `key = value`: {line:?}")))?;
        let value = value.trim().trim_matches('"');
        match key.trim() {
            "volume_id" => volume = Some(value.parse::<u64>().map_err(|e| bad(e.to_string()))?),
            "attachment_id" => {
                attachment = Some(value.parse::<u64>().map_err(|e| bad(e.to_string()))?)
            }
            "attachment_token" => {
                token = Some(AttachmentToken::parse_hex(value).map_err(|e| bad(e.to_string()))?)
            }
            "unit_ca_pem" => {
                let pem = format!("{}\n", value.replace("\\n", "\n"));
                proto::tls::certs_from_pem(pem.as_bytes(), path)
                    .map_err(|e| bad(format!("unit_ca_pem: {e}")))?;
                unit_ca_pem = Some(pem);
            }
            other => return Err(bad(format!("unknown key {other:?}"))),
        }
    }
    match (volume, attachment, token) {
        (Some(volume_id), Some(attachment), Some(token)) => Ok(AttachmentFile {
            volume_id,
            credential: AttachmentCredential { attachment, token },
            unit_ca_pem,
        }),
        _ => Err(bad(
            "needs volume_id, attachment_id and attachment_token".into()
        )),
    }
}

pub async fn create(args: &CreateArgs) -> Result<(), CliError> {
    let rack = args.rack.load()?;
    // Before anything is registered: a bad CA file mints nothing.
    let unit_ca_pem = unit_ca_for(args)?;
    let lcp = crate::unit::client(&rack, args.rack.credential());
    let ttl_ms = args
        .ttl
        .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    let registered =
        client::register_expiring_attachment(&lcp, args.volume_id, &args.host, ttl_ms).await;
    lcp.close();
    let credential = registered.map_err(|e| {
        CliError::Unavailable(format!(
            "cannot register an attachment of volume {}: {e}",
            args.volume_id
        ))
    })?;
    let carries_ca = unit_ca_pem.is_some();
    let text = file_text(&AttachmentFile {
        volume_id: args.volume_id,
        credential,
        unit_ca_pem,
    });
    match &args.out {
        None => print!("{text}"),
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut file| file.write_all(text.as_bytes()));
            written.map_err(|e| CliError::Runtime(format!("{}: {e}", path.display())))?;
            eprintln!(
                "attachment {} of volume {} written to {}{}",
                credential.attachment,
                args.volume_id,
                path.display(),
                if carries_ca {
                    " (with the unit CA)"
                } else {
                    " (no unit CA: the host needs --unit-ca if the host ports require TLS)"
                }
            );
        }
    }
    Ok(())
}

pub async fn revoke(args: &RevokeArgs) -> Result<(), CliError> {
    let rack = args.rack.load()?;
    let lcp = crate::unit::client(&rack, args.rack.credential());
    let removed = client::remove_attachment(&lcp, args.volume_id, args.attachment_id).await;
    lcp.close();
    removed.map_err(|e| CliError::Unavailable(e.to_string()))?;
    eprintln!(
        "attachment {} of volume {} revoked",
        args.attachment_id, args.volume_id
    );
    Ok(())
}

pub fn init_credentials(args: &InitCredentialsArgs) -> Result<(), CliError> {
    let rack = Rack::load(&args.rack)
        .map_err(|e| CliError::Usage(format!("{}: {e}", args.rack.display())))?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| proto::auth::default_credentials_dir(&args.rack));
    let operators = if args.operators.is_empty() {
        vec![proto::auth::DEFAULT_OPERATOR.to_owned(), "zonal".to_owned()]
    } else {
        args.operators.clone()
    };
    let sleds: Vec<String> = rack.sled.iter().map(|s| s.id.clone()).collect();
    let written = proto::auth::init_credentials(&dir, &sleds, &operators, args.rotate)
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn attachment_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let tls = client::tls::ensure(&dir.path().join("tls")).unwrap();
        let ca = std::fs::read_to_string(&tls.ca_cert).unwrap();
        for unit_ca_pem in [None, Some(ca)] {
            let file = AttachmentFile {
                volume_id: 42,
                credential: AttachmentCredential {
                    attachment: 1 << 63 | 5,
                    token: AttachmentToken([9; 16]),
                },
                unit_ca_pem,
            };
            std::fs::write(&path, file_text(&file)).unwrap();
            let read = read_file(&path).unwrap();
            assert_eq!(read, file);
            if let Some(pem) = &read.unit_ca_pem {
                // What the agent builds its TLS from.
                proto::link::LinkTls::from_ca_pem(pem.as_bytes(), &path).unwrap();
            }
        }
        std::fs::write(&path, "volume_id = 1\n").unwrap();
        assert!(read_file(&path).is_err());
        // A CA that is no certificate is refused when read, not at connect.
        std::fs::write(
            &path,
            "volume_id = 1\nattachment_id = 2\nattachment_token = \"09090909090909090909090909090909\"\nunit_ca_pem = \"garbage\"\n",
        )
        .unwrap();
        assert!(read_file(&path).is_err());
    }
}
