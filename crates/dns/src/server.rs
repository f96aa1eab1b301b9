//! DNS sockets: a UDP fast path (one blocking thread per address, answers cached as encoded
//! bytes per registry version; responses to strangers and other hosts' clients rate-limited) and
//! TCP (connections capped and admitted here, then framed and answered by hickory-server's
//! stream and request handler). Both answer with [`Zone::decide`], and share one cap on
//! queries forwarded upstream.

use std::collections::HashMap;
use std::iter;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, ResponseCode};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use linkdns_registry::{canonical_ip, Asker, Published};
use tokio::sync::watch;

use crate::acl::{Acl, Client};
use crate::answer::{
    check_request, formerr_for, reply_to, rotate_records, vantage_class, Cacheable, Decision, Zone,
    MAX_UDP_PAYLOAD,
};
use crate::forward::Forwarder;
use crate::limits::{truncated, Limits, Rrl, TcpSlots, Verdict};
use crate::metrics::DnsMetrics;
use crate::Error;

/// Everything answering needs, shared by all sockets.
pub struct Answerer {
    pub zone: Zone,
    pub acl: Acl,
    pub forwarder: Forwarder,
    pub published: Arc<ArcSwap<Published>>,
    /// Changes whenever `published` gets a new local view: what held queries wait on.
    pub view_changes: watch::Receiver<u64>,
    pub holds: Holds,
    pub metrics: DnsMetrics,
}

/// How long a query from an address of this host's container networks that no known container
/// holds waits for the Docker watcher to tell who it is (a container that has just started: its
/// process can run before Docker reports its address). Then it is answered as from a stranger
/// on this host: names, but no link aliases.
pub const HOLD_LIMIT: Duration = Duration::from_secs(1);

/// After a wait ran out, the same address is not held again for this long (an address that no
/// container holds, such as a process on a Docker network that is not a container, must not
/// wait on every query).
const HOLD_AGAIN_AFTER: Duration = Duration::from_secs(30);

/// At most this many queries wait at once; more are answered without waiting.
const MAX_HELD: usize = 256;

/// Asked, when queries are held, to find out who is at their addresses sooner than the
/// watcher would (it tells the view, which wakes the queries): all the addresses at once, so
/// one walk of `/proc` serves them all. It must not block.
pub type Identify = Arc<dyn Fn(Vec<IpAddr>) + Send + Sync>;

/// Shortest time between two batched lookups of the held addresses.
const PROBE_SPACING: Duration = Duration::from_millis(25);

/// The addresses whose last wait ran out, the budget of waiting queries (UDP and TCP
/// together), the addresses held now, and who to ask about them.
pub struct Holds {
    expired: Mutex<HashMap<IpAddr, Instant>>,
    slots: Arc<tokio::sync::Semaphore>,
    identify: Option<Identify>,
    /// The addresses queries are held for now, with how many queries each.
    wanted: Mutex<HashMap<IpAddr, usize>>,
    /// The lookups of the held addresses (see [`Holds::claim_probe`]).
    probe: Mutex<Probe>,
}

/// When the held addresses are looked up: for a newly held address, and on each new version
/// of the view; whatever the number of held queries, one lookup at a time covers all the
/// held addresses, at most one per [`PROBE_SPACING`].
#[derive(Default)]
struct Probe {
    /// The latest view version a lookup was claimed for.
    seen: u64,
    /// A lookup is claimed and not made yet: it will take every address held by then.
    pending: bool,
    /// When the last lookup was (or will be) made.
    last: Option<Instant>,
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holds")
            .field("available", &self.slots.available_permits())
            .field("identify", &self.identify.is_some())
            .finish()
    }
}

impl Default for Holds {
    fn default() -> Self {
        Holds::new(MAX_HELD, None)
    }
}

impl Holds {
    /// Holds that ask `identify` about the addresses queries are held for.
    pub fn with_identify(identify: Identify) -> Holds {
        Holds::new(MAX_HELD, Some(identify))
    }

    /// At most `capacity` queries held at once.
    pub fn new(capacity: usize, identify: Option<Identify>) -> Holds {
        Holds {
            expired: Mutex::new(HashMap::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(capacity)),
            identify,
            wanted: Mutex::new(HashMap::new()),
            probe: Mutex::new(Probe::default()),
        }
    }

    fn may_hold(&self, src: IpAddr) -> bool {
        self.expired
            .lock()
            .map(|e| e.get(&src).is_none_or(|t| t.elapsed() >= HOLD_AGAIN_AFTER))
            .unwrap_or(false)
    }

    /// A slot for one held query, if any is free.
    fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    fn ran_out(&self, src: IpAddr) {
        if let Ok(mut e) = self.expired.lock() {
            if e.len() >= 4096 {
                e.retain(|_, t| t.elapsed() < HOLD_AGAIN_AFTER);
                if e.len() >= 4096 {
                    e.clear();
                }
            }
            e.insert(src, Instant::now());
        }
    }

    /// Counts a query held for `src`; whether it is the first for that address.
    fn want(&self, src: IpAddr) -> bool {
        self.wanted.lock().is_ok_and(|mut w| {
            let n = w.entry(src).or_insert(0);
            *n += 1;
            *n == 1
        })
    }

