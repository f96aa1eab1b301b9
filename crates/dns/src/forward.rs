//! Forwarding of names outside the cluster domain to upstream resolvers, and finding those
//! upstreams in the host's resolv.conf (following systemd-resolved's real file).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::Error;

/// The stub resolv.conf of systemd-resolved names this address; the real upstreams are in
/// [`RESOLVED_REAL`].
const RESOLVED_STUB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53));
const RESOLVED_REAL: &str = "/run/systemd/resolve/resolv.conf";

/// Upstream resolvers, tried in order.
#[derive(Clone, Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        Forwarder { upstreams, timeout }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Sends `query` (wire bytes) to each upstream in turn until one answers; over TCP when
    /// `tcp` (the client asked over TCP) or when the UDP answer came back truncated to a TCP
    /// client. Returns the upstream's response with the client's id.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, Error> {
        let mut last = Error::NoUpstream;
        for upstream in &self.upstreams {
            let attempt = if tcp {
                self.over_tcp(*upstream, query).await
            } else {
                self.over_udp(*upstream, query).await
            };
            match attempt {
                Ok(response) => return Ok(response),
                Err(e) => {
                    tracing::debug!(%upstream, error = %e, "upstream failed");
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
            // A connected socket only hears from the upstream; the id must match ours.
            if n >= 12 && buf.get(..2) == query.get(..2) {
                buf.truncate(n);
                buf.shrink_to_fit();
                return Ok(buf);
            }
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
            Ok(buf)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Error::Upstream(upstream, "timed out".into()))?
    }
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
