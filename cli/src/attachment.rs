//! `rackblock attachment create|revoke`: attachments minted by an operator
//! for hosts that attach without the zonal plane (`rackblock attach --rack
//! FILE --attachment-file F`), and `rackblock rack init-credentials`.
//!
//! `create` registers a fresh attachment (random id with the top bit set,
//! random 128-bit token; the unit keeps only the token's SHA-256) through
//! the unit's control plane with the operator's credential, and writes the
//! **attachment file** (mode 0600): `volume_id`, `attachment_id` and the
//! token (hex) as `key = value` lines. That file, the rack file's host
//! ports and nothing else is what the host needs (SECURITY.md). `revoke`
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

/// The attachment file's text.
fn file_text(volume_id: u64, credential: &AttachmentCredential) -> String {
    format!(
        "volume_id = {volume_id}\nattachment_id = {}\nattachment_token = \"{}\"\n",
        credential.attachment,
        credential.token.to_hex()
    )
}

/// Reads an attachment file: (volume id, credential).
pub fn read_file(path: &Path) -> Result<(u64, AttachmentCredential), CliError> {
    let bad = |reason: String| CliError::Usage(format!("{}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let (mut volume, mut attachment, mut token) = (None, None, None);
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
            other => return Err(bad(format!("unknown key {other:?}"))),
        }
    }
    match (volume, attachment, token) {
        (Some(volume), Some(attachment), Some(token)) => {
            Ok((volume, AttachmentCredential { attachment, token }))
        }
        _ => Err(bad(
            "needs volume_id, attachment_id and attachment_token".into()
        )),
    }
}

pub async fn create(args: &CreateArgs) -> Result<(), CliError> {
    let rack = args.rack.load()?;
    let lcp = crate::unit::client(&rack, args.rack.credential());
    let registered = client::register_attachment(&lcp, args.volume_id, &args.host).await;
    lcp.close();
    let credential = registered.map_err(|e| {
        CliError::Unavailable(format!(
            "cannot register an attachment of volume {}: {e}",
            args.volume_id
        ))
    })?;
    let text = file_text(args.volume_id, &credential);
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
                "attachment {} of volume {} written to {}",
                credential.attachment,
                args.volume_id,
                path.display()
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
        let credential = AttachmentCredential {
            attachment: 1 << 63 | 5,
            token: AttachmentToken([9; 16]),
        };
        std::fs::write(&path, file_text(42, &credential)).unwrap();
        let (volume, read) = read_file(&path).unwrap();
        assert_eq!((volume, read), (42, credential));
        std::fs::write(&path, "volume_id = 1\n").unwrap();
        assert!(read_file(&path).is_err());
    }
}