    fn unwant(&self, src: IpAddr) {
        if let Ok(mut w) = self.wanted.lock() {
            if let Some(n) = w.get_mut(&src) {
                *n -= 1;
                if *n == 0 {
                    w.remove(&src);
                }
            }
        }
    }

    /// Whether this caller is the one to look up the held addresses, and after how long (the
    /// spacing): for a newly held address (`None`), or for view `version`, the first to see
    /// it. `None`: a lookup claimed and not made yet takes this caller's address and view too.
    fn claim_probe(&self, version: Option<u64>) -> Option<Duration> {
        let mut probe = self.probe.lock().ok()?;
        if let Some(version) = version {
            if probe.seen >= version {
                return None;
            }
            probe.seen = version;
        }
        if probe.pending {
            return None;
        }
        let now = Instant::now();
        let wait = probe.last.map_or(Duration::ZERO, |at| {
            (at + PROBE_SPACING).saturating_duration_since(now)
        });
        probe.pending = true;
        probe.last = Some(now + wait);
        Some(wait)
    }

    /// Makes the lookup claimed with [`Holds::claim_probe`], after `wait`: every held address
    /// (those held while it waited too).
    async fn probe(&self, wait: Duration) {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if let Ok(mut probe) = self.probe.lock() {
            probe.pending = false;
        }
        self.probe_all();
    }

    /// Asks `identify` about every held address (at most the slots' number).
    fn probe_all(&self) {
        let Some(identify) = &self.identify else {
            return;
        };
        let addresses: Vec<IpAddr> = self
            .wanted
            .lock()
            .map(|w| w.keys().copied().take(MAX_HELD).collect())
            .unwrap_or_default();
        if !addresses.is_empty() {
            identify(addresses);
        }
    }
}

/// What the UDP path does with one datagram.
enum Handled {
    Reply(Vec<u8>),
    /// The reply came from the cache and is in its `out` buffer (so a hit allocates nothing).
    Cached,
    /// Ask the upstreams; the client takes UDP answers of at most this many bytes.
    Forward {
        udp_limit: usize,
    },
    /// From an address no known container holds yet: wait for the watcher, then answer.
    Hold,
    Drop,
}

/// Encoded answers of the current registry version, keyed by the lowercased question, whether
/// the client used EDNS and the asker's vantage class (see [`AnswerCache::build_key`]). Owned by
/// one UDP thread: no locks, except where an answer's rotation counter is first shared with
/// the other threads' caches (see [`Turns`]).
pub struct AnswerCache {
    applied: u64,
    version: u64,
    entries: HashMap<Vec<u8>, Cached>,
    /// Bytes held by keys and answers.
    bytes: usize,
    /// Where the key of the query at hand is built, so a lookup allocates nothing.
    scratch: Vec<u8>,
    /// The length of the key without the asker's address (see [`AnswerCache::add_asker`]).
    general: usize,
    /// Where a reply from the cache is written, so a hit allocates nothing.
    out: Vec<u8>,
    turns: Arc<Turns>,
}

/// One cached answer: its bytes, the runs of its answer records that rotate, and the turn
/// its next copy rotates to (`None` when nothing rotates).
struct Cached {
    bytes: Vec<u8>,
    runs: Vec<Run>,
    turn: Option<Arc<AtomicUsize>>,
}

/// The rotation counter of each cached answer, shared by the caches of one server's UDP
/// threads: each answer starts one further along, whichever thread sends it.
#[derive(Default)]
pub struct Turns {
    counters: Mutex<TurnCounters>,
}

#[derive(Default)]
struct TurnCounters {
    /// The registry and local view versions the counters belong to.
    applied: u64,
    version: u64,
    by_key: HashMap<Vec<u8>, Arc<AtomicUsize>>,
}

/// Answers whose rotation counters are kept at once; past it the table starts over (a flood
/// of distinct names resets rotation, it does not grow memory).
const MAX_TURN_COUNTERS: usize = 65_536;

impl Turns {
    /// The counter of the answer cached under `key` at these versions, made (starting at
    /// `start`) if no cache has it yet. A cache still on older versions gets a counter of
    /// its own: it is about to move on.
    fn counter(
        &self,
        versions: (u64, u64),
        key: &[u8],
        start: impl FnOnce() -> usize,
    ) -> Arc<AtomicUsize> {
        let mut t = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let held = (t.applied, t.version);
        if versions < held && !t.by_key.is_empty() {
            return Arc::new(AtomicUsize::new(start()));
        }
        if versions != held || t.by_key.len() >= MAX_TURN_COUNTERS {
            t.by_key.clear();
            (t.applied, t.version) = versions;
        }
        t.by_key
            .entry(key.to_vec())
            .or_insert_with(|| Arc::new(AtomicUsize::new(start())))
            .clone()
    }
}

/// A run of equally long answer records in an encoded response, rotated in place on every
/// answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// Byte offset of the first record.
    at: usize,
    /// Length of each record.
    len: usize,
    count: usize,
}

/// The runs of `rotation` (record indexes of the answer section) as byte ranges of `bytes`, the
/// encoded response; a run whose records are not all equally long is left out (it stays in
/// order).
fn runs_of(bytes: &[u8], rotation: &[(usize, usize)]) -> Vec<Run> {
    if rotation.is_empty() {
        return Vec::new();
    }
    let Some(offsets) = answer_offsets(bytes) else {
        return Vec::new();
    };
    rotation
        .iter()
        .filter(|(_, count)| *count > 1)
        .filter_map(|&(start, count)| {
            let bounds = offsets.get(start..=start + count)?;
            let len = bounds[1] - bounds[0];
            bounds
                .windows(2)
                .all(|w| w[1] - w[0] == len)
                .then_some(Run {
                    at: bounds[0],
                    len,
                    count,
                })
        })
        .collect()
}

