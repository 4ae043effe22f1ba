//! Sans-IO fixed-newstyle handshake: takes the client flags and then one
//! option at a time, returns the bytes to send and what happens next.
//!
//! ```text
//! Greeting ──client flags──▶ Options ──EXPORT_NAME (known)──▶ Transmission
//!    │ unknown flag bits          │ ──GO (known) + ACK─────────▶ Transmission
//!    ▼                            │ ──ABORT ──▶ ACK, Close
//!  Close                          │ ──EXPORT_NAME (unknown) ──▶ Close (no way to error)
//!                                 │ ──LIST / INFO / STRUCTURED_REPLY / other ──▶ reply, Options
//!                                 │ ──STARTTLS (offered, not yet on) ──▶ ACK, StartTls, Options
//! ```
//!
//! **TLS** ([`TlsMode`], NBD spec "TLS support"): when offered,
//! `NBD_OPT_STARTTLS` is answered with an ACK and the shell runs the TLS
//! handshake before reading the next option; whatever was negotiated
//! before (structured replies) is forgotten, as the spec asks, since a
//! man in the middle could have chosen it. When TLS is *required*, every
//! option before it but `STARTTLS` and `ABORT` is refused with
//! `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` (which cannot carry an
//! error) closes the connection. A second `STARTTLS` is `ERR_INVALID`.
//!
//! The shell has already bounded the option's length (see
//! [`Handshake::on_oversized_option`]); everything here works on a slice
//! it was handed.

use super::wire::*;

/// What the core needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
}

/// The export table as the handshake sees it.
pub trait ExportLookup {
    /// The export called `name`; the empty name means the default export
    /// (the only one, when there is exactly one).
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Every export, in listing order.
    fn list(&self) -> Vec<ExportInfo>;
}

/// Block-size constraints advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum_bytes: u32,
    pub preferred_bytes: u32,
    pub maximum_bytes: u32,
}

/// The result of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// Transmission runs over TLS.
    pub tls: bool,
}

/// What the shell does after one step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send `reply`, read the next option.
    Continue { reply: Vec<u8> },
    /// Send `reply` (possibly empty), then close the connection.
    Close {
        reply: Vec<u8>,
        reason: &'static str,
    },
    /// Send `reply` (the `STARTTLS` ACK), run the TLS server handshake,
    /// report it with [`Handshake::on_tls_established`] and read the next
    /// option over TLS.
    StartTls { reply: Vec<u8> },
    /// Send `reply`, then start the transmission phase.
    Transmission {
        reply: Vec<u8>,
        negotiated: Negotiated,
    },
}

/// Whether the server offers or requires TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `NBD_OPT_STARTTLS` is refused as unsupported.
    Off,
    /// `NBD_OPT_STARTTLS` upgrades; plain clients are served too.
    Offered,
    /// Nothing but `STARTTLS` and `ABORT` is served before TLS.
    Required,
}

/// Handshake state for one connection.
#[derive(Debug)]
pub struct Handshake {
    tls: TlsMode,
    tls_active: bool,
    block_sizes: BlockSizes,
    multi_conn: bool,
    read_only: bool,
    no_zeroes: bool,
    structured_replies: bool,
    options_seen: u32,
    max_options: u32,
}

impl Handshake {
    pub fn new(block_sizes: BlockSizes, multi_conn: bool, max_options: u32) -> Handshake {
        Handshake {
            tls: TlsMode::Off,
            tls_active: false,
            block_sizes,
            multi_conn,
            read_only: false,
            no_zeroes: false,
            structured_replies: false,
            options_seen: 0,
            max_options,
        }
    }

    /// Offer or require TLS (default: off).
    pub fn with_tls(mut self, tls: TlsMode) -> Handshake {
        self.tls = tls;
        self
    }

    /// Advertise `NBD_FLAG_READ_ONLY` (the backend refuses writes with
    /// `EPERM` whatever the client does).
    pub fn with_read_only(mut self, read_only: bool) -> Handshake {
        self.read_only = read_only;
        self
    }

