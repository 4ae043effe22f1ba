//! [`HostMapSource`]: a host's partition map, from the head nodes' host
//! ports, with nothing but the attachment credential.
//!
//! ```text
//! VolumeClient ─ partition_map(volume) ─▶ HostMap{volume, credential}
//!                                          ─▶ any head node's host port
//!   ◀── HostMapReply{map with host ports}   (credential checked there)
//!   ◀── HostError::Unauthorized             (revoked, deleted, wrong token)
//! ```
//!
//! A host never reaches the unit port (SECURITY.md): the head node that
//! answers reads the map through its control plane and replaces every
//! address in it with the head nodes' host ports, so the volume client
//! routes I/O to host ports too. The source starts with the head node that
//! answered last and tries the others when one fails; `Unauthorized` is
//! final (the client stops with [`crate::ClientError::Unauthorized`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use local_control_plane::state::PartitionMap;
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::volume::{AttachmentCredential, HostError, HostReply};
use proto::Message;

use crate::volume::{MapSource, MapSourceError};

/// One head node's host port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEndpoint {
    /// Head node id.
    pub node: String,
    pub address: SocketAddr,
}

/// Partition maps from host ports (module docs).
#[derive(Debug)]
pub struct HostMapSource {
    links: Vec<Arc<PeerLink>>,
    credential: AttachmentCredential,
    /// The link that answered last.
    preferred: AtomicUsize,
}

impl HostMapSource {
    /// Links (made lazily) to every endpoint; both paths of a link go to
    /// the one host port (the host network is one network). Needs a tokio
    /// runtime.
    pub fn new(
        endpoints: &[HostEndpoint],
        credential: AttachmentCredential,
        config: LinkConfig,
    ) -> HostMapSource {
        let metrics = LinkMetrics::unregistered();
        let links = endpoints
            .iter()
            .map(|endpoint| {
                PeerLink::new(
                    endpoint.node.clone(),
                    endpoint.address,
                    endpoint.address,
                    config.clone(),
                    metrics.clone(),
                )
            })
            .collect();
        HostMapSource {
            links,
            credential,
            preferred: AtomicUsize::new(0),
        }
    }

    async fn ask(&self, link: &PeerLink, volume: u64) -> Result<PartitionMap, MapSourceError> {
        let request = Message::HostMap {
            volume,
            credential: self.credential,
        };
        match link.call(request, true).await {
            Ok(Message::HostMapReply { payload }) => serde_json::from_slice(&payload)
                .map_err(|error| MapSourceError::Other(format!("undecodable map: {error}"))),
            Ok(Message::HostReply(HostReply::Error(HostError::Unauthorized { .. }))) => {
                Err(MapSourceError::Unauthorized)
            }
            Ok(Message::HostReply(HostReply::Error(error))) => {
                Err(MapSourceError::Other(format!("{}: {error}", link.peer())))
            }
            Ok(other) => Err(MapSourceError::Other(format!(
                "{}: unexpected answer kind {:#06x}",
                link.peer(),
                other.kind()
            ))),
            Err(proto::link::LinkError::TlsRequired { peer }) => {
                Err(MapSourceError::TlsRequired { node: peer })
            }
            Err(error) => Err(MapSourceError::Other(error.to_string())),
        }
    }

    /// Close every link.
    pub fn close(&self) {
        for link in &self.links {
            link.close();
        }
    }
}

impl MapSource for HostMapSource {
    fn partition_map(&self, volume: u64) -> BoxFuture<'_, Result<PartitionMap, MapSourceError>> {
        Box::pin(async move {
            if self.links.is_empty() {
                return Err(MapSourceError::Other("no host endpoint".into()));
            }
            let first = self.preferred.load(Ordering::Relaxed) % self.links.len();
            let mut last = MapSourceError::Other("no head node answered".into());
            for step in 0..self.links.len() {
                let index = (first + step) % self.links.len();
                match self.ask(&self.links[index], volume).await {
                    Ok(map) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(map);
                    }
                    Err(MapSourceError::Unauthorized) => return Err(MapSourceError::Unauthorized),
                    // Every host port of a unit runs the same way.
                    Err(error @ MapSourceError::TlsRequired { .. }) => return Err(error),
                    Err(error) => last = error,
                }
            }
            Err(last)
        })
    }
}
