//! The peer protocol, inside TLS: length-prefixed frames.
//!
//! ```text
//! frame   = length:u32be kind:u8 payload      (length counts kind + payload; at most 16 MiB)
//! HELLO   = postcard Hello                    first frame of a Raft stream (member cert needed)
//! RAFT    = count:u32be (len:u32be protobuf eraftpb.Message)*
//! CHUNK   = total:u64be offset:u64be bytes     a piece of one snapshot message (protobuf)
//! PING    = (empty)                           keeps the contact time fresh when idle
//! REQUEST = postcard Request                  first frame of a control connection
//! REPLY   = postcard Reply                    its answer; then the connection closes
//! ACCEPT  = (empty)                           the acceptor's answer to a good hello
//! REFUSE  = utf-8 reason                      ... to a bad one; then it closes
//! ```
//!
//! A Raft stream is one-way after the hello: the dialer sends, the acceptor steps what it reads
//! into Raft.

use protobuf::Message as _;
use raft::eraftpb::Message;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::identity::ClusterId;

/// Version of the peer protocol, in `Hello` and `Request::Join`. Version 2: certificates
/// expire and are renewed, the CA key goes to voters only, the join secret rotates.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame accepted.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Largest first frame from a connection that has not proven membership.
pub const MAX_FIRST_FRAME: usize = 64 * 1024;

/// A sender closes a RAFT frame once it holds this much (one larger message goes alone).
pub const FRAME_TARGET: usize = 4 * 1024 * 1024;

/// Most Raft messages in one RAFT frame (senders put 256 at most).
pub const MAX_MESSAGES_PER_FRAME: usize = 4096;

/// Largest snapshot accepted in chunks.
pub const MAX_SNAPSHOT: u64 = 1024 * 1024 * 1024;

/// Size of one snapshot chunk: heartbeats queued behind it wait for at most one chunk.
pub const CHUNK: usize = 256 * 1024;

pub const HELLO: u8 = 1;
pub const RAFT: u8 = 2;
pub const CHUNK_KIND: u8 = 3;
pub const PING: u8 = 4;
pub const REQUEST: u8 = 5;
pub const REPLY: u8 = 6;
pub const ACCEPT: u8 = 7;
pub const REFUSE: u8 = 8;

/// How a refusal of a removed node starts.
pub const REMOVED: &str = "removed from the cluster";

/// How the refusal of a second process with one node's identity starts.
pub const DUPLICATE: &str = "duplicate node identity";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub cluster: ClusterId,
    pub from: u64,
    pub to: u64,
    /// Where the sender takes peer connections (empty if it does not know): lets a node that
    /// has no registry yet (it is joining) answer the leader.
    pub addr: String,
}

/// A control request: one per connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Admit the sender as a new node (no client certificate needed).
    Join {
        version: u32,
        cluster: ClusterId,
        secret: [u8; 32],
        name: String,
        /// Where peers reach the new node.
        peer_addr: String,
        /// The new node's P-256 public key (raw point); its certificate is issued for it.
        public_key: Vec<u8>,
    },
    /// Take a node out of the cluster, by name or id (member certificate needed).
    Remove { node: String },
    /// A new certificate for the sender, for this public key (its current one needed).
    Renew { public_key: Vec<u8> },
    /// The CA key, for a sender that is a voter (its certificate needed).
    CaKey,
    /// A new join secret: tokens with the old one are refused from now on (member certificate
    /// needed).
    RotateToken,
    /// The callee's own account of who leads it (member certificate needed): a replica asks
    /// its voters about a leader its log does not hold as a voter.
    Leader,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Joined {
        node_id: u64,
        node_cert: Vec<u8>,
        /// When `node_cert` expires (Unix seconds).
        expires: u64,
        ca_cert: Vec<u8>,
        /// The members and their certificate fingerprints, to trust until the snapshot comes.
        members: Vec<(u64, [u8; 32])>,
    },
    Renewed {
        node_cert: Vec<u8>,
        expires: u64,
    },
    CaKey {
        ca_key: Vec<u8>,
    },
    Rotated {
        secret: [u8; 32],
    },
    Removed {
        node_id: u64,
    },
    /// The answer to [`Request::Leader`]: the callee's term, its leader, its voters.
    Leader {
        term: u64,
        leader: Option<u64>,
        voters: Vec<u64>,
    },
    /// Ask the leader instead.
    Redirect {
        leader: String,
    },
    /// Not now: asking again later (or another member) may succeed.
    Refused {
        reason: String,
    },
    /// Never, as asked: a join with this token, version, name or key cannot succeed until the
    /// asker changes it, so it stops rather than retrying.
    Denied {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is too large or empty")]
    BadLength(usize),
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

fn malformed(what: &'static str) -> impl Fn(String) -> WireError {
    move |reason| WireError::Malformed { what, reason }
}

/// Reads one frame: (kind, payload).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), WireError> {
    read_frame_within(r, MAX_FRAME).await
}

