//! BGP-4 messages on the wire (RFC 4271), as much as an IPv4-unicast speaker that only
//! announces needs: OPEN with capabilities (multiprotocol IPv4 unicast, four-octet AS, route
//! refresh — RFC 5492, 4760, 6793, 2918), UPDATE (ORIGIN, AS_PATH, NEXT_HOP, LOCAL_PREF and
//! prefixes), NOTIFICATION, KEEPALIVE and ROUTE-REFRESH.
//!
//! Pure: bytes in, values out, and back. Every malformed input is an [`Error`] carrying the
//! NOTIFICATION code and subcode RFC 4271 §6 gives it, never a panic (the decoder is fuzzed).

use std::fmt;
use std::net::Ipv4Addr;

/// Every message starts with a 16-byte marker of ones, a length and a type.
pub const HEADER_LEN: usize = 19;

/// The largest message without the extended-message capability (which is not offered).
pub const MAX_LEN: usize = 4096;

/// `AS_TRANS` (RFC 6793): the two-octet AS field of a speaker whose AS does not fit.
pub const AS_TRANS: u16 = 23456;

const MARKER: [u8; 16] = [0xff; 16];

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;

const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_LOCAL_PREF: u8 = 5;
/// Well-known attributes: not optional, transitive.
const WELL_KNOWN: u8 = 0x40;
const EXTENDED_LENGTH: u8 = 0x10;
const AS_SEQUENCE: u8 = 2;

const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_ROUTE_REFRESH: u8 = 2;
const CAP_FOUR_OCTET_AS: u8 = 65;
const PARAM_CAPABILITIES: u8 = 2;

/// Address family IPv4, sub-family unicast.
pub const AFI_IPV4: u16 = 1;
pub const SAFI_UNICAST: u8 = 1;

/// An IPv4 prefix with its host bits clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: Ipv4Addr,
    len: u8,
}

