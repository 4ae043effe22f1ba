//! SCSI persistent reservations of a volume (SPC-4 5.12), kept in the
//! unit's replicated state so that they outlive any attach agent and any
//! head node, and so that every agent of a volume (one per host, or two
//! on one host for two portals) sees the same registrations.
//!
//! The control plane is a **versioned register** here: it stores one
//! [`PersistentReservations`] record per volume and replaces it only by
//! compare-and-set on its `version` ([`Command::SetReservations`]). The
//! SPC-4 rules (who may register, reserve, preempt; which command a
//! reservation forbids) live in the attach agent (`client/src/iscsi/
//! reserve.rs`), which reads the record, computes the next one and
//! proposes it with the version it read: two agents racing on one volume
//! are serialized by Raft, the loser is refused with
//! [`CommandError::ReservationVersion`] and recomputes from the record it
//! then reads. The state machine checks the record's shape and bounds,
//! not its SPC-4 meaning.
//!
//! ```text
//! agent ─ HostReservations{Set{expected, record}} ─▶ host port ─▶ SetReservations
//!    ◀── applied, record at version expected+1
//!    ◀── refused: record at its current version (the agent retries)
//! ```
//!
//! A volume without any record reads as the empty record at version 0.
//! Deleting the volume drops its record.
//!
//! The record also holds the volume's SPC-2 reservation (RESERVE(6)),
//! [`LegacyReservation`]: not persistent in SCSI terms (it ends with its
//! I_T nexus), but kept here so that every agent of the volume enforces
//! it. Its holder's agent renews it (`beat`) while it holds it; the
//! other agents treat it as gone once `beat` has not moved for a lease
//! measured on their own clocks (a crashed agent's nexus is lost, and so
//! is its reservation). The state machine stores it like the rest.

use serde::{Deserialize, Serialize};

use super::{UnitState, VolumeId};
use crate::command::Outcome;
use crate::error::CommandError;

/// Bound on registrations of one volume.
pub const MAX_REGISTRATIONS: usize = 256;
/// Bound on an iSCSI initiator name (RFC 7143: 223 bytes).
pub const MAX_INITIATOR_NAME_BYTES: usize = 223;

/// An I_T nexus's registration: its initiator port and reservation key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// iSCSI initiator name.
    pub initiator: String,
    /// The session's ISID.
    pub isid: [u8; 6],
    pub key: u64,
}

/// The persistent reservation held on a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldReservation {
    /// The holder's initiator name and ISID (for all-registrants types,
    /// one registrant standing for all).
    pub initiator: String,
    pub isid: [u8; 6],
    /// SPC-4 TYPE (1, 3, 5, 6, 7 or 8).
    pub kind: u8,
}

/// The SPC-2 reservation (RESERVE(6)) of a volume (module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyReservation {
    /// The holder's initiator name and ISID.
    pub initiator: String,
    pub isid: [u8; 6],
    /// The attach agent serving the holder's session (a random id per
    /// agent process): only it renews the reservation.
    pub agent: u64,
    /// Raised by the holder's agent while the reservation is held.
    pub beat: u64,
}

/// One volume's persistent reservation state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentReservations {
    /// Raised by one at every applied [`Command::SetReservations`]: the
    /// compare-and-set token (0: never set).
    pub version: u64,
    /// SPC-4 PRGENERATION (reported by PERSISTENT RESERVE IN; the agent
    /// raises it as SPC-4 says, not at every change).
    pub generation: u32,
    /// In registration order.
    pub registrations: Vec<Registration>,
    pub reservation: Option<HeldReservation>,
    /// SPC-4 APTPL: the last REGISTER asked for the registrations and the
    /// reservation to persist through power loss (they do, being in this
    /// state, whatever the bit says; the agent reports it as PTPL_A).
    /// Absent in records written before it existed: false.
    #[serde(default)]
    pub aptpl: bool,
    /// The SPC-2 reservation, if any. Absent in records written before
    /// it existed: none.
    #[serde(default)]
    pub legacy: Option<LegacyReservation>,
}

impl PersistentReservations {
    /// Shape and bounds (not SPC-4 semantics, see the module docs).
    fn check(&self) -> Result<(), CommandError> {
        if self.registrations.len() > MAX_REGISTRATIONS {
            return Err(CommandError::invalid(format!(
                "{} registrations (at most {MAX_REGISTRATIONS})",
                self.registrations.len()
            )));
        }
        let names = self
            .registrations
            .iter()
            .map(|r| &r.initiator)
            .chain(self.reservation.iter().map(|r| &r.initiator))
            .chain(self.legacy.iter().map(|r| &r.initiator));
        for name in names {
            if name.is_empty() || name.len() > MAX_INITIATOR_NAME_BYTES {
                return Err(CommandError::invalid(format!(
                    "initiator name of {} bytes",
                    name.len()
                )));
            }
        }
        for (i, r) in self.registrations.iter().enumerate() {
            if self.registrations[..i]
                .iter()
                .any(|other| other.initiator == r.initiator && other.isid == r.isid)
            {
                return Err(CommandError::invalid(format!(
                    "nexus {} registered twice",
                    r.initiator
                )));
            }
        }
        if let Some(held) = &self.reservation {
            if !matches!(held.kind, 1 | 3 | 5 | 6 | 7 | 8) {
                return Err(CommandError::invalid(format!(
                    "reservation type {}",
                    held.kind
                )));
            }
            let registered = self
                .registrations
                .iter()
                .any(|r| r.initiator == held.initiator && r.isid == held.isid);
            if !registered {
                return Err(CommandError::invalid(
                    "the reservation holder is not registered",
                ));
            }
        }
        Ok(())
    }
}

