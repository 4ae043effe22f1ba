//! The SCSI block device (SPC-4, SBC-3) behind an iSCSI LUN, over the
//! same [`NbdBackend`] seam the NBD server uses: the volume client's
//! failover, retries and CRCs apply unchanged, and a host sees a pause
//! during a head-node failover, never an error.
//!
//! Geometry: 512-byte logical blocks, 4096-byte physical blocks (LOGICAL
//! BLOCKS PER PHYSICAL BLOCK EXPONENT 3, the volume's 4 KiB unit). The
//! backend takes any 512-byte-aligned range (the primary does the
//! read-modify-write of a partial 4 KiB unit, as for NBD), so no
//! read-modify-write happens here.
//!
//! | command | what it does |
//! |---|---|
//! | TEST UNIT READY | GOOD |
//! | REQUEST SENSE | the oldest pending unit attention (then cleared), else NO SENSE |
//! | INQUIRY | standard data; VPD 0x00 0x80 0x83 0xB0 0xB1 0xB2 |
//! | READ CAPACITY 10/16 | LBPME=1, LBPRZ=1 (unmapped blocks read zeros) |
//! | READ/WRITE 6/10/12/16, WRITE AND VERIFY 10/12/16 | FUA → durable before GOOD |
//! | SYNCHRONIZE CACHE 10/16 | backend flush |
//! | WRITE SAME 10/16 | UNMAP with zeros → trim; zeros → write zeroes; else pattern |
//! | UNMAP | trim each descriptor |
//! | VERIFY 10/12/16 | BYTCHK 0: read; 1: compare; 3: compare with one block |
//! | PRE-FETCH 10/16 | range check; GOOD (no cache to load) |
//! | COMPARE AND WRITE | compare, write; serialised per LUN in this agent |
//! | MODE SENSE 6/10, MODE SELECT 6/10 | caching, control, informational exceptions; a SELECT must not change anything |
//! | REPORT LUNS, REPORT SUPPORTED OPERATION CODES, GET LBA STATUS | |
//! | PERSISTENT RESERVE IN/OUT | reserve.rs and shared.rs (state in the unit); RESERVATION CONFLICT checked first |
//! | RESERVE(6), RELEASE(6) | SPC-2 reservation of one I_T nexus, below |
//! | anything else | INVALID COMMAND OPERATION CODE |
//!
//! Refusals carry fixed-format sense data (response code 0x70).
//!
//! # Before a command runs (LUN 0)
//!
//! ```text
//! (a persistent reservation check, which refreshes a stale copy of the
//!  reservations and so finds the changes that raise unit attentions;
//!  its answer is used below)
//! unit attention pending for the nexus? ─▶ CHECK CONDITION, UNIT ATTENTION (reported once)
//!     (not for INQUIRY, REPORT LUNS; REQUEST SENSE returns it as its data)
//! RESERVE(6) held by another nexus?     ─▶ RESERVATION CONFLICT
//!     (not for INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE(6))
//! PERSISTENT RESERVE IN/OUT             ─▶ reserve.rs / shared.rs
//! persistent reservation forbids it?    ─▶ RESERVATION CONFLICT
//! ```
//!
//! # RESERVE(6) / RELEASE(6)
//!
//! SPC-2 reservations, kept by the SPC-4 exceptions (5.13.3): one I_T
//! nexus holds the whole LUN; every other nexus gets RESERVATION
//! CONFLICT for all but the commands above. RESERVE(6) by the holder is
//! GOOD again; by anyone while another holds it, or while any nexus is
//! registered for persistent reservations, RESERVATION CONFLICT.
//! RELEASE(6) by a non-holder is GOOD and does nothing (also while
//! persistent registrations exist). The reservation ends with RELEASE(6),
//! the holder's I_T nexus loss (its session ends: logout or dropped
//! connection), LUN RESET, TARGET WARM RESET and TARGET COLD RESET.
//!
//! It is kept with the persistent reservations (shared.rs): in the
//! unit's replicated state for a unit's volume, so a RESERVE(6) through
//! one agent conflicts through every other agent of the volume, and it
//! ends when its holder's agent dies (a lease, shared.rs), as nexus loss
//! says it must.
//! COMPARE AND WRITE is atomic against other COMPARE AND WRITEs through
//! this agent (a per-LUN lock), not against writes from other agents: the
//! primary-side atomic operation is future work.

use std::sync::Arc;

use bytes::Bytes;

use super::reserve::{self, Nexus};
use super::shared::ReservationStore;
use crate::nbd::{BackendError, NbdBackend, NbdErrno};

pub const BLOCK_BYTES: u64 = 512;
/// Largest READ/WRITE in blocks (32 MiB), advertised in VPD 0xB0.
pub const MAX_TRANSFER_BLOCKS: u32 = 65_536;
/// Largest WRITE SAME in blocks (1 GiB).
pub const MAX_WRITE_SAME_BLOCKS: u64 = 2 << 20;
/// Largest UNMAP: blocks per descriptor and descriptors per command.
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Largest COMPARE AND WRITE in blocks.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;

pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Fixed-format sense: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (VALID bit set when present).
    pub information: Option<u32>,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
        }
    }

    pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(0x05, 0x24, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(0x05, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(0x05, 0x1a, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x25, 0x00);
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
    pub const INVALID_FIELD_IN_INFORMATION_UNIT: Sense = Sense::new(0x05, 0x0e, 0x03);
    pub const MISCOMPARE: Sense = Sense::new(0x0e, 0x1d, 0x00);
    pub const READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(0x03, 0x0c, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);
    pub const NOT_READY: Sense = Sense::new(0x02, 0x04, 0x00);
    pub const DATA_PHASE_ERROR: Sense = Sense::new(0x0b, 0x4b, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Sense = Sense::new(0x05, 0x26, 0x04);
    /// UNIT ATTENTION: the reservations were cleared (PR OUT CLEAR).
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(0x06, 0x2a, 0x03);
    /// UNIT ATTENTION: a registrants-only or all-registrants reservation
    /// was released.
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(0x06, 0x2a, 0x04);
    /// UNIT ATTENTION: this nexus's registration was preempted.
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(0x06, 0x2a, 0x05);
    /// UNIT ATTENTION: POWER ON OCCURRED (TARGET COLD RESET).
    pub const POWER_ON: Sense = Sense::new(0x06, 0x29, 0x01);
    /// UNIT ATTENTION: BUS DEVICE RESET FUNCTION OCCURRED (LUN RESET,
    /// TARGET WARM RESET).
    pub const DEVICE_RESET: Sense = Sense::new(0x06, 0x29, 0x03);
    /// UNIT ATTENTION: I_T NEXUS LOSS OCCURRED.
    pub const NEXUS_LOSS: Sense = Sense::new(0x06, 0x29, 0x07);

    /// 18 bytes of fixed-format sense data.
    pub fn encode(&self) -> Bytes {
        let mut out = [0u8; 18];
        out[0] = 0x70;
        out[2] = self.key;
        if let Some(information) = self.information {
            out[0] |= 0x80;
            out[3..7].copy_from_slice(&information.to_be_bytes());
        }
        out[7] = 10;
        out[12] = self.asc;
        out[13] = self.ascq;
        Bytes::copy_from_slice(&out)
    }
}

/// How a command ended: status, sense (when CHECK CONDITION) and the
/// data for the initiator (already cut to the allocation length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data: Bytes,
}

impl Outcome {
    pub fn good() -> Outcome {
        Outcome {
            status: GOOD,
            sense: None,
            data: Bytes::new(),
        }
    }

    fn data(data: Bytes) -> Outcome {
        Outcome {
            status: GOOD,
            sense: None,
            data,
        }
    }

    pub fn check(sense: Sense) -> Outcome {
        Outcome {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data: Bytes::new(),
        }
    }
}

type Result<T> = std::result::Result<T, Sense>;

/// RESERVATION CONFLICT status.
fn conflict() -> Outcome {
    Outcome {
        status: reserve::RESERVATION_CONFLICT,
        sense: None,
        data: Bytes::new(),
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Cut `data` to the allocation length.
fn allocated(mut data: Vec<u8>, allocation: usize) -> Outcome {
    data.truncate(allocation);
    Outcome::data(Bytes::from(data))
}

/// Transfer (LBA, blocks) of a READ/WRITE-family CDB.
fn rw_range(cdb: &[u8]) -> (u64, u64) {
    match cdb[0] {
        0x08 | 0x0a => {
            let lba = u64::from(cdb[1] & 0x1f) << 16 | u64::from(be16(&cdb[2..4]));
            let blocks = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, blocks)
        }
        0x28 | 0x2a | 0x2e | 0x2f | 0x35 | 0x41 | 0x34 => {
            (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9])))
        }
        0xa8 | 0xaa | 0xae | 0xaf => (u64::from(be32(&cdb[2..6])), u64::from(be32(&cdb[6..10]))),
        0x88 | 0x8a | 0x8e | 0x8f | 0x90 | 0x91 | 0x93 => {
            (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])))
        }
        0x89 => (be64(&cdb[2..10]), u64::from(cdb[13])),
        _ => (0, 0),
    }
}

