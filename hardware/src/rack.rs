//! The rack description: what one unit is made of, read from TOML.
//!
//! A rack file names the unit, its head nodes and its sleds. Every node has
//! one address on network A, one on network B (the two redundant internal
//! networks: the **unit port**, for members only) and an HTTP admin/metrics
//! address; a head node that serves hosts also has a **host port** on the
//! host network (`host`), which takes host I/O and nothing else; every sled
//! lists its devices with their fault and power domains. See
//! `deploy/rack.example.toml` and `SECURITY.md`.
//!
//! Validation happens in two stages:
//!
//! 1. [`Rack::from_toml_str`] / [`Rack::load`]: parse (unknown fields are
//!    errors) and structural checks that need nothing but the text — unique
//!    ids, unique addresses, both networks present and different, at least
//!    one head node, every sled has a device, erasure codes well formed,
//!    enough sleds for the widest code, a sane column size.
//! 2. [`Rack::validate_devices`]: checks against the machine — every device
//!    exists, is at least as large as declared, and the declared size holds
//!    the reserved metadata area plus one column.
//!
//! The first problem found is reported, naming the node, address or path.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::device::IO_ALIGN_BYTES;

/// Default column size: 64 MiB.
pub const DEFAULT_COLUMN_SIZE_BYTES: u64 = 64 << 20;
/// Smallest accepted column size: 1 MiB.
pub const MIN_COLUMN_SIZE_BYTES: u64 = 1 << 20;
/// Space reserved on every device for the sled controller's metadata
/// (superblocks, allocation table), before the first column.
pub const DEVICE_RESERVED_BYTES: u64 = 2 << 20;
/// Default erasure code.
pub const DEFAULT_ERASURE_CODE: ErasureCode = ErasureCode { k: 4, m: 2 };

/// One unit (rack), validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rack {
    /// Unit-wide settings.
    pub unit: UnitSpec,
    /// The head nodes (at least one).
    pub head_node: Vec<HeadNodeSpec>,
    /// The sleds (at least as many as the widest erasure code).
    pub sled: Vec<SledSpec>,
}

/// Unit-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitSpec {
    /// Name of the unit, unique in the zone.
    pub name: String,
    /// Size of one column; a multiple of 4096 and at least 1 MiB.
    pub column_size_bytes: u64,
    /// Erasure codes volumes of this unit may use.
    pub erasure_codes: Vec<ErasureCode>,
    /// Least columns a new extent may have when fewer than k+m sleds can
    /// take one (a **degraded** extent: the missing columns are owed and
    /// written by repair). `None`: k+1 for every code. Clamped per code to
    /// `[k, k+m]`; k+m allows no degraded extent.
    pub min_flush_columns: Option<u16>,
}

/// A head node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadNodeSpec {
    /// Node id, unique among head nodes and sleds.
    pub id: String,
    /// Address on network A.
    pub address_a: SocketAddr,
    /// Address on network B.
    pub address_b: SocketAddr,
    /// HTTP admin/metrics address.
    pub admin: SocketAddr,
    /// The host port, on the host network: host I/O and the partition map
    /// of an attachment's own volume, nothing else. `None`: this head node
    /// serves no host.
    pub host: Option<SocketAddr>,
}

/// A sled and its controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SledSpec {
    /// Sled id, unique among head nodes and sleds.
    pub id: String,
    /// Sled controller address on network A.
    pub address_a: SocketAddr,
    /// Sled controller address on network B.
    pub address_b: SocketAddr,
    /// HTTP admin/metrics address.
    pub admin: SocketAddr,
    /// The sled's devices (at least one).
    pub device: Vec<DeviceSpec>,
}

/// One device of a sled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Block device or file backing it.
    pub path: PathBuf,
    /// Bytes of the device the sled controller may use.
    pub size_bytes: u64,
    /// Failure domain label (e.g. a disk shelf); informational for placement.
    #[serde(default)]
    pub fault_domain: Option<String>,
    /// Power domain label (e.g. "pd-a"); informational for placement.
    #[serde(default)]
    pub power_domain: Option<String>,
}

