//! The peer transport: Raft messages between members over mutual TLS.
//!
//! - Outgoing: one task and one bounded queue per peer. The Raft thread never blocks: a full
//!   queue drops the message and reports the peer unreachable (Raft resends). Messages are sent
//!   in batches; a snapshot goes in chunks between batches, so heartbeats never wait behind a
//!   whole snapshot. Failed connects back off (100 ms doubling to 500 ms).
//! - Incoming: every connection must finish a TLS handshake and open with a `Hello` carrying a
//!   member certificate of the node it claims to be, or with a control request. Anything else is
//!   dropped with one log line and never reaches Raft.
//! - Contact: every frame from a peer refreshes its last-contact time; idle senders ping once a
//!   second, so every node knows when it last heard from every other one.
//! - Bounds: a peer's messages not yet stepped into Raft hold a share of its budget (about
//!   64 MiB); with none left its streams are not read on (TCP pushes back). A snapshot is
//!   reassembled only from this node's leader, one at a time, up to `--max-snapshot-mb`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use linkdns_raft::{Inquiry, LeaderView, NodeHandle, Outbox};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::{fingerprint, ClusterId, Identity, DEFAULT_CERT_VALIDITY};
use crate::tls::MemberTls;
use crate::wire::{self, Hello, Reassembly, WireError};
use crate::Error;
use rustls::pki_types::CertificateDer;

/// Who sent a control request, as the transport authenticated it.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// The member whose bound certificate the caller presented (none: a joining host, or a
    /// stranger).
    pub member: Option<u64>,
    /// ... and that certificate is the one its latest renewal replaced (still good for Raft
    /// until it expires; a control request needs the current one).
    pub superseded: bool,
    /// This node's address on the connection (the address the caller reached it at).
    pub local: Option<SocketAddr>,
    pub remote: SocketAddr,
}

/// Answers control requests (join, remove, renew, ...). The transport frames and
/// authenticates them and hands them over; the handler decides.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(
        &self,
        request: wire::Request,
        caller: Caller,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = wire::Reply> + Send + '_>>;
}

/// Messages queued for one peer before new ones are dropped.
const QUEUE: usize = 4096;
/// Messages per RAFT frame, at most.
const BATCH: usize = 256;
/// The budget of one peer's messages received and not yet stepped into Raft, in units of
/// about 4 KiB (so about 64 MiB; a snapshot message counts as all of it at most).
const INBOX_BUDGET: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const PING_EVERY: Duration = Duration::from_secs(1);
/// Longest wait between connection attempts to a peer: a restarted peer is reached again
/// well within an election timeout.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// A member stream with no frame for this long (pings come every second) is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Member streams at once (connections that proved they are a member's), and connections
/// from members' addresses not yet proven.
const MAX_CONNECTIONS: usize = 256;
/// Unproven connections at once from one member's address: a process on a member's host
/// without the node's key can hold no more (and no member slot).
const MAX_PER_MEMBER_ADDRESS: usize = 8;
/// Inbound connections at once from any other address (joining hosts, strangers): their own
/// small pool, so a flood of them never takes a member's slot.
const MAX_STRANGERS: usize = 32;
/// ... and from one such address.
const MAX_PER_STRANGER: usize = 4;
/// A stranger must finish its TLS handshake and first frame within this.
const STRANGER_HANDSHAKE: Duration = Duration::from_secs(3);

/// The transport of one member. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) cluster: ClusterId,
    /// This node's identity and the TLS configurations made of it: replaced together when the
    /// certificate is renewed or the CA key arrives.
    pub(crate) identity: ArcSwap<Identity>,
    pub(crate) tls: ArcSwap<MemberTls>,
    /// Where the identity is saved when it changes (`None`: kept in memory only).
    data_dir: Mutex<Option<PathBuf>>,
    /// How long the certificates this node issues (as leader) are valid.
    pub(crate) cert_validity: Mutex<Duration>,
    runtime: tokio::runtime::Handle,
    node: OnceLock<Arc<NodeHandle>>,
    control: OnceLock<Arc<dyn ControlHandler>>,
    queues: Mutex<HashMap<u64, PeerQueue>>,
    contacts: Mutex<HashMap<u64, Instant>>,
    /// Peer addresses learned from their hellos, for peers the registry does not list yet.
    learned: Mutex<HashMap<u64, SocketAddr>>,
    /// This node's own peer address, as configured (a specified IP only).
    advertised: Mutex<Option<SocketAddr>>,
    /// The port peers connect to (set by `serve`).
    listen_port: Mutex<Option<u16>>,
    /// This node's address as its outgoing connections show it: their local IP with the
    /// listen port. The address to announce when none is configured.
    observed: Mutex<Option<SocketAddr>>,
    shutdown: watch::Receiver<bool>,
    /// One membership change at a time from this node's control handler.
    pub(crate) admission: tokio::sync::Mutex<()>,
    connections: Arc<tokio::sync::Semaphore>,
    strangers: Arc<tokio::sync::Semaphore>,
    /// Each node's live inbound Raft stream: where from, and which one (see `StreamClaim`).
    streams: Mutex<HashMap<u64, (SocketAddr, u64)>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// Connections open per stranger address.
    per_stranger: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    /// Connections from members' addresses that have not proven who they are yet, in all and
    /// per address.
    pending_members: Arc<tokio::sync::Semaphore>,
    per_member_ip: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    /// Each peer's budget of messages received and not yet stepped (see [`INBOX_BUDGET`]),
    /// shared by all its streams.
    inboxes: Mutex<HashMap<u64, Arc<tokio::sync::Semaphore>>>,
    /// The certificates this node issued as leader, by node: the last one's public key, the
    /// certificate and its expiry, and when it was issued (see `control::renew`).
    pub(crate) issued: Mutex<HashMap<u64, crate::control::Issued>>,
    /// The key this node's renewal in progress asks a certificate for (DER), kept until one
    /// lands: a retry after a lost answer asks for the same key.
    pub(crate) pending_key: Mutex<Option<Vec<u8>>>,
    /// The stream reassembling a snapshot now, if any (by its serial): one at a time on this
    /// node, from its leader only.
    reassembling: Mutex<Option<u64>>,
    /// The largest snapshot taken in chunks, in bytes.
    max_snapshot: std::sync::atomic::AtomicU64,
}

