//! The kernel's NBD client, configured over generic netlink (family
//! `"nbd"`, include/uapi/linux/nbd-netlink.h), as `nbd-client` does:
//! how `rackblock attach VOLUME --device [/dev/nbdN]` gives the host a
//! block device.
//!
//! ```text
//!  agent process                                 kernel
//!  ┌──────────────────────────────┐              ┌──────────────────────┐
//!  │ NbdServer ◀── socketpair ──▶ │ fd ────────▶ │ nbd driver /dev/nbdN │
//!  │ (serve_stream)   one end     │  NBD_CMD_    │ (transmission phase  │
//!  │                  other end:  │  CONNECT or  │  only: READ, WRITE,  │
//!  │   negotiate() = the client   │  RECONFIGURE │  FLUSH, FUA, TRIM)   │
//!  │   half of the handshake      │              └──────────────────────┘
//!  └──────────────────────────────┘
//! ```
//!
//! The kernel only speaks the transmission phase, so the agent first runs
//! the client half of the fixed-newstyle handshake on the kernel's end of
//! a socketpair against its own server ([`negotiate`]: `EXPORT_NAME`,
//! which yields the size and transmission flags) and then hands that end
//! to the kernel ([`Device::connect`]) with:
//!
//! * `SIZE_BYTES` = the export size, `BLOCK_SIZE_BYTES` = 4096 (the
//!   server's preferred block size; the device's logical block size);
//! * `SERVER_FLAGS` = the negotiated transmission flags, which include
//!   `SEND_FLUSH | SEND_FUA` (the kernel then issues FLUSH for a cache
//!   flush and FUA writes for REQ_FUA: an `fsync` on the device reaches
//!   the volume as a FLUSH) — [`connect`](Device::connect) refuses flags
//!   without them rather than give a device that loses fsyncs;
//! * `TIMEOUT` = 0: the kernel never times a request out (it logs a
//!   "possible stuck request" line every 30 s and keeps waiting). A
//!   head-node failover is a pause of seconds; the volume client bounds
//!   it (`--failover-timeout`) and answers `EIO` itself when it gives up.
//!   A non-zero timeout would make the kernel tear the socket down
//!   under a slow failover.
//! * `DEAD_CONN_TIMEOUT` = how long the kernel queues I/O when the socket
//!   died (the agent exited or was killed) waiting for a new one;
//!   afterwards I/O fails. A restarted agent hands a fresh, negotiated
//!   socket with [`Device::reconfigure`] (`NBD_CMD_RECONFIGURE`), and the
//!   device goes on as if nothing happened.
//! * one socket: with several, the kernel's request timer marks a socket
//!   dead and requeues its requests on another after 30 s even with
//!   `TIMEOUT` = 0 (nbd.c, `nbd_xmit_timeout`), which a long failover
//!   would trigger.
//!
//! [`Device::disconnect`] (`NBD_CMD_DISCONNECT`) makes the kernel send
//! `NBD_CMD_DISC` and drop its socket; [`status`] (`NBD_CMD_STATUS`) says
//! which devices are configured. Every netlink command needs
//! `CAP_SYS_ADMIN` ([`KernelNbdError::NotPermitted`]); a kernel without
//! the `nbd` family is [`KernelNbdError::NoModule`].

use std::os::fd::RawFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::netlink::{self, GenlSocket, Message, NetlinkError};
use super::wire::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES,
    FLAG_SEND_FLUSH, FLAG_SEND_FUA, INIT_MAGIC, OPTION_MAGIC, OPT_EXPORT_NAME,
};

/// `NBD_GENL_FAMILY_NAME`, `NBD_GENL_VERSION`.
const FAMILY: &str = "nbd";
const VERSION: u8 = 1;
/// `NBD_CMD_*`.
const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
const CMD_STATUS: u8 = 5;
/// `NBD_ATTR_*`.
const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_DEVICE_LIST: u16 = 9;
/// `NBD_SOCK_ITEM`, `NBD_SOCK_FD`.
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
/// `NBD_DEVICE_ITEM`, `NBD_DEVICE_INDEX`, `NBD_DEVICE_CONNECTED`.
const DEVICE_ITEM: u16 = 1;
const DEVICE_INDEX: u16 = 1;
const DEVICE_CONNECTED: u16 = 2;