/// Where each answer record of an encoded response starts, and where the last one ends.
fn answer_offsets(bytes: &[u8]) -> Option<Vec<usize>> {
    let count = |i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *bytes.get(i)?,
            *bytes.get(i + 1)?,
        ])))
    };
    let (questions, answers) = (count(4)?, count(6)?);
    let mut pos = 12;
    for _ in 0..questions {
        pos = skip_name(bytes, pos)? + 4;
    }
    let mut offsets = Vec::with_capacity(answers + 1);
    for _ in 0..answers {
        offsets.push(pos);
        pos = skip_name(bytes, pos)? + 10;
        pos += count(pos - 2)?;
    }
    offsets.push(pos);
    (pos <= bytes.len()).then_some(offsets)
}

/// The position after the (possibly compressed) name at `pos`.
pub(crate) fn skip_name(bytes: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *bytes.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            l if l & 0xc0 == 0xc0 => return Some(pos + 2),
            l => pos += 1 + usize::from(l),
        }
    }
}

/// Rotates each run of `bytes` by `turn` records.
fn rotate_runs(bytes: &mut [u8], runs: &[Run], turn: usize) {
    for run in runs {
        if let Some(span) = bytes.get_mut(run.at..run.at + run.len * run.count) {
            span.rotate_left((turn % run.count) * run.len);
        }
    }
}

/// Budget of one cache (one per UDP socket): a flood of distinct names empties it rather than
/// growing it past this.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// At most this many forwarded queries wait on upstreams at once; more get SERVFAIL at once.
const MAX_FORWARDS_IN_FLIGHT: usize = 256;

impl Default for AnswerCache {
    fn default() -> Self {
        AnswerCache::new()
    }
}

impl AnswerCache {
    /// A cache whose answers rotate on their own.
    pub fn new() -> AnswerCache {
        AnswerCache::sharing(Arc::default())
    }

    /// A cache whose answers rotate together with those of the other caches sharing `turns`
    /// (the UDP threads of one server).
    pub fn sharing(turns: Arc<Turns>) -> AnswerCache {
        AnswerCache {
            applied: u64::MAX,
            version: u64::MAX,
            entries: HashMap::new(),
            bytes: 0,
            scratch: Vec::with_capacity(300),
            general: 0,
            out: Vec::with_capacity(512),
            turns,
        }
    }

    /// Builds the key of a scanned query in the scratch buffer: the question name lowercased,
    /// type and class as they are, whether the client used EDNS, and the asker's vantage class
    /// (which addresses reach it: see [`vantage_class`]).
    fn build_key(&mut self, bytes: &[u8], q: &WireQuery, class: u32) {
        let name_end = q.question_end - 4;
        self.scratch.clear();
        self.scratch
            .extend(bytes[12..name_end].iter().map(u8::to_ascii_lowercase));
        self.scratch
            .extend_from_slice(&bytes[name_end..q.question_end]);
        self.scratch.push(u8::from(q.edns.is_some()));
        self.scratch.extend_from_slice(&class.to_le_bytes());
        self.general = self.scratch.len();
    }

    /// Makes the key in the scratch buffer that of an answer for `asker` alone (once).
    fn add_asker(&mut self, asker: IpAddr) {
        if self.scratch.len() > self.general {
            return;
        }
        match asker {
            IpAddr::V4(ip) => self.scratch.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => self.scratch.extend_from_slice(&ip.octets()),
        }
    }

    /// Writes the answer cached under the key in the scratch buffer, for the query `bytes`, into
    /// `out` (rotated one turn further); false when there is none or it is too large for the
    /// client.
    fn reply_from_cache(&mut self, bytes: &[u8], q: &WireQuery) -> bool {
        let Some(cached) = self.entries.get_mut(self.scratch.as_slice()) else {
            return false;
        };
        if cached.bytes.len() > udp_limit(q.edns) {
            return false;
        }
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(&cached.bytes);
        // Same question length, so the cached answer's name pointers still fit; copy the
        // client's id, RD/CD bits and the question in its own case.
        out[..2].copy_from_slice(&bytes[..2]);
        out[2] = (out[2] & !0x01) | (bytes[2] & 0x01);
        out[3] = (out[3] & !0x10) | (bytes[3] & 0x10);
        out[12..q.question_end].copy_from_slice(&bytes[12..q.question_end]);
        let turn = cached
            .turn
            .as_ref()
            .map_or(0, |t| t.fetch_add(1, Ordering::Relaxed));
        rotate_runs(out, &cached.runs, turn);
        true
    }

    /// Empties the cache when the registry or the local view moved on since it was filled.
    fn follow(&mut self, published: &Published) {
        if self.applied != published.applied || self.version != published.version {
            self.entries.clear();
            self.bytes = 0;
            self.applied = published.applied;
            self.version = published.version;
        }
    }