/// The slot an accepted connection holds until it closes.
/// A connection's place until it proves who it is (its TLS handshake and first frame): from a
/// member's address, or from any other; each pool also caps each address. A member's Raft
/// stream then takes a member slot ([`MAX_CONNECTIONS`]) and gives this one back, so a process
/// on a member's host that cannot complete the handshake holds no member slot.
struct Slot {
    from_member: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
    ip: std::net::IpAddr,
    counts: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.lock() {
            if let Some(n) = counts.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.ip);
                }
            }
        }
    }
}

/// What certificate a peer claiming to be some node must present.
enum Expected {
    /// Exactly this one (SHA-256 of the DER), or the one its last renewal replaced.
    Bound([u8; 32], Option<[u8; 32]>),
    /// Any from the cluster CA for that node name (a member whose binding has not arrived).
    Unbound,
    Removed,
    Unknown,
}

struct PeerQueue {
    tx: mpsc::Sender<Message>,
    snapshot: Arc<SnapshotSlot>,
}

/// The latest snapshot message waiting for a peer (a newer one replaces an older one).
#[derive(Default)]
struct SnapshotSlot {
    message: Mutex<Option<Message>>,
    ready: Notify,
}

impl Transport {
    /// Creates the transport of node `identity.node_id`. Call [`Transport::attach`] with the
    /// Raft node before peers can be reached, and [`Transport::serve`] to accept connections.
    pub fn new(identity: Identity, shutdown: watch::Receiver<bool>) -> Result<Transport, Error> {
        let tls = MemberTls::new(&identity)?;
        Ok(Transport {
            inner: Arc::new(Inner {
                id: identity.node_id,
                cluster: identity.cluster,
                identity: ArcSwap::from_pointee(identity),
                tls: ArcSwap::from_pointee(tls),
                data_dir: Mutex::new(None),
                cert_validity: Mutex::new(DEFAULT_CERT_VALIDITY),
                runtime: tokio::runtime::Handle::current(),
                node: OnceLock::new(),
                control: OnceLock::new(),
                queues: Mutex::new(HashMap::new()),
                contacts: Mutex::new(HashMap::new()),
                learned: Mutex::new(HashMap::new()),
                advertised: Mutex::new(None),
                listen_port: Mutex::new(None),
                observed: Mutex::new(None),
                shutdown,
                admission: tokio::sync::Mutex::new(()),
                connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
                strangers: Arc::new(tokio::sync::Semaphore::new(MAX_STRANGERS)),
                pending_members: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
                per_member_ip: Arc::new(Mutex::new(HashMap::new())),
                streams: Mutex::new(HashMap::new()),
                next_stream: std::sync::atomic::AtomicU64::new(0),
                per_stranger: Arc::new(Mutex::new(HashMap::new())),
                issued: Mutex::new(HashMap::new()),
                pending_key: Mutex::new(None),
                reassembling: Mutex::new(None),
                inboxes: Mutex::new(HashMap::new()),
                max_snapshot: std::sync::atomic::AtomicU64::new(wire::MAX_SNAPSHOT),
            }),
        })
    }

    /// The outbox to start the Raft node with.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(PeerOutbox(self.inner.clone()))
    }

    /// Connects the transport to the Raft node it carries messages for.
    pub(crate) fn attach(&self, node: Arc<NodeHandle>) {
        let _ = self.inner.node.set(node);
        let inner = self.inner.clone();
        self.inner.runtime.spawn(keep_peers(inner));
    }

    /// Hands control requests to `handler` from now on (until then they are refused as
    /// "still starting").
    pub fn set_control(&self, handler: Arc<dyn ControlHandler>) {
        let _ = self.inner.control.set(handler);
    }

    /// The address this node announces to the peers it dials.
    pub fn set_advertised(&self, addr: SocketAddr) {
        if let Ok(mut a) = self.inner.advertised.lock() {
            *a = (!addr.ip().is_unspecified()).then_some(addr);
        }
    }

    /// This node's peer address as seen on its outgoing connections (local IP, listen port):
    /// what to register when no address is configured and it listens on 0.0.0.0.
    pub fn observed_address(&self) -> Option<SocketAddr> {
        self.inner.observed.lock().ok().and_then(|a| *a)
    }

    /// This node's identity as it is now.
    pub fn identity(&self) -> Arc<Identity> {
        self.inner.identity.load_full()
    }

    /// Saves the identity to `data_dir` whenever it changes (a renewed certificate, the CA
    /// key of a new voter).
    pub fn set_data_dir(&self, data_dir: PathBuf) {
        if let Ok(mut d) = self.inner.data_dir.lock() {
            *d = Some(data_dir);
        }
    }

    /// How long the certificates this node issues as leader are valid.
    pub fn set_cert_validity(&self, validity: Duration) {
        if let Ok(mut v) = self.inner.cert_validity.lock() {
            *v = validity;
        }
    }

    /// Replaces this node's identity (and its TLS configurations), saving it first when a
    /// data dir is set: new connections present the new certificate.
    pub fn replace_identity(&self, identity: Identity) -> Result<(), Error> {
        self.inner.replace_identity(identity)
    }

    /// How long ago anything arrived from `peer`.
    /// The largest snapshot this node takes in chunks, in bytes (1 GiB unless set).
    pub fn set_max_snapshot(&self, bytes: u64) {
        self.inner
            .max_snapshot
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// `peer`'s own account of who leads it, as an inquiry asks it (see [`Inquiry`]).
    pub async fn leader_view(&self, peer: u64) -> Result<LeaderView, String> {
        ask_leader(&self.inner, peer).await
    }

    pub fn last_contact(&self, peer: u64) -> Option<Duration> {
        self.inner.last_contact(peer)
    }

    /// Binds `addr` and serves peers until shutdown. Returns the bound address.
    pub async fn serve(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let local = listener.local_addr().map_err(|e| Error::Bind {
            addr,
            reason: e.to_string(),
        })?;
        if let Ok(mut port) = self.inner.listen_port.lock() {
            *port = Some(local.port());
        }
        let inner = self.inner.clone();
        self.inner.runtime.spawn(accept_loop(inner, listener));
        tracing::info!(addr = %local, "peer transport listening");
        Ok(local)
    }
}