impl Prefix {
    /// `None` for a length over 32; host bits are cleared.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Prefix> {
        if len > 32 {
            return None;
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        Some(Prefix {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The bytes it takes in an UPDATE: the length, then the significant octets.
    fn wire_len(&self) -> usize {
        1 + usize::from(self.len).div_ceil(8)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.len);
        out.extend_from_slice(&self.addr.octets()[..usize::from(self.len).div_ceil(8)]);
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A capability of an OPEN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol {
        afi: u16,
        safi: u8,
    },
    RouteRefresh,
    FourOctetAs(u32),
    /// One this speaker does not use (graceful restart, enhanced refresh, …): kept, ignored.
    Other {
        code: u8,
        value: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The two-octet AS field (`AS_TRANS` for a four-octet AS).
    pub my_as: u16,
    pub hold_time: u16,
    pub id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// The speaker's AS: from the four-octet capability if there is one, else the AS field.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(asn) => Some(*asn),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }

    pub fn has(&self, capability: &Capability) -> bool {
        self.capabilities.contains(capability)
    }

    /// The OPEN this speaker sends: version 4, IPv4 unicast, four-octet AS, route refresh.
    pub fn ours(asn: u32, hold_time: u16, id: Ipv4Addr) -> Open {
        Open {
            version: 4,
            my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
            hold_time,
            id,
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::FourOctetAs(asn),
                Capability::RouteRefresh,
            ],
        }
    }
}

/// The path attributes of announced prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    pub next_hop: Ipv4Addr,
    /// Empty towards an internal peer; this speaker's AS towards an external one.
    pub as_path: Vec<u32>,
    /// Sent to internal peers only (RFC 4271 §5.1.5).
    pub local_pref: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<Prefix>,
    /// The attributes of `nlri` (`None`: no attributes, a withdrawal or End-of-RIB).
    pub path: Option<Path>,
    pub nlri: Vec<Prefix>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8) -> Notification {
        Notification {
            code,
            subcode,
            data: Vec::new(),
        }
    }

    /// Cease / administrative shutdown (RFC 4486), what a speaker that stops sends.
    pub fn shutdown() -> Notification {
        Notification::new(6, 2)
    }

    /// Hold timer expired.
    pub fn hold_timer_expired() -> Notification {
        Notification::new(4, 0)
    }

    /// A message that does not fit the session's state (RFC 6608: 1 OpenSent, 2 OpenConfirm,
    /// 3 Established).
    pub fn unexpected(state: u8) -> Notification {
        Notification::new(5, state)
    }
}

impl fmt::Display for Notification {
    /// `6/2 cease: administrative shutdown`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (code, sub) = match (self.code, self.subcode) {
            (1, 1) => ("message header error", "connection not synchronized"),
            (1, 2) => ("message header error", "bad message length"),
            (1, 3) => ("message header error", "bad message type"),
            (1, _) => ("message header error", ""),
            (2, 1) => ("OPEN error", "unsupported version number"),
            (2, 2) => ("OPEN error", "bad peer AS"),
            (2, 3) => ("OPEN error", "bad BGP identifier"),
            (2, 4) => ("OPEN error", "unsupported optional parameter"),
            (2, 6) => ("OPEN error", "unacceptable hold time"),
            (2, 7) => ("OPEN error", "unsupported capability"),
            (2, _) => ("OPEN error", ""),
            (3, 1) => ("UPDATE error", "malformed attribute list"),
            (3, 3) => ("UPDATE error", "missing well-known attribute"),
            (3, 5) => ("UPDATE error", "attribute length error"),
            (3, 10) => ("UPDATE error", "invalid network field"),
            (3, 11) => ("UPDATE error", "malformed AS_PATH"),
            (3, _) => ("UPDATE error", ""),
            (4, _) => ("hold timer expired", ""),
            (5, _) => ("finite state machine error", ""),
            (6, 1) => ("cease", "maximum number of prefixes reached"),
            (6, 2) => ("cease", "administrative shutdown"),
            (6, 3) => ("cease", "peer de-configured"),
            (6, 4) => ("cease", "administrative reset"),
            (6, 5) => ("cease", "connection rejected"),
            (6, 6) => ("cease", "other configuration change"),
            (6, 7) => ("cease", "connection collision resolution"),
            (6, 8) => ("cease", "out of resources"),
            (6, _) => ("cease", ""),
            (7, _) => ("ROUTE-REFRESH error", ""),
            _ => ("unknown error", ""),
        };
        write!(f, "{}/{} {code}", self.code, self.subcode)?;
        if !sub.is_empty() {
            write!(f, ": {sub}")?;
        }
        // A shutdown communication (RFC 9003): a length, then UTF-8 text.
        if self.code == 6 && matches!(self.subcode, 2 | 4) {
            if let Some((len, text)) = self.data.split_first() {
                if let Some(text) = text.get(..usize::from(*len)) {
                    write!(f, " ({:?})", String::from_utf8_lossy(text))?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh { afi: u16, safi: u8 },
}

/// A malformed message: the NOTIFICATION to answer it with, and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (answered with NOTIFICATION {notification})")]
pub struct Error {
    pub notification: Notification,
    pub reason: String,
}

fn error(code: u8, subcode: u8, data: &[u8], reason: impl Into<String>) -> Error {
    Error {
        notification: Notification {
            code,
            subcode,
            data: data.to_vec(),
        },
        reason: reason.into(),
    }
}

/// A message header: checks the marker, the length and the type; the whole message's length
/// and its type.
pub fn header(bytes: &[u8; HEADER_LEN]) -> Result<(usize, u8), Error> {
    if bytes[..16] != MARKER {
        return Err(error(1, 1, &[], "the header's marker is not all ones"));
    }
    let length = [bytes[16], bytes[17]];
    let len = usize::from(u16::from_be_bytes(length));
    let kind = bytes[18];
    let least = match kind {
        OPEN => 29,
        UPDATE => 23,
        NOTIFICATION => 21,
        KEEPALIVE => HEADER_LEN,
        ROUTE_REFRESH => 23,
        other => {
            return Err(error(
                1,
                3,
                &[other],
                format!("unknown message type {other}"),
            ))
        }
    };
    let fits = match kind {
        KEEPALIVE => len == HEADER_LEN,
        ROUTE_REFRESH => len == 23,
        _ => (least..=MAX_LEN).contains(&len),
    };
    if !fits {
        return Err(error(
            1,
            2,
            &length,
            format!("a message of type {kind} cannot be {len} bytes long"),
        ));
    }
    Ok((len, kind))
}

/// Decodes one whole message (header included). `four_octet`: whether both sides sent the
/// four-octet AS capability (AS_PATH then carries four-octet AS numbers).
pub fn decode(bytes: &[u8], four_octet: bool) -> Result<Message, Error> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| error(1, 2, &[], "shorter than a message header"))?;
    let (len, kind) = header(head)?;
    if bytes.len() != len {
        let length = u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes();
        return Err(error(
            1,
            2,
            &length,
            format!(
                "the header says {len} bytes, the message has {}",
                bytes.len()
            ),
        ));
    }
    let body = &bytes[HEADER_LEN..];
    match kind {
        OPEN => decode_open(body).map(Message::Open),
        UPDATE => decode_update(body, four_octet).map(Message::Update),
        NOTIFICATION => Ok(Message::Notification(Notification {
            code: body[0],
            subcode: body[1],
            data: body[2..].to_vec(),
        })),
        KEEPALIVE => Ok(Message::Keepalive),
        _ => Ok(Message::RouteRefresh {
            afi: u16::from_be_bytes([body[0], body[1]]),
            safi: body[3],
        }),
    }
}

/// A cursor over a message body whose every read is checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn decode_open(body: &[u8]) -> Result<Open, Error> {
    let mut r = Reader { bytes: body };
    let short = || error(1, 2, &[], "OPEN too short");
    let version = r.u8().ok_or_else(short)?;
    if version != 4 {
        return Err(error(
            2,
            1,
            &4u16.to_be_bytes(),
            format!("BGP version {version}; this speaker speaks 4"),
        ));
    }
    let my_as = r.u16().ok_or_else(short)?;
    let hold_time = r.u16().ok_or_else(short)?;
    let id = Ipv4Addr::from(r.u32().ok_or_else(short)?);
    let params_len = usize::from(r.u8().ok_or_else(short)?);
    let params = r
        .take(params_len)
        .filter(|_| r.bytes.is_empty())
        .ok_or_else(|| {
            error(
                2,
                0,
                &[],
                "the optional parameters' length does not fit the OPEN",
            )
        })?;
    let mut capabilities = Vec::new();
    let mut p = Reader { bytes: params };
    while !p.bytes.is_empty() {
        let bad = || error(2, 0, &[], "a malformed optional parameter");
        let kind = p.u8().ok_or_else(bad)?;
        let len = usize::from(p.u8().ok_or_else(bad)?);
        let value = p.take(len).ok_or_else(bad)?;
        if kind != PARAM_CAPABILITIES {
            return Err(error(
                2,
                4,
                &[],
                format!("optional parameter type {kind} (only capabilities, 2, are known)"),
            ));
        }
        let mut c = Reader { bytes: value };
        while !c.bytes.is_empty() {
            let bad = || error(2, 0, &[], "a malformed capability");
            let code = c.u8().ok_or_else(bad)?;
            let len = usize::from(c.u8().ok_or_else(bad)?);
            let value = c.take(len).ok_or_else(bad)?;
            capabilities.push(match (code, value) {
                (CAP_MULTIPROTOCOL, [a, b, _, safi]) => Capability::Multiprotocol {
                    afi: u16::from_be_bytes([*a, *b]),
                    safi: *safi,
                },
                (CAP_ROUTE_REFRESH, []) => Capability::RouteRefresh,
                (CAP_FOUR_OCTET_AS, [a, b, c, d]) => {
                    Capability::FourOctetAs(u32::from_be_bytes([*a, *b, *c, *d]))
                }
                (CAP_MULTIPROTOCOL | CAP_ROUTE_REFRESH | CAP_FOUR_OCTET_AS, _) => {
                    return Err(error(
                        2,
                        0,
                        &[],
                        format!("capability {code} with a value of {len} bytes"),
                    ))
                }
                (code, value) => Capability::Other {
                    code,
                    value: value.to_vec(),
                },
            });
        }
    }
    Ok(Open {
        version,
        my_as,
        hold_time,
        id,
        capabilities,
    })
}