impl UnitState {
    /// The reservation record of a live volume (the empty record at
    /// version 0 when none was ever set).
    pub fn reservations(&self, volume: VolumeId) -> Result<PersistentReservations, CommandError> {
        self.live_volume(volume)?;
        Ok(self.reservations.get(&volume).cloned().unwrap_or_default())
    }

    pub(super) fn set_reservations(
        &mut self,
        volume: VolumeId,
        expected_version: u64,
        record: PersistentReservations,
    ) -> Result<Outcome, CommandError> {
        let current = self.reservations(volume)?.version;
        if current != expected_version {
            return Err(CommandError::ReservationVersion {
                volume,
                expected: expected_version,
                current,
            });
        }
        record.check()?;
        let version = current
            .checked_add(1)
            .ok_or_else(|| CommandError::invalid("reservation version at its maximum"))?;
        self.reservations
            .insert(volume, PersistentReservations { version, ..record });
        Ok(Outcome::ReservationsSet { volume, version })
    }

    /// Drop the records of volumes that are no longer live.
    pub(super) fn forget_reservations(&mut self, volume: VolumeId) {
        self.reservations.remove(&volume);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::state::tests::unit;

    fn record(names: &[&str], holder: Option<(&str, u8)>) -> PersistentReservations {
        PersistentReservations {
            version: 0,
            generation: 3,
            registrations: names
                .iter()
                .enumerate()
                .map(|(i, n)| Registration {
                    initiator: (*n).to_owned(),
                    isid: [0x80, 0, 0, 0, 0, 1],
                    key: i as u64 + 1,
                })
                .collect(),
            reservation: holder.map(|(n, kind)| HeldReservation {
                initiator: n.to_owned(),
                isid: [0x80, 0, 0, 0, 0, 1],
                kind,
            }),
            aptpl: false,
            legacy: None,
        }
    }

    #[test]
    fn compare_and_set_serializes_writers() {
        let mut unit = unit();
        let volume: VolumeId = 1;
        assert_eq!(unit.reservations(volume).unwrap().version, 0);
        let set = |expected, record| Command::SetReservations {
            volume,
            expected_version: expected,
            record,
        };
        assert_eq!(
            unit.apply(set(0, record(&["iqn.a"], None))).unwrap(),
            Outcome::ReservationsSet { volume, version: 1 }
        );
        // A second writer that read version 0 loses and changes nothing.
        assert_eq!(
            unit.apply(set(0, record(&["iqn.b"], None))),
            Err(CommandError::ReservationVersion {
                volume,
                expected: 0,
                current: 1
            })
        );
        let now = unit.reservations(volume).unwrap();
        assert_eq!(now.version, 1);
        assert_eq!(now.registrations[0].initiator, "iqn.a");
        assert_eq!(now.generation, 3);
        assert_eq!(
            unit.apply(set(1, record(&["iqn.a", "iqn.b"], Some(("iqn.b", 3)))))
                .unwrap(),
            Outcome::ReservationsSet { volume, version: 2 }
        );
        // Malformed records are refused: unregistered holder, bad type,
        // duplicate nexus.
        for bad in [
            record(&["iqn.a"], Some(("iqn.z", 1))),
            record(&["iqn.a"], Some(("iqn.a", 2))),
            record(&["iqn.a", "iqn.a"], None),
            record(&[""], None),
        ] {
            assert!(matches!(
                unit.apply(set(2, bad)),
                Err(CommandError::InvalidArgument { .. })
            ));
        }
        assert_eq!(unit.reservations(volume).unwrap().version, 2);
        // Unknown volumes have no record, and cannot get one.
        assert!(unit.reservations(volume + 1000).is_err());
        assert!(matches!(
            unit.apply(Command::SetReservations {
                volume: volume + 1000,
                expected_version: 0,
                record: record(&[], None),
            }),
            Err(CommandError::UnknownVolume { .. })
        ));
        // Deleting the volume drops its record.
        unit.apply(Command::DeleteVolume {
            volume,
            force: true,
            now_ms: 5000,
        })
        .unwrap();
        assert!(!unit.reservations.contains_key(&volume));
    }
}
