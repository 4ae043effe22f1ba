//! Persistent reservations (SPC-4 5.12): PERSISTENT RESERVE IN (READ
//! KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS) and
//! OUT (REGISTER, REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE,
//! CLEAR, PREEMPT, PREEMPT AND ABORT), and the RESERVATION CONFLICT
//! check every other command goes through.
//!
//! An initiator is identified per I_T nexus: its iSCSI initiator name
//! and the session's ISID (one target port: both portals are the same
//! SCSI target port group). Registrations outlive the session that made
//! them (a reconnecting initiator with the same name and ISID keeps its
//! registration and its reservation), as SPC-4 asks.
//!
//! # Where the state lives
//!
//! [`Reservations`] is the state and its SPC-4 rules, sans-IO. Where it
//! is kept is shared.rs's business: for a volume of a unit, in the
//! unit's replicated state (every agent of the volume sees the same
//! registrations; they survive agent restarts and head-node failovers),
//! converted by [`Reservations::from_record`] / [`Reservations::to_record`];
//! for a memory LUN, in this agent.
//!
//! # APTPL
//!
//! A unit's volume keeps its reservations in replicated state, which
//! survives power loss whatever the APTPL bit says: such a LUN reports
//! PTPL_C 1 and takes REGISTER with APTPL 1, and reports the last
//! REGISTER's bit as PTPL_A (kept in the record). With APTPL 0, SPC-4
//! lets a target drop the state at power loss; this one keeps it (a
//! unit's power loss is not one target's, and a cluster that reserved
//! expects the reservation back). A memory LUN loses everything with the
//! agent: PTPL_C 0, and REGISTER with APTPL 1 is refused (INVALID FIELD
//! IN PARAMETER LIST).
//!
//! # Unit attentions
//!
//! [`attentions`] compares two states and names the I_T nexuses that
//! SPC-4 5.12.11 says must hear about the change (a CHECK CONDITION with
//! UNIT ATTENTION on their next command): a registration removed by
//! someone else (PREEMPT, PREEMPT AND ABORT: REGISTRATIONS PREEMPTED;
//! CLEAR: RESERVATIONS PREEMPTED), a registrants-only or all-registrants
//! reservation released (RESERVATIONS RELEASED to the other
//! registrants). It works on states rather than on commands so that an
//! agent also sees what other agents changed: shared.rs runs it at every
//! new version of the record it installs.
//!
//! # Conflicts (SPC-4 table 5.12.x, simplified to three classes)
//!
//! | command class | WE | EA | WE RO/AR | EA RO/AR |
//! |---|---|---|---|---|
//! | always (INQUIRY, TUR, REPORT LUNS, READ CAPACITY, PR IN/OUT, ...) | - | - | - | - |
//! | read (READ, VERIFY, PRE-FETCH, MODE SENSE, GET LBA STATUS) | - | C | - | C¹ |
//! | write (everything else) | C | C | C¹ | C¹ |
//!
//! C: conflict for every nexus but the holder; C¹: conflict for
//! unregistered nexuses only (every registrant holds an RO/AR
//! reservation's access).

use bytes::Bytes;
use local_control_plane::state::{
    HeldReservation, LegacyReservation, PersistentReservations, Registration,
};

use super::scsi::{Outcome, Sense};

/// SCSI status RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;

/// Length of a PERSISTENT RESERVE OUT basic parameter list.
const PROUT_PARAMETERS: u32 = 24;

/// Reservation types (SPC-4 table 6.x, TYPE field).
const WRITE_EXCLUSIVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 3;
const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

