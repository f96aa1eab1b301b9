//! DNS metrics in Prometheus form: queries by type and response code, answer latency.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub qtype: &'static str,
    pub rcode: &'static str,
}

/// Counters the DNS front end updates; cheap to clone (shared atomics).
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    /// Handles on `queries`' counters by (type, rcode) index, filled on first use: counting
    /// a query is an atomic add, not a lookup in the family's locked map.
    query_counters: Arc<[OnceLock<Counter>; QTYPES.len() * RCODES.len()]>,
    latency: Histogram,
    forwarded: Counter,
    malformed: Counter,
    /// How long queries from an address no local container was known to hold waited for the
    /// watcher to tell who it is.
    held: Histogram,
    held_expired: Counter,
    /// UDP responses to strangers and to the rest of the cluster held back by rate limiting, by
    /// verdict (dropped, or sent truncated).
    rate_limited: Family<LimitLabels, Counter>,
    /// TCP connections refused by the connection caps.
    tcp_refused: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub verdict: &'static str,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        let metrics = DnsMetrics {
            queries: Family::default(),
            query_counters: Arc::new(std::array::from_fn(|_| OnceLock::new())),
            // 10 µs .. ~1.3 s
            latency: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
            forwarded: Counter::default(),
            malformed: Counter::default(),
            // 0.1 ms .. ~1.6 s
            held: Histogram::new(exponential_buckets(0.000_1, 2.0, 15)),
            held_expired: Counter::default(),
            rate_limited: Family::default(),
            tcp_refused: Counter::default(),
        };
        // Both verdicts exposed from the start (at 0), so rates over them work at once.
        for verdict in ["dropped", "slipped"] {
            let _ = metrics.rate_limited.get_or_create(&LimitLabels { verdict });
        }
        metrics
    }
}

impl DnsMetrics {
    /// One UDP response limited: sent truncated (`slipped`) or dropped.
    pub fn record_rate_limited(&self, slipped: bool) {
        let verdict = if slipped { "slipped" } else { "dropped" };
        self.rate_limited
            .get_or_create(&LimitLabels { verdict })
            .inc();
    }

    /// One TCP connection refused by the caps.
    pub fn record_tcp_refused(&self) {
        self.tcp_refused.inc();
    }

    /// Adds the metrics to `registry` under `linkdns_dns_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "linkdns_dns_rate_limited",
            "UDP responses to strangers and to the rest of the cluster held back by rate limiting",
            self.rate_limited.clone(),
        );
        registry.register(
            "linkdns_dns_tcp_refused",
            "DNS TCP connections refused by the connection caps",
            self.tcp_refused.clone(),
        );
        registry.register(
            "linkdns_dns_queries",
            "DNS queries answered, by query type and response code",
            self.queries.clone(),
        );
        registry.register(
            "linkdns_dns_answer_seconds",
            "Time from receiving a query to sending its answer",
            self.latency.clone(),
        );
        registry.register(
            "linkdns_dns_forwarded",
            "Queries forwarded to upstream resolvers",
            self.forwarded.clone(),
        );
        registry.register(
            "linkdns_dns_malformed",
            "Packets that did not parse as DNS queries",
            self.malformed.clone(),
        );
        registry.register(
            "linkdns_dns_held_seconds",
            "Time queries from a not yet known local container address waited for the Docker watcher",
            self.held.clone(),
        );
        registry.register(
            "linkdns_dns_held_expired",
            "Held queries whose asker was still unknown when the wait ran out",
            self.held_expired.clone(),
        );
    }

    pub(crate) fn record(&self, response: &Message) {
        let qtype = response
            .queries
            .first()
            .map_or(RecordType::Unknown(0), |q| q.query_type());
        self.count(qtype, response.metadata.response_code);
    }

    /// Counts a cached answer: its query type and the header byte that holds the rcode.
    pub(crate) fn record_cached(&self, qtype: u16, flags_low: u8) {
        let rcode = ResponseCode::from(0, flags_low & 0x0f);
        self.count(RecordType::from(qtype), rcode);
    }

    fn count(&self, qtype: RecordType, rcode: ResponseCode) {
        let (t, r) = (label_index(&QTYPES, qtype), label_index(&RCODES, rcode));
        self.query_counters[t * RCODES.len() + r]
            .get_or_init(|| {
                let labels = QueryLabels {
                    qtype: QTYPES[t].1,
                    rcode: RCODES[r].1,
                };
                self.queries.get_or_create(&labels).clone()
            })
            .inc();
    }

    pub(crate) fn observe_latency(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn record_forward(&self) {
        self.forwarded.inc();
    }

    pub(crate) fn observe_hold(&self, waited: Duration, expired: bool) {
        self.held.observe(waited.as_secs_f64());
        if expired {
            self.held_expired.inc();
        }
    }

    pub(crate) fn record_malformed(&self) {
        self.malformed.inc();
    }
}

/// The query types counted under their own label, in label order; any other is `other`.
const QTYPES: [(RecordType, &str); 11] = [
    (RecordType::A, "A"),
    (RecordType::AAAA, "AAAA"),
    (RecordType::PTR, "PTR"),
    (RecordType::SOA, "SOA"),
    (RecordType::NS, "NS"),
    (RecordType::SRV, "SRV"),
    (RecordType::TXT, "TXT"),
    (RecordType::MX, "MX"),
    (RecordType::CNAME, "CNAME"),
    (RecordType::ANY, "ANY"),
    (RecordType::Unknown(0), "other"),
];

/// The response codes counted under their own label; any other is `other`.
const RCODES: [(ResponseCode, &str); 7] = [
    (ResponseCode::NoError, "NOERROR"),
    (ResponseCode::NXDomain, "NXDOMAIN"),
    (ResponseCode::ServFail, "SERVFAIL"),
    (ResponseCode::Refused, "REFUSED"),
    (ResponseCode::FormErr, "FORMERR"),
    (ResponseCode::NotImp, "NOTIMP"),
    (ResponseCode::Unknown(0), "other"),
];

/// The index of `value` in one of those tables; the last entry (`other`) for any value
/// the table does not name.
fn label_index<T: PartialEq>(table: &[(T, &str)], value: T) -> usize {
    let other = table.len() - 1;
    table[..other]
        .iter()
        .position(|(known, _)| *known == value)
        .unwrap_or(other)
}
