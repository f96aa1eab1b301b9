//! Limits that keep a node serving its own clients when strangers flood it:
//! - UDP response-rate limiting (RRL), in the style of Knot and BIND: per client prefix (/24,
//!   /56), a token bucket of responses per second; over the rate, every `slip`-th response goes
//!   out truncated (TC=1: a real client retries over TCP, a spoofed victim gets a small packet)
//!   and the others are dropped. This host's own clients are never limited; the rest of the
//!   cluster has a rate of its own, higher than strangers';
//! - DNS over TCP: a cap on connections, a lower one for strangers (outside the cluster), a
//!   per-client cap, and an idle timeout.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits' settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// UDP responses per second to one client prefix outside the cluster (0: no limit).
    pub rrl_rate: u32,
    /// ... to one client prefix elsewhere in the cluster (another host's containers or
    /// address; 0: no limit). This host's own clients are never limited.
    pub rrl_cluster_rate: u32,
    /// Of the responses over the rate, every `rrl_slip`-th goes out truncated; the others are
    /// dropped (0: all dropped).
    pub rrl_slip: u32,
    /// TCP connections at once, over all clients.
    pub tcp_connections: usize,
    /// TCP connections at once from one client address.
    pub tcp_per_client: usize,
    /// A TCP connection that sends no query for this long is closed.
    pub tcp_idle: Duration,
    /// UDP sockets (one thread each) per listen address, sharing its port (`SO_REUSEPORT`).
    pub udp_threads: usize,
}

/// The default of [`Limits::udp_threads`]: one per core, at most 4 (one thread answers well
/// over 100,000 queries a second from its cache; more only spread a flood).
pub fn default_udp_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rrl_rate: 20,
            rrl_cluster_rate: 200,
            rrl_slip: 2,
            tcp_connections: 1024,
            tcp_per_client: 16,
            tcp_idle: Duration::from_secs(10),
            udp_threads: default_udp_threads(),
        }
    }
}

/// Client prefixes tracked at once; past it, new prefixes outside the allowed set are limited
/// until old entries expire (a flood from many prefixes gets no more than one from few).
const MAX_PREFIXES: usize = 100_000;

/// What to do with one response to a limited client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Send it truncated: header and question only, TC=1.
    Slip,
    Drop,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    over: u32,
}

/// The response-rate limiter of one DNS server.
#[derive(Debug)]
pub struct Rrl {
    rate: u32,
    slip: u32,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    by_prefix: HashMap<IpAddr, Bucket>,
    /// When the full table was last swept for quiet prefixes (at most once a second: a
    /// flood from many prefixes must not make every packet scan it).
    swept: Option<Instant>,
}

impl Rrl {
    pub fn new(limits: &Limits) -> Rrl {
        Rrl {
            rate: limits.rrl_rate,
            slip: limits.rrl_slip,
            buckets: Mutex::new(Buckets {
                by_prefix: HashMap::new(),
                swept: None,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate > 0
    }

    /// The verdict on one more response to `client` (one outside the allowed set) at `now`.
    pub fn check(&self, client: IpAddr, now: Instant) -> Verdict {
        if self.rate == 0 {
            return Verdict::Send;
        }
        let rate = f64::from(self.rate);
        let Ok(mut guard) = self.buckets.lock() else {
            return Verdict::Drop;
        };
        let table = &mut *guard;
        let key = prefix(client);
        if !table.by_prefix.contains_key(&key) && table.by_prefix.len() >= MAX_PREFIXES {
            // Forget the prefixes quiet for a second (their buckets are full again anyway),
            // once a second at most; meanwhile new prefixes are limited.
            if table
                .swept
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                table.swept = Some(now);
                table
                    .by_prefix
                    .retain(|_, b| now.duration_since(b.last) < Duration::from_secs(1));
            }
            if table.by_prefix.len() >= MAX_PREFIXES {
                return self.over(&mut Bucket {
                    tokens: 0.0,
                    last: now,
                    over: 0,
                });
            }
        }
        let bucket = table.by_prefix.entry(key).or_insert(Bucket {
            tokens: rate,
            last: now,
            over: 0,
        });
        let elapsed = now.duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.over = 0;
            return Verdict::Send;
        }
        self.over(bucket)
    }

    fn over(&self, bucket: &mut Bucket) -> Verdict {
        bucket.over = bucket.over.wrapping_add(1);
        if self.slip > 0 && bucket.over % self.slip == 0 {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// The prefix a client is limited by: its /24 (IPv4) or /56 (IPv6).
fn prefix(ip: IpAddr) -> IpAddr {
    match linkdns_registry::canonical_ip(ip) {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) & 0xffff_ff00).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !((1u128 << 72) - 1)).into()),
    }
}

/// A response cut to its header and question, with TC set: what a slipped response is. `None`
/// if the response is not one question long.
pub fn truncated(response: &[u8]) -> Option<Vec<u8>> {
    if response.len() < 12 || response[4..6] != [0, 1] {
        return None;
    }
    let end = crate::server::skip_name(response, 12)? + 4;
    let mut out = response.get(..end)?.to_vec();
    out[2] |= 0x02;
    out[6..12].fill(0);
    Some(out)
}