/// Commands whose data-out must be exactly the CDB's length (a different
/// expected transfer length is refused rather than cut).
pub fn exact_data_out(cdb: &[u8; 16]) -> bool {
    matches!(cdb[0], 0x89 | 0x41) || (cdb[0] == 0x93 && cdb[1] & 0x01 == 0)
}

/// How many bytes of data-out a CDB transfers (0 for commands without
/// any, and for unknown ones).
pub fn data_out_length(cdb: &[u8; 16]) -> u64 {
    match cdb[0] {
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => rw_range(cdb).1 * BLOCK_BYTES,
        0x2f | 0xaf | 0x8f => match (cdb[1] >> 1) & 3 {
            1 => rw_range(cdb).1 * BLOCK_BYTES,
            3 => BLOCK_BYTES,
            _ => 0,
        },
        0x41 => BLOCK_BYTES,
        0x93 if cdb[1] & 0x01 != 0 => 0, // NDOB
        0x93 => BLOCK_BYTES,
        0x89 => 2 * rw_range(cdb).1 * BLOCK_BYTES,
        0x42 | 0x55 => u64::from(be16(&cdb[7..9])),
        0x15 => u64::from(cdb[4]),
        0x5f => u64::from(be32(&cdb[5..9])),
        _ => 0,
    }
}

/// One LUN: a block device over a backend.
pub struct LogicalUnit {
    backend: Arc<dyn NbdBackend>,
    /// Stable identity (the volume id): VPD 0x80 and 0x83 derive from it,
    /// so every portal and every agent shows the same LUN.
    id: u64,
    compare_and_write: tokio::sync::Mutex<()>,
    /// Persistent reservations (see shared.rs: in the unit's replicated
    /// state, or in this agent for a memory LUN), and the unit
    /// attentions their changes raised.
    reservations: ReservationStore,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("id", &self.id)
            .field("size_bytes", &self.backend.size_bytes())
            .finish()
    }
}

/// The operation codes implemented: (opcode, service action, CDB length).
const SUPPORTED: &[(u8, Option<u16>, u8)] = &[
    (0x00, None, 6),        // TEST UNIT READY
    (0x03, None, 6),        // REQUEST SENSE
    (0x08, None, 6),        // READ(6)
    (0x0a, None, 6),        // WRITE(6)
    (0x12, None, 6),        // INQUIRY
    (0x15, None, 6),        // MODE SELECT(6)
    (0x16, None, 6),        // RESERVE(6)
    (0x17, None, 6),        // RELEASE(6)
    (0x1a, None, 6),        // MODE SENSE(6)
    (0x25, None, 10),       // READ CAPACITY(10)
    (0x28, None, 10),       // READ(10)
    (0x2a, None, 10),       // WRITE(10)
    (0x2e, None, 10),       // WRITE AND VERIFY(10)
    (0x2f, None, 10),       // VERIFY(10)
    (0x34, None, 10),       // PRE-FETCH(10)
    (0x35, None, 10),       // SYNCHRONIZE CACHE(10)
    (0x41, None, 10),       // WRITE SAME(10)
    (0x42, None, 10),       // UNMAP
    (0x55, None, 10),       // MODE SELECT(10)
    (0x5a, None, 10),       // MODE SENSE(10)
    (0x5e, Some(0x00), 10), // PERSISTENT RESERVE IN, READ KEYS
    (0x5e, Some(0x01), 10), // PERSISTENT RESERVE IN, READ RESERVATION
    (0x5e, Some(0x02), 10), // PERSISTENT RESERVE IN, REPORT CAPABILITIES
    (0x5e, Some(0x03), 10), // PERSISTENT RESERVE IN, READ FULL STATUS
    (0x5f, Some(0x00), 10), // PERSISTENT RESERVE OUT, REGISTER
    (0x5f, Some(0x01), 10), // PERSISTENT RESERVE OUT, RESERVE
    (0x5f, Some(0x02), 10), // PERSISTENT RESERVE OUT, RELEASE
    (0x5f, Some(0x03), 10), // PERSISTENT RESERVE OUT, CLEAR
    (0x5f, Some(0x04), 10), // PERSISTENT RESERVE OUT, PREEMPT
    (0x5f, Some(0x05), 10), // PERSISTENT RESERVE OUT, PREEMPT AND ABORT
    (0x5f, Some(0x06), 10), // PERSISTENT RESERVE OUT, REGISTER AND IGNORE
    (0x88, None, 16),       // READ(16)
    (0x89, None, 16),       // COMPARE AND WRITE
    (0x8a, None, 16),       // WRITE(16)
    (0x8e, None, 16),       // WRITE AND VERIFY(16)
    (0x8f, None, 16),       // VERIFY(16)
    (0x90, None, 16),       // PRE-FETCH(16)
    (0x91, None, 16),       // SYNCHRONIZE CACHE(16)
    (0x93, None, 16),       // WRITE SAME(16)
    (0x9e, Some(0x10), 16), // READ CAPACITY(16)
    (0x9e, Some(0x12), 16), // GET LBA STATUS
    (0xa0, None, 12),       // REPORT LUNS
    (0xa3, Some(0x0c), 12), // REPORT SUPPORTED OPERATION CODES
    (0xa8, None, 12),       // READ(12)
    (0xaa, None, 12),       // WRITE(12)
    (0xae, None, 12),       // WRITE AND VERIFY(12)
    (0xaf, None, 12),       // VERIFY(12)
];

/// CDB usage bitmap: which bits of each CDB byte the target looks at.
fn cdb_usage(opcode: u8, service_action: Option<u16>, length: u8) -> Vec<u8> {
    let mut usage = vec![0xffu8; usize::from(length)];
    usage[0] = opcode;
    if let Some(sa) = service_action {
        usage[1] = (sa & 0x1f) as u8;
    }
    // Control byte: NACA and LINK are not supported.
    if let Some(last) = usage.last_mut() {
        *last = 0x00;
    }
    usage
}

fn backend_sense(error: &BackendError, writing: bool) -> Sense {
    match error.errno {
        NbdErrno::Invalid | NbdErrno::NoSpace | NbdErrno::Overflow => Sense::LBA_OUT_OF_RANGE,
        NbdErrno::PermissionDenied => Sense::WRITE_PROTECTED,
        NbdErrno::Shutdown => Sense::NOT_READY,
        _ if writing => Sense::WRITE_ERROR,
        _ => Sense::READ_ERROR,
    }
}

impl LogicalUnit {
    /// A LUN whose persistent reservations are held in this agent.
    pub fn new(backend: Arc<dyn NbdBackend>, id: u64) -> LogicalUnit {
        LogicalUnit::with_reservations(backend, id, ReservationStore::local())
    }