fn valid_type(kind: u8) -> bool {
    matches!(
        kind,
        WRITE_EXCLUSIVE
            | EXCLUSIVE_ACCESS
            | WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | WRITE_EXCLUSIVE_ALL_REGISTRANTS
            | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

/// Every registrant holds an all-registrants reservation.
fn all_registrants(kind: u8) -> bool {
    matches!(
        kind,
        WRITE_EXCLUSIVE_ALL_REGISTRANTS | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

/// Registrants (not only the holder) get access.
fn registrants_access(kind: u8) -> bool {
    matches!(
        kind,
        WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | WRITE_EXCLUSIVE_ALL_REGISTRANTS
            | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

fn exclusive_access(kind: u8) -> bool {
    matches!(
        kind,
        EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

/// An I_T nexus: the initiator port (name and ISID).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    pub initiator: String,
    pub isid: [u8; 6],
}

impl Nexus {
    /// The iSCSI TransportID, initiator port format (SPC-4 7.6.4.6):
    /// "name,i,0x<isid>", NUL-terminated, padded to a multiple of 4.
    fn transport_id(&self) -> Vec<u8> {
        let mut name = format!("{},i,0x", self.initiator).into_bytes();
        for byte in self.isid {
            name.extend_from_slice(format!("{byte:02x}").as_bytes());
        }
        name.push(0);
        while name.len() % 4 != 0 {
            name.push(0);
        }
        let mut out = vec![0x45, 0];
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(&name);
        out
    }
}

/// How a command uses the medium, for the conflict check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Always,
    Read,
    Write,
}

/// The conflict class of a CDB.
pub fn access_of(cdb: &[u8; 16]) -> Access {
    match cdb[0] {
        // TUR, REQUEST SENSE, INQUIRY, READ CAPACITY(10), REPORT LUNS,
        // REPORT SUPPORTED OPCODES, PR IN, PR OUT (checked by itself).
        0x00 | 0x03 | 0x12 | 0x25 | 0xa0 | 0xa3 | 0x5e | 0x5f => Access::Always,
        0x9e if cdb[1] & 0x1f == 0x10 => Access::Always,
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x1a | 0x5a | 0x9e => {
            Access::Read
        }
        _ => Access::Write,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reservation {
    holder: Nexus,
    kind: u8,
}

/// The SPC-2 reservation (RESERVE(6)) of a LUN: its holder, the agent
/// serving the holder's session, and the beat that agent renews
/// (shared.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Legacy {
    pub holder: Nexus,
    pub agent: u64,
    pub beat: u64,
}

/// The persistent reservation state of one LUN, and its SPC-2
/// reservation (kept with it so that every agent sees both).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservations {
    generation: u32,
    /// Registered nexuses and their keys, in registration order.
    registrations: Vec<(Nexus, u64)>,
    reservation: Option<Reservation>,
    /// APTPL of the last REGISTER (module docs).
    aptpl: bool,
    /// The SPC-2 reservation (scsi.rs, shared.rs).
    pub legacy: Option<Legacy>,
}

/// SPC-4 PERSISTENT RESERVE OUT parameter flags (byte 20).
const SPEC_I_PT: u8 = 0x08;
const ALL_TG_PT: u8 = 0x04;
const APTPL: u8 = 0x01;

/// The unit attentions a change from `before` to `after` raises (module
/// docs), `actor` being the nexus whose command made it when known (it
/// hears nothing about its own change).
pub fn attentions(
    before: &Reservations,
    after: &Reservations,
    actor: Option<&Nexus>,
) -> Vec<(Nexus, Sense)> {
    let mut out = Vec::new();
    let released = match (&before.reservation, &after.reservation) {
        (Some(r), None) => registrants_access(r.kind),
        _ => false,
    };
    for (nexus, _) in &before.registrations {
        if Some(nexus) == actor {
            continue;
        }
        if after.key_of(nexus).is_none() {
            // Removed by someone else: CLEAR empties the list; PREEMPT
            // keeps the preemptor. A lone registrant that left did so
            // itself (only a registrant can CLEAR or PREEMPT).
            if after.registrations.is_empty() {
                if before.registrations.len() > 1 {
                    out.push((nexus.clone(), Sense::RESERVATIONS_PREEMPTED));
                }
            } else {
                out.push((nexus.clone(), Sense::REGISTRATIONS_PREEMPTED));
            }
        } else if released {
            out.push((nexus.clone(), Sense::RESERVATIONS_RELEASED));
        }
    }
    out
}

fn conflict() -> Outcome {
    Outcome {
        status: RESERVATION_CONFLICT,
        sense: None,
        data: Bytes::new(),
    }
}

fn data(mut out: Vec<u8>, allocation: usize) -> Outcome {
    out.truncate(allocation);
    Outcome {
        status: super::scsi::GOOD,
        sense: None,
        data: Bytes::from(out),
    }
}

impl Reservations {
    /// From the unit's record (shared.rs). A holder the record does not
    /// list as registered cannot occur (the control plane refuses such a
    /// record) and would be ignored.
    pub fn from_record(record: &PersistentReservations) -> Reservations {
        let registrations: Vec<(Nexus, u64)> = record
            .registrations
            .iter()
            .map(|r| {
                (
                    Nexus {
                        initiator: r.initiator.clone(),
                        isid: r.isid,
                    },
                    r.key,
                )
            })
            .collect();
        let reservation = record.reservation.as_ref().map(|held| Reservation {
            holder: Nexus {
                initiator: held.initiator.clone(),
                isid: held.isid,
            },
            kind: held.kind,
        });
        let legacy = record.legacy.as_ref().map(|held| Legacy {
            holder: Nexus {
                initiator: held.initiator.clone(),
                isid: held.isid,
            },
            agent: held.agent,
            beat: held.beat,
        });
        Reservations {
            generation: record.generation,
            registrations,
            reservation,
            aptpl: record.aptpl,
            legacy,
        }
    }

    /// The unit's record of this state (version 0: the control plane
    /// sets it).
    pub fn to_record(&self) -> PersistentReservations {
        PersistentReservations {
            version: 0,
            generation: self.generation,
            registrations: self
                .registrations
                .iter()
                .map(|(n, key)| Registration {
                    initiator: n.initiator.clone(),
                    isid: n.isid,
                    key: *key,
                })
                .collect(),
            reservation: self.reservation.as_ref().map(|r| HeldReservation {
                initiator: r.holder.initiator.clone(),
                isid: r.holder.isid,
                kind: r.kind,
            }),
            aptpl: self.aptpl,
            legacy: self.legacy.as_ref().map(|l| LegacyReservation {
                initiator: l.holder.initiator.clone(),
                isid: l.holder.isid,
                agent: l.agent,
                beat: l.beat,
            }),
        }
    }

    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|&(_, key)| key)
    }

    fn holds(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(r) if all_registrants(r.kind) => self.key_of(nexus).is_some(),
            Some(r) => r.holder == *nexus,
            None => false,
        }
    }

    /// Whether `nexus` may run a command of class `access` now.
    pub fn permits(&self, nexus: &Nexus, access: Access) -> bool {
        let Some(r) = &self.reservation else {
            return true;
        };
        if access == Access::Always || self.holds(nexus) {
            return true;
        }
        if registrants_access(r.kind) && self.key_of(nexus).is_some() {
            return true;
        }
        access == Access::Read && !exclusive_access(r.kind)
    }

    /// Whether any I_T nexus is registered (RESERVE(6) conflicts then).
    pub fn any_registered(&self) -> bool {
        !self.registrations.is_empty()
    }

    /// PERSISTENT RESERVE IN; `ptpl_capable`: whether this LUN's state
    /// persists through power loss (module docs).
    pub fn read(&self, cdb: &[u8; 16], ptpl_capable: bool) -> Result<Outcome, Sense> {
        let allocation = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
        let mut out = self.generation.to_be_bytes().to_vec();
        match cdb[1] & 0x1f {
            0 => {
                let keys: Vec<u8> = self
                    .registrations
                    .iter()
                    .flat_map(|(_, key)| key.to_be_bytes())
                    .collect();
                out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
                out.extend_from_slice(&keys);
            }
            1 => match &self.reservation {
                None => out.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    out.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(r.kind) {
                        0
                    } else {
                        self.key_of(&r.holder).unwrap_or(0)
                    };
                    out.extend_from_slice(&key.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 0, 0, r.kind, 0, 0]);
                }
            },
            2 => {
                // LENGTH 8; CRH 0, SIP_C 0, ATP_C 0, PTPL_C; TMV with
                // ALLOW COMMANDS 0 (no detail given), PTPL_A; the type
                // mask of every type above.
                let ptpl_c = u8::from(ptpl_capable);
                let ptpl_a = u8::from(ptpl_capable && self.aptpl);
                out = vec![0, 8, ptpl_c, 0x80 | ptpl_a, 0xea, 0x01, 0, 0];
            }
            3 => {
                let mut descriptors = Vec::new();
                for (n, key) in &self.registrations {
                    let holder = self.holds(n);
                    descriptors.extend_from_slice(&key.to_be_bytes());
                    descriptors.extend_from_slice(&[0; 4]);
                    descriptors.push(u8::from(holder));
                    let kind = match (&self.reservation, holder) {
                        (Some(r), true) => r.kind,
                        _ => 0,
                    };
                    descriptors.push(kind);
                    descriptors.extend_from_slice(&[0; 4]);
                    // Relative target port identifier 1.
                    descriptors.extend_from_slice(&1u16.to_be_bytes());
                    let transport = n.transport_id();
                    descriptors.extend_from_slice(&(transport.len() as u32).to_be_bytes());
                    descriptors.extend_from_slice(&transport);
                }
                out.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
                out.extend_from_slice(&descriptors);
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        }
        Ok(data(out, allocation))
    }

    /// PERSISTENT RESERVE OUT with its parameter list; `ptpl_capable` as
    /// for [`Reservations::read`].
    pub fn write(
        &mut self,
        nexus: &Nexus,
        cdb: &[u8; 16],
        parameters: &[u8],
        ptpl_capable: bool,
    ) -> Outcome {
        match self.out(nexus, cdb, parameters, ptpl_capable) {
            Ok(outcome) => outcome,
            Err(sense) => Outcome::check(sense),
        }
    }

    fn out(
        &mut self,
        nexus: &Nexus,
        cdb: &[u8; 16],
        p: &[u8],
        ptpl_capable: bool,
    ) -> Result<Outcome, Sense> {
        let action = cdb[1] & 0x1f;
        let kind = cdb[2] & 0x0f;
        let scope = cdb[2] >> 4;
        let length = u32::from_be_bytes([cdb[5], cdb[6], cdb[7], cdb[8]]);
        if action > 6 {
            // REGISTER AND MOVE and beyond.
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        if length != PROUT_PARAMETERS || p.len() < PROUT_PARAMETERS as usize {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let key = u64::from_be_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
        let sa_key = u64::from_be_bytes([p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]]);
        // SPEC_I_PT and ALL_TG_PT are not supported (REPORT
        // CAPABILITIES says so); APTPL only where the state persists, and
        // it means something for the REGISTER actions only (SPC-4 6.17.4:
        // ignored by the others).
        let registering = matches!(action, 0 | 6);
        if p[20] & (SPEC_I_PT | ALL_TG_PT) != 0
            || (registering && p[20] & APTPL != 0 && !ptpl_capable)
        {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        let registered = self.key_of(nexus);
        match action {
            0 | 6 => {
                if action == 0 && registered.unwrap_or(0) != key {
                    return Ok(conflict());
                }
                let aptpl = p[20] & APTPL != 0;
                match (registered, sa_key) {
                    (None, 0) => return Ok(Outcome::good()),
                    (None, new) => self.registrations.push((nexus.clone(), new)),
                    (Some(_), 0) => self.unregister(nexus),
                    (Some(_), new) => {
                        for (n, k) in &mut self.registrations {
                            if n == nexus {
                                *k = new;
                            }
                        }
                    }
                }
                self.aptpl = aptpl;
                self.generation = self.generation.wrapping_add(1);
                Ok(Outcome::good())
            }
            _ if registered != Some(key) => Ok(conflict()),
            1 => {
                if scope != 0 || !valid_type(kind) {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                match &self.reservation {
                    Some(r) if self.holds(nexus) && r.kind == kind => Ok(Outcome::good()),
                    Some(_) => Ok(conflict()),
                    None => {
                        self.reservation = Some(Reservation {
                            holder: nexus.clone(),
                            kind,
                        });
                        Ok(Outcome::good())
                    }
                }
            }
            2 => match &self.reservation {
                Some(r) if self.holds(nexus) => {
                    if r.kind != kind || scope != 0 {
                        return Err(Sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION);
                    }
                    self.reservation = None;
                    Ok(Outcome::good())
                }
                _ => Ok(Outcome::good()),
            },
            3 => {
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(Outcome::good())
            }
            _ => self.preempt(nexus, kind, scope, sa_key),
        }
    }

    /// Drop `nexus`'s registration, and the reservation it alone held.
    fn unregister(&mut self, nexus: &Nexus) {
        self.registrations.retain(|(n, _)| n != nexus);
        if let Some(r) = &self.reservation {
            let gone = if all_registrants(r.kind) {
                self.registrations.is_empty()
            } else {
                r.holder == *nexus
            };
            if gone {
                self.reservation = None;
            } else if all_registrants(r.kind) && r.holder == *nexus {
                // Any remaining registrant stands as the recorded holder.
                let holder = self.registrations[0].0.clone();
                self.reservation = Some(Reservation {
                    holder,
                    kind: r.kind,
                });
            }
        }
    }

    /// PREEMPT and PREEMPT AND ABORT (no task is aborted: commands run
    /// to their end in this target, see server.rs).
    fn preempt(
        &mut self,
        nexus: &Nexus,
        kind: u8,
        scope: u8,
        sa_key: u64,
    ) -> Result<Outcome, Sense> {
        let reservation = self.reservation.clone();
        match reservation {
            Some(r) if all_registrants(r.kind) && sa_key == 0 => {
                if scope != 0 || !valid_type(kind) {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                self.registrations.retain(|(n, _)| n == nexus);
                self.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    kind,
                });
            }
            Some(r) if !all_registrants(r.kind) && self.key_of(&r.holder) == Some(sa_key) => {
                if scope != 0 || !valid_type(kind) {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                self.registrations
                    .retain(|(n, k)| *k != sa_key || n == nexus);
                self.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    kind,
                });
            }
            _ => {
                if sa_key == 0 {
                    return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
                }
                let before = self.registrations.len();
                let removed: Vec<Nexus> = self
                    .registrations
                    .iter()
                    .filter(|(_, k)| *k == sa_key)
                    .map(|(n, _)| n.clone())
                    .collect();
                if removed.is_empty() {
                    return Ok(conflict());
                }
                for n in &removed {
                    self.unregister(n);
                }
                debug_assert!(self.registrations.len() < before);
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(Outcome::good())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests {
    use super::*;

    /// An I_T nexus of initiator `name` (the shared store's tests use it too).
    pub(crate) fn nexus(name: &str) -> Nexus {
        Nexus {
            initiator: name.to_owned(),
            isid: [0x80, 0, 0, 0, 0, 1],
        }
    }

    /// A PERSISTENT RESERVE OUT CDB with a 24-byte parameter list.
    pub(crate) fn prout(action: u8, kind: u8) -> [u8; 16] {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x5f;
        cdb[1] = action;
        cdb[2] = kind;
        cdb[8] = 24;
        cdb
    }

    /// The basic PR OUT parameter list: key, service action key.
    pub(crate) fn params(key: u64, sa_key: u64) -> Vec<u8> {
        let mut p = key.to_be_bytes().to_vec();
        p.extend_from_slice(&sa_key.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p
    }

    fn prin(action: u8) -> [u8; 16] {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x5e;
        cdb[1] = action;
        cdb[8] = 0xff;
        cdb
    }

    #[test]
    fn register_reserve_conflict_preempt_clear() {
        let mut state = Reservations::default();
        let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
        // A wrong current key for an unregistered nexus conflicts.
        assert_eq!(
            state.write(&a, &prout(0, 0), &params(5, 1), false).status,
            RESERVATION_CONFLICT
        );
        assert_eq!(
            state.write(&a, &prout(0, 0), &params(0, 1), false).status,
            0
        );
        assert_eq!(
            state.write(&b, &prout(6, 0), &params(99, 2), false).status,
            0
        );
        let keys = state.read(&prin(0), false).unwrap().data;
        assert_eq!(&keys[..8], &[0, 0, 0, 2, 0, 0, 0, 16]);
        assert_eq!(&keys[8..16], &1u64.to_be_bytes());
        // An unregistered nexus (or a wrong key) cannot reserve.
        assert_eq!(
            state.write(&a, &prout(1, 1), &params(2, 0), false).status,
            RESERVATION_CONFLICT
        );
        assert_eq!(
            state
                .write(&a, &prout(1, WRITE_EXCLUSIVE), &params(1, 0), false)
                .status,
            0
        );
        let c = nexus("iqn.c");
        assert!(state.permits(&b, Access::Read));
        assert!(!state.permits(&b, Access::Write));
        assert!(state.permits(&a, Access::Write));
        assert!(state.permits(&c, Access::Always));
        // Reservation is reported with the holder's key.
        let r = state.read(&prin(1), false).unwrap().data;
        assert_eq!(&r[4..8], &16u32.to_be_bytes());
        assert_eq!(&r[8..16], &1u64.to_be_bytes());
        assert_eq!(r[21], WRITE_EXCLUSIVE);
        // b preempts a: a's registration goes, b holds EA.
        assert_eq!(
            state
                .write(&b, &prout(4, EXCLUSIVE_ACCESS), &params(2, 1), false)
                .status,
            0
        );
        assert_eq!(state.key_of(&a), None);
        assert!(!state.permits(&a, Access::Read));
        assert!(state.permits(&b, Access::Write));
        // Releasing with the wrong type is refused; with the right one works.
        let wrong = state.write(&b, &prout(2, WRITE_EXCLUSIVE), &params(2, 0), false);
        assert_eq!(
            wrong.sense,
            Some(Sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        );
        assert_eq!(
            state
                .write(&b, &prout(2, EXCLUSIVE_ACCESS), &params(2, 0), false)
                .status,
            0
        );
        assert!(state.permits(&a, Access::Write));
        // All registrants: every registrant writes, others only read.
        assert_eq!(
            state.write(&a, &prout(0, 0), &params(0, 3), false).status,
            0
        );
        assert_eq!(
            state
                .write(
                    &a,
                    &prout(1, WRITE_EXCLUSIVE_ALL_REGISTRANTS),
                    &params(3, 0),
                    false
                )
                .status,
            0
        );
        assert!(state.permits(&b, Access::Write));
        assert!(!state.permits(&c, Access::Write));
        assert!(state.permits(&c, Access::Read));
        let r = state.read(&prin(1), false).unwrap().data;
        assert_eq!(&r[8..16], &0u64.to_be_bytes());
        // a leaves; b still holds it.
        assert_eq!(
            state.write(&a, &prout(0, 0), &params(3, 0), false).status,
            0
        );
        assert!(state.permits(&b, Access::Write));
        assert!(!state.permits(&a, Access::Write));
        // CLEAR drops everything.
        assert_eq!(
            state.write(&b, &prout(3, 0), &params(2, 0), false).status,
            0
        );
        assert!(state.permits(&a, Access::Write));
        assert_eq!(
            state.read(&prin(0), false).unwrap().data[4..8],
            [0, 0, 0, 0]
        );
        // APTPL is refused; a short list is a length error.
        let mut p = params(0, 9);
        p[20] = 1;
        assert_eq!(
            state.write(&a, &prout(0, 0), &p, false).sense,
            Some(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
        let mut short = prout(0, 0);
        short[8] = 16;
        assert_eq!(
            state.write(&a, &short, &p[..16], false).sense,
            Some(Sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        // Out-of-range service actions.
        assert!(state.read(&prin(4), false).is_err());
        let full = state.read(&prin(3), false).unwrap();
        assert_eq!(&full.data[4..8], &[0, 0, 0, 0]);
    }

    /// APTPL is taken only where the state persists, is kept per the last
    /// REGISTER, and shows as PTPL_C / PTPL_A in REPORT CAPABILITIES.
    #[test]
    fn aptpl_is_reported_where_it_is_kept() {
        let a = nexus("iqn.a");
        let mut p = params(0, 9);
        p[20] = APTPL;
        let mut memory = Reservations::default();
        assert_eq!(
            memory.write(&a, &prout(0, 0), &p, false).sense,
            Some(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
        let caps = memory.read(&prin(2), false).unwrap().data;
        assert_eq!((caps[2] & 1, caps[3] & 1), (0, 0));
        let mut unit = Reservations::default();
        assert_eq!(unit.write(&a, &prout(0, 0), &p, true).status, 0);
        let caps = unit.read(&prin(2), true).unwrap().data;
        assert_eq!((caps[2] & 1, caps[3] & 1), (1, 1));
        // It travels in the record (a restarted agent reports it).
        let copy = Reservations::from_record(&unit.to_record());
        assert_eq!(copy.read(&prin(2), true).unwrap().data[3] & 1, 1);
        // A RESERVE with the bit set ignores it; a REGISTER without it
        // clears it.
        let mut reserve = params(9, 0);
        reserve[20] = APTPL;
        assert_eq!(unit.write(&a, &prout(1, 1), &reserve, true).status, 0);
        assert_eq!(unit.read(&prin(2), true).unwrap().data[3] & 1, 1);
        assert_eq!(unit.write(&a, &prout(0, 0), &params(9, 10), true).status, 0);
        assert_eq!(unit.read(&prin(2), true).unwrap().data[3] & 1, 0);
        // SPEC_I_PT and ALL_TG_PT stay refused.
        let mut spec = params(10, 10);
        spec[20] = SPEC_I_PT;
        assert_eq!(
            unit.write(&a, &prout(0, 0), &spec, true).sense,
            Some(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
    }

    /// SPC-4 5.12.11: who hears about a change, and what.
    #[test]
    fn changes_raise_unit_attentions_for_the_others() {
        let (a, b, c) = (nexus("iqn.a"), nexus("iqn.b"), nexus("iqn.c"));
        let mut state = Reservations::default();
        for (n, key) in [(&a, 1), (&b, 2), (&c, 3)] {
            let before = state.clone();
            assert_eq!(
                state.write(n, &prout(0, 0), &params(0, key), false).status,
                0
            );
            // Registering raises nothing.
            assert!(attentions(&before, &state, Some(n)).is_empty());
        }
        // a takes a registrants-only reservation and releases it: b and c
        // hear RESERVATIONS RELEASED, a nothing.
        let wero = WRITE_EXCLUSIVE_REGISTRANTS_ONLY;
        assert_eq!(
            state
                .write(&a, &prout(1, wero), &params(1, 0), false)
                .status,
            0
        );
        let before = state.clone();
        assert_eq!(
            state
                .write(&a, &prout(2, wero), &params(1, 0), false)
                .status,
            0
        );
        assert_eq!(
            attentions(&before, &state, Some(&a)),
            vec![
                (b.clone(), Sense::RESERVATIONS_RELEASED),
                (c.clone(), Sense::RESERVATIONS_RELEASED)
            ]
        );
        // Seen from another agent (actor unknown), the releaser hears it
        // too: it is not one of that agent's nexuses.
        assert_eq!(attentions(&before, &state, None).len(), 3);
        // Releasing a WRITE EXCLUSIVE raises nothing.
        assert_eq!(
            state.write(&a, &prout(1, 1), &params(1, 0), false).status,
            0
        );
        let before = state.clone();
        assert_eq!(
            state.write(&a, &prout(2, 1), &params(1, 0), false).status,
            0
        );
        assert!(attentions(&before, &state, Some(&a)).is_empty());
        // b preempts c: c's registration is preempted, a hears nothing.
        let before = state.clone();
        assert_eq!(
            state.write(&b, &prout(4, 3), &params(2, 3), false).status,
            0
        );
        assert_eq!(
            attentions(&before, &state, Some(&b)),
            vec![(c.clone(), Sense::REGISTRATIONS_PREEMPTED)]
        );
        // b clears: a hears RESERVATIONS PREEMPTED.
        let before = state.clone();
        assert_eq!(
            state.write(&b, &prout(3, 0), &params(2, 0), false).status,
            0
        );
        assert_eq!(
            attentions(&before, &state, Some(&b)),
            vec![(a.clone(), Sense::RESERVATIONS_PREEMPTED)]
        );
        // A lone registrant leaving raises nothing, whoever looks.
        assert_eq!(
            state.write(&a, &prout(0, 0), &params(0, 7), false).status,
            0
        );
        let before = state.clone();
        assert_eq!(
            state.write(&a, &prout(0, 0), &params(7, 0), false).status,
            0
        );
        assert!(attentions(&before, &state, None).is_empty());
    }
}