    /// Whether `STARTTLS` has completed on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The shell finished the TLS handshake that [`Step::StartTls`] asked
    /// for. Options negotiated before TLS are forgotten.
    pub fn on_tls_established(&mut self) {
        self.tls_active = true;
        self.structured_replies = false;
    }

    /// Options other than these are refused while TLS is required and
    /// not yet on.
    fn refused_before_tls(&self, option: u32) -> bool {
        self.tls == TlsMode::Required
            && !self.tls_active
            && option != OPT_STARTTLS
            && option != OPT_ABORT
    }

    /// The client's 32-bit flags. `Err` names why the connection must be
    /// dropped (the spec requires it for unknown bits).
    pub fn on_client_flags(&mut self, flags: u32) -> Result<(), &'static str> {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err("client set unknown handshake flags");
        }
        // A client without C_FIXED_NEWSTYLE may only send EXPORT_NAME,
        // which we answer the same way, so nothing else depends on it.
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// Transmission flags for this connection.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES;
        if self.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        // Every read is answered with a single data chunk, so DF holds
        // trivially; the flag is only allowed with structured replies.
        if self.structured_replies {
            flags |= FLAG_SEND_DF;
        }
        flags
    }

    /// An option whose data the shell refused to buffer (longer than the
    /// bound) and has discarded.
    pub fn on_oversized_option(&mut self, option: u32) -> Step {
        if let Some(step) = self.count_option() {
            return step;
        }
        if let Some(step) = self.tls_required_step(option) {
            return step;
        }
        match option {
            // Cannot be answered with an error.
            OPT_EXPORT_NAME => Step::Close {
                reply: Vec::new(),
                reason: "NBD_OPT_EXPORT_NAME longer than any export name",
            },
            OPT_ABORT => abort(),
            OPT_LIST | OPT_INFO | OPT_GO | OPT_STRUCTURED_REPLY | OPT_STARTTLS => {
                error_reply(option, REP_ERR_INVALID, "option data too long")
            }
            _ => error_reply(option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    /// One option with its complete data.
    pub fn on_option(&mut self, option: u32, data: &[u8], exports: &dyn ExportLookup) -> Step {
        if let Some(step) = self.count_option() {
            return step;
        }
        if let Some(step) = self.tls_required_step(option) {
            return step;
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, exports),
            OPT_ABORT => abort(),
            OPT_LIST => {
                if !data.is_empty() {
                    return error_reply(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                let mut reply = Vec::new();
                for export in exports.list() {
                    let name = export.name.as_bytes();
                    let description = truncate_str(&export.description, MAX_STRING_BYTES);
                    let mut entry = Vec::with_capacity(4 + name.len() + description.len());
                    entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(name);
                    entry.extend_from_slice(description.as_bytes());
                    put_option_reply(&mut reply, option, REP_SERVER, &entry);
                }
                put_option_reply(&mut reply, option, REP_ACK, &[]);
                Step::Continue { reply }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return error_reply(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                self.structured_replies = true;
                let mut reply = Vec::new();
                put_option_reply(&mut reply, option, REP_ACK, &[]);
                Step::Continue { reply }
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, exports),
            OPT_STARTTLS => self.start_tls(data),
            _ => error_reply(option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    /// The step for `option` when TLS is required and not yet on.
    fn tls_required_step(&self, option: u32) -> Option<Step> {
        if !self.refused_before_tls(option) {
            return None;
        }
        Some(if option == OPT_EXPORT_NAME {
            Step::Close {
                reply: Vec::new(),
                reason: "NBD_OPT_EXPORT_NAME before the required TLS",
            }
        } else {
            error_reply(option, REP_ERR_TLS_REQD, "TLS is required")
        })
    }

    fn start_tls(&self, data: &[u8]) -> Step {
        if self.tls == TlsMode::Off {
            return error_reply(OPT_STARTTLS, REP_ERR_UNSUP, "TLS is not configured");
        }
        if !data.is_empty() {
            return error_reply(
                OPT_STARTTLS,
                REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
        }
        if self.tls_active {
            return error_reply(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already on");
        }
        let mut reply = Vec::new();
        put_option_reply(&mut reply, OPT_STARTTLS, REP_ACK, &[]);
        Step::StartTls { reply }
    }

    fn count_option(&mut self) -> Option<Step> {
        self.options_seen += 1;
        (self.options_seen > self.max_options).then_some(Step::Close {
            reply: Vec::new(),
            reason: "too many options in one handshake",
        })
    }

    fn export_name(&self, data: &[u8], exports: &dyn ExportLookup) -> Step {
        let Some(export) = std::str::from_utf8(data)
            .ok()
            .and_then(|name| exports.lookup(name))
        else {
            // NBD_OPT_EXPORT_NAME cannot be answered with an error.
            return Step::Close {
                reply: Vec::new(),
                reason: "NBD_OPT_EXPORT_NAME for an unknown export",
            };
        };
        let flags = self.transmission_flags();
        let mut reply = Vec::with_capacity(10 + 124);
        reply.extend_from_slice(&export.size_bytes.to_be_bytes());
        reply.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        self.transmission(reply, export, flags)
    }

    /// The last step: send `reply`, then serve `export` with `flags`.
    fn transmission(&self, reply: Vec<u8>, export: ExportInfo, flags: u16) -> Step {
        Step::Transmission {
            reply,
            negotiated: Negotiated {
                export,
                transmission_flags: flags,
                structured_replies: self.structured_replies,
                tls: self.tls_active(),
            },
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO` data: u32 name length, name, u16
    /// number of info requests, that many u16 info types.
    fn info_or_go(&self, option: u32, data: &[u8], exports: &dyn ExportLookup) -> Step {
        let Some(request) = parse_info_request(data) else {
            return error_reply(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
        };
        let Some(name) = std::str::from_utf8(request.name).ok() else {
            return error_reply(option, REP_ERR_INVALID, "export name is not UTF-8");
        };
        let Some(export) = exports.lookup(name) else {
            return error_reply(option, REP_ERR_UNKNOWN, "no such export");
        };
        let flags = self.transmission_flags();
        let mut reply = Vec::new();

        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size_bytes.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        put_option_reply(&mut reply, option, REP_INFO, &info);

        if request.info_types.contains(&INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(export.name.as_bytes());
            put_option_reply(&mut reply, option, REP_INFO, &info);
        }
        if request.info_types.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(truncate_str(&export.description, MAX_STRING_BYTES).as_bytes());
            put_option_reply(&mut reply, option, REP_INFO, &info);
        }
        // Sent whether asked or not: the spec allows it, and a client that
        // ignores it still gets EINVAL (not corruption) for unaligned I/O.
        let sizes = self.block_sizes;
        let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        info.extend_from_slice(&sizes.minimum_bytes.to_be_bytes());
        info.extend_from_slice(&sizes.preferred_bytes.to_be_bytes());
        info.extend_from_slice(&sizes.maximum_bytes.to_be_bytes());
        put_option_reply(&mut reply, option, REP_INFO, &info);

        put_option_reply(&mut reply, option, REP_ACK, &[]);
        if option == OPT_GO {
            self.transmission(reply, export, flags)
        } else {
            Step::Continue { reply }
        }
    }
}

struct InfoRequest<'a> {
    name: &'a [u8],
    info_types: Vec<u16>,
}

fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = usize::try_from(u32::from_be_bytes(data.get(0..4)?.try_into().ok()?)).ok()?;
    if name_len > MAX_STRING_BYTES {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let rest = data.get(4 + name_len..)?;
    let count = usize::from(u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?));
    let types = rest.get(2..)?;
    if types.len() != count * 2 {
        return None;
    }
    let info_types = types
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Some(InfoRequest { name, info_types })
}

fn abort() -> Step {
    let mut reply = Vec::new();
    put_option_reply(&mut reply, OPT_ABORT, REP_ACK, &[]);
    Step::Close {
        reply,
        reason: "client sent NBD_OPT_ABORT",
    }
}

fn error_reply(option: u32, reply_type: u32, message: &str) -> Step {
    let mut reply = Vec::new();
    put_option_reply(&mut reply, option, reply_type, message.as_bytes());
    Step::Continue { reply }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    struct Table(Vec<ExportInfo>);

    impl ExportLookup for Table {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            if name.is_empty() && self.0.len() == 1 {
                return self.0.first().cloned();
            }
            self.0.iter().find(|e| e.name == name).cloned()
        }
        fn list(&self) -> Vec<ExportInfo> {
            self.0.clone()
        }
    }

    fn table() -> Table {
        Table(vec![ExportInfo {
            name: "vol0".into(),
            description: "test volume".into(),
            size_bytes: 1 << 30,
        }])
    }

    fn handshake() -> Handshake {
        Handshake::new(
            BlockSizes {
                minimum_bytes: 512,
                preferred_bytes: 4096,
                maximum_bytes: 32 << 20,
            },
            true,
            16,
        )
    }

    /// Split a byte string of option replies into (option, type, data).
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(
                u64::from_be_bytes(bytes[0..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
            out.push((option, kind, bytes[20..20 + len].to_vec()));
            bytes = &bytes[20 + len..];
        }
        out
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    #[test]
    fn unknown_client_flags_close() {
        assert!(handshake().on_client_flags(1 << 5).is_err());
        assert!(handshake().on_client_flags(3).is_ok());
    }

    #[test]
    fn go_reports_export_block_sizes_and_enters_transmission() {
        let mut hs = handshake();
        hs.on_client_flags(3).unwrap();
        let step = hs.on_option(OPT_STRUCTURED_REPLY, &[], &table());
        assert!(matches!(step, Step::Continue { .. }));
        let step = hs.on_option(
            OPT_GO,
            &go_data("vol0", &[INFO_BLOCK_SIZE, INFO_NAME]),
            &table(),
        );
        let Step::Transmission { reply, negotiated } = step else {
            panic!("expected transmission, got {step:?}");
        };
        assert!(negotiated.structured_replies);
        assert_ne!(negotiated.transmission_flags & FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(negotiated.transmission_flags & FLAG_SEND_DF, 0);
        let replies = replies(&reply);
        assert_eq!(replies.last().unwrap().1, REP_ACK);
        let export = &replies[0].2;
        assert_eq!(u16::from_be_bytes([export[0], export[1]]), INFO_EXPORT);
        assert_eq!(
            u64::from_be_bytes(export[2..10].try_into().unwrap()),
            1 << 30
        );
        let block = replies
            .iter()
            .find(|r| u16::from_be_bytes([r.2[0], r.2[1]]) == INFO_BLOCK_SIZE)
            .unwrap();
        assert_eq!(&block.2[2..6], &512u32.to_be_bytes());
        assert_eq!(&block.2[6..10], &4096u32.to_be_bytes());
        assert!(replies
            .iter()
            .any(|r| r.2[..2] == INFO_NAME.to_be_bytes() && &r.2[2..] == b"vol0"));
    }

    #[test]
    fn info_errors_keep_negotiating() {
        let mut hs = handshake();
        let step = hs.on_option(OPT_INFO, &go_data("nope", &[]), &table());
        let Step::Continue { reply } = step else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_UNKNOWN);
        // Inconsistent lengths: name length beyond the data.
        let mut bad = go_data("vol0", &[1]);
        bad[3] = 200;
        let Step::Continue { reply } = hs.on_option(OPT_INFO, &bad, &table()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        let Step::Continue { reply } = hs.on_option(OPT_LIST, b"x", &table()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        let Step::Continue { reply } = hs.on_option(99, b"", &table()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_UNSUP);
        let Step::Continue { reply } = hs.on_oversized_option(OPT_GO) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        // INFO does not leave the handshake.
        let step = hs.on_option(OPT_INFO, &go_data("vol0", &[]), &table());
        assert!(matches!(step, Step::Continue { .. }));
    }

    #[test]
    fn list_names_every_export() {
        let mut hs = handshake();
        let Step::Continue { reply } = hs.on_option(OPT_LIST, &[], &table()) else {
            panic!()
        };
        let replies = replies(&reply);
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].1, REP_SERVER);
        assert_eq!(&replies[0].2[4..8], b"vol0");
        assert_eq!(replies[1].1, REP_ACK);
    }

    #[test]
    fn export_name_replies_without_zeroes_when_negotiated() {
        let mut hs = handshake();
        hs.on_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .unwrap();
        let Step::Transmission { reply, negotiated } = hs.on_option(OPT_EXPORT_NAME, b"", &table())
        else {
            panic!()
        };
        assert_eq!(reply.len(), 10);
        assert!(!negotiated.structured_replies);
        assert_eq!(negotiated.transmission_flags & FLAG_SEND_DF, 0);
        let step = handshake().on_option(OPT_EXPORT_NAME, b"nope", &table());
        assert!(matches!(step, Step::Close { .. }));
    }

    #[test]
    fn starttls_offered_upgrades_and_forgets_earlier_options() {
        let mut hs = handshake().with_tls(TlsMode::Offered);
        // Plain clients are still served.
        let step = hs.on_option(OPT_INFO, &go_data("vol0", &[]), &table());
        assert!(matches!(step, Step::Continue { .. }));
        hs.on_option(OPT_STRUCTURED_REPLY, &[], &table());
        let Step::Continue { reply } = hs.on_option(OPT_STARTTLS, b"x", &table()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        let Step::StartTls { reply } = hs.on_option(OPT_STARTTLS, &[], &table()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0], (OPT_STARTTLS, REP_ACK, vec![]));
        hs.on_tls_established();
        assert!(hs.tls_active());
        let Step::Continue { reply } = hs.on_option(OPT_STARTTLS, &[], &table()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        let Step::Transmission { negotiated, .. } =
            hs.on_option(OPT_GO, &go_data("vol0", &[]), &table())
        else {
            panic!()
        };
        assert!(!negotiated.structured_replies);
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls_and_abort() {
        let mut hs = handshake().with_tls(TlsMode::Required);
        for option in [OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, 99] {
            let Step::Continue { reply } = hs.on_option(option, &go_data("vol0", &[]), &table())
            else {
                panic!("option {option} was not refused")
            };
            assert_eq!(replies(&reply)[0].1, REP_ERR_TLS_REQD);
        }
        let Step::Continue { reply } = hs.on_oversized_option(OPT_GO) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_TLS_REQD);
        assert!(matches!(
            hs.on_option(OPT_EXPORT_NAME, b"vol0", &table()),
            Step::Close { .. }
        ));
        let mut hs = handshake().with_tls(TlsMode::Required);
        assert!(matches!(
            hs.on_option(OPT_STARTTLS, &[], &table()),
            Step::StartTls { .. }
        ));
        hs.on_tls_established();
        assert!(matches!(
            hs.on_option(OPT_GO, &go_data("vol0", &[]), &table()),
            Step::Transmission { .. }
        ));
        let mut hs = handshake().with_tls(TlsMode::Required);
        assert!(matches!(
            hs.on_option(OPT_ABORT, &[], &table()),
            Step::Close { .. }
        ));
        // Without TLS configured, STARTTLS is unsupported.
        let Step::Continue { reply } = handshake().on_option(OPT_STARTTLS, &[], &table()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_UNSUP);
    }

    #[test]
    fn option_count_is_bounded() {
        let mut hs = handshake();
        for _ in 0..16 {
            assert!(matches!(
                hs.on_option(OPT_LIST, &[], &table()),
                Step::Continue { .. }
            ));
        }
        assert!(matches!(
            hs.on_option(OPT_LIST, &[], &table()),
            Step::Close { .. }
        ));
    }
}