    fn insert(&mut self, key: Vec<u8>, answer: Cached) {
        let answer_len = answer.bytes.len();
        let size = key.len() + answer_len + 64;
        if self.bytes + size > CACHE_BYTES {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        if let Some(old) = self.entries.insert(key, answer) {
            self.bytes -= size - answer_len + old.bytes.len();
        }
    }
}

/// The parts of a query the fast path reads straight off the wire.
struct WireQuery {
    /// End of the question section.
    question_end: usize,
    /// Whether an OPT record follows, and the client's UDP payload size.
    edns: Option<u16>,
}

/// Reads a plain query (one question, optionally one OPT of version 0, nothing else) without
/// decoding it; anything else returns `None` and takes the full path.
fn scan_query(bytes: &[u8]) -> Option<WireQuery> {
    let header = bytes.get(..12)?;
    let flags = header[2];
    if flags & 0x80 != 0 || flags & 0x78 != 0 {
        return None; // a response, or not a QUERY
    }
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return None;
    }
    let mut pos = 12;
    loop {
        let len = usize::from(*bytes.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 || pos - 12 > 255 {
            return None; // compression or an oversize label: full path
        }
        pos += 1 + len;
    }
    let question_end = pos + 4;
    if bytes.len() < question_end {
        return None;
    }
    if count(10) == 0 {
        return (bytes.len() == question_end).then_some(WireQuery {
            question_end,
            edns: None,
        });
    }
    // OPT: root name, type 41, class = payload, ttl = ext-rcode/version/flags, rdlength, rdata.
    let opt = bytes.get(question_end..question_end + 11)?;
    if opt[0] != 0 || opt[1..3] != [0, 41] || opt[6] != 0 {
        return None;
    }
    let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
    if bytes.len() != question_end + 11 + rdlen {
        return None;
    }
    Some(WireQuery {
        question_end,
        edns: Some(u16::from_be_bytes([opt[3], opt[4]])),
    })
}

/// The largest UDP response this client accepts.
fn udp_limit(edns_payload: Option<u16>) -> usize {
    match edns_payload {
        Some(p) => usize::from(p.clamp(512, MAX_UDP_PAYLOAD)),
        None => 512,
    }
}

impl Answerer {
    /// Answers one datagram as the UDP path does, without a socket and with `cache` kept by the
    /// caller: `None` when it would be dropped or forwarded. For tests and fuzzing.
    pub fn answer_datagram(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        cache: &mut AnswerCache,
    ) -> Option<Vec<u8>> {
        self.answer_datagram_in(bytes, src, cache)
            .map(<[u8]>::to_vec)
    }

