//! iSCSI target (RFC 7143): how hosts that do not speak NBD attach to a
//! volume (ARCHITECTURE.md, `client/`). One LUN, LUN 0, served over the
//! same backend seam as the NBD server ([`NbdBackend`](crate::nbd::NbdBackend):
//! the volume client in production with its failover, retries, CRCs and
//! attachment credential; the memory backend for `rackblock attach
//! --memory`), so both front ends see one device.
//!
//! # Layers
//!
//! * `pdu.rs` (sans-IO): framing of the 48-byte BHS, AHS, padding and the
//!   CRC-32C header and data digests; typed [`PduError`]s.
//! * `login.rs` (sans-IO): the login stage machine, CHAP (one-way and
//!   mutual, hex and base64 values), operational negotiation.
//! * `scsi.rs`: SPC-4/SBC-3 commands on the backend; fixed-format sense.
//! * `reserve.rs` (sans-IO): persistent reservations per I_T nexus
//!   (initiator name + ISID), the SPC-4 rules and the RESERVATION
//!   CONFLICT check; the state also holds the SPC-2 reservation
//!   (RESERVE(6)), so every agent of a volume enforces both.
//! * `shared.rs`: where they are kept: in the unit's replicated state
//!   for a volume of a unit (read and compare-and-set through the host
//!   ports; a cached copy at most 500 ms old admits commands, and
//!   RESERVE/PREEMPT are answered only after every other agent's copy
//!   must have seen them), in this agent for a memory LUN.
//! * `server.rs`: listeners (one per portal), a task per connection, the
//!   full feature phase.
//!
//! # Connection state machine
//!
//! ```text
//! accept ─▶ LOGIN (≤ 30 s; no digests; data ≤ 64 KiB per PDU)
//!   stage 0 security: AuthMethod CHAP (required when a secret is set) or None
//!   stage 1 operational: keys answered, defaults for the rest
//!   T=1 NSG=3 ─▶ FULL FEATURE (digests as negotiated; data ≤ 256 KiB per PDU)
//!   any refusal ─▶ login response with status, close
//! FULL FEATURE, PDUs read one at a time, commands run as tasks:
//!   SCSI Command ── CmdSN == ExpCmdSN (or immediate)? else ignored silently
//!     read/no data ─▶ execute ─▶ Data-In… (last with S, status, residual)
//!                                or SCSI Response (+ sense, residual)
//!     write ─▶ immediate data; unsolicited Data-Out until F (InitialR2T=No)
//!            ─▶ R2T (≤ MaxBurstLength, one outstanding) … ─▶ execute ─▶ response
//!   Data-Out ── DataSN, offset, TTT checked; a mismatch fails the task
//!               (ABORTED COMMAND, DATA PHASE ERROR), its later data is
//!               dropped, the connection carries on
//!   NOP-Out ─▶ NOP-In echoing the ping data
//!   Text ─▶ SendTargets: this target, one TargetAddress per portal
//!   Task management ─▶ ABORT TASK (a write still waiting for data is
//!     dropped; a completed one: "task does not exist"), ABORT/CLEAR TASK
//!     SET, LUN RESET, TARGET WARM RESET: function complete, and every
//!     session of this agent (the issuer's too) gets UNIT ATTENTION 29h/03h
//!     BUS DEVICE RESET FUNCTION OCCURRED; TARGET COLD RESET: function
//!     complete, 29h/01h POWER ON OCCURRED, then every connection closes
//!   Logout ─▶ response, close
//!   SNACK, anything else ─▶ Reject
//! ```
//!
//! # Sessions and sequence numbers
//!
//! Every connection is its own session: MaxConnections is negotiated to
//! 1 whatever the initiator offers (the RFC's minimum function), each
//! login gets a new TSIH, and a login that tries to add a connection to
//! a session (a non-zero TSIH) is refused with "too many connections"
//! (0x0206) when that session is live, "session does not exist" (0x020a)
//! otherwise. Multipath initiators (dm-multipath, ESXi NMP, MPIO) open
//! one session per portal instead, which is what the two portals are
//! for: several sessions from one or many initiators run side by side on
//! one LUN, which is safe for the same reason NBD's multi-conn is (every
//! completed write is durable and visible to every later read). MC/S
//! would add nothing here but command ordering across the connections
//! of one session, which the task model below does not promise anyway.
//! StatSN counts per connection; the command window is 32 (MaxCmdSN =
//! ExpCmdSN + 31).
//!
//! The I_T nexus of a session is (initiator name, ISID). When its
//! connection ends its RESERVE(6) ends (scsi.rs); after a logout its
//! pending unit attentions go, after a loss (no logout) they stay and
//! 29h/07h I_T NEXUS LOSS OCCURRED joins them, reported once to the next
//! session of that initiator port (shared.rs, `Attentions`).
//!
//! **Session reinstatement** (RFC 7143 6.3.5): a normal-session login
//! with TSIH 0 and the (initiator name, ISID) of a live normal session
//! closes the old session before the new one reads its first command: the
//! old one is told to stop reading, its writes still waiting for data are
//! dropped, its running commands answer (they are never cut short), its
//! connection closes and its nexus is released (I_T nexus loss, above);
//! only then does the new session run (its first command hears 29h/07h).
//! If the old session has not ended within 90 s the new connection is
//! closed instead (the initiator logs in again).
//!
//! # Concurrency in a connection
//!
//! ```text
//! reader (CmdSN, Data-Out, R2T, TMF, text) ──slot (≤ 32)──▶ command task ─┐
//!      │                                                               ├─▶ writer
//!      └── NOP-In, R2T, Text/TMF/Logout responses, Reject ─────────────┘   (stamps StatSN,
//!                                                                         ExpCmdSN, MaxCmdSN
//!                                                                         in wire order)
//! ```
//!
//! Commands run concurrently as SIMPLE tasks (the initiator must not rely
//! on the order of outstanding ones; a completed write is durable, so a
//! SYNCHRONIZE CACHE covers every write completed before it). ORDERED and
//! HEAD OF QUEUE tasks wait for the running ones and run alone. Task
//! management and logout wait for the running commands too, so their
//! answer follows the replies of the tasks they cover: a running command
//! is never cut short, only a write still waiting for its data is
//! aborted. When all 32 slots are taken the reader stops reading (TCP
//! backpressure), and likewise when the running commands hold 128 MiB
//! of payload (write data, read replies). At most 32 MiB is solicited
//! for one command, whatever its CDB asks.
//!
//! # Supported parameters
//!
//! HeaderDigest/DataDigest None or CRC32C (initiator's preference order),
//! MaxRecvDataSegmentLength 256 KiB (ours) / as declared (theirs),
//! MaxBurstLength and FirstBurstLength up to 16 MiB, ImmediateData and
//! InitialR2T as offered, MaxOutstandingR2T 1, DataPDUInOrder and
//! DataSequenceInOrder Yes, ErrorRecoveryLevel 0, markers off.
//!
//! # Not supported (yet)
//!
//! PREEMPT AND ABORT aborting other agents' tasks in flight, REGISTER
//! AND MOVE, SPEC_I_PT and ALL_TG_PT, the unit attentions of a reset for the sessions
//! of *other* agents of the volume (a reset raises them for this
//! agent's sessions), a 29h/00h POWER ON for a brand-new nexus (as
//! Linux LIO: a new session's first command is not refused), several
//! connections per session, error recovery levels 1 and 2, ACA,
//! target-initiated NOP-In pings.
//!
//! APTPL is honoured for a unit's volume (reserve.rs), and reservation
//! changes raise SPC-4's unit attentions (REGISTRATIONS PREEMPTED,
//! RESERVATIONS PREEMPTED, RESERVATIONS RELEASED) for the nexuses of
//! this agent, including changes made through other agents.

mod login;
mod md5;
mod pdu;
mod reserve;
mod scsi;
mod server;
mod shared;

pub use login::Chap;
pub use pdu::PduError;
pub use scsi::{LogicalUnit, Outcome, Sense};
pub use server::{target_name_for, ConnectionError, IscsiConfig, IscsiError, IscsiServer};
pub use shared::{
    HostReservationSource, ReservationSource, ReservationStore, SourceError, FRESH_FOR,
    RESTRICT_GRACE,
};

/// The well-known iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;