/// Counts TCP connections, over all and per client.
#[derive(Debug)]
pub struct TcpSlots {
    limits: Limits,
    total: AtomicUsize,
    /// Of them, from clients outside the allowed set.
    strangers: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted TCP connection; its slot is freed when dropped.
#[derive(Debug)]
pub struct TcpSlot {
    slots: Arc<TcpSlots>,
    client: IpAddr,
    stranger: bool,
}

impl TcpSlots {
    pub fn new(limits: Limits) -> Arc<TcpSlots> {
        Arc::new(TcpSlots {
            limits,
            total: AtomicUsize::new(0),
            strangers: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `client`, or why there is none. Clients outside the
    /// allowed set get at most half the connections, so the allowed ones always find some.
    pub fn admit(self: &Arc<Self>, client: IpAddr, allowed: bool) -> Result<TcpSlot, &'static str> {
        let client = linkdns_registry::canonical_ip(client);
        let mut per_client = self
            .per_client
            .lock()
            .map_err(|_| "connection table unavailable")?;
        let mine = per_client.get(&client).copied().unwrap_or(0);
        if mine >= self.limits.tcp_per_client {
            return Err("too many connections from this client");
        }
        // Counted under the lock: admissions are serialized.
        if self.total.load(Ordering::Relaxed) >= self.limits.tcp_connections {
            return Err("too many connections");
        }
        if !allowed && self.strangers.load(Ordering::Relaxed) >= self.limits.tcp_connections / 2 {
            return Err("too many connections from clients outside the allowed set");
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        if !allowed {
            self.strangers.fetch_add(1, Ordering::Relaxed);
        }
        per_client.insert(client, mine + 1);
        Ok(TcpSlot {
            slots: self.clone(),
            client,
            stranger: !allowed,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.slots.total.fetch_sub(1, Ordering::Relaxed);
        if self.stranger {
            self.slots.strangers.fetch_sub(1, Ordering::Relaxed);
        }
        if let Ok(mut per_client) = self.slots.per_client.lock() {
            if let Some(n) = per_client.get_mut(&self.client) {
                *n -= 1;
                if *n == 0 {
                    per_client.remove(&self.client);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_gets_its_rate_then_every_slip_th_response_truncated() {
        let rrl = Rrl::new(&Limits {
            rrl_rate: 10,
            rrl_slip: 2,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.7".parse().expect("ip");
        let neighbour: IpAddr = "192.0.2.200".parse().expect("ip");
        let elsewhere: IpAddr = "198.51.100.1".parse().expect("ip");
        let verdicts: Vec<Verdict> = (0..20).map(|_| rrl.check(a, t0)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Send));
        assert_eq!(
            &verdicts[10..14],
            &[Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]
        );
        // The same /24 shares the bucket; another prefix has its own.
        assert_ne!(rrl.check(neighbour, t0), Verdict::Send);
        assert_eq!(rrl.check(elsewhere, t0), Verdict::Send);
        // A second later the bucket is full again.
        let later = t0 + Duration::from_secs(1);
        assert!((0..10).all(|_| rrl.check(a, later) == Verdict::Send));
        let off = Rrl::new(&Limits {
            rrl_rate: 0,
            ..Limits::default()
        });
        assert!((0..1000).all(|_| off.check(a, t0) == Verdict::Send));
    }

    #[test]
    fn slots_cap_clients_and_strangers_and_free_on_drop() {
        let slots = TcpSlots::new(Limits {
            tcp_connections: 4,
            tcp_per_client: 2,
            ..Limits::default()
        });
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let c: IpAddr = "127.0.0.1".parse().expect("ip");
        let a1 = slots.admit(a, false).expect("a1");
        let _a2 = slots.admit(a, false).expect("a2");
        assert!(slots.admit(a, false).is_err(), "per client");
        assert!(slots.admit(b, false).is_err(), "strangers get half");
        let c1 = slots.admit(c, true).expect("allowed");
        let _c2 = slots.admit(c, true).expect("allowed");
        assert!(slots.admit(c, true).is_err(), "per client, allowed too");
        drop(a1);
        assert_eq!(slots.open(), 3);
        let _b1 = slots.admit(b, false).expect("a stranger's freed slot");
        assert!(slots.admit(b, true).is_err(), "the whole cap");
        drop(c1);
        let _d = slots
            .admit("192.0.2.9".parse().expect("ip"), true)
            .expect("allowed");
    }

    #[test]
    fn a_slipped_response_is_its_header_and_question_with_tc() {
        // id 0x1234, QR RD RA, 1 question, 1 answer: a.cluster A -> 10.0.0.1
        let mut response = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        let question = [
            1, b'a', 7, b'c', b'l', b'u', b's', b't', b'e', b'r', 0, 0, 1, 0, 1,
        ];
        response.extend_from_slice(&question);
        response.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, 1]);
        let slipped = truncated(&response).expect("one question");
        let mut expected = vec![0x12, 0x34, 0x83, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&question);
        assert_eq!(slipped, expected);
        assert_eq!(truncated(&response[..20]), None);
    }
}