impl Inner {
    pub(crate) fn node(&self) -> Option<&Arc<NodeHandle>> {
        self.node.get()
    }

    pub(crate) fn replace_identity(&self, mut identity: Identity) -> Result<(), Error> {
        let tls = MemberTls::new(&identity)?;
        let dir = self.data_dir.lock().ok().and_then(|d| d.clone());
        if let Some(dir) = dir {
            // The join secret is the file's: `linkdns token --rotate` writes it there (under
            // the same lock).
            // Never written anew: no file means this node was retired meanwhile.
            let written = Identity::update(&dir, |on_disk| {
                identity.secret = on_disk.secret.clone();
                *on_disk = identity.clone();
            })?;
            if written.is_none() {
                tracing::warn!("no identity file to update (the node is being retired); the new credentials are kept in memory only");
            }
        }
        self.identity.store(Arc::new(identity));
        self.tls.store(Arc::new(tls));
        Ok(())
    }

    pub(crate) fn cert_validity(&self) -> Duration {
        self.cert_validity
            .lock()
            .map_or(DEFAULT_CERT_VALIDITY, |v| *v)
    }

    pub(crate) fn last_contact(&self, peer: u64) -> Option<Duration> {
        let contacts = self.contacts.lock().ok()?;
        contacts.get(&peer).map(|t| t.elapsed())
    }

    fn touch(&self, peer: u64) {
        if let Ok(mut contacts) = self.contacts.lock() {
            contacts.insert(peer, Instant::now());
        }
    }

    /// The queue to `peer`, started on first use.
    fn queue(self: &Arc<Self>, peer: u64) -> Option<(mpsc::Sender<Message>, Arc<SnapshotSlot>)> {
        let mut queues = self.queues.lock().ok()?;
        if let Some(q) = queues.get(&peer) {
            if !q.tx.is_closed() {
                return Some((q.tx.clone(), q.snapshot.clone()));
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let snapshot = Arc::new(SnapshotSlot::default());
        self.runtime
            .spawn(send_loop(self.clone(), peer, rx, snapshot.clone()));
        queues.insert(
            peer,
            PeerQueue {
                tx: tx.clone(),
                snapshot: snapshot.clone(),
            },
        );
        Some((tx, snapshot))
    }

    fn report_unreachable(&self, peer: u64) {
        if let Some(node) = self.node() {
            node.report_unreachable(peer);
        }
    }

    /// The address peers reach `peer` at: from the replicated registry, else as the peer
    /// announced itself.
    pub(crate) fn address_of(&self, peer: u64) -> Option<SocketAddr> {
        let node = self.node()?;
        let published = node.published().load_full();
        let registered = published
            .registry
            .node(peer)
            .and_then(|info| info.peer_addr.parse::<SocketAddr>().ok())
            .filter(|a| !a.ip().is_unspecified());
        registered.or_else(|| self.learned.lock().ok()?.get(&peer).copied())
    }

    /// The address to announce: configured, else as seen on the connection `local` just made.
    fn own_address(&self, local: Option<SocketAddr>) -> String {
        let advertised = self.advertised.lock().ok().and_then(|a| *a);
        let port = self.listen_port.lock().ok().and_then(|p| *p);
        let observed = match (local, port) {
            (Some(local), Some(port)) => {
                let addr = SocketAddr::new(local.ip(), port);
                if let Ok(mut o) = self.observed.lock() {
                    *o = Some(addr);
                }
                Some(addr)
            }
            _ => None,
        };
        advertised
            .or(observed)
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// Whether `ip` is the address of a registered node (or of a peer that said hello).
    fn is_member_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = linkdns_registry::canonical_ip(ip);
        let registered = self
            .node()
            .is_some_and(|node| node.published().load().registry.node_at(ip).is_some());
        registered
            || self.learned.lock().is_ok_and(|l| {
                l.values()
                    .any(|a| linkdns_registry::canonical_ip(a.ip()) == ip)
            })
    }

    /// A slot for a connection from `remote` until it proves who it is: the pool of members'
    /// addresses for a registered node's address, else the strangers'; each caps each address.
    fn admit(&self, remote: SocketAddr) -> Result<Slot, &'static str> {
        let ip = linkdns_registry::canonical_ip(remote.ip());
        let from_member = self.is_member_ip(ip);
        let (pool, counts, per_ip) = if from_member {
            (
                &self.pending_members,
                &self.per_member_ip,
                MAX_PER_MEMBER_ADDRESS,
            )
        } else {
            (&self.strangers, &self.per_stranger, MAX_PER_STRANGER)
        };
        let mut table = counts.lock().map_err(|_| "connection table unavailable")?;
        let mine = table.get(&ip).copied().unwrap_or(0);
        if mine >= per_ip {
            return Err("too many connections from this address");
        }
        let permit = pool.clone().try_acquire_owned().map_err(|_| {
            if from_member {
                "too many connections from members' addresses"
            } else {
                "too many connections from addresses that are not members"
            }
        })?;
        table.insert(ip, mine + 1);
        Ok(Slot {
            from_member,
            _permit: permit,
            ip,
            counts: counts.clone(),
        })
    }

    fn learn(&self, peer: u64, addr: &str) {
        if let Ok(addr) = addr.parse::<SocketAddr>() {
            if !addr.ip().is_unspecified() {
                if let Ok(mut learned) = self.learned.lock() {
                    learned.insert(peer, addr);
                }
            }
        }
    }

    /// The certificate a peer claiming to be `peer` must present: the one the replicated
    /// registry binds to it, else (while this node's replica does not list it yet) the one it
    /// had when this node joined.
    fn expected(&self, peer: u64) -> Expected {
        let Some(node) = self.node() else {
            return Expected::Unknown;
        };
        let published = node.published().load_full();
        let registry = &published.registry;
        if let Some(fingerprint) = registry.node_cert(peer) {
            return Expected::Bound(*fingerprint, registry.previous_node_cert(peer).copied());
        }
        if registry.was_removed(peer) {
            return Expected::Removed;
        }
        if registry.node(peer).is_some() || node.status().is_member(peer) {
            return Expected::Unbound;
        }
        match self
            .identity
            .load()
            .peers
            .iter()
            .find(|(id, _)| *id == peer)
        {
            Some((_, fingerprint)) => Expected::Bound(*fingerprint, None),
            None => Expected::Unknown,
        }
    }

    /// Lets stream `serial` of node `from` reassemble a snapshot of `total` bytes: only this
    /// node's leader sends snapshots (a peer that is not gets its stream closed), one at a
    /// time (a newer one from the leader replaces an unfinished one), of at most the
    /// configured size. The leader's append may still be on its way into Raft when the first
    /// chunk comes: its leadership is awaited for a second.
    async fn start_reassembly(&self, from: u64, serial: u64, total: u64) -> Result<(), String> {
        let max = self.max_snapshot.load(std::sync::atomic::Ordering::Relaxed);
        if total > max {
            tracing::warn!(peer = from, bytes = total, max, "refused a snapshot larger than this node takes (--max-snapshot-mb); it cannot catch up until that is raised");
            return Err(format!(
                "node {from} sent a snapshot of {total} bytes; this node takes at most {max}"
            ));
        }
        let Some(node) = self.node() else {
            return Err("the node is not running yet".into());
        };
        let mut changes = node.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while node.status().leader != Some(from) {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                return Err(format!(
                    "node {from} sent a snapshot but is not this node's leader"
                ));
            }
        }
        if let Ok(mut slot) = self.reassembling.lock() {
            *slot = Some(serial);
        }
        Ok(())
    }