fn decode_prefixes(mut bytes: &[u8], what: &str) -> Result<Vec<Prefix>, Error> {
    let mut prefixes = Vec::new();
    while let Some((&len, rest)) = bytes.split_first() {
        let octets = usize::from(len).div_ceil(8);
        if len > 32 || octets > rest.len() {
            return Err(error(
                3,
                10,
                &[],
                format!("a {what} prefix of length {len} that does not fit"),
            ));
        }
        let mut addr = [0u8; 4];
        addr[..octets].copy_from_slice(&rest[..octets]);
        let prefix = Prefix::new(Ipv4Addr::from(addr), len)
            .ok_or_else(|| error(3, 10, &[], format!("a {what} prefix of length {len}")))?;
        prefixes.push(prefix);
        bytes = &rest[octets..];
    }
    Ok(prefixes)
}

fn decode_update(body: &[u8], four_octet: bool) -> Result<Update, Error> {
    let mut r = Reader { bytes: body };
    let malformed = |what: &str| error(3, 1, &[], format!("UPDATE: {what}"));
    let withdrawn_len = usize::from(r.u16().ok_or_else(|| malformed("too short"))?);
    let withdrawn = r
        .take(withdrawn_len)
        .ok_or_else(|| malformed("withdrawn routes overrun the message"))?;
    let withdrawn = decode_prefixes(withdrawn, "withdrawn")?;
    let attrs_len = usize::from(r.u16().ok_or_else(|| malformed("too short"))?);
    let attrs = r
        .take(attrs_len)
        .ok_or_else(|| malformed("path attributes overrun the message"))?;
    let nlri = decode_prefixes(r.bytes, "announced")?;
    let mut a = Reader { bytes: attrs };
    let (mut origin, mut as_path, mut next_hop, mut local_pref) = (false, None, None, None);
    while !a.bytes.is_empty() {
        let flags = a.u8().ok_or_else(|| malformed("a truncated attribute"))?;
        let kind = a.u8().ok_or_else(|| malformed("a truncated attribute"))?;
        let len = if flags & EXTENDED_LENGTH != 0 {
            a.u16().map(usize::from)
        } else {
            a.u8().map(usize::from)
        }
        .ok_or_else(|| malformed("a truncated attribute"))?;
        let value = a
            .take(len)
            .ok_or_else(|| malformed("an attribute overruns the attribute list"))?;
        let length_error = || {
            error(
                3,
                5,
                &[],
                format!("UPDATE: attribute {kind} of {len} bytes"),
            )
        };
        match kind {
            ATTR_ORIGIN if len == 1 => origin = true,
            ATTR_NEXT_HOP => {
                let octets: [u8; 4] = value.try_into().map_err(|_| length_error())?;
                next_hop = Some(Ipv4Addr::from(octets));
            }
            ATTR_LOCAL_PREF => {
                let octets: [u8; 4] = value.try_into().map_err(|_| length_error())?;
                local_pref = Some(u32::from_be_bytes(octets));
            }
            ATTR_AS_PATH => as_path = Some(decode_as_path(value, four_octet)?),
            ATTR_ORIGIN => return Err(length_error()),
            _ => {}
        }
    }
    let path = match (origin, as_path, next_hop) {
        (true, Some(as_path), Some(next_hop)) => Some(Path {
            next_hop,
            as_path,
            local_pref,
        }),
        _ if nlri.is_empty() => None,
        (false, ..) => return Err(error(3, 3, &[ATTR_ORIGIN], "UPDATE: no ORIGIN")),
        (_, None, _) => return Err(error(3, 3, &[ATTR_AS_PATH], "UPDATE: no AS_PATH")),
        (_, _, None) => return Err(error(3, 3, &[ATTR_NEXT_HOP], "UPDATE: no NEXT_HOP")),
    };
    Ok(Update {
        withdrawn,
        path,
        nlri,
    })
}