/// A systematic Reed–Solomon code: `k` data chunks, `m` parity chunks,
/// written as `"k+m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErasureCode {
    /// Data chunks per stripe (>= 1).
    pub k: u8,
    /// Parity chunks per stripe (>= 1).
    pub m: u8,
}

impl ErasureCode {
    /// Columns per extent, each on a different sled: `k + m`.
    pub fn width(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }
}

impl fmt::Display for ErasureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

impl FromStr for ErasureCode {
    type Err = RackError;

    fn from_str(value: &str) -> Result<Self, RackError> {
        let bad = || RackError::BadErasureCode {
            value: value.to_owned(),
        };
        let (k, m) = value.trim().split_once('+').ok_or_else(bad)?;
        let k: u8 = k.trim().parse().map_err(|_| bad())?;
        let m: u8 = m.trim().parse().map_err(|_| bad())?;
        // Reed–Solomon over GF(2^8) allows at most 256 shards.
        if k == 0 || m == 0 || usize::from(k) + usize::from(m) > 256 {
            return Err(bad());
        }
        Ok(Self { k, m })
    }
}

impl Serialize for ErasureCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What is wrong with a rack description.
#[derive(Debug, thiserror::Error)]
pub enum RackError {
    /// Not valid TOML, or not the rack schema.
    #[error("rack file does not parse: {message}")]
    Parse {
        /// The parser's message (with line and column).
        message: String,
    },
    /// Two nodes (head nodes or sleds) share an id.
    #[error("node id {id:?} is used twice")]
    DuplicateId {
        /// The repeated id.
        id: String,
    },
    /// Two endpoints share an address.
    #[error("address {address} is used by both {first} and {second}")]
    DuplicateAddress {
        /// The repeated address.
        address: SocketAddr,
        /// The first user, as "node-id field".
        first: String,
        /// The second user, as "node-id field".
        second: String,
    },
    /// A node lacks its address on a network.
    #[error("node {node:?} has no address on network {network}")]
    MissingNetwork {
        /// Node id.
        node: String,
        /// "A", "B", or "admin".
        network: &'static str,
    },
    /// A node's network A and B addresses are the same, so the networks are
    /// not redundant for it.
    #[error("node {node:?} uses the same address on networks A and B")]
    SameAddressOnBothNetworks {
        /// Node id.
        node: String,
    },
    /// A sled lists no device.
    #[error("sled {sled:?} has no device")]
    NoDevices {
        /// Sled id.
        sled: String,
    },
    /// A device path does not exist.
    #[error("device {} of sled {sled:?} does not exist", path.display())]
    DeviceMissing {
        /// Sled id.
        sled: String,
        /// Device path.
        path: PathBuf,
    },
    /// A device is smaller than declared, or its declared size is below the
    /// minimum (reserved area + one column).
    #[error("device {} of sled {sled:?} has {size_bytes} bytes, needs at least {needed_bytes}", path.display())]
    DeviceTooSmall {
        /// Sled id.
        sled: String,
        /// Device path.
        path: PathBuf,
        /// Size found (actual, or declared when below the minimum).
        size_bytes: u64,
        /// Size needed.
        needed_bytes: u64,
    },
    /// An erasure code is not `k+m` with k, m >= 1 and k + m <= 256.
    #[error("bad erasure code {value:?}: expected \"k+m\" with k, m >= 1")]
    BadErasureCode {
        /// The offending text.
        value: String,
    },
    /// Fewer sleds than the widest erasure code needs.
    #[error("erasure code {code} needs {needed} sleds, the rack has {sleds}")]
    NotEnoughSleds {
        /// Sleds in the rack.
        sleds: usize,
        /// Sleds needed.
        needed: usize,
        /// The code needing them.
        code: ErasureCode,
    },
    /// The column size is not a multiple of 4096 or below 1 MiB.
    #[error("bad column_size_bytes {value}: must be a multiple of 4096 and at least 1 MiB")]
    BadColumnSize {
        /// The offending value.
        value: u64,
    },
    /// The rack has no head node.
    #[error("the rack has no head node")]
    NoHeadNodes,
    /// Reading a file failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
}