    fn reassembles(&self, serial: u64) -> bool {
        self.reassembling
            .lock()
            .is_ok_and(|slot| *slot == Some(serial))
    }

    fn end_reassembly(&self, serial: u64) {
        if let Ok(mut slot) = self.reassembling.lock() {
            if *slot == Some(serial) {
                *slot = None;
            }
        }
    }

    /// `peer`'s budget of messages received and not yet stepped.
    fn inbox(&self, peer: u64) -> Arc<tokio::sync::Semaphore> {
        match self.inboxes.lock() {
            Ok(mut inboxes) => inboxes
                .entry(peer)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(INBOX_BUDGET)))
                .clone(),
            Err(_) => Arc::new(tokio::sync::Semaphore::new(INBOX_BUDGET)),
        }
    }

    /// Whether this node knows `peer` was removed.
    fn was_removed(&self, peer: u64) -> bool {
        self.node()
            .is_some_and(|n| n.published().load().registry.was_removed(peer))
    }
}

struct PeerOutbox(Arc<Inner>);

impl Outbox for PeerOutbox {
    fn send(&self, messages: Vec<Message>) {
        // One lookup (a lock and two clones) per peer in the batch, not per message: this runs
        // on the Raft thread.
        let mut queues: Vec<(u64, mpsc::Sender<Message>, Arc<SnapshotSlot>)> = Vec::new();
        for m in messages {
            let to = m.to;
            if to == self.0.id {
                continue;
            }
            let (tx, slot) = match queues.iter().find(|(peer, _, _)| *peer == to) {
                Some((_, tx, slot)) => (tx, slot),
                None => {
                    let Some((tx, slot)) = self.0.queue(to) else {
                        continue;
                    };
                    queues.push((to, tx, slot));
                    let (_, tx, slot) = &queues[queues.len() - 1];
                    (tx, slot)
                }
            };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // A newer snapshot replaces one not yet started; Raft tracks only the newest,
                // so nothing is reported for the replaced one.
                if let Ok(mut s) = slot.message.lock() {
                    *s = Some(m);
                }
                slot.ready.notify_one();
                continue;
            }
            if tx.try_send(m).is_err() {
                tracing::debug!(peer = to, "peer queue full; message dropped");
                self.0.report_unreachable(to);
            }
        }
    }

    fn inquire(&self, inquiry: Inquiry) {
        self.0.runtime.spawn(inquire(self.0.clone(), inquiry));
    }
}