/// The logical block size of our devices.
pub const DEVICE_BLOCK_BYTES: u64 = 4096;

/// Why configuring a kernel NBD device failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelNbdError {
    #[error("the kernel has no nbd module (modprobe nbd)")]
    NoModule,
    #[error("configuring NBD devices needs root (CAP_SYS_ADMIN)")]
    NotPermitted,
    #[error("{device} is busy (connected by another process or agent)")]
    Busy { device: String },
    #[error("/dev/nbd{index} is not connected")]
    NotConnected { index: u32 },
    #[error("{0:?} is not an NBD device (expected /dev/nbdN)")]
    NotADevice(String),
    #[error("the export's transmission flags {flags:#x} lack SEND_FLUSH or SEND_FUA: the device would lose fsyncs")]
    NoFlush { flags: u16 },
    #[error("NBD handshake with our own server failed: {0}")]
    Handshake(String),
    #[error("nbd netlink {command} of /dev/nbd{}: {source}", index.map_or_else(|| "?".to_owned(), |i| i.to_string()))]
    Kernel {
        command: &'static str,
        index: Option<u32>,
        #[source]
        source: NetlinkError,
    },
}

/// The device index of `/dev/nbdN` (or `nbdN`).
pub fn device_index(path: &Path) -> Result<u32, KernelNbdError> {
    let text = path.to_string_lossy();
    let name = text.strip_prefix("/dev/").unwrap_or(&text);
    name.strip_prefix("nbd")
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| KernelNbdError::NotADevice(text.into_owned()))
}

/// The path of device `index`.
pub fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

/// What the client half of the handshake learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

/// How long [`negotiate`] may take (our own server, in this process).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the client half of the fixed-newstyle handshake for `export` on
/// `stream` (`NBD_OPT_EXPORT_NAME`, no structured replies: the kernel
/// reads simple replies only). Afterwards the stream is in the
/// transmission phase, ready for the kernel.
pub async fn negotiate<S>(stream: &mut S, export: &str) -> Result<Negotiated, KernelNbdError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let bad = |what: String| KernelNbdError::Handshake(what);
    let io = |e: std::io::Error| KernelNbdError::Handshake(e.to_string());
    let exchange = async {
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.map_err(io)?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap_or_default());
        let option = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if magic != INIT_MAGIC || option != OPTION_MAGIC {
            return Err(bad("not a newstyle NBD server".into()));
        }
        if flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES {
            return Err(bad(format!("server handshake flags {flags:#x}")));
        }
        let name = export.as_bytes();
        let mut request = Vec::with_capacity(20 + name.len());
        request.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        request.extend_from_slice(&OPTION_MAGIC.to_be_bytes());
        request.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        let length = u32::try_from(name.len()).map_err(|_| bad("export name too long".into()))?;
        request.extend_from_slice(&length.to_be_bytes());
        request.extend_from_slice(name);
        stream.write_all(&request).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        // EXPORT_NAME's answer (NO_ZEROES): size u64, flags u16. An
        // unknown export closes the connection instead.
        let mut answer = [0u8; 10];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(|e| bad(format!("no export {export:?}: {e}")))?;
        Ok(Negotiated {
            size_bytes: u64::from_be_bytes(answer[0..8].try_into().unwrap_or_default()),
            transmission_flags: u16::from_be_bytes([answer[8], answer[9]]),
        })
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| bad(format!("no answer within {HANDSHAKE_TIMEOUT:?}")))?
}