// ---- the file schema, before validation ------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RackFile {
    /// Unit-wide settings.
    unit: UnitFile,
    /// `[[head_node]]` tables.
    #[serde(default)]
    head_node: Vec<NodeFile>,
    /// `[[sled]]` tables.
    #[serde(default)]
    sled: Vec<NodeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnitFile {
    /// Unit name.
    name: String,
    /// Column size; default 64 MiB.
    #[serde(default)]
    column_size_bytes: Option<u64>,
    /// `"k+m"` strings; default `["4+2"]`.
    #[serde(default)]
    erasure_codes: Option<Vec<String>>,
    /// Least columns of a degraded extent; default k+1.
    #[serde(default)]
    min_flush_columns: Option<u16>,
}

/// A head node or a sled; head nodes must not have devices.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    /// Node id.
    id: String,
    /// Address on network A.
    #[serde(default)]
    address_a: Option<SocketAddr>,
    /// Address on network B.
    #[serde(default)]
    address_b: Option<SocketAddr>,
    /// Admin/metrics address.
    #[serde(default)]
    admin: Option<SocketAddr>,
    /// Host port (head nodes only).
    #[serde(default)]
    host: Option<SocketAddr>,
    /// Devices (sleds only).
    #[serde(default)]
    device: Option<Vec<DeviceSpec>>,
}

struct NodeAddresses {
    address_a: SocketAddr,
    address_b: SocketAddr,
    admin: SocketAddr,
}

impl NodeFile {
    fn addresses(&self) -> Result<NodeAddresses, RackError> {
        let missing = |network| RackError::MissingNetwork {
            node: self.id.clone(),
            network,
        };
        let address_a = self.address_a.ok_or_else(|| missing("A"))?;
        let address_b = self.address_b.ok_or_else(|| missing("B"))?;
        let admin = self.admin.ok_or_else(|| missing("admin"))?;
        if address_a == address_b {
            return Err(RackError::SameAddressOnBothNetworks {
                node: self.id.clone(),
            });
        }
        Ok(NodeAddresses {
            address_a,
            address_b,
            admin,
        })
    }
}

impl Rack {
    /// Parses and structurally validates a rack description.
    pub fn from_toml_str(text: &str) -> Result<Rack, RackError> {
        let file: RackFile = toml::from_str(text).map_err(|error| RackError::Parse {
            message: error.to_string(),
        })?;
        let column_size_bytes = file
            .unit
            .column_size_bytes
            .unwrap_or(DEFAULT_COLUMN_SIZE_BYTES);
        // Columns start and end on device I/O boundaries; the local control
        // plane also checks the volume block size (equal today).
        if column_size_bytes % IO_ALIGN_BYTES as u64 != 0
            || column_size_bytes < MIN_COLUMN_SIZE_BYTES
        {
            return Err(RackError::BadColumnSize {
                value: column_size_bytes,
            });
        }
        let erasure_codes = match &file.unit.erasure_codes {
            None => vec![DEFAULT_ERASURE_CODE],
            Some(codes) if codes.is_empty() => {
                return Err(RackError::BadErasureCode {
                    value: String::new(),
                })
            }
            Some(codes) => codes
                .iter()
                .map(|code| code.parse())
                .collect::<Result<Vec<ErasureCode>, RackError>>()?,
        };
        if file.head_node.is_empty() {
            return Err(RackError::NoHeadNodes);
        }

        let mut ids: HashSet<String> = HashSet::new();
        let mut addresses: HashMap<SocketAddr, String> = HashMap::new();
        let mut claim = |address: SocketAddr, user: String| match addresses.get(&address) {
            Some(first) => Err(RackError::DuplicateAddress {
                address,
                first: first.clone(),
                second: user,
            }),
            None => {
                addresses.insert(address, user);
                Ok(())
            }
        };
        let mut check_node = |node: &NodeFile| -> Result<NodeAddresses, RackError> {
            if !ids.insert(node.id.clone()) {
                return Err(RackError::DuplicateId {
                    id: node.id.clone(),
                });
            }
            let found = node.addresses()?;
            claim(found.address_a, format!("{} address_a", node.id))?;
            claim(found.address_b, format!("{} address_b", node.id))?;
            claim(found.admin, format!("{} admin", node.id))?;
            if let Some(host) = node.host {
                claim(host, format!("{} host", node.id))?;
            }
            Ok(found)
        };

        let mut head_node = Vec::with_capacity(file.head_node.len());
        for node in &file.head_node {
            if node.device.is_some() {
                return Err(RackError::Parse {
                    message: format!("head node {:?} cannot have devices", node.id),
                });
            }
            let found = check_node(node)?;
            head_node.push(HeadNodeSpec {
                id: node.id.clone(),
                address_a: found.address_a,
                address_b: found.address_b,
                admin: found.admin,
                host: node.host,
            });
        }
        let mut sled = Vec::with_capacity(file.sled.len());
        for node in &file.sled {
            if node.host.is_some() {
                return Err(RackError::Parse {
                    message: format!("sled {:?} cannot have a host port", node.id),
                });
            }
            let found = check_node(node)?;
            let device = node.device.clone().unwrap_or_default();
            if device.is_empty() {
                return Err(RackError::NoDevices {
                    sled: node.id.clone(),
                });
            }
            sled.push(SledSpec {
                id: node.id.clone(),
                address_a: found.address_a,
                address_b: found.address_b,
                admin: found.admin,
                device,
            });
        }
        if let Some(code) = erasure_codes.iter().max_by_key(|code| code.width()) {
            if sled.len() < code.width() {
                return Err(RackError::NotEnoughSleds {
                    sleds: sled.len(),
                    needed: code.width(),
                    code: *code,
                });
            }
        }
        Ok(Rack {
            unit: UnitSpec {
                name: file.unit.name,
                column_size_bytes,
                erasure_codes,
                min_flush_columns: file.unit.min_flush_columns,
            },
            head_node,
            sled,
        })
    }