/// Reads one frame of at most `max` bytes.
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<(u8, Vec<u8>), WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > max {
        return Err(WireError::BadLength(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let kind = body.remove(0);
    Ok((kind, body))
}

/// Appends one frame to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> Result<(), WireError> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    frame(&mut out, kind, payload);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data into a Vec: postcard fails only on writer exhaustion.
    postcard::to_allocvec(value).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(what: &'static str, bytes: &'a [u8]) -> Result<T, WireError> {
    postcard::from_bytes(bytes).map_err(|e| malformed(what)(e.to_string()))
}

/// Encodes Raft messages for one RAFT frame.
pub fn encode_messages(messages: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(messages.len() as u32).to_be_bytes());
    for m in messages {
        let bytes = m.write_to_bytes().unwrap_or_default();
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

pub fn decode_messages(mut payload: &[u8]) -> Result<Vec<Message>, WireError> {
    let bad = malformed("raft frame");
    let take = |n: usize, p: &mut &[u8]| -> Result<Vec<u8>, WireError> {
        if p.len() < n {
            return Err(bad("truncated".into()));
        }
        let (head, rest) = p.split_at(n);
        *p = rest;
        Ok(head.to_vec())
    };
    let count = u32::from_be_bytes(take(4, &mut payload)?.try_into().unwrap_or([0; 4]));
    if count as usize > MAX_MESSAGES_PER_FRAME {
        return Err(bad(format!(
            "{count} messages in one frame; senders put {MAX_MESSAGES_PER_FRAME} at most"
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = u32::from_be_bytes(take(4, &mut payload)?.try_into().unwrap_or([0; 4]));
        let bytes = take(len as usize, &mut payload)?;
        check_wire(&bytes, Schema::Message).map_err(malformed("raft message"))?;
        let m = Message::parse_from_bytes(&bytes)
            .map_err(|e| malformed("raft message")(e.to_string()))?;
        out.push(m);
    }
    if !payload.is_empty() {
        return Err(malformed("raft frame")("trailing bytes".into()));
    }
    Ok(out)
}

/// The header of a CHUNK frame.
pub fn chunk_header(total: u64, offset: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&total.to_be_bytes());
    h[8..].copy_from_slice(&offset.to_be_bytes());
    h
}

pub fn parse_chunk(payload: &[u8]) -> Result<(u64, u64, &[u8]), WireError> {
    if payload.len() < 16 {
        return Err(malformed("snapshot chunk")("truncated header".into()));
    }
    let total = u64::from_be_bytes(payload[..8].try_into().unwrap_or([0; 8]));
    let offset = u64::from_be_bytes(payload[8..16].try_into().unwrap_or([0; 8]));
    Ok((total, offset, &payload[16..]))
}

/// Reassembles one snapshot message from its chunks, in order.
#[derive(Default)]
pub struct Reassembly {
    total: u64,
    buf: Vec<u8>,
}

impl Reassembly {
    /// Adds a chunk of a snapshot of at most `max` bytes; returns the whole message when the
    /// last one arrives.
    pub fn add(&mut self, payload: &[u8], max: u64) -> Result<Option<Message>, WireError> {
        let bad = malformed("snapshot chunk");
        let (total, offset, bytes) = parse_chunk(payload)?;
        if total > max {
            return Err(bad(format!("snapshot of {total} bytes is too large")));
        }
        if offset == 0 {
            self.total = total;
            self.buf.clear();
        } else if total != self.total || offset != self.buf.len() as u64 {
            return Err(bad(format!(
                "chunk at {offset} of {total} does not follow {} of {}",
                self.buf.len(),
                self.total
            )));
        }
        if self.buf.len() as u64 + bytes.len() as u64 > total {
            return Err(bad("chunk runs past the end".into()));
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() as u64 == total {
            check_wire(&self.buf, Schema::Message).map_err(malformed("snapshot message"))?;
            let m = Message::parse_from_bytes(&self.buf)
                .map_err(|e| malformed("snapshot message")(e.to_string()))?;
            self.buf = Vec::new();
            return Ok(Some(m));
        }
        Ok(None)
    }
}

/// The `eraftpb` messages that hold other messages, for [`check_wire`].
#[derive(Clone, Copy, Debug)]
enum Schema {
    Message,
    Entry,
    Snapshot,
    SnapshotMetadata,
    ConfState,
}

impl Schema {
    /// The message type of field `field`, if it holds a message.
    fn nested(self, field: u64) -> Option<Schema> {
        match (self, field) {
            (Schema::Message, 7) => Some(Schema::Entry),
            (Schema::Message, 9) => Some(Schema::Snapshot),
            (Schema::Snapshot, 2) => Some(Schema::SnapshotMetadata),
            (Schema::SnapshotMetadata, 1) => Some(Schema::ConfState),
            _ => None,
        }
    }
}

/// Walks the protobuf encoding of a `schema` message before protobuf 2 parses it, and refuses
/// groups (wire types 3 and 4) anywhere in it. `eraftpb` is proto3 and has none; protobuf 2.28
/// skips an unknown group by recursion without a bound, so a deep nest of them would overflow
/// the stack (RUSTSEC-2024-0437, which raft 0.7 brings in with or without its prost codec).
/// The walk's own depth is that of the schema (four at most).
fn check_wire(mut bytes: &[u8], schema: Schema) -> Result<(), String> {
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        match key & 7 {
            0 => {
                varint(&mut bytes)?;
            }
            1 => bytes = skip(bytes, 8)?,
            5 => bytes = skip(bytes, 4)?,
            2 => {
                let len = usize::try_from(varint(&mut bytes)?)
                    .map_err(|_| "length out of range".to_string())?;
                if len > bytes.len() {
                    return Err("a field runs past the end".into());
                }
                let (body, rest) = bytes.split_at(len);
                if let Some(inner) = schema.nested(key >> 3) {
                    check_wire(body, inner)?;
                }
                bytes = rest;
            }
            t => {
                return Err(format!(
                    "wire type {t} in {schema:?} (groups are no part of eraftpb)"
                ))
            }
        }
    }
    Ok(())
}

fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or_else(|| "truncated varint".to_string())?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than ten bytes".into())
}

fn skip(bytes: &[u8], n: usize) -> Result<&[u8], String> {
    bytes
        .get(n..)
        .ok_or_else(|| "a fixed-width field runs past the end".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{ConfState, Entry, MessageType, Snapshot, SnapshotMetadata};

    #[test]
    fn raft_messages_pass_and_groups_are_refused_before_protobuf_sees_them() {
        let mut snapshot = Snapshot::default();
        let mut meta = SnapshotMetadata::default();
        meta.set_conf_state(ConfState::from((vec![1, 2, 3], vec![4])));
        meta.index = 9;
        snapshot.set_metadata(meta);
        snapshot.data = vec![7; 300].into();
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.entries = vec![Entry {
            data: vec![1, 2, 3].into(),
            context: vec![0; 24].into(),
            ..Default::default()
        }]
        .into();
        m.set_snapshot(snapshot);
        let frame = encode_messages(&[m.clone(), m.clone()]);
        assert_eq!(
            decode_messages(&frame).expect("decodes"),
            vec![m.clone(), m]
        );

        // 100,000 nested start-group tags (field 20, wire type 3) as an unknown field, at the
        // top and inside an entry: protobuf 2.28 would recurse once per tag.
        let groups = [0xa3, 0x01].repeat(100_000);
        let mut entry = vec![0x22, 0x01, 0x00]; // data = [0]
        entry.extend_from_slice(&groups);
        let mut nested = vec![0x3a]; // entries: one Entry
        let mut len = entry.len();
        while len >= 0x80 {
            nested.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        nested.push(len as u8);
        nested.extend_from_slice(&entry);
        for message in [groups, nested] {
            let mut frame = 1u32.to_be_bytes().to_vec();
            frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
            frame.extend_from_slice(&message);
            let e = decode_messages(&frame).expect_err("refused");
            assert!(e.to_string().contains("wire type 3"), "{e}");
        }
        // Truncations and overlong varints are refused too, never read past the end.
        for bad in [&[0x08][..], &[0x3a, 0x05, 0x01], &[0xff; 11]] {
            assert!(check_wire(bad, Schema::Message).is_err());
        }
    }
}