/// The AS numbers of an AS_PATH's segments, in order.
fn decode_as_path(bytes: &[u8], four_octet: bool) -> Result<Vec<u32>, Error> {
    let width = if four_octet { 4 } else { 2 };
    let mut path = Vec::new();
    let mut r = Reader { bytes };
    let malformed = || error(3, 11, &[], "UPDATE: a malformed AS_PATH");
    while !r.bytes.is_empty() {
        let _kind = r.u8().ok_or_else(malformed)?;
        let count = usize::from(r.u8().ok_or_else(malformed)?);
        for _ in 0..count {
            let asn = if width == 4 {
                r.u32()
            } else {
                r.u16().map(u32::from)
            }
            .ok_or_else(malformed)?;
            path.push(asn);
        }
    }
    Ok(path)
}

/// The bytes of `message`; an UPDATE must fit [`MAX_LEN`] (see [`updates`]).
pub fn encode(message: &Message, four_octet: bool) -> Vec<u8> {
    let mut body = Vec::new();
    let kind = match message {
        Message::Open(open) => {
            let mut caps = Vec::new();
            for c in &open.capabilities {
                match c {
                    Capability::Multiprotocol { afi, safi } => {
                        caps.extend_from_slice(&[CAP_MULTIPROTOCOL, 4]);
                        caps.extend_from_slice(&afi.to_be_bytes());
                        caps.extend_from_slice(&[0, *safi]);
                    }
                    Capability::RouteRefresh => caps.extend_from_slice(&[CAP_ROUTE_REFRESH, 0]),
                    Capability::FourOctetAs(asn) => {
                        caps.extend_from_slice(&[CAP_FOUR_OCTET_AS, 4]);
                        caps.extend_from_slice(&asn.to_be_bytes());
                    }
                    Capability::Other { code, value } => {
                        caps.push(*code);
                        caps.push(u8::try_from(value.len()).unwrap_or(u8::MAX));
                        caps.extend_from_slice(&value[..value.len().min(255)]);
                    }
                }
            }
            body.push(open.version);
            body.extend_from_slice(&open.my_as.to_be_bytes());
            body.extend_from_slice(&open.hold_time.to_be_bytes());
            body.extend_from_slice(&open.id.octets());
            if caps.is_empty() {
                body.push(0);
            } else {
                // One parameter per 255 bytes of capabilities.
                let params: Vec<&[u8]> = caps.chunks(255).collect();
                let total: usize = params.iter().map(|p| p.len() + 2).sum();
                body.push(u8::try_from(total).unwrap_or(u8::MAX));
                for p in params {
                    body.push(PARAM_CAPABILITIES);
                    body.push(u8::try_from(p.len()).unwrap_or(u8::MAX));
                    body.extend_from_slice(p);
                }
            }
            OPEN
        }
        Message::Update(update) => {
            let mut withdrawn = Vec::new();
            for p in &update.withdrawn {
                p.encode(&mut withdrawn);
            }
            let mut attrs = Vec::new();
            if let Some(path) = &update.path {
                attrs.extend_from_slice(&[WELL_KNOWN, ATTR_ORIGIN, 1, 0]);
                let mut segments = Vec::new();
                for chunk in path.as_path.chunks(255) {
                    segments.push(AS_SEQUENCE);
                    segments.push(u8::try_from(chunk.len()).unwrap_or(u8::MAX));
                    for asn in chunk {
                        if four_octet {
                            segments.extend_from_slice(&asn.to_be_bytes());
                        } else {
                            let two = u16::try_from(*asn).unwrap_or(AS_TRANS);
                            segments.extend_from_slice(&two.to_be_bytes());
                        }
                    }
                }
                push_attribute(&mut attrs, ATTR_AS_PATH, &segments);
                push_attribute(&mut attrs, ATTR_NEXT_HOP, &path.next_hop.octets());
                if let Some(pref) = path.local_pref {
                    push_attribute(&mut attrs, ATTR_LOCAL_PREF, &pref.to_be_bytes());
                }
            }
            body.extend_from_slice(&u16::try_from(withdrawn.len()).unwrap_or(0).to_be_bytes());
            body.extend_from_slice(&withdrawn);
            body.extend_from_slice(&u16::try_from(attrs.len()).unwrap_or(0).to_be_bytes());
            body.extend_from_slice(&attrs);
            for p in &update.nlri {
                p.encode(&mut body);
            }
            UPDATE
        }
        Message::Notification(n) => {
            body.extend_from_slice(&[n.code, n.subcode]);
            body.extend_from_slice(&n.data);
            NOTIFICATION
        }
        Message::Keepalive => KEEPALIVE,
        Message::RouteRefresh { afi, safi } => {
            body.extend_from_slice(&afi.to_be_bytes());
            body.extend_from_slice(&[0, *safi]);
            ROUTE_REFRESH
        }
    };
    let len = HEADER_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&body);
    out
}