/// Keeps a sender to every node in the registry (so pings flow even when Raft is quiet) and
/// drops those of nodes that are gone: at start and whenever the node's registry or
/// membership changes.
async fn keep_peers(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.clone();
    let Some(mut changes) = inner.node().map(|n| n.subscribe()) else {
        return;
    };
    loop {
        let Some(node) = inner.node() else { return };
        let published = node.published().load_full();
        let wanted: Vec<u64> = published
            .registry
            .nodes()
            .map(|n| n.id)
            .filter(|&id| id != inner.id)
            .collect();
        for &id in &wanted {
            inner.queue(id);
        }
        if let Ok(mut queues) = inner.queues.lock() {
            let status = node.status();
            queues.retain(|id, _| wanted.contains(id) || status.is_member(*id));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Sends everything queued for `peer`, reconnecting as needed, until the queue is dropped.
async fn send_loop(
    inner: Arc<Inner>,
    peer: u64,
    mut rx: mpsc::Receiver<Message>,
    snapshot: Arc<SnapshotSlot>,
) {
    let mut shutdown = inner.shutdown.clone();
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let stream = match connect(&inner, peer).await {
            Ok(s) => {
                if warned {
                    tracing::info!(peer, "peer reachable again");
                }
                warned = false;
                backoff = Duration::from_millis(100);
                s
            }
            Err(e) => {
                if e.contains(wire::DUPLICATE) {
                    // Said every time: this process must not go on unnoticed.
                    tracing::error!(peer, error = %e, "a peer refused this node: another process holds its identity");
                    warned = true;
                } else if !warned {
                    tracing::warn!(peer, error = %e, "cannot reach peer; retrying");
                    warned = true;
                } else {
                    tracing::debug!(peer, error = %e, "cannot reach peer");
                }
                inner.report_unreachable(peer);
                fail_snapshot(&inner, peer, &snapshot);
                // Keep what is queued through a short outage (a forwarded proposal is not
                // resent by Raft); after that, Raft resends what matters and stale messages
                // would only slow the catch-up down.
                if backoff >= MAX_BACKOFF {
                    while rx.try_recv().is_ok() {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        match session(&inner, peer, stream, &mut rx, &snapshot, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(peer, error = %e, "peer stream ended; reconnecting");
                inner.report_unreachable(peer);
            }
        }
    }
}

fn fail_snapshot(inner: &Inner, peer: u64, slot: &SnapshotSlot) {
    let dropped = slot.message.lock().ok().and_then(|mut s| s.take());
    if dropped.is_some() {
        if let Some(node) = inner.node() {
            node.report_snapshot(peer, false);
        }
    }
}

/// A TLS connection to `peer` at its registered address, proven to be that node: the
/// handshake checks the CA and the node's name, and the certificate must be the one the
/// registry binds to it (as the acceptor checks it the other way). With its address and this
/// node's local one.
async fn dial(
    inner: &Inner,
    peer: u64,
) -> Result<(ClientStream, SocketAddr, Option<SocketAddr>), String> {
    let addr = inner
        .address_of(peer)
        .ok_or_else(|| format!("no usable peer address for node {peer} in the registry"))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr} timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().ok();
    let tls = inner.tls.load_full();
    let name = tls.server_name(peer).map_err(|e| e.to_string())?;
    let connector = TlsConnector::from(tls.client.clone());
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| format!("TLS handshake with {addr} timed out"))?
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| fingerprint(c));
    match inner.expected(peer) {
        Expected::Bound(current, previous)
            if presented != Some(current) && (previous.is_none() || presented != previous) =>
        {
            return Err(format!(
                "{addr} presented a certificate for node {peer} that is not the one bound to it"
            ))
        }
        Expected::Removed => return Err(format!("node {peer} was removed from the cluster")),
        _ => {}
    }
    Ok((tls, addr, local))
}

async fn connect(inner: &Inner, peer: u64) -> Result<ClientStream, String> {
    let (mut tls, addr, local) = dial(inner, peer).await?;
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        cluster: inner.cluster,
        from: inner.id,
        to: peer,
        addr: inner.own_address(local),
    };
    wire::write_frame(&mut tls, wire::HELLO, &wire::encode(&hello))
        .await
        .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        wire::read_frame_within(&mut tls, wire::MAX_FIRST_FRAME),
    )
    .await
    .map_err(|_| format!("no answer to the hello from {addr}"))?
    .map_err(|e| format!("answer to the hello from {addr}: {e}"))?;
    match answer {
        (wire::ACCEPT, _) => Ok(tls),
        (wire::REFUSE, reason) => {
            // Only this node's own log retires it: a refusal is logged, never acted on.
            let reason = String::from_utf8_lossy(&reason).into_owned();
            Err(format!("{addr} refused this node: {reason}"))
        }
        (kind, _) => Err(format!("{addr} answered the hello with frame kind {kind}")),
    }
}

/// `peer`'s own account of who leads it, over a control connection to that very node.
async fn ask_leader(inner: &Inner, peer: u64) -> Result<LeaderView, String> {
    let (mut tls, addr, _) = dial(inner, peer).await?;
    wire::write_frame(
        &mut tls,
        wire::REQUEST,
        &wire::encode(&wire::Request::Leader),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (kind, payload) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        wire::read_frame_within(&mut tls, wire::MAX_FIRST_FRAME),
    )
    .await
    .map_err(|_| format!("no answer from {addr}"))?
    .map_err(|e| format!("answer from {addr}: {e}"))?;
    if kind != wire::REPLY {
        return Err(format!("{addr} answered with frame kind {kind}"));
    }
    match wire::decode("reply", &payload).map_err(|e| e.to_string())? {
        wire::Reply::Leader {
            term,
            leader,
            voters,
        } => Ok(LeaderView {
            term,
            leader,
            voters,
        }),
        wire::Reply::Refused { reason } | wire::Reply::Denied { reason } => {
            Err(format!("{addr} refused: {reason}"))
        }
        other => Err(format!("{addr} answered {other:?}")),
    }
}

