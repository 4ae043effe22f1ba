//! Attachments registered straight with a unit, for hosts that attach
//! without the zonal plane (`rackblock attachment create`, whose file a
//! host gives to `rackblock attach --rack FILE --attachment-file F`;
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

/// Registers a new attachment of `volume` for `host` (see module docs),
/// valid until removed.
pub async fn register_attachment(
    lcp: &LcpClient,
    volume: u64,
    host: &str,
) -> Result<AttachmentCredential, AttachmentError> {
    register_expiring_attachment(lcp, volume, host, None).await
}

/// [`register_attachment`] with a TTL: head nodes refuse the token once
/// `ttl_ms` passed without the host reading its partition map (each read
/// past half the TTL renews it; `local_control_plane::state`'s attachment
/// expiry).
pub async fn register_expiring_attachment(
    lcp: &LcpClient,
    volume: u64,
    host: &str,
    ttl_ms: Option<u64>,
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
            ttl_ms,
        };
        match command_resending(lcp, command).await? {
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

/// Bound on resends of one attachment command whose outcome is unknown or
/// that found no leader (a leader change in progress).
const RESEND_ATTEMPTS: usize = 40;
/// Pause between two resends.
const RESEND_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// Commits `command`, sending the *same* command again (both attachment
/// commands are idempotent: a repeat with the same digest, or of a removal,
/// changes nothing) while its outcome is unknown, no head node answered, or
/// the unit answers with a retryable refusal (no leader yet): an election
/// must not fail an attach.
async fn command_resending(
    lcp: &LcpClient,
    command: Command,
) -> Result<Result<local_control_plane::Outcome, CommandError>, AttachmentError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last_try = attempt >= RESEND_ATTEMPTS;
        match lcp.command(command.clone()).await {
            Ok(Err(error)) if error.is_retryable() && !last_try => {}
            Ok(answer) => return Ok(answer),
            Err(LcpClientError::Uncertain(_) | LcpClientError::NoHeadNode { .. }) if !last_try => {}
            Err(error) => return Err(error.into()),
        }
        tokio::time::sleep(RESEND_PAUSE).await;
    }
}

/// Revokes attachment `attachment` of `volume`; one already gone (or a
/// volume already deleted) counts as revoked.
pub async fn remove_attachment(
    lcp: &LcpClient,
    volume: u64,
    attachment: u64,
) -> Result<(), AttachmentError> {
    match command_resending(lcp, Command::RemoveAttachment { volume, attachment }).await? {
        Ok(_)
        | Err(
            CommandError::UnknownAttachment { .. }
            | CommandError::UnknownVolume { .. }
            | CommandError::VolumeDeleting { .. },
        ) => Ok(()),
        Err(error) => Err(AttachmentError::Refused(error)),
    }
}
