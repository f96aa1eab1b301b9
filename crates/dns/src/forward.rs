//! Forwarding of names outside the cluster domain to upstream resolvers, and finding those
//! upstreams in the host's resolv.conf (following systemd-resolved's real file).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::Error;

/// The stub resolv.conf of systemd-resolved names this address; the real upstreams are in
/// [`RESOLVED_REAL`].
const RESOLVED_STUB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53));
const RESOLVED_REAL: &str = "/run/systemd/resolve/resolv.conf";

/// An upstream that failed is tried after the others for this long (then it gets its turn
/// again): a dead first upstream costs one timeout, not one per lookup.
const FAILED_BACKOFF: Duration = Duration::from_secs(30);

/// Upstream resolvers, tried in order; those that failed lately go last.
#[derive(Clone, Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    /// Until when each upstream (by index) goes last.
    failed_until: Arc<Mutex<Vec<Option<Instant>>>>,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        let failed_until = Arc::new(Mutex::new(vec![None; upstreams.len()]));
        Forwarder {
            upstreams,
            timeout,
            failed_until,
        }
    }

    /// The upstreams in the order to try them now: those in good standing as configured, then
    /// those that failed lately (the one whose failure is oldest first).
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let failed = self
            .failed_until
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default();
        let until = |i: usize| failed.get(i).copied().flatten().filter(|t| *t > now);
        let mut order: Vec<usize> = (0..self.upstreams.len()).collect();
        order.sort_by_key(|&i| (until(i).is_some(), until(i), i));
        order
    }

    fn mark(&self, index: usize, ok: bool) {
        if let Ok(mut failed) = self.failed_until.lock() {
            if let Some(slot) = failed.get_mut(index) {
                *slot = (!ok).then(|| Instant::now() + FAILED_BACKOFF);
            }
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Sends `query` (wire bytes) to each upstream in turn (see [`Forwarder::order`]) until
    /// one answers: over TCP when `tcp` (the client asked over TCP), else over UDP, and again
    /// over TCP when the UDP answer came back truncated (the client gets as much of it as fits
    /// its own limit). Returns the upstream's response with the client's id.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, Error> {
        let mut last = Error::NoUpstream;
        for index in self.order() {
            let upstream = self.upstreams[index];
            let attempt = if tcp {
                self.over_tcp(upstream, query).await
            } else {
                match self.over_udp(upstream, query).await {
                    Ok(response) if truncated(&response) => {
                        self.over_tcp(upstream, query).await.or(Ok(response))
                    }
                    other => other,
                }
            };
            match attempt {
                Ok(response) => {
                    self.mark(index, true);
                    return Ok(response);
                }
                Err(e) => {
                    tracing::debug!(%upstream, error = %e, "upstream failed; it goes last for a while");
                    self.mark(index, false);
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn over_udp(&self, upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, Error> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().map_err(|_| Error::NoUpstream)?
        } else {
            "[::]:0".parse().map_err(|_| Error::NoUpstream)?
        };
        let io = |e: std::io::Error| Error::Upstream(upstream, e.to_string());
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(upstream).await.map_err(io)?;
        socket.send(query).await.map_err(io)?;
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
                .await
                .map_err(|_| Error::Upstream(upstream, "timed out".into()))?
                .map_err(io)?;
            // A connected socket only hears from the upstream's address, which anyone on the
            // path can forge: only a response to this very question counts; the rest is
            // dropped and the wait goes on.
            if answers(query, &buf[..n]) {
                buf.truncate(n);
                buf.shrink_to_fit();
                return Ok(buf);
            }
            tracing::debug!(%upstream, bytes = n, "dropped a datagram that does not answer the query");
        }
    }

    async fn over_tcp(&self, upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, Error> {
        let io = |e: std::io::Error| Error::Upstream(upstream, e.to_string());
        let exchange = async {
            let mut stream = TcpStream::connect(upstream).await.map_err(io)?;
            let len = u16::try_from(query.len())
                .map_err(|_| Error::Upstream(upstream, "query too long".into()))?;
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(query);
            stream.write_all(&framed).await.map_err(io)?;
            let len = stream.read_u16().await.map_err(io)?;
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.map_err(io)?;
            if !answers(query, &buf) {
                return Err(Error::Upstream(
                    upstream,
                    "its answer does not match the query".into(),
                ));
            }
            Ok(buf)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Error::Upstream(upstream, "timed out".into()))?
    }
}

/// Whether `response` answers `query`: the same id and opcode, QR set, and the one question
/// the query asked (the name compared without regard to ASCII case, type and class exactly).
fn answers(query: &[u8], response: &[u8]) -> bool {
    if response.len() < 12 || query.len() < 12 || response[..2] != query[..2] {
        return false;
    }
    let (qr, opcode) = (response[2] & 0x80 != 0, response[2] & 0x78);
    if !qr || opcode != query[2] & 0x78 || response[4..6] != [0, 1] || query[4..6] != [0, 1] {
        return false;
    }
    match (question(query), question(response)) {
        (Some(asked), Some(answered)) => {
            asked.len() == answered.len()
                && asked.iter().zip(answered).enumerate().all(|(i, (a, b))| {
                    // Type and class (the last four bytes) exactly; the name's bytes without
                    // regard to case (its length bytes are under 64, never letters).
                    if i + 4 >= asked.len() {
                        a == b
                    } else {
                        a.eq_ignore_ascii_case(b)
                    }
                })
        }
        _ => false,
    }
}

/// The first question of a message as bytes: its name (uncompressed labels), type and class.
fn question(message: &[u8]) -> Option<&[u8]> {
    let mut at = 12;
    loop {
        let len = usize::from(*message.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        // A compression pointer (or a reserved label type) has no place in a question.
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
    }
    message.get(12..at + 4)
}

/// Whether a response has TC set.
fn truncated(response: &[u8]) -> bool {
    response.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

/// Reads the upstream resolvers from a resolv.conf. When it points at systemd-resolved's stub
/// (127.0.0.53), the real upstreams are read from systemd-resolved's own file instead.
/// Loopback resolvers other than the stub are kept: a local unbound or dnsmasq is a fine upstream.
pub fn upstreams_from_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, Error> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
    };
    let servers = parse_nameservers(&read(path)?);
    if servers.contains(&RESOLVED_STUB) {
        let real = Path::new(RESOLVED_REAL);
        if real.exists() {
            let servers = parse_nameservers(&read(real)?);
            return to_sockets(servers, RESOLVED_REAL);
        }
    }
    to_sockets(servers, &path.display().to_string())
}

fn to_sockets(servers: Vec<IpAddr>, from: &str) -> Result<Vec<SocketAddr>, Error> {
    let servers: Vec<SocketAddr> = servers
        .into_iter()
        .filter(|ip| *ip != RESOLVED_STUB)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if servers.is_empty() {
        return Err(Error::Config(format!(
            "{from} lists no usable nameserver; set `upstreams` in the config or --upstream"
        )));
    }
    Ok(servers)
}

/// The `nameserver` lines of a resolv.conf, in order; IPv6 zone suffixes are dropped.
pub fn parse_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => {
                    addr.split('%').next().and_then(|a| a.parse().ok())
                }
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply to `query`: its header with QR set, and `flags` (TC, say) or'ed in.
    fn reply(query: &[u8], extra: &[u8], flags: u8) -> Vec<u8> {
        let mut r = query.to_vec();
        r[2] |= 0x80 | flags;
        r.extend_from_slice(extra);
        r
    }

    /// `example.test. A IN`, id 0xabcd, RD.
    const QUERY: [u8; 30] = [
        0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e',
        4, b't', b'e', b's', b't', 0, 0, 1, 0, 1,
    ];

    #[test]
    fn only_a_response_to_the_very_question_answers_it() {
        let good = reply(&QUERY, b"", 0);
        assert!(answers(&QUERY, &good));
        // 0x20 case: the name compares without regard to case.
        let mut cased = good.clone();
        cased[13] = b'E';
        assert!(answers(&QUERY, &cased));
        let bad = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut r = good.clone();
            change(&mut r);
            !answers(&QUERY, &r)
        };
        assert!(bad(&|r| r[2] &= 0x7f), "the query echoed back (QR clear)");
        assert!(bad(&|r| r[1] ^= 1), "another id");
        assert!(bad(&|r| r[2] ^= 0x08), "another opcode");
        assert!(bad(&|r| r[14] = b'y'), "another name");
        assert!(bad(&|r| r[27] = 28), "another type (AAAA)");
        assert!(bad(&|r| r[29] = 3), "another class");
        assert!(bad(&|r| r[5] = 0), "no question");
        assert!(bad(&|r| r[12] = 0xc0), "a compression pointer");
        assert!(bad(&|r| r.truncate(20)), "cut short");
    }

    #[tokio::test]
    async fn forged_datagrams_are_dropped_and_the_real_answer_taken() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = upstream.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
                let q = &buf[..n];
                // The query echoed, an answer to another name, then the real one.
                let _ = upstream.send_to(q, from).await;
                let mut other = reply(q, b"forged", 0);
                other[14] = b'y';
                let _ = upstream.send_to(&other, from).await;
                let _ = upstream.send_to(&reply(q, b"real", 0), from).await;
            }
        });
        let f = Forwarder::new(vec![addr], Duration::from_secs(1));
        let r = f.forward(&QUERY, false).await.expect("answered");
        assert!(r.ends_with(b"real"), "{r:?}");
    }

    #[tokio::test]
    async fn a_tcp_answer_to_another_question_is_an_error() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = tcp.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let len = stream.read_u16().await.expect("len");
                let mut q = vec![0u8; usize::from(len)];
                stream.read_exact(&mut q).await.expect("query");
                let mut r = reply(&q, b"", 0);
                r[14] = b'y';
                let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&r);
                stream.write_all(&framed).await.expect("write");
            }
        });
        let f = Forwarder::new(vec![addr], Duration::from_secs(1));
        let e = f.forward(&QUERY, true).await.expect_err("refused");
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_upstream_costs_one_timeout_then_goes_last() {
        // The first upstream never answers; the second does.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        silent
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let good = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let good_addr = good.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = good.recv_from(&mut buf).await {
                let _ = good.send_to(&reply(&buf[..n], b"ok", 0), from).await;
            }
        });
        let f = Forwarder::new(
            vec![silent.local_addr().expect("addr"), good_addr],
            Duration::from_millis(300),
        );
        for _ in 0..5 {
            let r = f.forward(&QUERY, false).await.expect("answered");
            assert!(r.ends_with(b"ok"));
        }
        let mut heard = 0;
        let mut buf = [0u8; 512];
        while silent.recv_from(&mut buf).is_ok() {
            heard += 1;
        }
        assert_eq!(
            heard, 1,
            "the silent upstream was asked once, then went last"
        );
        assert_eq!(f.order(), vec![1, 0]);
    }

    #[tokio::test]
    async fn a_truncated_udp_answer_is_asked_again_over_tcp() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = udp.local_addr().expect("addr");
        let tcp = tokio::net::TcpListener::bind(addr).await.expect("bind tcp");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&reply(&buf[..n], b"", 0x02), from).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let len = stream.read_u16().await.expect("len");
                let mut q = vec![0u8; usize::from(len)];
                stream.read_exact(&mut q).await.expect("query");
                let r = reply(&q, b"the whole answer", 0);
                let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&r);
                stream.write_all(&framed).await.expect("write");
            }
        });
        let f = Forwarder::new(vec![addr], Duration::from_secs(1));
        let r = f.forward(&QUERY, false).await.expect("answered");
        assert!(r.ends_with(b"the whole answer"), "{r:?}");
        assert!(!truncated(&r));
    }
}