/// The (index, connected) pairs of `NBD_CMD_STATUS` replies, by index:
///
/// ```text
/// [NBD_ATTR_DEVICE_LIST]
///   [NBD_DEVICE_ITEM] [NBD_DEVICE_INDEX u32] [NBD_DEVICE_CONNECTED u8]
///   ...
/// ```
pub fn parse_status(replies: &[Vec<u8>]) -> Result<Vec<(u32, bool)>, NetlinkError> {
    let mut devices = Vec::new();
    for reply in replies {
        for (kind, list) in netlink::attributes(reply)? {
            if kind != ATTR_DEVICE_LIST {
                continue;
            }
            for (kind, item) in netlink::attributes(list)? {
                if kind != DEVICE_ITEM {
                    continue;
                }
                let mut index = None;
                let mut connected = false;
                for (kind, value) in netlink::attributes(item)? {
                    match kind {
                        DEVICE_INDEX => index = Some(netlink::attr_u32(value)?),
                        DEVICE_CONNECTED => connected = netlink::attr_u8(value)? != 0,
                        _ => {}
                    }
                }
                if let Some(index) = index {
                    devices.push((index, connected));
                }
            }
        }
    }
    devices.sort_unstable();
    Ok(devices)
}

/// How a device is (re)configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// How long the kernel keeps I/O queued while the socket is dead
    /// (seconds; the agent's restart window).
    pub dead_conn_timeout: Duration,
}

/// The kernel's NBD netlink family.
#[derive(Debug)]
pub struct Device {
    socket: GenlSocket,
    family: u16,
}

fn kernel(command: &'static str, index: Option<u32>) -> impl Fn(NetlinkError) -> KernelNbdError {
    move |source| match &source {
        NetlinkError::Refused { errno, .. } if *errno == libc::EPERM => {
            KernelNbdError::NotPermitted
        }
        NetlinkError::Refused { errno, .. } if *errno == libc::EBUSY => KernelNbdError::Busy {
            device: index.map_or_else(|| "the NBD device".to_owned(), device_path),
        },
        _ => KernelNbdError::Kernel {
            command,
            index,
            source,
        },
    }
}

impl Device {
    /// Opens a generic netlink socket and resolves the `nbd` family.
    pub fn open() -> Result<Device, KernelNbdError> {
        let mut socket = GenlSocket::open().map_err(kernel("open", None))?;
        let family = socket
            .family_id(FAMILY)
            .map_err(kernel("family lookup", None))?
            .ok_or(KernelNbdError::NoModule)?;
        Ok(Device { socket, family })
    }

    fn put_timeouts(message: &mut Message, config: &DeviceConfig) {
        message
            .put_u64(ATTR_TIMEOUT, 0)
            .put_u64(ATTR_DEAD_CONN_TIMEOUT, config.dead_conn_timeout.as_secs());
    }

    fn put_socket(message: &mut Message, fd: RawFd) {
        message
            .begin_nested(ATTR_SOCKETS)
            .begin_nested(SOCK_ITEM)
            .put_u32(SOCK_FD, fd as u32)
            .end_nested()
            .end_nested();
    }

    /// `NBD_CMD_CONNECT`: device `index` (or the first free one the kernel
    /// picks) serves over the connected, negotiated socket `fd`. Returns
    /// the device's index. The kernel takes its own reference to the
    /// socket: the caller closes `fd` afterwards.
    pub fn connect(
        &mut self,
        index: Option<u32>,
        fd: RawFd,
        negotiated: Negotiated,
        config: &DeviceConfig,
    ) -> Result<u32, KernelNbdError> {
        let wanted = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        if negotiated.transmission_flags & wanted != wanted {
            return Err(KernelNbdError::NoFlush {
                flags: negotiated.transmission_flags,
            });
        }
        let mut message = Message::new(self.family, CMD_CONNECT, VERSION);
        if let Some(index) = index {
            message.put_u32(ATTR_INDEX, index);
        }
        message
            .put_u64(ATTR_SIZE_BYTES, negotiated.size_bytes)
            .put_u64(ATTR_BLOCK_SIZE_BYTES, DEVICE_BLOCK_BYTES)
            .put_u64(ATTR_SERVER_FLAGS, u64::from(negotiated.transmission_flags));
        Device::put_timeouts(&mut message, config);
        Device::put_socket(&mut message, fd);
        let replies = self
            .socket
            .request(&message)
            .map_err(kernel("connect", index))?;
        for reply in &replies {
            for (kind, payload) in netlink::attributes(reply).map_err(kernel("connect", index))? {
                if kind == ATTR_INDEX {
                    return netlink::attr_u32(payload).map_err(kernel("connect", index));
                }
            }
        }
        index.ok_or(KernelNbdError::Kernel {
            command: "connect",
            index,
            source: NetlinkError::Malformed("no device index in the answer"),
        })
    }