    /// As [`Answerer::answer_datagram`], the reply borrowed from `cache`: what the UDP thread
    /// sends, with no copy of its own (a test counts this path's allocations).
    pub fn answer_datagram_in<'c>(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        cache: &'c mut AnswerCache,
    ) -> Option<&'c [u8]> {
        match self.handle_datagram(bytes, src, cache, false) {
            Handled::Reply(b) => {
                cache.out = b;
                Some(&cache.out)
            }
            Handled::Cached => Some(&cache.out),
            Handled::Forward { .. } | Handled::Hold | Handled::Drop => None,
        }
    }

    /// Waits (at most [`HOLD_LIMIT`]) until the local view tells who `src` is, when it is an
    /// address of this host's container networks that no known container holds. Returns how
    /// long it waited. New addresses are looked up at once (a burst of them together, at most
    /// one lookup per 25 ms); on each change of the view, one of the held queries looks up all
    /// the held addresses at once.
    pub async fn wait_for_asker(&self, src: IpAddr) -> Duration {
        struct Unwant<'a>(&'a Holds, IpAddr);
        impl Drop for Unwant<'_> {
            fn drop(&mut self) {
                self.0.unwant(self.1);
            }
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
        let mut changes = self.view_changes.clone();
        let holds = &self.holds;
        let first = holds.want(src);
        let _unwant = Unwant(holds, src);
        if first {
            if let Some(wait) = holds.claim_probe(None) {
                holds.probe(wait).await;
            }
        }
        let mut expired = false;
        while self.published.load().local.identify(src) == Asker::Unknown {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    // The containers being connected may be known only now: ask again about
                    // every held address, once for all of them.
                    let version = *changes.borrow_and_update();
                    if let Some(wait) = holds.claim_probe(Some(version)) {
                        holds.probe(wait).await;
                    }
                }
                Ok(Err(_)) => {
                    // Nothing publishes views any more: wait the time out.
                    tokio::time::sleep_until(deadline).await;
                    expired = true;
                    break;
                }
                Err(_) => {
                    expired = true;
                    break;
                }
            }
        }
        if expired {
            holds.ran_out(src);
            tracing::debug!(%src, "no local container known at this address; answering without its links");
        }
        let waited = started.elapsed();
        self.metrics.observe_hold(waited, expired);
        waited
    }

    /// Answers one UDP datagram; with `may_hold`, one from an unknown local address is held.
    fn handle_datagram(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        cache: &mut AnswerCache,
        may_hold: bool,
    ) -> Handled {
        let published = self.published.load();
        cache.follow(&published);
        let src_ip = canonical_ip(src.ip());
        let asker = published.local.identify(src_ip);
        if asker == Asker::Unknown && may_hold && self.holds.may_hold(src_ip) {
            return Handled::Hold;
        }
        let class = match asker {
            Asker::Container(_) | Asker::Unknown => vantage_class(asker, true),
            Asker::Other => vantage_class(asker, self.zone.on_host(src_ip, &published)),
        };
        let scanned = scan_query(bytes);
        // A container's answers that depend on who asks are cached under its address too.
        let per_asker = matches!(asker, Asker::Container(_));
        if let (Some(q), false) = (&scanned, asker == Asker::Unknown) {
            cache.build_key(bytes, q, class);
            let hit = cache.reply_from_cache(bytes, q)
                || (per_asker && {
                    cache.add_asker(src_ip);
                    cache.reply_from_cache(bytes, q)
                });
            if hit {
                let qtype =
                    u16::from_be_bytes([bytes[q.question_end - 4], bytes[q.question_end - 3]]);
                self.metrics.record_cached(qtype, cache.out[3]);
                return Handled::Cached;
            }
        }
        let request = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.metrics.record_malformed();
                return formerr_for(bytes).map_or(Handled::Drop, Handled::Reply);
            }
        };
        if request.metadata.message_type != hickory_proto::op::MessageType::Query {
            return Handled::Drop;
        }
        let query = match check_request(&request) {
            Ok(q) => q.clone(),
            Err(response) => return self.encode_udp(&response, None, None, &[], cache),
        };
        let vantage = self.zone.vantage(src_ip, asker, &published);
        let decided = self.zone.decide(
            &request, &query, src_ip, &published, asker, vantage, &self.acl,
        );
        let limit = udp_limit(request.edns.as_ref().map(Edns::max_payload));
        match decided.decision {
            Decision::Forward => Handled::Forward { udp_limit: limit },
            Decision::Respond(response) => {
                let key = match (&scanned, decided.cacheable, asker) {
                    // The scratch buffer still holds this query's key (an unknown asker's
                    // answer lacks the links it may have: never cached).
                    (_, _, Asker::Unknown) => None,
                    (Some(_), Cacheable::Yes, _) => Some(cache.scratch[..cache.general].to_vec()),
                    (Some(_), Cacheable::PerAsker, _) if per_asker => {
                        cache.add_asker(src_ip);
                        Some(cache.scratch.clone())
                    }
                    _ => None,
                };
                self.encode_udp(&response, Some(limit), key, &decided.rotation, cache)
            }
        }
    }

    /// Encodes a response within the client's UDP limit (setting TC when records had to go),
    /// caching it when it is complete and `key` allows, and rotates the runs of `rotation`.
    fn encode_udp(
        &self,
        response: &Message,
        limit: Option<usize>,
        key: Option<Vec<u8>>,
        rotation: &[(usize, usize)],
        cache: &mut AnswerCache,
    ) -> Handled {
        let limit = limit.unwrap_or(512);
        let Some(Encoded { mut bytes, whole }) = encode(response, limit) else {
            return Handled::Drop;
        };
        self.metrics.record(response);
        let runs = runs_of(&bytes, rotation);
        let key = key.filter(|_| whole);
        // Where the rotation stands: the cached copies count on from here for this answer.
        let counter = match &key {
            Some(key) if !runs.is_empty() => Some(cache.turns.counter(
                (cache.applied, cache.version),
                key,
                || self.zone.next_turn(),
            )),
            _ => None,
        };
        let turn = match (&counter, runs.is_empty()) {
            (Some(counter), _) => counter.fetch_add(1, Ordering::Relaxed),
            (None, true) => 0,
            (None, false) => self.zone.next_turn(),
        };
        if let Some(key) = key {
            cache.insert(
                key,
                Cached {
                    bytes: bytes.clone(),
                    runs: runs.clone(),
                    turn: counter,
                },
            );
        }
        rotate_runs(&mut bytes, &runs, turn);
        Handled::Reply(bytes)
    }
}

/// An encoded response, and whether it holds every record (else the additional section had to
/// go, or it is truncated).
struct Encoded {
    bytes: Vec<u8>,
    whole: bool,
}

/// Encodes `message` in at most `limit` bytes. If it does not fit, the additional section goes
/// first (clients ask for the targets of SRV records themselves); if it still does not fit,
/// the answer is the header, the question and the OPT record (EDNS stays echoed) with TC set
/// and no records, which tells the client to ask again over TCP.
fn encode(message: &Message, limit: usize) -> Option<Encoded> {
    if let Some(bytes) = encode_within(message, limit) {
        return Some(Encoded { bytes, whole: true });
    }
    if !message.additionals.is_empty() {
        let mut lean = message.clone();
        lean.additionals.clear();
        if let Some(bytes) = encode_within(&lean, limit) {
            return Some(Encoded {
                bytes,
                whole: false,
            });
        }
    }
    let mut bare = reply_header_only(message);
    bare.metadata.truncation = true;
    if let Some(edns) = &message.edns {
        bare.set_edns(edns.clone());
    }
    bare.to_vec().ok().map(|bytes| Encoded {
        bytes,
        whole: false,
    })
}

/// `message` encoded, if it fits in `limit` bytes whole.
fn encode_within(message: &Message, limit: usize) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(u16::try_from(limit).unwrap_or(u16::MAX));
    let complete = message.emit(&mut encoder).is_ok()
        && buf.len() <= limit
        && buf.get(2).is_some_and(|flags| flags & 0x02 == 0);
    complete.then_some(buf)
}

