//! Login (RFC 7143 §6, §12, §13), sans-IO: text keys, the stage machine,
//! CHAP (RFC 1994 with MD5, one-way or mutual) and operational parameter
//! negotiation.
//!
//! ```text
//! stage 0 SecurityNegotiation ── AuthMethod=CHAP: CHAP_A → A,I,C; CHAP_N,R[,I,C] → [N,R]
//!        │ (refused: 0x0201)        AuthMethod=None only when no CHAP secret is set
//!        ▼ T=1
//! stage 1 LoginOperationalNegotiation ── keys answered in one round (defaults for
//!        │                                keys the initiator does not send)
//!        ▼ T=1, NSG=3
//! stage 3 FullFeaturePhase (Normal: the target's TargetName; Discovery: any)
//! ```
//!
//! Every request PDU gets exactly one response PDU; keys spread over
//! several PDUs (C bit) are gathered first. Keys we do not know are
//! answered `NotUnderstood`; declarative keys are recorded.

use bytes::Bytes;

use super::md5::md5;
use super::pdu::{op, Pdu};

/// Our limit on received data segments (declared as
/// MaxRecvDataSegmentLength).
pub const TARGET_MAX_RECV_DATA: u32 = 256 * 1024;
/// Largest MaxBurstLength / FirstBurstLength we accept.
pub const TARGET_MAX_BURST: u32 = 16 << 20;
/// Largest text (login keys, SendTargets) gathered over C-bit PDUs.
const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Login status class/detail (RFC 7143 §11.13.5).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTHENTICATION_FAILED: u16 = 0x0201;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
}

/// Parses `key=value\0key=value\0` text. Malformed items (no `=`) are
/// kept with an empty key so that they can be refused.
pub fn parse_text(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let text = String::from_utf8_lossy(item);
            match text.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (String::new(), text.into_owned()),
            }
        })
        .collect()
}

pub fn encode_text(pairs: &[(String, String)]) -> Bytes {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    Bytes::from(out)
}

/// CHAP secrets of a target (RFC 7143 §12.1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    /// The initiator authenticates as this user with this secret.
    pub user: String,
    pub secret: String,
    /// Mutual CHAP: the target answers the initiator's challenge as this
    /// user with this secret (without it, mutual CHAP is refused).
    pub target_user: Option<String>,
    pub target_secret: Option<String>,
}

/// The parameters a session runs with after login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Longest data segment we may send (the initiator's declaration).
    pub max_send_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub header_digest: bool,
    pub data_digest: bool,
    pub discovery: bool,
    pub initiator_name: String,
}

impl Default for Negotiated {
    /// RFC 7143 defaults.
    fn default() -> Negotiated {
        Negotiated {
            max_send_data: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            header_digest: false,
            data_digest: false,
            discovery: false,
            initiator_name: String::new(),
        }
    }
}

/// What one login request led to.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginStep {
    /// Send this response; login continues.
    Continue(Pdu),
    /// Send this response; the connection enters full feature phase.
    FullFeature(Pdu, Negotiated),
    /// Send this (failure) response and close the connection.
    Fail(Pdu),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChapState {
    /// AuthMethod not yet agreed.
    Start,
    /// Waiting for CHAP_A.
    WaitAlgorithm,
    /// Challenge sent (identifier, challenge).
    WaitResponse(u8, [u8; 16]),
    Done,
}

/// The login stage machine of one connection.
#[derive(Debug)]
pub struct Login {
    target_name: String,
    chap: Option<Chap>,
    stage: u8,
    chap_state: ChapState,
    pending_text: Vec<u8>,
    negotiated: Negotiated,
    session_type_seen: bool,
    target_name_ok: bool,
    declared: bool,
    tsih: u16,
    random: [u8; 17],
}

fn csg(flags: u8) -> u8 {
    (flags >> 2) & 3
}

fn nsg(flags: u8) -> u8 {
    flags & 3
}

fn yes(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(value: bool) -> String {
    if value { "Yes" } else { "No" }.to_owned()
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64.
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        let hex = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex.to_owned()
        };
        return (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
    }
    let b64 = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))?;
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in b64.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The CHAP response: MD5(identifier ‖ secret ‖ challenge).
pub fn chap_response(identifier: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut input = Vec::with_capacity(1 + secret.len() + challenge.len());
    input.push(identifier);
    input.extend_from_slice(secret);
    input.extend_from_slice(challenge);
    md5(&input)
}