    /// `NBD_CMD_RECONFIGURE`: replaces the dead socket of configured
    /// device `index` with `fd` (an agent restart). The kernel refuses
    /// (`ENOSPC`) while the old socket still looks alive: the caller may
    /// retry a moment later.
    pub fn reconfigure(
        &mut self,
        index: u32,
        fd: RawFd,
        config: &DeviceConfig,
    ) -> Result<(), KernelNbdError> {
        let mut message = Message::new(self.family, CMD_RECONFIGURE, VERSION);
        message.put_u32(ATTR_INDEX, index);
        Device::put_timeouts(&mut message, config);
        Device::put_socket(&mut message, fd);
        self.socket
            .request(&message)
            .map_err(kernel("reconfigure", Some(index)))
            .map(drop)
    }

    /// `NBD_CMD_DISCONNECT`: the kernel sends `NBD_CMD_DISC`, shuts its
    /// socket down and fails what is still queued; the device is free.
    pub fn disconnect(&mut self, index: u32) -> Result<(), KernelNbdError> {
        let mut message = Message::new(self.family, CMD_DISCONNECT, VERSION);
        message.put_u32(ATTR_INDEX, index);
        self.socket
            .request(&message)
            .map_err(kernel("disconnect", Some(index)))
            .map(drop)
    }

    /// `NBD_CMD_STATUS`: (index, connected) of device `index`, or of every
    /// device.
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<(u32, bool)>, KernelNbdError> {
        let mut message = Message::new(self.family, CMD_STATUS, VERSION);
        if let Some(index) = index {
            message.put_u32(ATTR_INDEX, index);
        }
        let replies = self
            .socket
            .request(&message)
            .map_err(kernel("status", index))?;
        parse_status(&replies).map_err(kernel("status", index))
    }