    pub fn with_reservations(
        backend: Arc<dyn NbdBackend>,
        id: u64,
        reservations: ReservationStore,
    ) -> LogicalUnit {
        LogicalUnit {
            backend,
            id,
            compare_and_write: tokio::sync::Mutex::new(()),
            reservations,
        }
    }

    /// A session of `nexus` began (it hears the unit attentions kept
    /// for its initiator port, shared.rs).
    pub fn session_started(&self, nexus: &Nexus) {
        self.reservations.nexus_found(nexus);
    }

    /// The session of `nexus` ended: its SPC-2 reservation ends. After a
    /// logout its pending unit attentions go; otherwise (I_T nexus loss:
    /// the connection dropped, the session was reinstated, TARGET COLD
    /// RESET) they stay and I_T NEXUS LOSS OCCURRED joins them, for the
    /// initiator port's next session.
    pub async fn session_ended(&self, nexus: &Nexus, logged_out: bool) {
        self.reservations.end_reserve6(Some(nexus)).await;
        if logged_out {
            self.reservations.forget(nexus);
        } else {
            self.reservations.nexus_lost(nexus);
        }
    }

    /// The session of `nexus` is logging out: its SPC-2 reservation ends
    /// now, before the logout is answered.
    pub async fn logging_out(&self, nexus: &Nexus) {
        self.reservations.end_reserve6(Some(nexus)).await;
    }

    /// LUN RESET, TARGET WARM/COLD RESET: the SPC-2 reservation ends
    /// (persistent reservations are kept, as SPC-4 says), and every
    /// nexus of `nexuses` (this agent's sessions, the issuer's included,
    /// SAM-5 7.6) gets the unit attention `sense`.
    pub async fn reset(&self, sense: Sense, nexuses: &[Nexus]) {
        self.reservations.raise(nexuses, sense);
        self.reservations.end_reserve6(None).await;
    }