fn push_attribute(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    match u8::try_from(value.len()) {
        Ok(len) => out.extend_from_slice(&[WELL_KNOWN, kind, len]),
        Err(_) => {
            out.extend_from_slice(&[WELL_KNOWN | EXTENDED_LENGTH, kind]);
            out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
        }
    }
    out.extend_from_slice(value);
}

/// The UPDATEs that withdraw `withdrawn` and announce `announced` with `path`, each within
/// [`MAX_LEN`]: the withdrawals first, then the announcements (a prefix is never in both
/// fields of one message).
pub fn updates(
    withdrawn: &[Prefix],
    announced: &[Prefix],
    path: &Path,
    four_octet: bool,
) -> Vec<Update> {
    let mut out = Vec::new();
    // Header, the two length fields.
    let fixed = HEADER_LEN + 4;
    let mut current = Update::default();
    let mut size = fixed;
    for p in withdrawn {
        if size + p.wire_len() > MAX_LEN {
            out.push(std::mem::take(&mut current));
            size = fixed;
        }
        current.withdrawn.push(*p);
        size += p.wire_len();
    }
    if !current.withdrawn.is_empty() {
        out.push(std::mem::take(&mut current));
    }
    let attrs = encode(
        &Message::Update(Update {
            path: Some(path.clone()),
            ..Update::default()
        }),
        four_octet,
    )
    .len()
        - fixed;
    size = fixed + attrs;
    for p in announced {
        if size + p.wire_len() > MAX_LEN {
            out.push(std::mem::take(&mut current));
            size = fixed + attrs;
        }
        current.path = Some(path.clone());
        current.nlri.push(*p);
        size += p.wire_len();
    }
    if !current.nlri.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn prefix(s: &str) -> Prefix {
        let (a, l) = s.split_once('/').expect("prefix");
        Prefix::new(a.parse().expect("addr"), l.parse().expect("len")).expect("prefix")
    }

    const ONES: &str = "ffffffffffffffffffffffffffffffff";

    #[test]
    fn messages_encode_byte_for_byte_as_the_rfcs_give_them() {
        let open = Message::Open(Open::ours(64512, 90, "172.20.1.5".parse().expect("ip")));
        assert_eq!(
            hex(&encode(&open, false)),
            format!("{ONES}002d01")
                + "04fc00005aac140105"
                + "10"
                + "020e"
                + "010400010001"
                + "41040000fc00"
                + "0200"
        );
        assert_eq!(
            hex(&encode(&Message::Keepalive, true)),
            format!("{ONES}001304")
        );
        let announce = Message::Update(Update {
            withdrawn: vec![],
            path: Some(Path {
                next_hop: "172.20.1.5".parse().expect("ip"),
                as_path: vec![],
                local_pref: Some(100),
            }),
            nlri: vec![prefix("192.168.1.0/24")],
        });
        assert_eq!(
            hex(&encode(&announce, true)),
            format!("{ONES}0030020000001540010100400200400304ac1401054005040000006418c0a801")
        );
        let withdraw = Message::Update(Update {
            withdrawn: vec![prefix("192.168.1.0/24")],
            ..Update::default()
        });
        assert_eq!(
            hex(&encode(&withdraw, true)),
            format!("{ONES}001b02000418c0a8010000")
        );
        assert_eq!(
            hex(&encode(
                &Message::Notification(Notification::shutdown()),
                true
            )),
            format!("{ONES}0015030602")
        );
        // Each decodes to itself.
        for m in [open, announce, withdraw, Message::Keepalive] {
            assert_eq!(decode(&encode(&m, true), true), Ok(m));
        }
        // An external peer gets this AS in the path (four-octet or two-octet).
        let ebgp = Message::Update(Update {
            withdrawn: vec![],
            path: Some(Path {
                next_hop: "10.0.0.1".parse().expect("ip"),
                as_path: vec![4_200_000_000],
                local_pref: None,
            }),
            nlri: vec![prefix("10.77.16.0/20")],
        });
        assert_eq!(decode(&encode(&ebgp, true), true), Ok(ebgp.clone()));
        assert!(
            hex(&encode(&ebgp, false)).contains("40020402015ba0"),
            "AS_TRANS"
        );
    }

    #[test]
    fn what_bird_sends_decodes_and_unknown_capabilities_are_kept() {
        // BIRD 2.0.12's OPEN: MP, route refresh, graceful restart (aware), AS4, enhanced
        // refresh, long-lived GR.
        let body = "04fc0000f0ac1fc9fe".to_string()
            + "18"
            + "0216"
            + "010400010001"
            + "0200"
            + "40020078"
            + "41040000fc00"
            + "4600"
            + "4700";
        let mut bytes = hex_to_bytes(ONES);
        let body = hex_to_bytes(&body.replace(' ', ""));
        bytes.extend_from_slice(
            &u16::try_from(HEADER_LEN + body.len())
                .expect("len")
                .to_be_bytes(),
        );
        bytes.push(1);
        bytes.extend_from_slice(&body);
        let Ok(Message::Open(open)) = decode(&bytes, false) else {
            panic!("{:?}", decode(&bytes, false));
        };
        assert_eq!(open.asn(), 64512);
        assert_eq!(open.hold_time, 240);
        assert!(open.has(&Capability::Multiprotocol { afi: 1, safi: 1 }));
        assert!(open.capabilities.contains(&Capability::Other {
            code: 64,
            value: vec![0, 0x78]
        }));
        // End-of-RIB: an empty UPDATE.
        let eor = hex_to_bytes(&format!("{ONES}00170200000000"));
        assert_eq!(decode(&eor, true), Ok(Message::Update(Update::default())));
    }

    fn hex_to_bytes(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn malformed_messages_name_the_notification_to_answer_with() {
        let code = |bytes: &[u8]| {
            decode(bytes, true).map_err(|e| (e.notification.code, e.notification.subcode))
        };
        let mut bad_marker = encode(&Message::Keepalive, true);
        bad_marker[3] = 0;
        assert_eq!(code(&bad_marker), Err((1, 1)));
        let mut long_keepalive = encode(&Message::Keepalive, true);
        long_keepalive[17] = 20;
        long_keepalive.push(0);
        assert_eq!(code(&long_keepalive), Err((1, 2)));
        let mut bad_type = encode(&Message::Keepalive, true);
        bad_type[18] = 9;
        assert_eq!(code(&bad_type), Err((1, 3)));
        assert_eq!(code(b"garbage"), Err((1, 2)));
        let mut v3 = encode(
            &Message::Open(Open::ours(64512, 90, Ipv4Addr::new(10, 0, 0, 1))),
            true,
        );
        v3[19] = 3;
        assert_eq!(code(&v3), Err((2, 1)));
        let mut param = encode(
            &Message::Open(Open::ours(64512, 90, Ipv4Addr::new(10, 0, 0, 1))),
            true,
        );
        param[29] = 1; // the first optional parameter's type
        assert_eq!(code(&param), Err((2, 4)));
        // An UPDATE whose withdrawn length overruns it, a prefix of /33, no NEXT_HOP.
        let overrun = hex_to_bytes(&format!("{ONES}001702ffff0000"));
        assert_eq!(code(&overrun), Err((3, 1)));
        let long_prefix = hex_to_bytes(&format!("{ONES}001c020000000021c0a80101"));
        assert_eq!(code(&long_prefix), Err((3, 10)));
        let no_next_hop = hex_to_bytes(&format!("{ONES}0022020000000740010100400200180a8c01"));
        assert!(
            matches!(code(&no_next_hop), Err((3, _))),
            "{:?}",
            code(&no_next_hop)
        );
        // Notifications read as people read them.
        assert_eq!(
            Notification::shutdown().to_string(),
            "6/2 cease: administrative shutdown"
        );
        let with_text = Notification {
            code: 6,
            subcode: 2,
            data: vec![3, b'b', b'y', b'e'],
        };
        assert_eq!(
            with_text.to_string(),
            "6/2 cease: administrative shutdown (\"bye\")"
        );
    }

    #[test]
    fn many_prefixes_split_into_updates_within_the_limit() {
        let path = Path {
            next_hop: Ipv4Addr::new(172, 20, 1, 5),
            as_path: vec![],
            local_pref: Some(100),
        };
        let announced: Vec<Prefix> = (0..3000u32)
            .map(|i| Prefix::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).expect("prefix"))
            .collect();
        let withdrawn = &announced[..1500];
        let updates = updates(withdrawn, &announced[1500..], &path, true);
        assert!(updates.len() >= 3);
        let mut seen_w = 0;
        let mut seen_a = 0;
        for u in &updates {
            let bytes = encode(&Message::Update(u.clone()), true);
            assert!(bytes.len() <= MAX_LEN, "{}", bytes.len());
            assert!(u.withdrawn.is_empty() || u.nlri.is_empty());
            seen_w += u.withdrawn.len();
            seen_a += u.nlri.len();
            assert_eq!(decode(&bytes, true), Ok(Message::Update(u.clone())));
        }
        assert_eq!((seen_w, seen_a), (1500, 1500));
        assert_eq!(prefix("10.77.17.9/20").to_string(), "10.77.16.0/20");
        assert_eq!(
            Prefix::new(Ipv4Addr::new(1, 2, 3, 4), 0)
                .map(|p| p.to_string())
                .as_deref(),
            Some("0.0.0.0/0")
        );
        assert_eq!(Prefix::new(Ipv4Addr::new(1, 2, 3, 4), 33), None);
    }
}