fn reply_header_only(message: &Message) -> Message {
    let mut m = Message::new(
        message.metadata.id,
        message.metadata.message_type,
        message.metadata.op_code,
    );
    m.metadata = message.metadata;
    m.add_queries(message.queries.iter().cloned());
    m
}

/// A running DNS front end; dropping it stops the UDP threads and the TCP listeners.
pub struct DnsServer {
    stop: Arc<AtomicBool>,
    udp_threads: Vec<JoinHandle<()>>,
    tcp_stop: watch::Sender<bool>,
    tcp_tasks: tokio::task::JoinSet<()>,
    bound: Vec<SocketAddr>,
}

/// What the sockets of one server share besides the answerer.
struct Shared {
    answerer: Arc<Answerer>,
    /// Queries forwarded upstream at once, over UDP and TCP together.
    forwards: Arc<tokio::sync::Semaphore>,
    rrl: Rrl,
    /// The rate limiter of clients elsewhere in the cluster.
    rrl_cluster: Rrl,
}

impl Shared {
    /// Which kind of client `client` is (see [`Client`]).
    fn class(&self, client: IpAddr) -> Client {
        // Loopback first: no registry to load for the host's own queries.
        if client.is_loopback() {
            return Client::Local;
        }
        let published = self.answerer.published.load();
        self.answerer.acl.class(client, &published)
    }

    /// A slot among the queries forwarded at once; with none left, `query` gets SERVFAIL.
    fn forward_slot(
        &self,
        socket: &UdpSocket,
        query: &[u8],
        src: SocketAddr,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = self.forwards.clone().try_acquire_owned().ok();
        if slot.is_none() {
            tracing::debug!(%src, "too many forwarded queries in flight; SERVFAIL");
            if let Some(fail) = servfail_for(query) {
                let _ = socket.send_to(&fail, src);
            }
        }
        slot
    }

    /// The verdict of response-rate limiting on one UDP response to `client`: this host's own
    /// clients are never limited, the rest of the cluster at the cluster rate (its source
    /// addresses are the easiest to forge from the LAN), anyone else at the stranger rate.
    fn rate(&self, client: IpAddr) -> Verdict {
        let limiter = match self.class(client) {
            Client::Local => return Verdict::Send,
            Client::Cluster => &self.rrl_cluster,
            Client::Stranger => &self.rrl,
        };
        if !limiter.enabled() {
            return Verdict::Send;
        }
        let verdict = limiter.check(client, Instant::now());
        if verdict != Verdict::Send {
            self.answerer
                .metrics
                .record_rate_limited(verdict == Verdict::Slip);
        }
        verdict
    }
}

impl DnsServer {
    /// Binds UDP and TCP on every address and starts serving with `limits`. Must run inside a
    /// tokio runtime.
    pub async fn start(
        listen: &[SocketAddr],
        answerer: Arc<Answerer>,
        limits: Limits,
    ) -> Result<DnsServer, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Handle::current();
        let shared = Arc::new(Shared {
            answerer: answerer.clone(),
            forwards: Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS_IN_FLIGHT)),
            rrl: Rrl::new(&limits),
            rrl_cluster: Rrl::new(&Limits {
                rrl_rate: limits.rrl_cluster_rate,
                ..limits
            }),
        });
        let slots = TcpSlots::new(limits);
        let (tcp_stop, tcp_stopped) = watch::channel(false);
        let mut tcp_tasks = tokio::task::JoinSet::new();
        let mut udp_threads = Vec::new();
        let mut bound = Vec::new();
        let turns = Arc::new(Turns::default());
        for addr in listen {
            // A failure part way also stops the threads already running (they would hold
            // their ports).
            let bind_err = |e: std::io::Error| {
                stop.store(true, Ordering::Relaxed);
                Error::Bind(*addr, e.to_string())
            };
            let sockets = udp_sockets(*addr, limits.udp_threads).map_err(bind_err)?;
            let local = sockets[0].local_addr().map_err(bind_err)?;
            // Same port for TCP as UDP, also when the config asked for port 0.
            let listener = tokio::net::TcpListener::bind(local)
                .await
                .map_err(bind_err)?;
            tcp_tasks.spawn(tcp_accept_loop(
                listener,
                shared.clone(),
                slots.clone(),
                limits.tcp_idle,
                tcp_stopped.clone(),
            ));
            let threads = sockets.len();
            for (i, socket) in sockets.into_iter().enumerate() {
                socket
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .map_err(bind_err)?;
                let cache = AnswerCache::sharing(turns.clone());
                let (shared, stop, runtime) = (shared.clone(), stop.clone(), runtime.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("dns-udp {local} {i}"))
                    .spawn(move || udp_loop(socket, cache, shared, stop, runtime))
                    .map_err(bind_err)?;
                udp_threads.push(thread);
            }
            tracing::info!(addr = %local, udp_threads = threads, "DNS listening (udp, tcp)");
            bound.push(local);
        }
        Ok(DnsServer {
            stop,
            udp_threads,
            tcp_stop,
            tcp_tasks,
            bound,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.bound
    }

    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.tcp_stop.send(true);
        while self.tcp_tasks.join_next().await.is_some() {}
        for t in self.udp_threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.tcp_stop.send(true);
    }
}