impl Login {
    /// `random`: 17 unpredictable bytes (CHAP identifier and challenge);
    /// `tsih`: the session handle given to a new session.
    pub fn new(target_name: String, chap: Option<Chap>, random: [u8; 17], tsih: u16) -> Login {
        Login {
            target_name,
            chap,
            stage: 0,
            chap_state: ChapState::Start,
            pending_text: Vec::new(),
            negotiated: Negotiated::default(),
            session_type_seen: false,
            target_name_ok: false,
            declared: false,
            tsih,
            random,
        }
    }

    fn response(&self, request: &Pdu, flags: u8, status: u16, keys: &[(String, String)]) -> Pdu {
        let mut pdu = Pdu::new(op::LOGIN_RESPONSE);
        pdu.set_flags(flags);
        pdu.bhs[2] = 0; // VersionMax
        pdu.bhs[3] = 0; // VersionActive
        pdu.bhs[8..14].copy_from_slice(&request.bhs[8..14]); // ISID
        if status == status::SUCCESS && flags & 0x80 != 0 && nsg(flags) == 3 {
            pdu.bhs[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        } else {
            pdu.bhs[14..16].copy_from_slice(&request.bhs[14..16]);
        }
        pdu.set_itt(request.itt());
        // StatSN, ExpCmdSN and MaxCmdSN are set by the connection.
        pdu.bhs[36..38].copy_from_slice(&status.to_be_bytes());
        pdu.with_data(encode_text(keys))
    }

    fn fail(&self, request: &Pdu, status: u16) -> LoginStep {
        let flags = self.stage << 2;
        LoginStep::Fail(self.response(request, flags, status, &[]))
    }

    /// Handle one Login Request PDU.
    pub fn step(&mut self, request: &Pdu) -> LoginStep {
        if request.opcode() != op::LOGIN {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        if request.bhs[3] > 0 {
            // VersionMin above 0: we only speak version 0.
            return self.fail(request, status::UNSUPPORTED_VERSION);
        }
        let flags = request.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        if transit && cont {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        let current = csg(flags);
        if current != self.stage && !(self.stage == 0 && current == 1) {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        if current == 1 && self.stage == 0 && self.chap.is_some() {
            // Skipping security negotiation when CHAP is required.
            return self.fail(request, status::AUTHENTICATION_FAILED);
        }
        self.stage = current;
        if self.pending_text.len() + request.data.len() > MAX_TEXT_BYTES {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        self.pending_text.extend_from_slice(&request.data);
        if cont {
            // More keys follow: acknowledge with an empty response.
            let response = self.response(request, current << 2, status::SUCCESS, &[]);
            return LoginStep::Continue(response);
        }
        let keys = parse_text(&std::mem::take(&mut self.pending_text));
        let mut answer = Vec::new();
        // CHAP steps first: AuthMethod in this round starts CHAP next round.
        if self.stage == 0 && self.chap.is_some() {
            match self.chap_step(&keys, &mut answer) {
                Ok(()) => {}
                Err(status) => return self.fail(request, status),
            }
        }
        for (key, value) in &keys {
            match self.key(key, value, &mut answer) {
                Ok(()) => {}
                Err(status) => return self.fail(request, status),
            }
        }
        if !self.session_type_seen && self.negotiated.initiator_name.is_empty() {
            return self.fail(request, status::MISSING_PARAMETER);
        }
        if !self.negotiated.discovery && !self.target_name_ok {
            return self.fail(request, status::MISSING_PARAMETER);
        }
        // The first response of a normal session carries the portal group.
        if !self.negotiated.discovery && keys.iter().any(|(k, _)| k == "TargetName") {
            answer.push(("TargetPortalGroupTag".into(), "1".into()));
        }
        // Our receive limit is declared once, in operational negotiation
        // (or on a jump straight from security to full feature).
        if !self.declared && (self.stage == 1 || (transit && nsg(flags) == 3)) {
            self.declared = true;
            answer.push((
                "MaxRecvDataSegmentLength".into(),
                TARGET_MAX_RECV_DATA.to_string(),
            ));
        }
        let mut response_flags = self.stage << 2;
        if transit {
            let next = nsg(flags);
            let security_done = self.chap.is_none() || self.chap_state == ChapState::Done;
            let allowed = match (self.stage, next) {
                (0, 1) | (0, 3) => security_done,
                (1, 3) => true,
                _ => false,
            };
            if allowed {
                response_flags |= 0x80 | next;
                let response = self.response(request, response_flags, status::SUCCESS, &answer);
                if next == 3 {
                    return LoginStep::FullFeature(response, self.negotiated.clone());
                }
                self.stage = next;
                return LoginStep::Continue(response);
            }
            if self.stage == 0 && !security_done && self.chap_state == ChapState::Start {
                return self.fail(request, status::AUTHENTICATION_FAILED);
            }
        }
        LoginStep::Continue(self.response(request, response_flags, status::SUCCESS, &answer))
    }

    fn chap_step(
        &mut self,
        keys: &[(String, String)],
        answer: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let get = |name: &str| {
            keys.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let Some(chap) = self.chap.clone() else {
            return Ok(());
        };
        match self.chap_state {
            ChapState::Start | ChapState::Done => Ok(()),
            ChapState::WaitAlgorithm => {
                let Some(algorithms) = get("CHAP_A") else {
                    return Err(status::AUTHENTICATION_FAILED);
                };
                if !algorithms.split(',').any(|a| a == "5") {
                    answer.push(("CHAP_A".into(), "Reject".into()));
                    return Err(status::AUTHENTICATION_FAILED);
                }
                let identifier = self.random[0];
                let mut challenge = [0u8; 16];
                challenge.copy_from_slice(&self.random[1..17]);
                answer.push(("CHAP_A".into(), "5".into()));
                answer.push(("CHAP_I".into(), identifier.to_string()));
                answer.push(("CHAP_C".into(), hex(&challenge)));
                self.chap_state = ChapState::WaitResponse(identifier, challenge);
                Ok(())
            }
            ChapState::WaitResponse(identifier, challenge) => {
                let (Some(name), Some(response)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(status::AUTHENTICATION_FAILED);
                };
                let response = decode_binary(response).ok_or(status::AUTHENTICATION_FAILED)?;
                let expected = chap_response(identifier, chap.secret.as_bytes(), &challenge);
                if name != chap.user || !constant_time_eq(&response, &expected) {
                    return Err(status::AUTHENTICATION_FAILED);
                }
                if let (Some(their_id), Some(their_challenge)) = (get("CHAP_I"), get("CHAP_C")) {
                    let (Some(user), Some(secret)) = (&chap.target_user, &chap.target_secret)
                    else {
                        return Err(status::AUTHENTICATION_FAILED);
                    };
                    let id: u8 = their_id
                        .parse()
                        .map_err(|_| status::AUTHENTICATION_FAILED)?;
                    let their_challenge =
                        decode_binary(their_challenge).ok_or(status::AUTHENTICATION_FAILED)?;
                    // A reflected challenge would let an attacker make us
                    // answer our own challenge.
                    if their_challenge == challenge || their_challenge.is_empty() {
                        return Err(status::AUTHENTICATION_FAILED);
                    }
                    let ours = chap_response(id, secret.as_bytes(), &their_challenge);
                    answer.push(("CHAP_N".into(), user.clone()));
                    answer.push(("CHAP_R".into(), hex(&ours)));
                }
                self.chap_state = ChapState::Done;
                Ok(())
            }
        }
    }

    /// Answer one key. Errors are login status codes.
    fn key(
        &mut self,
        key: &str,
        value: &str,
        answer: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let n = &mut self.negotiated;
        let number = |value: &str| value.parse::<u64>().ok();
        let mut reply = |k: &str, v: String| answer.push((k.to_owned(), v));
        match key {
            "InitiatorName" => n.initiator_name = value.to_owned(),
            "InitiatorAlias" => {}
            "SessionType" => {
                self.session_type_seen = true;
                match value {
                    "Discovery" => n.discovery = true,
                    "Normal" => n.discovery = false,
                    _ => return Err(status::INITIATOR_ERROR),
                }
            }
            "TargetName" => {
                if value != self.target_name {
                    return Err(status::NOT_FOUND);
                }
                self.target_name_ok = true;
            }
            "AuthMethod" => {
                let offered: Vec<&str> = value.split(',').collect();
                let choice = if self.chap.is_some() {
                    if !offered.contains(&"CHAP") {
                        return Err(status::AUTHENTICATION_FAILED);
                    }
                    if self.chap_state == ChapState::Start {
                        self.chap_state = ChapState::WaitAlgorithm;
                    }
                    "CHAP"
                } else if offered.contains(&"None") {
                    "None"
                } else {
                    return Err(status::AUTHENTICATION_FAILED);
                };
                reply(key, choice.to_owned());
            }
            "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                if self.chap.is_none() || self.stage != 0 {
                    return Err(status::INITIATOR_ERROR);
                }
            }
            "HeaderDigest" | "DataDigest" => {
                let choice = value
                    .split(',')
                    .find(|v| *v == "CRC32C" || *v == "None")
                    .unwrap_or("Reject");
                let on = choice == "CRC32C";
                if key == "HeaderDigest" {
                    n.header_digest = on;
                } else {
                    n.data_digest = on;
                }
                reply(key, choice.to_owned());
            }
            "MaxRecvDataSegmentLength" => match number(value) {
                Some(v) if (512..=0xff_ffff).contains(&v) => n.max_send_data = v as u32,
                _ => return Err(status::INITIATOR_ERROR),
            },
            "MaxBurstLength" | "FirstBurstLength" => match number(value) {
                Some(v) if (512..=0xff_ffff).contains(&v) => {
                    let v = (v as u32).min(TARGET_MAX_BURST);
                    if key == "MaxBurstLength" {
                        n.max_burst = v;
                    } else {
                        n.first_burst = v;
                    }
                    reply(key, v.to_string());
                }
                _ => reply(key, "Reject".into()),
            },
            "ImmediateData" | "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => {
                let Some(offered) = yes(value) else {
                    reply(key, "Reject".into());
                    return Ok(());
                };
                let result = match key {
                    // AND with our Yes.
                    "ImmediateData" => {
                        n.immediate_data = offered;
                        offered
                    }
                    // OR with our No.
                    "InitialR2T" => {
                        n.initial_r2t = offered;
                        offered
                    }
                    // OR with our Yes: always in order.
                    _ => true,
                };
                reply(key, yes_no(result));
            }
            "MaxOutstandingR2T" | "MaxConnections" => match number(value) {
                Some(v) if v >= 1 => reply(key, "1".into()),
                _ => reply(key, "Reject".into()),
            },
            "ErrorRecoveryLevel" => match number(value) {
                Some(_) => reply(key, "0".into()),
                None => reply(key, "Reject".into()),
            },
            "DefaultTime2Wait" => match number(value) {
                Some(v) => reply(key, v.clamp(2, 3600).to_string()),
                None => reply(key, "Reject".into()),
            },
            "DefaultTime2Retain" => match number(value) {
                // ERL 0: nothing is retained.
                Some(_) => reply(key, "0".into()),
                None => reply(key, "Reject".into()),
            },
            "IFMarker" | "OFMarker" => reply(key, "No".into()),
            "IFMarkInt" | "OFMarkInt" => reply(key, "Irrelevant".into()),
            _ => reply(key, "NotUnderstood".into()),
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TARGET: &str = "iqn.2026-12.io.rackblock:vol0";

    fn request(flags: u8, keys: &[(&str, &str)]) -> Pdu {
        let mut pdu = Pdu::new(op::LOGIN);
        pdu.bhs[0] |= 0x40;
        pdu.set_flags(flags);
        pdu.bhs[8..14].copy_from_slice(&[0x40, 0, 0, 1, 0, 0]);
        pdu.set_itt(1);
        pdu.set_u32_at(24, 10);
        pdu.set_u32_at(28, 5);
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        pdu.with_data(encode_text(&pairs))
    }

    fn keys_of(pdu: &Pdu) -> Vec<(String, String)> {
        parse_text(&pdu.data)
    }

    fn get(pdu: &Pdu, key: &str) -> Option<String> {
        keys_of(pdu)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn status_of(pdu: &Pdu) -> u16 {
        u16::from_be_bytes([pdu.bhs[36], pdu.bhs[37]])
    }

    #[test]
    fn login_without_chap_negotiates_and_enters_full_feature() {
        let mut login = Login::new(TARGET.into(), None, [7; 17], 3);
        let step = login.step(&request(
            0x81, // T, CSG 0, NSG 1
            &[
                ("InitiatorName", "iqn.x"),
                ("SessionType", "Normal"),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
            ],
        ));
        let LoginStep::Continue(response) = step else {
            panic!("{step:?}")
        };
        assert_eq!(response.flags(), 0x81);
        assert_eq!(get(&response, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(get(&response, "TargetPortalGroupTag").as_deref(), Some("1"));
        let step = login.step(&request(
            0x87, // T, CSG 1, NSG 3
            &[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "262144"),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "No"),
                ("ErrorRecoveryLevel", "2"),
                ("MaxOutstandingR2T", "8"),
                ("X-Frob", "1"),
            ],
        ));
        let LoginStep::FullFeature(response, negotiated) = step else {
            panic!("{step:?}")
        };
        assert_eq!(response.flags(), 0x87);
        assert_eq!(u16::from_be_bytes([response.bhs[14], response.bhs[15]]), 3);
        assert_eq!(get(&response, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(get(&response, "ErrorRecoveryLevel").as_deref(), Some("0"));
        assert_eq!(get(&response, "MaxOutstandingR2T").as_deref(), Some("1"));
        assert_eq!(get(&response, "X-Frob").as_deref(), Some("NotUnderstood"));
        assert_eq!(
            get(&response, "MaxRecvDataSegmentLength"),
            Some(TARGET_MAX_RECV_DATA.to_string())
        );
        assert!(negotiated.header_digest && !negotiated.data_digest);
        assert_eq!(negotiated.max_send_data, 65536);
        assert_eq!(negotiated.first_burst, 262_144);
        assert!(!negotiated.initial_r2t && negotiated.immediate_data);
    }

    #[test]
    fn wrong_target_and_missing_names_are_refused() {
        let mut login = Login::new(TARGET.into(), None, [7; 17], 3);
        let step = login.step(&request(
            0x81,
            &[("InitiatorName", "iqn.x"), ("TargetName", "iqn.other")],
        ));
        let LoginStep::Fail(response) = step else {
            panic!("{step:?}")
        };
        assert_eq!(status_of(&response), status::NOT_FOUND);
        let mut login = Login::new(TARGET.into(), None, [7; 17], 3);
        let LoginStep::Fail(response) = login.step(&request(0x81, &[("TargetName", TARGET)]))
        else {
            panic!()
        };
        assert_eq!(status_of(&response), status::MISSING_PARAMETER);
        // A discovery session needs no target name.
        let mut login = Login::new(TARGET.into(), None, [7; 17], 3);
        let step = login.step(&request(
            0x83,
            &[("InitiatorName", "iqn.x"), ("SessionType", "Discovery")],
        ));
        assert!(matches!(step, LoginStep::FullFeature(_, n) if n.discovery));
    }

    fn chap() -> Chap {
        Chap {
            user: "alice".into(),
            secret: "secret-of-alice".into(),
            target_user: Some("target".into()),
            target_secret: Some("secret-of-target".into()),
        }
    }

    fn chap_login(secret: &str, mutual: bool) -> (LoginStep, Login) {
        let mut login = Login::new(TARGET.into(), Some(chap()), [9; 17], 3);
        let LoginStep::Continue(first) = login.step(&request(
            0x01,
            &[
                ("InitiatorName", "iqn.x"),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP,None"),
            ],
        )) else {
            panic!()
        };
        assert_eq!(get(&first, "AuthMethod").as_deref(), Some("CHAP"));
        let LoginStep::Continue(challenge) = login.step(&request(0x01, &[("CHAP_A", "5")])) else {
            panic!()
        };
        let id: u8 = get(&challenge, "CHAP_I").unwrap().parse().unwrap();
        let c = decode_binary(&get(&challenge, "CHAP_C").unwrap()).unwrap();
        let r = hex(&chap_response(id, secret.as_bytes(), &c));
        let mut keys = vec![("CHAP_N", "alice"), ("CHAP_R", r.as_str())];
        if mutual {
            keys.push(("CHAP_I", "77"));
            keys.push(("CHAP_C", "0x0102030405060708"));
        }
        let step = login.step(&request(0x81, &keys));
        (step, login)
    }

    #[test]
    fn chap_right_secret_passes_and_mutual_answers() {
        let (step, _) = chap_login("secret-of-alice", true);
        let LoginStep::Continue(response) = step else {
            panic!("{step:?}")
        };
        assert_eq!(response.flags(), 0x81);
        let expected = chap_response(77, b"secret-of-target", &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(get(&response, "CHAP_R"), Some(hex(&expected)));
        assert_eq!(get(&response, "CHAP_N").as_deref(), Some("target"));
    }

    #[test]
    fn chap_wrong_secret_and_skipped_security_are_refused() {
        let (step, _) = chap_login("guess", false);
        let LoginStep::Fail(response) = step else {
            panic!("{step:?}")
        };
        assert_eq!(status_of(&response), status::AUTHENTICATION_FAILED);
        let mut login = Login::new(TARGET.into(), Some(chap()), [9; 17], 3);
        let LoginStep::Fail(response) = login.step(&request(
            0x87,
            &[("InitiatorName", "iqn.x"), ("TargetName", TARGET)],
        )) else {
            panic!()
        };
        assert_eq!(status_of(&response), status::AUTHENTICATION_FAILED);
    }

    #[test]
    fn chap_values_decode_hex_and_base64() {
        assert_eq!(decode_binary("0x0a0B").unwrap(), vec![10, 11]);
        assert_eq!(decode_binary("0bAQID").unwrap(), vec![1, 2, 3]);
        assert_eq!(decode_binary("0bAQI=").unwrap(), vec![1, 2]);
        assert!(decode_binary("0xzz").is_none());
        assert!(decode_binary("plain").is_none());
    }
}