/// Asks the voters an inquiry names, all at once, and vouches for the leader if enough of
/// them back it (see [`Inquiry`]).
async fn inquire(inner: Arc<Inner>, inquiry: Inquiry) {
    let mut asking = tokio::task::JoinSet::new();
    for &voter in &inquiry.ask {
        let inner = inner.clone();
        asking.spawn(async move { (voter, ask_leader(&inner, voter).await) });
    }
    let mut answers = Vec::new();
    while let Some(done) = asking.join_next().await {
        match done {
            Ok((voter, Ok(view))) => answers.push((voter, view)),
            Ok((voter, Err(e))) => {
                tracing::debug!(peer = voter, error = %e, "a voter did not say who leads it")
            }
            Err(e) => tracing::debug!(error = %e, "an inquiry task failed"),
        }
    }
    let vouched = inquiry.vouched_by(&answers);
    tracing::info!(
        answers = answers.len(),
        ?vouched,
        "asked this replica's voters whom they follow"
    );
    if let (Some((leader, term)), Some(node)) = (vouched, inner.node()) {
        node.vouch(leader, term);
    }
}

/// One connection's life: batches first, then a snapshot chunk, then wait.
async fn session(
    inner: &Inner,
    peer: u64,
    mut stream: ClientStream,
    rx: &mut mpsc::Receiver<Message>,
    slot: &SnapshotSlot,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), WireError> {
    // A snapshot being streamed: its encoding and how much is sent.
    let mut streaming: Option<(Vec<u8>, usize)> = None;
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::new();
    let mut last_write = Instant::now();
    let result = loop {
        batch.clear();
        let mut bytes = 0;
        let mut closed = false;
        // A frame holds up to BATCH messages or about FRAME_TARGET bytes, far below MAX_FRAME
        // (raft-rs keeps one append message near 1 MiB).
        while batch.len() < BATCH && bytes < wire::FRAME_TARGET {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.compute_size() as usize;
                    batch.push(m);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && batch.is_empty() {
            break Ok(());
        }
        out.clear();
        if !batch.is_empty() {
            wire::frame(&mut out, wire::RAFT, &wire::encode_messages(&batch));
        } else if let Some((bytes, sent)) = &mut streaming {
            let end = (*sent + wire::CHUNK).min(bytes.len());
            let mut payload = wire::chunk_header(bytes.len() as u64, *sent as u64).to_vec();
            payload.extend_from_slice(&bytes[*sent..end]);
            wire::frame(&mut out, wire::CHUNK_KIND, &payload);
            *sent = end;
        } else if let Some(m) = slot.message.lock().ok().and_then(|mut s| s.take()) {
            streaming = Some((m.write_to_bytes().unwrap_or_default(), 0));
            continue;
        }
        if !out.is_empty() {
            if let Err(e) = write(&mut stream, &out).await {
                break Err(e);
            }
            last_write = Instant::now();
            if let Some((bytes, sent)) = &streaming {
                if *sent == bytes.len() {
                    streaming = None;
                    if let Some(node) = inner.node() {
                        node.report_snapshot(peer, true);
                    }
                }
            }
            continue;
        }
        // Nothing to send: wait for messages, a snapshot, the ping time, or shutdown.
        let ping_in = PING_EVERY.saturating_sub(last_write.elapsed());
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    let mut one = Vec::new();
                    wire::frame(&mut one, wire::RAFT, &wire::encode_messages(&[m]));
                    // Take whatever else arrived with it in the same frame next time round.
                    if let Err(e) = write(&mut stream, &one).await {
                        break Err(e);
                    }
                    last_write = Instant::now();
                }
                None => break Ok(()),
            },
            _ = slot.ready.notified() => {}
            _ = tokio::time::sleep(ping_in) => {
                if let Err(e) = write(&mut stream, &[0, 0, 0, 1, wire::PING]).await {
                    break Err(e);
                }
                last_write = Instant::now();
            }
            _ = shutdown.changed() => {
                let _ = stream.shutdown().await;
                break Ok(());
            }
        }
    };
    // Every way out of a session with a snapshot half sent tells Raft it failed.
    if streaming.is_some() {
        if let Some(node) = inner.node() {
            node.report_snapshot(peer, false);
        }
    }
    result
}

async fn write(stream: &mut ClientStream, bytes: &[u8]) -> Result<(), WireError> {
    let io = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, io).await {
        Ok(r) => r.map_err(WireError::from),
        Err(_) => Err(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "write timed out",
        ))),
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut shutdown = inner.shutdown.clone();
    let mut refused = 0u64;
    let mut last_log: Option<Instant> = None;
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let slot = match inner.admit(remote) {
            Ok(slot) => slot,
            Err(reason) => {
                drop(tcp);
                // One line per ten seconds, however many: a flood must not flood the log.
                refused += 1;
                if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(peer = %remote, %reason, refused, "peer connections refused");
                    refused = 0;
                    last_log = Some(Instant::now());
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let inner = inner.clone();
        // The current certificate: a renewed one serves the next connection.
        let acceptor = TlsAcceptor::from(inner.tls.load().server.clone());
        tokio::spawn(async move {
            let from_member = slot.from_member;
            let deadline = if from_member {
                HANDSHAKE_TIMEOUT
            } else {
                STRANGER_HANDSHAKE
            };
            if let Err(reason) =
                serve_connection(&inner, acceptor, tcp, remote, deadline, slot).await
            {
                if from_member {
                    tracing::warn!(peer = %remote, %reason, "peer connection refused")
                } else {
                    tracing::debug!(peer = %remote, %reason, "peer connection refused")
                }
            }
        });
    }
}