/// Sends a UDP response as response-rate limiting says: whole, truncated, or not at all.
fn send_limited(shared: &Shared, socket: &UdpSocket, bytes: &[u8], src: SocketAddr) -> bool {
    let slipped;
    let bytes = match shared.rate(src.ip()) {
        Verdict::Send => bytes,
        Verdict::Drop => return false,
        Verdict::Slip => match truncated(bytes) {
            Some(t) => {
                slipped = t;
                &slipped
            }
            None => return false,
        },
    };
    if let Err(e) = socket.send_to(bytes, src) {
        tracing::debug!(%src, error = %e, "udp send failed");
    }
    true
}

/// `threads` UDP sockets bound to `addr` (its port chosen once when it is 0). Several share the
/// port with `SO_REUSEPORT`, the kernel spreading clients over them; the address is first
/// bound alone, so that one taken by another process fails here instead of sharing its
/// queries.
fn udp_sockets(addr: SocketAddr, threads: usize) -> std::io::Result<Vec<UdpSocket>> {
    let alone = UdpSocket::bind(addr)?;
    if threads <= 1 {
        return Ok(vec![alone]);
    }
    let addr = alone.local_addr()?;
    drop(alone);
    (0..threads)
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            Ok(socket.into())
        })
        .collect()
}

/// Sends an answer (as response-rate limiting says) and counts its latency if it went out.
fn send_answer(
    shared: &Shared,
    socket: &UdpSocket,
    bytes: &[u8],
    src: SocketAddr,
    started: Instant,
) {
    if send_limited(shared, socket, bytes, src) {
        shared.answerer.metrics.observe_latency(started.elapsed());
    }
}

fn udp_loop(
    socket: UdpSocket,
    mut cache: AnswerCache,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
) {
    let socket = Arc::new(socket);
    let answerer = shared.answerer.clone();
    let mut buf = vec![0u8; 65535];
    while !stop.load(Ordering::Relaxed) {
        let (n, src) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "udp receive failed");
                continue;
            }
        };
        let started = Instant::now();
        match answerer.handle_datagram(&buf[..n], src, &mut cache, true) {
            Handled::Reply(bytes) => send_answer(&shared, &socket, &bytes, src, started),
            Handled::Cached => send_answer(&shared, &socket, &cache.out, src, started),
            Handled::Forward { udp_limit: limit } => {
                let Some(permit) = shared.forward_slot(&socket, &buf[..n], src) else {
                    continue;
                };
                let (answerer, socket, query) =
                    (answerer.clone(), socket.clone(), buf[..n].to_vec());
                runtime.spawn(async move {
                    let _permit = permit;
                    forward_udp(&answerer, &socket, &query, src, limit, started).await;
                });
            }
            Handled::Hold => {
                let query = buf[..n].to_vec();
                // Too many waiting: answered now, as after a wait that ran out (forwarded
                // when that is the answer).
                let permit = answerer.holds.slot();
                let (shared, socket) = (shared.clone(), socket.clone());
                runtime.spawn(async move {
                    let answerer = &shared.answerer;
                    if let Some(_permit) = permit {
                        answerer.wait_for_asker(canonical_ip(src.ip())).await;
                    }
                    let mut scratch = AnswerCache::new();
                    match answerer.handle_datagram(&query, src, &mut scratch, false) {
                        Handled::Reply(bytes) => {
                            send_answer(&shared, &socket, &bytes, src, started);
                        }
                        Handled::Cached => {
                            send_answer(&shared, &socket, &scratch.out, src, started);
                        }
                        Handled::Forward { udp_limit: limit } => {
                            let Some(_forward) = shared.forward_slot(&socket, &query, src) else {
                                return;
                            };
                            forward_udp(answerer, &socket, &query, src, limit, started).await;
                        }
                        Handled::Hold | Handled::Drop => {}
                    }
                });
            }
            Handled::Drop => {}
        }
    }
}

/// Forwards one UDP query upstream and sends the answer (or SERVFAIL) back.
async fn forward_udp(
    answerer: &Answerer,
    socket: &UdpSocket,
    query: &[u8],
    src: SocketAddr,
    limit: usize,
    started: Instant,
) {
    let Some(response) = forward_or_servfail(answerer, query, false).await else {
        return;
    };
    let response = fit_udp(response, limit);
    if let Err(e) = socket.send_to(&response, src) {
        tracing::debug!(%src, error = %e, "udp send failed");
    }
    answerer.metrics.observe_latency(started.elapsed());
}

/// An upstream answer too large for the client: re-encoded within the limit (TC set).
fn fit_udp(response: Vec<u8>, limit: usize) -> Vec<u8> {
    if response.len() <= limit {
        return response;
    }
    match Message::from_vec(&response) {
        Ok(m) => encode(&m, limit).map_or(response, |e| e.bytes),
        Err(_) => response,
    }
}

/// The upstream's answer, or SERVFAIL when no upstream answered (`None` if even that cannot be
/// built: then the client hears nothing and retries).
async fn forward_or_servfail(answerer: &Answerer, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    answerer.metrics.record_forward();
    match answerer.forwarder.forward(query, tcp).await {
        Ok(response) => Some(response),
        Err(e) => {
            tracing::warn!(error = %e, "forwarding failed; answering SERVFAIL");
            servfail_for(query)
        }
    }
}

fn servfail_for(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    reply_to(&request, ResponseCode::ServFail).to_vec().ok()
}

