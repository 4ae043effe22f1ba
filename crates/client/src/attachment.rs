//! Attachments registered straight with a unit, for hosts that attach
//! without the zonal plane (`rackblock attach --rack FILE --volume-id N`,
//! benchmarks, tests).
//!
//! [`register_attachment`] makes a fresh credential (a random id with the
//! top bit set, so it never meets the zonal plane's sequential ids, and a
//! random 128-bit token), and commits `RegisterAttachment` with the token's
//! SHA-256 through the unit's local control plane; head nodes accept the
//! token from then on. [`remove_attachment`] revokes it. The token never
//! leaves this process except in requests to head nodes.

use local_control_plane::client::ClientError as LcpClientError;
use local_control_plane::{Command, CommandError, Entity, LcpClient};
use proto::volume::{AttachmentCredential, AttachmentToken};

/// Top bit of an attachment id registered without the zonal plane.
pub const UNIT_LOCAL_ATTACHMENT_BIT: u64 = 1 << 63;

/// Attempts at a fresh id when one is taken (ids are random, 63 bits).
const ID_ATTEMPTS: usize = 4;

/// Why an attachment could not be registered or removed.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("cannot read random bytes for a token: {0}")]
    Random(std::io::Error),
    #[error("the unit refused: {0}")]
    Refused(CommandError),
    #[error("local control plane: {0}")]
    Lcp(#[from] LcpClientError),
}

/// Registers a new attachment of `volume` for `host` (see module docs).
pub async fn register_attachment(
    lcp: &LcpClient,
    volume: u64,
    host: &str,
) -> Result<AttachmentCredential, AttachmentError> {
    let mut last = None;
    for _ in 0..ID_ATTEMPTS {
        let token = AttachmentToken::random().map_err(AttachmentError::Random)?;
        let id_bytes = AttachmentToken::random().map_err(AttachmentError::Random)?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&id_bytes.0[..8]);
        let attachment = u64::from_le_bytes(id) | UNIT_LOCAL_ATTACHMENT_BIT;
        let command = Command::RegisterAttachment {
            volume,
            attachment,
            token_digest: token.digest(),
            host: host.to_owned(),
            now_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        match lcp.command(command).await? {
            Ok(_) => return Ok(AttachmentCredential { attachment, token }),
            Err(
                error @ CommandError::AlreadyExists {
                    entity: Entity::Attachment,
                    ..
                },
            ) => last = Some(error),
            Err(error) => return Err(AttachmentError::Refused(error)),
        }
    }
    Err(AttachmentError::Refused(last.unwrap_or_else(|| {
        CommandError::InvalidArgument {
            reason: "no free attachment id".into(),
        }
    })))
}

/// Revokes attachment `attachment` of `volume`; one already gone (or a
/// volume already deleted) counts as revoked.
pub async fn remove_attachment(
    lcp: &LcpClient,
    volume: u64,
    attachment: u64,
) -> Result<(), AttachmentError> {
    match lcp
        .command(Command::RemoveAttachment { volume, attachment })
        .await?
    {
        Ok(_)
        | Err(
            CommandError::UnknownAttachment { .. }
            | CommandError::UnknownVolume { .. }
            | CommandError::VolumeDeleting { .. },
        ) => Ok(()),
        Err(error) => Err(AttachmentError::Refused(error)),
    }
}