/// One accepted connection. An `Err` is a refusal (logged once by the caller); the end of a
/// healthy stream is `Ok`.
async fn serve_connection(
    inner: &Arc<Inner>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    deadline: Duration,
    slot: Slot,
) -> Result<(), String> {
    let local = tcp.local_addr().ok();
    // The handshake and the first frame together, within the deadline.
    let deadline = tokio::time::Instant::now() + deadline;
    let mut tls = tokio::time::timeout_at(deadline, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let certs: Vec<_> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (kind, payload) = tokio::time::timeout_at(
        deadline,
        wire::read_frame_within(&mut tls, wire::MAX_FIRST_FRAME),
    )
    .await
    .map_err(|_| "no hello within the handshake timeout".to_string())?
    .map_err(|e| format!("bad first frame: {e}"))?;
    match kind {
        wire::HELLO => {
            let hello: Hello = wire::decode("hello", &payload).map_err(|e| e.to_string())?;
            if hello.version != wire::PROTOCOL_VERSION {
                return Err(format!(
                    "protocol version {} (this node speaks {})",
                    hello.version,
                    wire::PROTOCOL_VERSION
                ));
            }
            if hello.cluster != inner.cluster || hello.to != inner.id {
                return Err(format!(
                    "hello for cluster {} node {}, this is cluster {} node {}",
                    hello.cluster, hello.to, inner.cluster, inner.id
                ));
            }
            // Proven a member's: a member slot for the stream, the unproven one given back.
            let checked = check_hello(inner, &hello, &certs).and_then(|()| {
                let member = inner
                    .connections
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| "too many member streams".to_string())?;
                StreamClaim::take(inner, hello.from, remote).map(|claim| (claim, member))
            });
            drop(slot);
            let _claim = match checked {
                Ok(claim) => claim,
                Err(reason) => {
                    let _ = wire::write_frame(&mut tls, wire::REFUSE, reason.as_bytes()).await;
                    return Err(reason);
                }
            };
            wire::write_frame(&mut tls, wire::ACCEPT, &[])
                .await
                .map_err(|e| e.to_string())?;
            inner.learn(hello.from, &hello.addr);
            receive(inner, hello.from, tls).await
        }
        wire::REQUEST => {
            let request: wire::Request =
                wire::decode("request", &payload).map_err(|e| e.to_string())?;
            let (member, superseded) = match member_of(inner, &certs) {
                Some((id, superseded)) => (Some(id), superseded),
                None => (None, false),
            };
            let caller = Caller {
                member,
                superseded,
                local,
                remote,
            };
            let handler = inner.control.get().cloned();
            let reply = match handler {
                Some(handler) => handler.handle(request, caller).await,
                None => wire::Reply::Refused {
                    reason: "this node is still starting; retry in a moment".into(),
                },
            };
            let refused = match &reply {
                wire::Reply::Refused { reason } => Some(reason.clone()),
                _ => None,
            };
            wire::write_frame(&mut tls, wire::REPLY, &wire::encode(&reply))
                .await
                .map_err(|e| e.to_string())?;
            let _ = tls.shutdown().await;
            match refused {
                Some(reason) => Err(format!("request refused: {reason}")),
                None => Ok(()),
            }
        }
        other => Err(format!("unexpected first frame of kind {other}")),
    }
}

/// The one live inbound stream of a node: while it is live (a frame within
/// [`DUPLICATE_WINDOW`]), a hello from the same identity at another address is a second
/// process holding that identity (a copied data dir), and it is refused.
struct StreamClaim {
    inner: Arc<Inner>,
    node: u64,
    serial: u64,
}

/// A stream silent for longer than this no longer holds its node's place.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3);

impl StreamClaim {
    fn take(inner: &Arc<Inner>, node: u64, remote: SocketAddr) -> Result<StreamClaim, String> {
        let mut streams = inner
            .streams
            .lock()
            .map_err(|_| "stream table unavailable".to_string())?;
        if let Some((held, _)) = streams.get(&node) {
            let live = inner
                .last_contact(node)
                .is_some_and(|d| d < DUPLICATE_WINDOW);
            if live && held.ip() != remote.ip() {
                tracing::error!(node, held = %held, newer = %remote, "two processes present one node identity; the newer is refused");
                return Err(format!(
                    "{}: node {node} is connected from {held} already, and this process at {} holds the same identity (a copied data dir?). Stop one of them; a host that needs a node of its own joins with an empty data dir",
                    wire::DUPLICATE, remote.ip()
                ));
            }
        }
        let serial = inner
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        streams.insert(node, (remote, serial));
        Ok(StreamClaim {
            inner: inner.clone(),
            node,
            serial,
        })
    }
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        if let Ok(mut streams) = self.inner.streams.lock() {
            if streams
                .get(&self.node)
                .is_some_and(|(_, s)| *s == self.serial)
            {
                streams.remove(&self.node);
            }
        }
    }
}