/// Accepts TCP connections while the caps allow, and serves each: hickory-server's stream
/// frames the queries (and closes a connection idle for `idle`), [`TcpHandler`] answers them.
async fn tcp_accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    slots: Arc<TcpSlots>,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use futures_util::StreamExt;
    use hickory_server::net::runtime::iocompat::AsyncIoTokioAsStd;
    use hickory_server::net::runtime::TokioTime;
    use hickory_server::net::tcp::TcpStream;
    use hickory_server::net::xfer::Protocol;
    use hickory_server::server::{ResponseHandle, TimeoutStream};

    let handler = Arc::new(TcpHandler {
        shared: shared.clone(),
    });
    let mut connections = tokio::task::JoinSet::new();
    let mut refused_since_log = 0u64;
    let mut last_log = Instant::now();
    loop {
        let (tcp, src) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait, do not spin.
                    tracing::warn!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        while connections.try_join_next().is_some() {}
        // TCP sources are not forged: the cluster's clients count as allowed here.
        let allowed = shared.class(src.ip()) != Client::Stranger;
        let slot = match slots.admit(src.ip(), allowed) {
            Ok(slot) => slot,
            Err(reason) => {
                drop(tcp);
                shared.answerer.metrics.record_tcp_refused();
                refused_since_log += 1;
                if last_log.elapsed() > Duration::from_secs(10) {
                    tracing::warn!(client = %src, %reason, refused = refused_since_log, open = slots.open(), "DNS TCP connections refused");
                    refused_since_log = 0;
                    last_log = Instant::now();
                }
                continue;
            }
        };
        let handler = handler.clone();
        let mut stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let (stream, responses) =
                TcpStream::from_stream_with_buffer_size(AsyncIoTokioAsStd(tcp), src, 32);
            let mut stream = TimeoutStream::new(stream, idle);
            loop {
                let message = tokio::select! {
                    m = stream.next() => m,
                    _ = stop.changed() => None,
                };
                let Some(Ok(message)) = message else { break };
                let (bytes, src) = message.into_parts();
                let response = ResponseHandle::new(src, responses.clone(), Protocol::Tcp);
                match Request::from_bytes(bytes.clone(), src, Protocol::Tcp) {
                    Ok(request) => {
                        handler
                            .handle_request::<_, TokioTime>(&request, response)
                            .await;
                    }
                    Err(_) => {
                        handler.shared.answerer.metrics.record_malformed();
                        if let Some(formerr) = formerr_for(&bytes) {
                            let mut responses = responses.clone();
                            let _ = hickory_server::net::DnsStreamHandle::send(
                                &mut responses,
                                hickory_server::proto::op::SerialMessage::new(formerr, src),
                            );
                        }
                    }
                }
            }
        });
    }
    connections.abort_all();
}

/// Answers TCP requests (hickory-server's request handler).
pub struct TcpHandler {
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let answerer = &self.shared.answerer;
        let failed = |code: ResponseCode| {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = code;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        let message = match Message::from_vec(request.as_slice()) {
            Ok(m) => m,
            Err(_) => {
                answerer.metrics.record_malformed();
                let builder = MessageResponseBuilder::new(&request.queries, None);
                let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return response_handle
                    .send_response(response)
                    .await
                    .unwrap_or_else(|_| failed(ResponseCode::FormErr));
            }
        };
        let response = match check_request(&message) {
            Err(response) => *response,
            Ok(query) => {
                let src = canonical_ip(request.src().ip());
                let mut published = answerer.published.load_full();
                // A held TCP query takes a slot like a UDP one; with none free it is answered
                // at once.
                if published.local.identify(src) == Asker::Unknown && answerer.holds.may_hold(src) {
                    if let Some(_slot) = answerer.holds.slot() {
                        answerer.wait_for_asker(src).await;
                        published = answerer.published.load_full();
                    }
                }
                let asker = published.local.identify(src);
                let vantage = answerer.zone.vantage(src, asker, &published);
                let decided = answerer.zone.decide(
                    &message,
                    query,
                    src,
                    &published,
                    asker,
                    vantage,
                    &answerer.acl,
                );
                match decided.decision {
                    Decision::Respond(mut response) => {
                        let turn = answerer.zone.next_turn();
                        rotate_records(&mut response.answers, &decided.rotation, turn);
                        response
                    }
                    Decision::Forward => {
                        // Counted with the UDP forwards: one cap for both.
                        let permit = self.shared.forwards.clone().try_acquire_owned();
                        let bytes = match permit {
                            Ok(_permit) => {
                                forward_or_servfail(answerer, request.as_slice(), true).await
                            }
                            Err(_) => None,
                        };
                        match bytes.map(|b| Message::from_vec(&b)) {
                            Some(Ok(m)) => m,
                            _ => reply_to(&message, ResponseCode::ServFail),
                        }
                    }
                }
            }
        };
        answerer.metrics.record(&response);
        let edns = response.edns.clone();
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let sent = builder.build(
            response.metadata,
            response.answers.iter(),
            response.authorities.iter(),
            iter::empty(),
            response.additionals.iter(),
        );
        let info = response_handle
            .send_response(sent)
            .await
            .unwrap_or_else(|_| failed(ResponseCode::ServFail));
        answerer.metrics.observe_latency(started.elapsed());
        info
    }
}