    /// RESERVE(6) and RELEASE(6) (module docs).
    async fn reserve6(&self, nexus: &Nexus, cdb: &[u8; 16]) -> Outcome {
        let reserve = cdb[0] == 0x16;
        // Byte 1 bit 0 was the obsolete extent reservation (and third
        // party bits beside it): refused.
        if cdb[1] & 0x1f != 0 {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        self.reservations.reserve6(nexus, reserve).await
    }

    pub fn blocks(&self) -> u64 {
        self.backend.size_bytes() / BLOCK_BYTES
    }

    /// The NAA 6 designator (VPD 0x83): locally assigned prefix, the id.
    pub fn naa(&self) -> [u8; 16] {
        let mut naa = [0u8; 16];
        naa[0] = 0x60;
        naa[1..4].copy_from_slice(b"RBK");
        naa[8..16].copy_from_slice(&self.id.to_be_bytes());
        naa
    }

    pub fn serial(&self) -> String {
        format!("RB{:016x}", self.id)
    }

    /// Execute one command from `nexus` on LUN `lun` with its data-out
    /// (cut to what the initiator sent). A command a persistent
    /// reservation forbids ends in RESERVATION CONFLICT.
    pub async fn execute(
        &self,
        nexus: &Nexus,
        lun: u64,
        cdb: &[u8; 16],
        data_out: Bytes,
    ) -> Outcome {
        if lun == 0 {
            // The persistent reservation check comes first, though its
            // answer is given after a unit attention's: it is what reads
            // a stale copy of the reservations (shared.rs), and a change
            // found in that read must be reported on this command, not
            // after it.
            // RESERVE(6) held by another nexus: everything conflicts
            // but INQUIRY, REPORT LUNS, REQUEST SENSE and RELEASE(6).
            let legacy_exempt = matches!(cdb[0], 0x12 | 0xa0 | 0x03 | 0x17);
            let access = match cdb[0] {
                0x16 | 0x17 | 0x5e | 0x5f => reserve::Access::Always,
                _ => reserve::access_of(cdb),
            };
            let admitted = self.reservations.admit(nexus, access, legacy_exempt).await;
            // INQUIRY and REPORT LUNS neither report nor clear a unit
            // attention; REQUEST SENSE returns it as its sense data.
            if !matches!(cdb[0], 0x12 | 0xa0) {
                if let Some(sense) = self.reservations.take_attention(nexus) {
                    return if cdb[0] == 0x03 {
                        allocated(sense.encode().to_vec(), usize::from(cdb[4]))
                    } else {
                        Outcome::check(sense)
                    };
                }
            }
            let permitted = match admitted {
                Ok((_, true)) => return conflict(),
                Ok((permitted, false)) => permitted,
                Err(outcome) => return outcome,
            };
            match cdb[0] {
                0x16 | 0x17 => return self.reserve6(nexus, cdb).await,
                0x5e => return self.reservations.read(cdb).await,
                0x5f => return self.reservations.write(nexus, cdb, &data_out).await,
                _ if !permitted => return conflict(),
                _ => {}
            }
        }
        match self.dispatch(lun, cdb, data_out).await {
            Ok(outcome) => outcome,
            Err(sense) => Outcome::check(sense),
        }
    }

    async fn dispatch(&self, lun: u64, cdb: &[u8; 16], data: Bytes) -> Result<Outcome> {
        let opcode = cdb[0];
        if lun != 0 {
            return match opcode {
                0x12 => self.inquiry(cdb, false),
                0xa0 => self.report_luns(cdb),
                0x03 => self.request_sense(cdb),
                _ => Err(Sense::LUN_NOT_SUPPORTED),
            };
        }
        match opcode {
            0x00 => Ok(Outcome::good()),
            0x03 => self.request_sense(cdb),
            0x12 => self.inquiry(cdb, true),
            0x25 => self.read_capacity10(cdb),
            0x9e => match cdb[1] & 0x1f {
                0x10 => self.read_capacity16(cdb),
                0x12 => self.get_lba_status(cdb),
                _ => Err(Sense::INVALID_FIELD_IN_CDB),
            },
            0x08 | 0x28 | 0xa8 | 0x88 => self.read(cdb).await,
            0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => self.write(cdb, data).await,
            0x2f | 0xaf | 0x8f => self.verify(cdb, data).await,
            0x34 | 0x90 => self.prefetch(cdb),
            0x35 | 0x91 => self.synchronize_cache(cdb).await,
            0x41 | 0x93 => self.write_same(cdb, data).await,
            0x42 => self.unmap(cdb, data).await,
            0x89 => self.compare_and_write(cdb, data).await,
            0x1a | 0x5a => self.mode_sense(cdb),
            0x15 | 0x55 => self.mode_select(cdb, &data),
            0xa0 => self.report_luns(cdb),
            0xa3 if cdb[1] & 0x1f == 0x0c => self.report_supported_opcodes(cdb),
            _ => Err(Sense::INVALID_OPCODE),
        }
    }

    /// Checks a block range against the capacity and the transfer limit.
    fn check_range(&self, lba: u64, blocks: u64, limit: u64) -> Result<()> {
        if lba
            .checked_add(blocks)
            .is_none_or(|end| end > self.blocks())
        {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        if blocks > limit {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        Ok(())
    }

    fn request_sense(&self, cdb: &[u8]) -> Result<Outcome> {
        let allocation = usize::from(cdb[4]);
        if cdb[1] & 0x01 != 0 {
            // Descriptor format, no sense.
            return Ok(allocated(vec![0x72, 0, 0, 0, 0, 0, 0, 0], allocation));
        }
        let sense = Sense::new(0, 0, 0).encode().to_vec();
        Ok(allocated(sense, allocation))
    }

    fn inquiry(&self, cdb: &[u8], connected: bool) -> Result<Outcome> {
        let allocation = usize::from(be16(&cdb[3..5]));
        let evpd = cdb[1] & 0x01 != 0;
        if cdb[1] & 0x02 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // CMDDT
        }
        // Peripheral qualifier 3: no LUN here; 0: direct-access block.
        let peripheral = if connected { 0x00 } else { 0x7f };
        if !evpd {
            if cdb[2] != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let mut data = vec![0u8; 96];
            data[0] = peripheral;
            data[2] = 0x06; // SPC-4
            data[3] = 0x12; // HISUP, response data format 2
            data[4] = 96 - 5;
            data[5] = 0x08; // 3PC=0, TPGS=0, PROTECT=0; (bit 3 reserved)
            data[5] = 0x00;
            data[7] = 0x02; // CMDQUE
            data[8..16].copy_from_slice(b"RACKBLK ");
            data[16..32].copy_from_slice(b"VOLUME          ");
            data[32..36].copy_from_slice(b"0001");
            // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
            for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
                data[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
            }
            return Ok(allocated(data, allocation));
        }
        let page = cdb[2];
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => self.serial().into_bytes(),
            0x83 => {
                let mut body = Vec::new();
                // NAA, binary, associated with the LUN.
                body.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
                body.extend_from_slice(&self.naa());
                // T10 vendor id, ASCII.
                let t10 = format!("RACKBLK {}", self.serial());
                body.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                body.extend_from_slice(t10.as_bytes());
                body
            }
            0xb0 => {
                let mut body = vec![0u8; 0x3c];
                body[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
                body[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
                body[2..4].copy_from_slice(&8u16.to_be_bytes()); // granularity
                body[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
                body[8..12].copy_from_slice(&2048u32.to_be_bytes()); // optimal 1 MiB
                body[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                body[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                body[24..28].copy_from_slice(&8u32.to_be_bytes()); // unmap granularity
                body[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, 0
                body[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
                body
            }
            0xb1 => {
                let mut body = vec![0u8; 0x3c];
                body[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating
                body
            }
            0xb2 => {
                // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type: thin.
                vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut data = vec![peripheral, page];
        data.extend_from_slice(&(body.len() as u16).to_be_bytes());
        data.extend_from_slice(&body);
        Ok(allocated(data, allocation))
    }

    fn read_capacity10(&self, cdb: &[u8]) -> Result<Outcome> {
        if cdb[8] & 0x01 != 0 || be32(&cdb[2..6]) != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // PMI is obsolete
        }
        let last = self.blocks().saturating_sub(1).min(0xffff_ffff) as u32;
        let mut data = Vec::with_capacity(8);
        data.extend_from_slice(&last.to_be_bytes());
        data.extend_from_slice(&(BLOCK_BYTES as u32).to_be_bytes());
        Ok(Outcome::data(Bytes::from(data)))
    }

    fn read_capacity16(&self, cdb: &[u8]) -> Result<Outcome> {
        let allocation = be32(&cdb[10..14]) as usize;
        let mut data = vec![0u8; 32];
        data[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        data[8..12].copy_from_slice(&(BLOCK_BYTES as u32).to_be_bytes());
        data[13] = 3; // 8 logical blocks per 4 KiB physical block
        data[14] = 0x80 | 0x40; // LBPME, LBPRZ
        Ok(allocated(data, allocation))
    }

    fn get_lba_status(&self, cdb: &[u8]) -> Result<Outcome> {
        let lba = be64(&cdb[2..10]);
        let allocation = be32(&cdb[10..14]) as usize;
        if lba >= self.blocks() {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        // The backend does not say which blocks are mapped: one
        // descriptor, "mapped or unknown" (SBC-4 provisioning status 0),
        // to the end of the LUN.
        let count = (self.blocks() - lba).min(u64::from(u32::MAX)) as u32;
        let mut data = vec![0u8; 24];
        data[0..4].copy_from_slice(&20u32.to_be_bytes());
        data[8..16].copy_from_slice(&lba.to_be_bytes());
        data[16..20].copy_from_slice(&count.to_be_bytes());
        Ok(allocated(data, allocation))
    }

    async fn read(&self, cdb: &[u8]) -> Result<Outcome> {
        if cdb[0] != 0x08 && cdb[1] & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // RDPROTECT
        }
        let (lba, blocks) = rw_range(cdb);
        self.check_range(lba, blocks, u64::from(MAX_TRANSFER_BLOCKS))?;
        if blocks == 0 {
            return Ok(Outcome::good());
        }
        let data = self
            .backend
            .read(lba * BLOCK_BYTES, blocks * BLOCK_BYTES)
            .await
            .map_err(|e| backend_sense(&e, false))?;
        Ok(Outcome::data(data))
    }

    async fn write(&self, cdb: &[u8], data: Bytes) -> Result<Outcome> {
        if cdb[0] != 0x0a && cdb[1] & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // WRPROTECT
        }
        let (lba, blocks) = rw_range(cdb);
        self.check_range(lba, blocks, u64::from(MAX_TRANSFER_BLOCKS))?;
        if blocks == 0 {
            return Ok(Outcome::good());
        }
        // The initiator's expected transfer length was shorter than the
        // CDB's: only the whole blocks it sent are written (SAM-5's first
        // choice; the transport reports the overflow residual).
        let blocks = blocks.min(data.len() as u64 / BLOCK_BYTES);
        if blocks == 0 {
            return Ok(Outcome::good());
        }
        // WRITE AND VERIFY: the data must be on the medium (durable).
        let fua = cdb[0] != 0x0a && cdb[1] & 0x08 != 0 || matches!(cdb[0], 0x2e | 0xae | 0x8e);
        self.backend
            .write(
                lba * BLOCK_BYTES,
                data.slice(..(blocks * BLOCK_BYTES) as usize),
                fua,
            )
            .await
            .map_err(|e| backend_sense(&e, true))?;
        Ok(Outcome::good())
    }

    async fn verify(&self, cdb: &[u8], data: Bytes) -> Result<Outcome> {
        if cdb[1] & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // VRPROTECT
        }
        let bytchk = (cdb[1] >> 1) & 3;
        if bytchk == 2 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let (lba, blocks) = rw_range(cdb);
        self.check_range(lba, blocks, u64::from(MAX_TRANSFER_BLOCKS))?;
        if blocks == 0 {
            return Ok(Outcome::good());
        }
        let medium = self
            .backend
            .read(lba * BLOCK_BYTES, blocks * BLOCK_BYTES)
            .await
            .map_err(|e| backend_sense(&e, false))?;
        let expected: Vec<u8> = match bytchk {
            0 => return Ok(Outcome::good()),
            1 => data.to_vec(),
            _ => data.iter().copied().cycle().take(medium.len()).collect(),
        };
        if expected.len() < medium.len() {
            return Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
        }
        if let Some(at) = medium.iter().zip(&expected).position(|(a, b)| a != b) {
            return Err(Sense {
                information: Some(at as u32),
                ..Sense::MISCOMPARE
            });
        }
        Ok(Outcome::good())
    }

    /// PRE-FETCH: this agent keeps no cache to load, so after the range
    /// check the answer is GOOD ("the blocks may not all fit in the
    /// cache"), never CONDITION MET.
    fn prefetch(&self, cdb: &[u8]) -> Result<Outcome> {
        let (lba, blocks) = rw_range(cdb);
        self.check_range(lba, blocks, u64::MAX)?;
        Ok(Outcome::good())
    }

    async fn synchronize_cache(&self, cdb: &[u8]) -> Result<Outcome> {
        let (lba, blocks) = rw_range(cdb);
        // 0 blocks: to the end of the LUN.
        self.check_range(lba, blocks, u64::MAX)?;
        self.backend
            .flush()
            .await
            .map_err(|e| backend_sense(&e, true))?;
        Ok(Outcome::good())
    }

    async fn write_same(&self, cdb: &[u8], data: Bytes) -> Result<Outcome> {
        let flags = cdb[1];
        if flags & 0xe0 != 0 || flags & 0x10 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // WRPROTECT, ANCHOR
        }
        if cdb[0] == 0x41 && flags & 0x01 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let (lba, blocks) = rw_range(cdb);
        if blocks == 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // WSNZ
        }
        self.check_range(lba, blocks, MAX_WRITE_SAME_BLOCKS)?;
        let ndob = cdb[0] == 0x93 && flags & 0x01 != 0;
        let unmap = flags & 0x08 != 0;
        let pattern = if ndob {
            Bytes::from(vec![0u8; BLOCK_BYTES as usize])
        } else {
            if data.len() < BLOCK_BYTES as usize {
                return Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
            }
            data.slice(..BLOCK_BYTES as usize)
        };
        let offset = lba * BLOCK_BYTES;
        let len = blocks * BLOCK_BYTES;
        let zeros = pattern.iter().all(|&b| b == 0);
        let done = if zeros && unmap {
            // Trimmed blocks read back as zeros (LBPRZ).
            self.backend.trim(offset, len).await
        } else if zeros {
            self.backend.write_zeroes(offset, len).await
        } else {
            let chunk_blocks = u64::from(MAX_TRANSFER_BLOCKS).min(blocks);
            let chunk: Bytes = pattern
                .iter()
                .copied()
                .cycle()
                .take((chunk_blocks * BLOCK_BYTES) as usize)
                .collect::<Vec<u8>>()
                .into();
            let mut at = 0;
            let mut result = Ok(());
            while at < blocks && result.is_ok() {
                let n = chunk_blocks.min(blocks - at);
                result = self
                    .backend
                    .write(
                        offset + at * BLOCK_BYTES,
                        chunk.slice(..(n * BLOCK_BYTES) as usize),
                        false,
                    )
                    .await;
                at += n;
            }
            result
        };
        done.map_err(|e| backend_sense(&e, true))?;
        Ok(Outcome::good())
    }

    async fn unmap(&self, cdb: &[u8], data: Bytes) -> Result<Outcome> {
        if cdb[1] & 0x01 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // ANCHOR
        }
        if data.is_empty() {
            return Ok(Outcome::good());
        }
        if data.len() < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let descriptors_len = usize::from(be16(&data[2..4]));
        let usable = descriptors_len.min(data.len() - 8) / 16;
        if usable as u32 > MAX_UNMAP_DESCRIPTORS {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        let mut ranges = Vec::with_capacity(usable);
        for i in 0..usable {
            let d = &data[8 + 16 * i..8 + 16 * (i + 1)];
            let (lba, blocks) = (be64(&d[0..8]), u64::from(be32(&d[8..12])));
            if lba
                .checked_add(blocks)
                .is_none_or(|end| end > self.blocks())
            {
                return Err(Sense::LBA_OUT_OF_RANGE);
            }
            if blocks > u64::from(MAX_UNMAP_BLOCKS) {
                return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
            }
            if blocks > 0 {
                ranges.push((lba, blocks));
            }
        }
        for (lba, blocks) in ranges {
            self.backend
                .trim(lba * BLOCK_BYTES, blocks * BLOCK_BYTES)
                .await
                .map_err(|e| backend_sense(&e, true))?;
        }
        Ok(Outcome::good())
    }

    async fn compare_and_write(&self, cdb: &[u8], data: Bytes) -> Result<Outcome> {
        if cdb[1] & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // WRPROTECT
        }
        let (lba, blocks) = rw_range(cdb);
        if blocks > u64::from(MAX_COMPARE_AND_WRITE_BLOCKS) {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        self.check_range(lba, blocks, u64::from(MAX_COMPARE_AND_WRITE_BLOCKS))?;
        if blocks == 0 {
            return Ok(Outcome::good());
        }
        let len = (blocks * BLOCK_BYTES) as usize;
        if data.len() < 2 * len {
            return Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
        }
        let _serialised = self.compare_and_write.lock().await;
        let medium = self
            .backend
            .read(lba * BLOCK_BYTES, len as u64)
            .await
            .map_err(|e| backend_sense(&e, false))?;
        if let Some(at) = medium.iter().zip(&data[..len]).position(|(a, b)| a != b) {
            return Err(Sense {
                information: Some(at as u32),
                ..Sense::MISCOMPARE
            });
        }
        let fua = cdb[1] & 0x08 != 0;
        self.backend
            .write(lba * BLOCK_BYTES, data.slice(len..2 * len), fua)
            .await
            .map_err(|e| backend_sense(&e, true))?;
        Ok(Outcome::good())
    }

    /// Mode pages (current values; changeable masks are all zero).
    fn mode_page(&self, page: u8, changeable: bool) -> Option<Vec<u8>> {
        let mut body = match page {
            // Caching: WCE=0 (a completed write is durable already).
            0x08 => vec![
                0x08, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            // Control: D_SENSE=0, QERR=0, TAS=1 (aborted tasks get TASK ABORTED).
            0x0a => vec![0x0a, 0x0a, 0x00, 0x00, 0x40, 0x00, 0, 0, 0xff, 0xff, 0, 0],
            // Informational exceptions control: all off.
            0x1c => vec![0x1c, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            _ => return None,
        };
        if changeable {
            for b in &mut body[2..] {
                *b = 0;
            }
        }
        Some(body)
    }

    fn mode_sense(&self, cdb: &[u8]) -> Result<Outcome> {
        let ten = cdb[0] == 0x5a;
        let dbd = cdb[1] & 0x08 != 0;
        let llbaa = ten && cdb[1] & 0x10 != 0;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        let allocation = if ten {
            usize::from(be16(&cdb[7..9]))
        } else {
            usize::from(cdb[4])
        };
        if pc == 3 {
            return Err(Sense::SAVING_NOT_SUPPORTED);
        }
        if subpage != 0 && subpage != 0xff {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut pages = Vec::new();
        if page == 0x3f {
            for p in [0x08, 0x0a, 0x1c] {
                pages.extend(self.mode_page(p, pc == 1).unwrap_or_default());
            }
        } else if subpage == 0 {
            pages = self
                .mode_page(page, pc == 1)
                .ok_or(Sense::INVALID_FIELD_IN_CDB)?;
        } else {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut descriptor = Vec::new();
        if !dbd {
            if llbaa {
                descriptor.extend_from_slice(&self.blocks().to_be_bytes());
                descriptor.extend_from_slice(&[0, 0, 0, 0]);
                descriptor.extend_from_slice(&(BLOCK_BYTES as u32).to_be_bytes());
            } else {
                let blocks = self.blocks().min(0xffff_ffff) as u32;
                descriptor.extend_from_slice(&blocks.to_be_bytes());
                descriptor.extend_from_slice(&(BLOCK_BYTES as u32).to_be_bytes());
                descriptor[4] = 0; // density code
            }
        }
        // Device-specific parameter: DPOFUA.
        let device_specific = 0x10;
        let mut data = Vec::new();
        if ten {
            let length = (6 + descriptor.len() + pages.len()) as u16;
            data.extend_from_slice(&length.to_be_bytes());
            data.push(0);
            data.push(device_specific);
            data.push(if llbaa && !dbd { 0x01 } else { 0x00 });
            data.push(0);
            data.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
        } else {
            data.push((3 + descriptor.len() + pages.len()).min(255) as u8);
            data.push(0);
            data.push(device_specific);
            data.push(descriptor.len() as u8);
        }
        data.extend_from_slice(&descriptor);
        data.extend_from_slice(&pages);
        Ok(allocated(data, allocation))
    }

    /// MODE SELECT: accepted only when it changes nothing (every page
    /// sent equals the current one; nothing here is changeable).
    fn mode_select(&self, cdb: &[u8], data: &[u8]) -> Result<Outcome> {
        let ten = cdb[0] == 0x55;
        if cdb[1] & 0x01 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // SP: no saved pages
        }
        if data.is_empty() {
            return Ok(Outcome::good());
        }
        let (header, descriptors) = if ten {
            if data.len() < 8 {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            (8, usize::from(be16(&data[6..8])))
        } else {
            if data.len() < 4 {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            (4, usize::from(data[3]))
        };
        let mut at = header + descriptors;
        if at > data.len() {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if descriptors >= 8 {
            // A block descriptor may restate the block length only.
            let d = &data[header..header + 8];
            if be32(&d[4..8]) & 0x00ff_ffff != BLOCK_BYTES as u32 {
                return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
            }
        }
        while at + 2 <= data.len() {
            let code = data[at] & 0x3f;
            let len = usize::from(data[at + 1]) + 2;
            if data[at] & 0x40 != 0 || at + len > data.len() {
                return Err(Sense::INVALID_FIELD_IN_PARAMETERS); // SPF / truncated
            }
            let current = self
                .mode_page(code, false)
                .ok_or(Sense::INVALID_FIELD_IN_PARAMETERS)?;
            if current.len() != len || current[2..] != data[at + 2..at + len] {
                return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
            }
            at += len;
        }
        Ok(Outcome::good())
    }

    fn report_luns(&self, cdb: &[u8]) -> Result<Outcome> {
        let allocation = be32(&cdb[6..10]) as usize;
        if allocation < 16 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let select = cdb[2];
        if !matches!(select, 0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12) {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut data = vec![0u8; 16];
        // Well-known LUNs only (0x01): none. Otherwise LUN 0.
        if select == 0x01 {
            data.truncate(8);
        } else {
            data[3] = 8;
        }
        Ok(allocated(data, allocation))
    }

    fn report_supported_opcodes(&self, cdb: &[u8]) -> Result<Outcome> {
        let rctd = cdb[2] & 0x80 != 0;
        let options = cdb[2] & 0x07;
        let opcode = cdb[3];
        let service_action = be16(&cdb[4..6]);
        let allocation = be32(&cdb[6..10]) as usize;
        let timeouts = |out: &mut Vec<u8>| {
            if rctd {
                out.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            }
        };
        match options {
            0 => {
                let mut list = Vec::new();
                for &(op, sa, len) in SUPPORTED {
                    list.push(op);
                    list.push(0);
                    list.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
                    list.push(0);
                    list.push(u8::from(sa.is_some()) | if rctd { 0x02 } else { 0 });
                    list.extend_from_slice(&u16::from(len).to_be_bytes());
                    timeouts(&mut list);
                }
                let mut data = (list.len() as u32).to_be_bytes().to_vec();
                data.extend_from_slice(&list);
                Ok(allocated(data, allocation))
            }
            1..=3 => {
                let entry = SUPPORTED.iter().find(|&&(op, sa, _)| {
                    op == opcode
                        && match options {
                            1 => sa.is_none(),
                            2 => sa == Some(service_action),
                            _ => sa.is_none_or(|sa| sa == service_action),
                        }
                });
                // A command with service actions asked without one (or
                // the other way round) is an invalid request.
                let mismatched = SUPPORTED.iter().any(|&(op, sa, _)| {
                    op == opcode
                        && ((options == 1 && sa.is_some()) || (options == 2 && sa.is_none()))
                });
                if mismatched {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                let mut data = vec![0u8, 0];
                match entry {
                    Some(&(op, sa, len)) => {
                        data[1] = 0x03 | if rctd { 0x80 } else { 0 }; // supported, standard
                        let usage = cdb_usage(op, sa, len);
                        data.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                        data.extend_from_slice(&usage);
                        timeouts(&mut data);
                    }
                    None => {
                        data[1] = 0x01; // not supported
                        data.extend_from_slice(&[0, 0]);
                    }
                }
                Ok(allocated(data, allocation))
            }
            _ => Err(Sense::INVALID_FIELD_IN_CDB),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nbd::MemoryBackend;

    fn unit() -> (LogicalUnit, MemoryBackend) {
        let backend = MemoryBackend::new(1 << 20);
        (LogicalUnit::new(Arc::new(backend.clone()), 42), backend)
    }

    fn nexus() -> Nexus {
        Nexus {
            initiator: "iqn.test".to_owned(),
            isid: [0; 6],
        }
    }

    /// A second initiator's nexus, beside [`nexus`].
    fn other_nexus() -> Nexus {
        Nexus {
            initiator: "iqn.other".to_owned(),
            isid: [0; 6],
        }
    }

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut cdb = [0u8; 16];
        cdb[..bytes.len()].copy_from_slice(bytes);
        cdb
    }

    fn run(unit: &LogicalUnit, c: &[u8], data: &[u8]) -> Outcome {
        futures::executor::block_on(unit.execute(
            &nexus(),
            0,
            &cdb(c),
            Bytes::copy_from_slice(data),
        ))
    }

    fn write16(lba: u64, blocks: u32) -> Vec<u8> {
        let mut c = vec![0x8a, 0];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&blocks.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    }

    fn read10(lba: u32, blocks: u16) -> Vec<u8> {
        let mut c = vec![0x28, 0];
        c.extend_from_slice(&lba.to_be_bytes());
        c.push(0);
        c.extend_from_slice(&blocks.to_be_bytes());
        c.push(0);
        c
    }

    #[test]
    fn writes_read_back_and_ranges_are_checked() {
        let (unit, _) = unit();
        let data = vec![0x5a; 1024];
        assert_eq!(run(&unit, &write16(10, 2), &data), Outcome::good());
        let read = run(&unit, &read10(10, 2), &[]);
        assert_eq!(read.data, data);
        // 2048 blocks: the last one is 2047.
        let beyond = run(&unit, &read10(2047, 2), &[]);
        assert_eq!(beyond.sense, Some(Sense::LBA_OUT_OF_RANGE));
        let rdprotect = run(&unit, &[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
        assert_eq!(rdprotect.sense, Some(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(run(&unit, &[0xc5], &[]).sense, Some(Sense::INVALID_OPCODE));
        // A persistent reservation taken by this nexus (register key 7,
        // reserve EXCLUSIVE ACCESS) refuses another nexus's read with
        // RESERVATION CONFLICT; READ KEYS shows the key.
        let mut parameters = [0u8; 24];
        parameters[8..16].copy_from_slice(&7u64.to_be_bytes());
        let register = run(&unit, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0], &parameters);
        assert_eq!(register.status, GOOD);
        let mut parameters = [0u8; 24];
        parameters[..8].copy_from_slice(&7u64.to_be_bytes());
        let reserve = run(&unit, &[0x5f, 1, 3, 0, 0, 0, 0, 0, 24, 0], &parameters);
        assert_eq!(reserve.status, GOOD);
        let keys = run(&unit, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 0x10, 0], &[]);
        assert_eq!(&keys.data[8..16], &7u64.to_be_bytes());
        let stranger = other_nexus();
        let refused = futures::executor::block_on(unit.execute(
            &stranger,
            0,
            &cdb(&read10(0, 1)),
            Bytes::new(),
        ));
        assert_eq!(refused.status, reserve::RESERVATION_CONFLICT);
        assert_eq!(run(&unit, &read10(0, 1), &[]).status, GOOD);
        let release = run(&unit, &[0x5f, 2, 3, 0, 0, 0, 0, 0, 24, 0], &parameters);
        assert_eq!(release.status, GOOD);
    }

    #[test]
    fn capacity_reports_geometry_and_provisioning() {
        let (unit, _) = unit();
        let rc10 = run(&unit, &[0x25], &[]);
        assert_eq!(&rc10.data[..], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
        let rc16 = run(
            &unit,
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            &[],
        );
        assert_eq!(rc16.data.len(), 32);
        assert_eq!(be64(&rc16.data[0..8]), 2047);
        assert_eq!(rc16.data[13], 3);
        assert_eq!(rc16.data[14] & 0xc0, 0xc0);
    }

    #[test]
    fn inquiry_pages_derive_from_the_id() {
        let (unit, _) = unit();
        let standard = run(&unit, &[0x12, 0, 0, 0, 255, 0], &[]);
        assert_eq!(standard.data.len(), 96);
        assert_eq!(&standard.data[8..16], b"RACKBLK ");
        let short = run(&unit, &[0x12, 0, 0, 0, 5, 0], &[]);
        assert_eq!(short.data.len(), 5);
        let pages = run(&unit, &[0x12, 1, 0, 0, 255, 0], &[]);
        assert_eq!(&pages.data[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        let ids = run(&unit, &[0x12, 1, 0x83, 0, 255, 0], &[]);
        assert_eq!(&ids.data[8..24], &unit.naa());
        assert_eq!(&unit.naa()[8..], &42u64.to_be_bytes());
        assert_eq!(
            run(&unit, &[0x12, 1, 0x99, 0, 255, 0], &[]).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
        // Another LUN: peripheral qualifier 3.
        let other = futures::executor::block_on(unit.execute(
            &nexus(),
            1,
            &cdb(&[0x12, 0, 0, 0, 36, 0]),
            Bytes::new(),
        ));
        assert_eq!(other.data[0], 0x7f);
    }

    #[test]
    fn write_same_unmap_and_compare_and_write() {
        let (unit, backend) = unit();
        let pattern = vec![0xabu8; 512];
        let mut ws = vec![0x93, 0];
        ws.extend_from_slice(&100u64.to_be_bytes());
        ws.extend_from_slice(&16u32.to_be_bytes());
        ws.extend_from_slice(&[0, 0]);
        assert_eq!(run(&unit, &ws, &pattern), Outcome::good());
        assert_eq!(
            backend.read_sync(100 * 512, 16 * 512).unwrap(),
            vec![0xab; 16 * 512]
        );
        // UNMAP 8 of them: zeros.
        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&100u64.to_be_bytes());
        list.extend_from_slice(&8u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        assert_eq!(
            run(&unit, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list),
            Outcome::good()
        );
        assert_eq!(
            backend.read_sync(100 * 512, 8 * 512).unwrap(),
            vec![0; 8 * 512]
        );
        // COMPARE AND WRITE: match then write; mismatch reports the offset.
        let mut caw = vec![0x89, 0];
        caw.extend_from_slice(&108u64.to_be_bytes());
        caw.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
        let mut data = vec![0xab; 512];
        data.extend_from_slice(&[0xcd; 512]);
        assert_eq!(run(&unit, &caw, &data), Outcome::good());
        assert_eq!(backend.read_sync(108 * 512, 512).unwrap(), vec![0xcd; 512]);
        let miss = run(&unit, &caw, &data);
        assert_eq!(
            miss.sense.map(|s| (s.key, s.asc, s.information)),
            Some((0x0e, 0x1d, Some(0)))
        );
        // WRITE SAME with 0 blocks is refused (WSNZ).
        let mut zero = ws.clone();
        zero[10..14].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            run(&unit, &zero, &pattern).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    #[test]
    fn mode_pages_and_select() {
        let (unit, _) = unit();
        let sense = run(&unit, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
        assert_eq!(usize::from(sense.data[0]) + 1, sense.data.len());
        assert_eq!(sense.data[3], 8);
        let caching = run(&unit, &[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]);
        assert_eq!(caching.data[8], 0x08);
        // Re-selecting the current caching page is accepted; changing it is not.
        let mut select = vec![0, 0, 0, 0];
        select.extend_from_slice(&caching.data[8..]);
        let len = select.len() as u8;
        assert_eq!(
            run(&unit, &[0x15, 0x10, 0, 0, len, 0], &select),
            Outcome::good()
        );
        select[6] = 0x04; // WCE
        assert_eq!(
            run(&unit, &[0x15, 0x10, 0, 0, len, 0], &select).sense,
            Some(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
        assert_eq!(
            run(&unit, &[0x1a, 0, 0xc8, 0, 255, 0], &[]).sense,
            Some(Sense::SAVING_NOT_SUPPORTED)
        );
    }

    #[test]
    fn data_out_lengths() {
        assert_eq!(data_out_length(&cdb(&write16(0, 3))), 1536);
        assert_eq!(data_out_length(&cdb(&[0x0a, 0, 0, 0, 0, 0])), 256 * 512);
        assert_eq!(data_out_length(&cdb(&read10(0, 3))), 0);
        assert_eq!(
            data_out_length(&cdb(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])),
            1024
        );
    }

    #[test]
    fn report_supported_opcodes_one_command() {
        let (unit, _) = unit();
        let one = run(
            &unit,
            &[0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 1, 0, 0, 0],
            &[],
        );
        assert_eq!(one.data[1] & 0x07, 0x03);
        assert_eq!(be16(&one.data[2..4]), 10);
        assert_eq!(one.data[4], 0x28);
        let none = run(
            &unit,
            &[0xa3, 0x0c, 0x01, 0xc5, 0, 0, 0, 0, 1, 0, 0, 0],
            &[],
        );
        assert_eq!(none.data[1] & 0x07, 0x01);
    }

    fn run_as(unit: &LogicalUnit, who: &Nexus, c: &[u8], data: &[u8]) -> Outcome {
        futures::executor::block_on(unit.execute(who, 0, &cdb(c), Bytes::copy_from_slice(data)))
    }

    /// RESERVE(6)/RELEASE(6): one nexus holds the LUN, others conflict
    /// but for INQUIRY, REPORT LUNS, REQUEST SENSE and RELEASE; nexus loss
    /// and LUN reset end it; persistent registrations forbid it.
    #[test]
    fn reserve6_holds_until_release_loss_or_reset() {
        let (unit, _) = unit();
        let (a, b) = (nexus(), other_nexus());
        assert_eq!(run_as(&unit, &a, &[0x16, 0, 0, 0, 0, 0], &[]).status, GOOD);
        assert_eq!(run_as(&unit, &a, &[0x16, 0, 0, 0, 0, 0], &[]).status, GOOD);
        let conflict = reserve::RESERVATION_CONFLICT;
        assert_eq!(
            run_as(&unit, &b, &[0x16, 0, 0, 0, 0, 0], &[]).status,
            conflict
        );
        assert_eq!(
            run_as(&unit, &b, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).status,
            conflict
        );
        assert_eq!(
            run_as(&unit, &b, &[0x00, 0, 0, 0, 0, 0], &[]).status,
            conflict
        );
        assert_eq!(run_as(&unit, &b, &read10(0, 1), &[]).status, conflict);
        assert_eq!(run_as(&unit, &b, &[0x12, 0, 0, 0, 36, 0], &[]).status, GOOD);
        assert_eq!(run_as(&unit, &b, &[0x03, 0, 0, 0, 18, 0], &[]).status, GOOD);
        // A non-holder's RELEASE is GOOD and changes nothing.
        assert_eq!(run_as(&unit, &b, &[0x17, 0, 0, 0, 0, 0], &[]).status, GOOD);
        assert_eq!(run_as(&unit, &b, &read10(0, 1), &[]).status, conflict);
        assert_eq!(run_as(&unit, &a, &read10(0, 1), &[]).status, GOOD);
        // The obsolete extent bit is refused.
        let extent = run_as(&unit, &a, &[0x16, 1, 0, 0, 0, 0], &[]);
        assert_eq!(extent.sense, Some(Sense::INVALID_FIELD_IN_CDB));
        // Released by its holder: b takes it; a's nexus loss does not
        // end b's; b's does.
        assert_eq!(run_as(&unit, &a, &[0x17, 0, 0, 0, 0, 0], &[]).status, GOOD);
        assert_eq!(run_as(&unit, &b, &[0x16, 0, 0, 0, 0, 0], &[]).status, GOOD);
        futures::executor::block_on(unit.session_ended(&a, true));
        assert_eq!(run_as(&unit, &a, &read10(0, 1), &[]).status, conflict);
        futures::executor::block_on(unit.session_ended(&b, true));
        assert_eq!(run_as(&unit, &a, &[0x16, 0, 0, 0, 0, 0], &[]).status, GOOD);
        // A LUN reset ends it, and tells every nexus once.
        futures::executor::block_on(unit.reset(Sense::DEVICE_RESET, &[a.clone(), b.clone()]));
        for who in [&a, &b] {
            let first = run_as(&unit, who, &read10(0, 1), &[]);
            assert_eq!(first.sense, Some(Sense::DEVICE_RESET));
            assert_eq!(run_as(&unit, who, &read10(0, 1), &[]).status, GOOD);
        }
        // With a persistent registration, RESERVE(6) conflicts and
        // RELEASE(6) does nothing.
        let mut parameters = [0u8; 24];
        parameters[8..16].copy_from_slice(&7u64.to_be_bytes());
        let register = run_as(&unit, &b, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0], &parameters);
        assert_eq!(register.status, GOOD);
        assert_eq!(
            run_as(&unit, &a, &[0x16, 0, 0, 0, 0, 0], &[]).status,
            conflict
        );
        assert_eq!(run_as(&unit, &a, &[0x17, 0, 0, 0, 0, 0], &[]).status, GOOD);
    }

    /// A preempted nexus hears UNIT ATTENTION once on its next command
    /// (REQUEST SENSE returns it as data instead; INQUIRY passes it by).
    #[test]
    fn preemption_raises_a_unit_attention_once() {
        let (unit, _) = unit();
        let (a, b) = (nexus(), other_nexus());
        let register = |who: &Nexus, key: u64| {
            let mut p = [0u8; 24];
            p[8..16].copy_from_slice(&key.to_be_bytes());
            run_as(&unit, who, &[0x5f, 6, 0, 0, 0, 0, 0, 0, 24, 0], &p).status
        };
        assert_eq!(register(&a, 1), GOOD);
        assert_eq!(register(&b, 2), GOOD);
        // b preempts a (PREEMPT, type EXCLUSIVE ACCESS).
        let mut p = [0u8; 24];
        p[..8].copy_from_slice(&2u64.to_be_bytes());
        p[8..16].copy_from_slice(&1u64.to_be_bytes());
        let preempt = run_as(&unit, &b, &[0x5f, 4, 3, 0, 0, 0, 0, 0, 24, 0], &p);
        assert_eq!(preempt.status, GOOD);
        // b (the actor) has nothing pending.
        assert_eq!(run_as(&unit, &b, &[0x00, 0, 0, 0, 0, 0], &[]).status, GOOD);
        assert_eq!(run_as(&unit, &a, &[0x12, 0, 0, 0, 36, 0], &[]).status, GOOD);
        let tur = run_as(&unit, &a, &[0x00, 0, 0, 0, 0, 0], &[]);
        assert_eq!(tur.sense, Some(Sense::REGISTRATIONS_PREEMPTED));
        // Reported once: the next TUR is GOOD (a is not reserved out of
        // TUR: it is an "always" command).
        assert_eq!(run_as(&unit, &a, &[0x00, 0, 0, 0, 0, 0], &[]).status, GOOD);
        // CLEAR by b after a registers again: a's REQUEST SENSE returns
        // RESERVATIONS PREEMPTED as data and clears it.
        assert_eq!(register(&a, 5), GOOD);
        let mut p = [0u8; 24];
        p[..8].copy_from_slice(&2u64.to_be_bytes());
        let clear = run_as(&unit, &b, &[0x5f, 3, 0, 0, 0, 0, 0, 0, 24, 0], &p);
        assert_eq!(clear.status, GOOD);
        let sense = run_as(&unit, &a, &[0x03, 0, 0, 0, 18, 0], &[]);
        assert_eq!(sense.status, GOOD);
        assert_eq!(
            (sense.data[2], sense.data[12], sense.data[13]),
            (0x06, 0x2a, 0x03)
        );
        assert_eq!(run_as(&unit, &a, &[0x00, 0, 0, 0, 0, 0], &[]).status, GOOD);
        // A logout drops what is pending.
        assert_eq!(register(&a, 5), GOOD);
        assert_eq!(register(&b, 2), GOOD);
        let mut p = [0u8; 24];
        p[..8].copy_from_slice(&2u64.to_be_bytes());
        p[8..16].copy_from_slice(&5u64.to_be_bytes());
        let preempt = run_as(&unit, &b, &[0x5f, 4, 3, 0, 0, 0, 0, 0, 24, 0], &p);
        assert_eq!(preempt.status, GOOD);
        futures::executor::block_on(unit.session_ended(&a, true));
        assert_eq!(run_as(&unit, &a, &[0x00, 0, 0, 0, 0, 0], &[]).status, GOOD);
    }

    /// I_T nexus loss (no logout): the initiator port's next session
    /// hears I_T NEXUS LOSS OCCURRED once, after the attentions that
    /// were pending; a reset's 29h attention stands alone (a later 29h
    /// adds nothing); a logout hears nothing.
    #[test]
    fn nexus_loss_is_reported_to_the_next_session() {
        let (unit, _) = unit();
        let (a, b) = (nexus(), other_nexus());
        let tur = [0x00, 0, 0, 0, 0, 0];
        unit.session_started(&a);
        futures::executor::block_on(unit.session_ended(&a, false));
        unit.session_started(&a);
        // INQUIRY passes it by; REQUEST SENSE returns it as data.
        assert_eq!(run_as(&unit, &a, &[0x12, 0, 0, 0, 36, 0], &[]).status, GOOD);
        let sense = run_as(&unit, &a, &[0x03, 0, 0, 0, 18, 0], &[]);
        assert_eq!(
            (sense.data[2], sense.data[12], sense.data[13]),
            (0x06, 0x29, 0x07)
        );
        assert_eq!(run_as(&unit, &a, &tur, &[]).status, GOOD);
        // Another nexus is not told.
        assert_eq!(run_as(&unit, &b, &tur, &[]).status, GOOD);
        // A cold reset, then the connection drops: POWER ON only.
        futures::executor::block_on(unit.reset(Sense::POWER_ON, std::slice::from_ref(&a)));
        futures::executor::block_on(unit.session_ended(&a, false));
        assert_eq!(run_as(&unit, &a, &tur, &[]).sense, Some(Sense::POWER_ON));
        assert_eq!(run_as(&unit, &a, &tur, &[]).status, GOOD);
        // A logout: nothing for the next session.
        futures::executor::block_on(unit.session_ended(&a, true));
        assert_eq!(run_as(&unit, &a, &tur, &[]).status, GOOD);
    }

    /// Lost nexuses that never come back (a new ISID per session) are
    /// dropped oldest first: they neither grow without bound nor crowd
    /// out the attentions of live nexuses.
    #[test]
    fn lost_nexuses_are_bounded() {
        let (unit, _) = unit();
        let tur = [0x00, 0, 0, 0, 0, 0];
        let port = |i: u32| Nexus {
            initiator: "iqn.2026-12.test:lost".into(),
            isid: [
                0x80,
                0,
                i.to_be_bytes()[0],
                i.to_be_bytes()[1],
                i.to_be_bytes()[2],
                i.to_be_bytes()[3],
            ],
        };
        for i in 0..5000 {
            unit.session_started(&port(i));
            futures::executor::block_on(unit.session_ended(&port(i), false));
        }
        // The oldest are gone, the newest are kept.
        assert_eq!(run_as(&unit, &port(0), &tur, &[]).status, GOOD);
        assert_eq!(
            run_as(&unit, &port(4999), &tur, &[]).sense,
            Some(Sense::NEXUS_LOSS)
        );
        // A live nexus still gets its reset attention.
        let a = nexus();
        futures::executor::block_on(unit.reset(Sense::DEVICE_RESET, std::slice::from_ref(&a)));
        assert_eq!(
            run_as(&unit, &a, &tur, &[]).sense,
            Some(Sense::DEVICE_RESET)
        );
    }
}