/// Whether the dialer is the node it claims to be, with the certificate bound to that node,
/// and still a member.
fn check_hello(
    inner: &Inner,
    hello: &Hello,
    certs: &[CertificateDer<'static>],
) -> Result<(), String> {
    check_node(inner, hello.from, certs)
}

/// Every node id this node knows as a member or a registered node.
pub(crate) fn member_ids(node: &NodeHandle) -> Vec<u64> {
    let registry = node.published().load_full();
    let mut ids: Vec<u64> = node
        .status()
        .members()
        .chain(registry.registry.nodes().map(|n| n.id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The member whose bound, current certificate `certs` is, among the members and registered
/// nodes this node knows.
/// The member whose bound certificate `certs` are, and whether it is the one its latest
/// renewal replaced rather than the current one.
fn member_of(inner: &Inner, certs: &[CertificateDer<'static>]) -> Option<(u64, bool)> {
    let id = member_ids(inner.node()?)
        .into_iter()
        .find(|&id| check_node(inner, id, certs).is_ok())?;
    let presented = certs.first().map(|c| fingerprint(c));
    let superseded =
        matches!(inner.expected(id), Expected::Bound(current, _) if presented != Some(current));
    Some((id, superseded))
}

/// Whether `certs` are those of member `from`: issued by the cluster CA for that node, and the
/// very certificate the registry binds to it.
pub(crate) fn check_node(
    inner: &Inner,
    from: u64,
    certs: &[CertificateDer<'static>],
) -> Result<(), String> {
    inner.tls.load().check_node(certs, from)?;
    let presented = certs.first().map(|c| fingerprint(c));
    match inner.expected(from) {
        Expected::Bound(current, previous)
            if presented == Some(current) || (previous.is_some() && presented == previous) =>
        {
            Ok(())
        }
        Expected::Bound(..) => Err(format!(
            "the certificate is not the one bound to node {from}"
        )),
        Expected::Unbound => Ok(()),
        Expected::Removed => Err(format!("{}: node {from}", wire::REMOVED)),
        Expected::Unknown => Err(format!(
            "node {from} is not a member this node knows of (yet)"
        )),
    }
}

/// Reads a member's Raft stream into the node.
async fn receive(
    inner: &Arc<Inner>,
    from: u64,
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
) -> Result<(), String> {
    let mut shutdown = inner.shutdown.clone();
    let mut reassembly = Reassembly::default();
    let serial = inner
        .next_stream
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The one snapshot being reassembled on this node, if this stream's: given up when the
    // stream ends.
    struct Releases<'a>(&'a Inner, u64);
    impl Drop for Releases<'_> {
        fn drop(&mut self) {
            self.0.end_reassembly(self.1);
        }
    }
    let _release = Releases(inner, serial);
    inner.touch(from);
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(IDLE_TIMEOUT, wire::read_frame(&mut tls)) => match f {
                Ok(f) => f,
                Err(_) => return Err(format!("node {from} sent nothing for {IDLE_TIMEOUT:?}")),
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let (kind, payload) = match frame {
            Ok(f) => f,
            Err(WireError::Closed) => return Ok(()),
            Err(WireError::Io(e)) => {
                // The peer went away (restart, crash): its sender reconnects.
                tracing::debug!(peer = from, error = %e, "peer stream ended");
                return Ok(());
            }
            Err(e) => return Err(format!("stream from node {from}: {e}")),
        };
        inner.touch(from);
        // The messages, and the bytes they came in (a snapshot's: all its chunks).
        let (messages, bytes) = match kind {
            wire::RAFT => (
                wire::decode_messages(&payload).map_err(|e| e.to_string())?,
                payload.len(),
            ),
            wire::CHUNK_KIND => {
                let (total, offset, _) = wire::parse_chunk(&payload).map_err(|e| e.to_string())?;
                if offset == 0 {
                    inner.start_reassembly(from, serial, total).await?;
                } else if !inner.reassembles(serial) {
                    return Err(format!(
                        "node {from} sent a snapshot chunk on a stream that is not reassembling one"
                    ));
                }
                let max = inner
                    .max_snapshot
                    .load(std::sync::atomic::Ordering::Relaxed);
                match reassembly.add(&payload, max).map_err(|e| e.to_string())? {
                    Some(m) => {
                        inner.end_reassembly(serial);
                        (vec![m], usize::try_from(total).unwrap_or(usize::MAX))
                    }
                    None => continue,
                }
            }
            wire::PING => {
                // A connection outlives a removal only until the next ping.
                if inner.was_removed(from) {
                    return Err(format!("node {from} was removed; closing its stream"));
                }
                continue;
            }
            other => return Err(format!("unexpected frame kind {other} from node {from}")),
        };
        let Some(node) = inner.node() else { continue };
        // Each message holds a share of the peer's budget until Raft stepped it (about one
        // unit per 4 KiB): while the Raft thread is busy this stream is not read on, and TCP
        // pushes back on the sender.
        let weight = |bytes: usize| (1 + bytes / 4096).min(INBOX_BUDGET) as u32;
        let each = bytes / messages.len().max(1);
        let budget = inner.inbox(from);
        for m in messages {
            if m.from != from || m.to != inner.id {
                return Err(format!(
                    "node {from} sent a message from {} to {}",
                    m.from, m.to
                ));
            }
            let share = tokio::select! {
                share = tokio::time::timeout(IDLE_TIMEOUT, budget.clone().acquire_many_owned(weight(each))) => match share {
                    Ok(Ok(share)) => share,
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => return Err(format!("Raft took none of node {from}'s messages for {IDLE_TIMEOUT:?}")),
                },
                _ = shutdown.changed() => return Ok(()),
            };
            if node.step_with(m, share).is_err() {
                return Ok(()); // the node is stopping
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unproven_connection_from_a_members_address_takes_no_member_slot() {
        let (_stop, stopped) = watch::channel(false);
        let identity = Identity::bootstrap(1).expect("identity");
        let transport = Transport::new(identity, stopped).expect("transport");
        let inner = &transport.inner;
        // 127.0.0.3 and 127.0.0.4 are members' addresses (learned from their hellos).
        inner.learn(2, "127.0.0.3:7380");
        inner.learn(3, "127.0.0.4:7380");
        let from = |host: u8, port: u16| SocketAddr::from(([127, 0, 0, host], port));
        // Any process on member 2's host can open connections from its address; before they
        // prove themselves they hold a few slots of that address's own, and no member slot.
        let held: Vec<Slot> = (0..MAX_PER_MEMBER_ADDRESS as u16)
            .map(|i| inner.admit(from(3, 40_000 + i)).expect("admitted"))
            .collect();
        assert!(held.iter().all(|s| s.from_member));
        assert!(inner.admit(from(3, 50_000)).is_err(), "capped per address");
        assert_eq!(inner.connections.available_permits(), MAX_CONNECTIONS);
        // Member 3's host is not affected; one slot given back is open again.
        assert!(inner.admit(from(4, 40_000)).is_ok());
        drop(held);
        assert!(inner.admit(from(3, 50_001)).is_ok());
    }
}
