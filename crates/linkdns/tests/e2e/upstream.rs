//! A small upstream resolver the forwarding test starts (UDP and TCP): `example.test` has an
//! address, every other name is NXDOMAIN. It listens on the root namespace's end of a host's veth.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record};

pub const ANSWER: &str = "203.0.113.7";

pub struct Upstream {
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start(addr: SocketAddr) -> Upstream {
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let udp = UdpSocket::bind(addr).expect("upstream udp");
        udp.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let tcp = TcpListener::bind(addr).expect("upstream tcp");
        tcp.set_nonblocking(true).expect("nonblocking");
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    if let Some(reply) = answer(&buf[..n]) {
                        c.fetch_add(1, Ordering::Relaxed);
                        let _ = udp.send_to(&reply, from);
                    }
                }
            }
        });
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let mut len = [0u8; 2];
                        if stream.read_exact(&mut len).is_err() {
                            continue;
                        }
                        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if stream.read_exact(&mut msg).is_err() {
                            continue;
                        }
                        if let Some(reply) = answer(&msg) {
                            c.fetch_add(1, Ordering::Relaxed);
                            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&reply);
                            let _ = stream.write_all(&framed);
                        }
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        Upstream { addr, count, stop }
    }

    pub fn queries(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An upstream that hears queries and never answers (a resolver that died or is firewalled).
pub struct Silent {
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Silent {
    pub fn start(addr: SocketAddr) -> Silent {
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let udp = UdpSocket::bind(addr).expect("silent upstream udp");
        udp.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if udp.recv_from(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Silent { addr, count, stop }
    }

    pub fn queries(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let q = query.queries.first()?.clone();
    let mut reply = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    if q.name()
        .to_ascii()
        .trim_end_matches('.')
        .eq_ignore_ascii_case("example.test")
    {
        let ip: std::net::Ipv4Addr = ANSWER.parse().ok()?;
        reply.add_answer(Record::from_rdata(
            q.name().clone(),
            60,
            RData::A(ip.into()),
        ));
    } else {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply.to_vec().ok()
}
