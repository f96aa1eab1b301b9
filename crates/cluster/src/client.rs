//! The client side of control requests: `linkdns join` (a new host, with a token) and
//! `linkdns remove` / `leave` (a member, with its certificate). Requests go to any member and
//! follow redirects to the leader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::{fingerprint, new_node_key, Identity, RawPublicKey, Secret, Token};
use crate::tls::{join_client, MemberTls};
use crate::wire::{self, Reply, Request};
use crate::Error;

const TIMEOUT: Duration = Duration::from_secs(5);
/// A join waits for a membership change to commit: allow it time.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;

/// What a new host says about itself when it joins.
pub struct JoinAs {
    pub name: String,
    /// The address peers should use; `None`: the address this host reaches `peer` from, with
    /// `listen_port`.
    pub advertise: Option<SocketAddr>,
    pub listen_port: u16,
}

/// Asks the cluster behind `peer` to admit this host. Returns the identity to save: the new
/// node's id and certificate, and the cluster CA. Nothing is written here.
pub async fn join(peer: &str, token: &Token, me: &JoinAs) -> Result<Identity, Error> {
    let key = new_node_key()?;
    let (config, name) = join_client(token)?;
    let mut target = peer.to_string();
    for _ in 0..MAX_REDIRECTS {
        let reply = request(&target, config.clone(), name.clone(), |local| {
            Request::Join {
                version: wire::PROTOCOL_VERSION,
                cluster: token.cluster,
                secret: token.secret.0,
                name: me.name.clone(),
                peer_addr: me
                    .advertise
                    .unwrap_or_else(|| SocketAddr::new(local.ip(), me.listen_port))
                    .to_string(),
                public_key: RawPublicKey::of(&key).0,
            }
        })
        .await?;
        match reply {
            Reply::Joined {
                node_id,
                node_cert,
                expires,
                ca_cert,
                members,
            } => {
                if fingerprint(&ca_cert) != token.ca_fingerprint {
                    return Err(Error::Denied(
                        "the cluster sent a CA that is not the one the token names".into(),
                    ));
                }
                return Ok(Identity {
                    cluster: token.cluster,
                    node_id,
                    secret: token.secret.clone(),
                    ca_cert,
                    // A learner never holds the CA key; a voter fetches it (`credentials`).
                    ca_key: Vec::new(),
                    node_cert,
                    node_key: key.serialize_der(),
                    node_cert_expires: expires,
                    node_cert_since: crate::identity::unix_now(),
                    peers: members,
                });
            }
            Reply::Redirect { leader } => {
                tracing::info!(%leader, "asking the leader");
                target = leader;
            }
            Reply::Refused { reason } => return Err(Error::JoinRefused(reason)),
            Reply::Denied { reason } => return Err(Error::Denied(reason)),
            _ => return Err(Error::Protocol("unexpected reply to a join".into())),
        }
    }
    Err(Error::JoinRefused(
        "too many redirects; is the cluster electing a leader?".into(),
    ))
}

/// Asks the cluster (through `peer`, any member) to remove `node` (a name or an id). Returns the
/// removed node's id.
pub async fn remove(peer: &str, identity: &Identity, node: &str) -> Result<u64, Error> {
    let request = Request::Remove {
        node: node.to_string(),
    };
    match member_request(peer, identity, request).await? {
        Reply::Removed { node_id } => Ok(node_id),
        _ => Err(Error::Protocol("unexpected reply to a removal".into())),
    }
}

/// Asks the leader (through `peer`) for a new certificate of this node for `key`. Returns the
/// certificate and when it expires.
pub async fn renew(
    peer: &str,
    identity: &Identity,
    key: &rcgen::KeyPair,
) -> Result<(Vec<u8>, u64), Error> {
    let request = Request::Renew {
        public_key: RawPublicKey::of(key).0,
    };
    match member_request(peer, identity, request).await? {
        Reply::Renewed { node_cert, expires } => Ok((node_cert, expires)),
        _ => Err(Error::Protocol("unexpected reply to a renewal".into())),
    }
}

/// Asks a voter (through `peer`) for the CA key, which this node may hold once it is a voter.
pub async fn fetch_ca_key(peer: &str, identity: &Identity) -> Result<Vec<u8>, Error> {
    match member_request(peer, identity, Request::CaKey).await? {
        Reply::CaKey { ca_key } => Ok(ca_key),
        _ => Err(Error::Protocol(
            "unexpected reply to a CA key request".into(),
        )),
    }
}

/// Asks the leader (through `peer`) for a new join secret; tokens with the old one are refused
/// from the moment this returns. Returns the new token.
pub async fn rotate_token(peer: &str, identity: &Identity) -> Result<Token, Error> {
    match member_request(peer, identity, Request::RotateToken).await? {
        Reply::Rotated { secret } => Ok(Token {
            cluster: identity.cluster,
            ca_fingerprint: fingerprint(&identity.ca_cert),
            secret: Secret(secret),
        }),
        _ => Err(Error::Protocol(
            "unexpected reply to a token rotation".into(),
        )),
    }
}

/// A member's request (with its certificate), following redirects to the leader.
async fn member_request(peer: &str, identity: &Identity, req: Request) -> Result<Reply, Error> {
    let tls = MemberTls::new(identity)?;
    // The callee may be any member (redirects follow the leader): check it is one.
    let name = ServerName::try_from(crate::identity::member_name(identity.cluster))
        .map_err(|e| Error::Crypto(e.to_string()))?;
    let mut target = peer.to_string();
    for _ in 0..MAX_REDIRECTS {
        match request(&target, tls.client.clone(), name.clone(), |_| req.clone()).await? {
            Reply::Redirect { leader } => target = leader,
            Reply::Refused { reason } => return Err(Error::JoinRefused(reason)),
            Reply::Denied { reason } => return Err(Error::Denied(reason)),
            reply => return Ok(reply),
        }
    }
    Err(Error::JoinRefused(
        "too many redirects; is the cluster electing a leader?".into(),
    ))
}

async fn request(
    target: &str,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    build: impl FnOnce(SocketAddr) -> Request,
) -> Result<Reply, Error> {
    let unreachable = |reason: String| Error::Unreachable {
        addr: target.to_string(),
        reason,
    };
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| unreachable("connection timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let local = tcp.local_addr().map_err(|e| unreachable(e.to_string()))?;
    let mut tls = tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| {
            let reason = format!(
                "{target} did not prove it is a member of the token's cluster ({e}); check the address and the token"
            );
            // A certificate of another CA is an answer, not a hiccup: asking again cannot help.
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|tls| matches!(tls, rustls::Error::InvalidCertificate(_)));
            if certificate {
                Error::Denied(reason)
            } else {
                Error::JoinRefused(reason)
            }
        })?;
    let request = build(local);
    wire::write_frame(&mut tls, wire::REQUEST, &wire::encode(&request))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (kind, payload) = tokio::time::timeout(REPLY_TIMEOUT, wire::read_frame(&mut tls))
        .await
        .map_err(|_| unreachable("no reply in time".into()))?
        .map_err(|e| match e {
            wire::WireError::Closed => Error::JoinRefused(format!(
                "{target} closed the connection without a reply (see its log)"
            )),
            e => unreachable(e.to_string()),
        })?;
    if kind != wire::REPLY {
        return Err(Error::Protocol(format!("reply frame of kind {kind}")));
    }
    wire::decode("reply", &payload).map_err(|e| Error::Protocol(e.to_string()))
}