    /// Reads, parses and structurally validates a rack file.
    pub fn load(path: impl AsRef<Path>) -> Result<Rack, RackError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| RackError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Smallest declared device size accepted: the reserved metadata area
    /// plus one column.
    pub fn min_device_size_bytes(&self) -> u64 {
        DEVICE_RESERVED_BYTES + self.unit.column_size_bytes
    }

    /// Checks every device against this machine: the declared size is at
    /// least [`min_device_size_bytes`](Self::min_device_size_bytes), the path
    /// exists, and the file (or block device) is at least the declared size.
    pub fn validate_devices(&self) -> Result<(), RackError> {
        let needed_bytes = self.min_device_size_bytes();
        for sled in &self.sled {
            for device in &sled.device {
                if device.size_bytes < needed_bytes {
                    return Err(RackError::DeviceTooSmall {
                        sled: sled.id.clone(),
                        path: device.path.clone(),
                        size_bytes: device.size_bytes,
                        needed_bytes,
                    });
                }
                let actual = match actual_size_bytes(&device.path) {
                    Ok(actual) => actual,
                    Err(source) if source.kind() == io::ErrorKind::NotFound => {
                        return Err(RackError::DeviceMissing {
                            sled: sled.id.clone(),
                            path: device.path.clone(),
                        })
                    }
                    Err(source) => {
                        return Err(RackError::Io {
                            path: device.path.clone(),
                            source,
                        })
                    }
                };
                if actual < device.size_bytes {
                    return Err(RackError::DeviceTooSmall {
                        sled: sled.id.clone(),
                        path: device.path.clone(),
                        size_bytes: actual,
                        needed_bytes: device.size_bytes,
                    });
                }
            }
        }
        Ok(())
    }

    /// The sled with this id.
    pub fn sled(&self, id: &str) -> Option<&SledSpec> {
        self.sled.iter().find(|sled| sled.id == id)
    }

    /// The head node with this id.
    pub fn head_node(&self, id: &str) -> Option<&HeadNodeSpec> {
        self.head_node.iter().find(|node| node.id == id)
    }
}

/// Length of a regular file, or BLKGETSIZE64 of a block device.
fn actual_size_bytes(path: &Path) -> io::Result<u64> {
    let metadata = std::fs::metadata(path)?;
    if metadata.file_type().is_block_device() {
        crate::device::block_device_size(&File::open(path)?)
    } else {
        Ok(metadata.len())
    }
}

#[cfg(test)]
mod tests;