    /// Whether device `index` is configured (connected, or waiting for a
    /// new socket).
    pub fn is_connected(&mut self, index: u32) -> Result<bool, KernelNbdError> {
        match self.status(Some(index)) {
            Ok(devices) => Ok(devices
                .iter()
                .any(|&(i, connected)| i == index && connected)),
            // No such device yet: the kernel creates it on connect.
            Err(KernelNbdError::Kernel {
                source: NetlinkError::Refused { errno, .. },
                ..
            }) if errno == libc::EINVAL || errno == libc::ENODEV => Ok(false),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::nbd::{MemoryBackend, NbdBackend, NbdConfig, NbdServer};

    /// A STATUS answer as the kernel builds it (nbd.c, `populate_nbd_status`).
    #[test]
    fn status_replies_parse() {
        let mut message = Message::new(0x20, CMD_STATUS, VERSION);
        message.begin_nested(ATTR_DEVICE_LIST);
        for (index, connected) in [(3u32, 0u8), (0, 1)] {
            message
                .begin_nested(DEVICE_ITEM)
                .put_u32(DEVICE_INDEX, index)
                .put_u8(DEVICE_CONNECTED, connected)
                .end_nested();
        }
        message.end_nested();
        let bytes = message.finish(1);
        // What GenlSocket::request hands back: after both headers.
        let reply = bytes[20..].to_vec();
        assert_eq!(
            parse_status(std::slice::from_ref(&reply)).unwrap(),
            vec![(0, true), (3, false)]
        );
        assert!(parse_status(&[reply[..reply.len() - 6].to_vec()]).is_err());
        assert!(parse_status(&[]).unwrap().is_empty());
    }

    #[test]
    fn device_paths_parse() {
        assert_eq!(device_index(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(device_index(Path::new("nbd15")).unwrap(), 15);
        for bad in ["/dev/sda", "/dev/nbd", "/dev/nbd1p1", "vol0", "/dev/nbd-1"] {
            assert!(
                matches!(
                    device_index(Path::new(bad)),
                    Err(KernelNbdError::NotADevice(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(device_path(3), "/dev/nbd3");
    }

    /// The client half against our own server over a socketpair, as the
    /// agent does before handing the socket to the kernel; then one
    /// transmission-phase WRITE and FLUSH on the same socket, as the
    /// kernel would send them.
    #[tokio::test]
    async fn negotiate_leaves_the_socket_in_transmission() {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let mut exports: BTreeMap<String, Arc<dyn NbdBackend>> = BTreeMap::new();
        exports.insert("vol0".into(), backend.clone());
        let server = NbdServer::new(exports, NbdConfig::default()).unwrap();
        let (mut kernel_end, server_end) = tokio::net::UnixStream::pair().unwrap();
        let served = tokio::spawn(async move { server.serve_stream(server_end).await });
        let negotiated = negotiate(&mut kernel_end, "vol0").await.unwrap();
        assert_eq!(negotiated.size_bytes, 1 << 20);
        let wanted = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        assert_eq!(negotiated.transmission_flags & wanted, wanted);
        use crate::nbd::wire::{
            encode_request_header, RequestHeader, CMD_DISC, CMD_FLUSH, CMD_WRITE,
        };
        let header = |command, handle, offset_bytes, length_bytes| RequestHeader {
            flags: 0,
            command,
            handle,
            offset_bytes,
            length_bytes,
        };
        kernel_end
            .write_all(&encode_request_header(&header(CMD_WRITE, 1, 4096, 4096)))
            .await
            .unwrap();
        kernel_end.write_all(&[0xab; 4096]).await.unwrap();
        kernel_end
            .write_all(&encode_request_header(&header(CMD_FLUSH, 2, 0, 0)))
            .await
            .unwrap();
        let mut replies = [0u8; 32];
        kernel_end.read_exact(&mut replies).await.unwrap();
        for reply in replies.chunks(16) {
            assert_eq!(&reply[0..4], &0x6744_6698u32.to_be_bytes());
            assert_eq!(&reply[4..8], &[0, 0, 0, 0], "no error");
        }
        kernel_end
            .write_all(&encode_request_header(&header(CMD_DISC, 3, 0, 0)))
            .await
            .unwrap();
        served.await.unwrap().unwrap();
        assert_eq!(&backend.read_sync(4096, 4096).unwrap()[..], &[0xab; 4096]);
        assert!(backend.flush_count() >= 1);
    }

    #[tokio::test]
    async fn an_unknown_export_is_a_handshake_error() {
        let mut exports: BTreeMap<String, Arc<dyn NbdBackend>> = BTreeMap::new();
        exports.insert("vol0".into(), Arc::new(MemoryBackend::new(1 << 20)));
        let server = NbdServer::new(exports, NbdConfig::default()).unwrap();
        let (mut kernel_end, server_end) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(async move { server.serve_stream(server_end).await });
        assert!(matches!(
            negotiate(&mut kernel_end, "nope").await,
            Err(KernelNbdError::Handshake(_))
        ));
    }

    /// On a kernel without the nbd module (these build machines), opening
    /// the family is the typed error the CLI reports.
    #[test]
    fn a_kernel_without_nbd_is_reported_as_such() {
        let opened = Device::open();
        // After the lookup: it may have loaded the module on demand.
        let loaded = Path::new("/sys/module/nbd").exists();
        match opened {
            Ok(_) => assert!(loaded, "the nbd family resolved without the module"),
            Err(KernelNbdError::NoModule) => assert!(!loaded),
            Err(other) => panic!("{other}"),
        }
    }
}
