//! Floods from a stranger (the root namespace, which is no container, host or allowed client
//! of the node) against one host's DNS: its UDP answers are rate-limited and its TCP
//! connections capped, while the host itself (loopback) and its containers are served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::expect_answer;
use crate::testbed::Host;

/// A query for `name` A with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A host serving DNS on its own address too (where the root namespace reaches it), with one
/// container `svc`; returns the host, `svc`'s address and the DNS address.
fn host_with_svc(extra: &[&str]) -> (Host, String, SocketAddr) {
    let mut h = Host::new();
    let listen = format!("{}:53", h.addr);
    let mut args = vec!["--dns-listen", "127.0.0.1:53", "--dns-listen", &listen];
    args.extend_from_slice(extra);
    h.start_linkdns(&args);
    h.run_container("svc", &[]);
    let svc = h.container_ip("svc");
    expect_answer(&h, "svc.cluster", "A", &[&svc]);
    let target = SocketAddr::new(h.addr.into(), 53);
    (h, svc, target)
}

/// 100 queries with `dig -f` from inside the host (loopback): how many got an answer.
fn answered_on_loopback(h: &Host, tcp: bool) -> usize {
    let batch = h.dir.join("batch.txt");
    std::fs::write(&batch, "svc.cluster A\n".repeat(100)).expect("batch file");
    let mut args = vec!["@127.0.0.1", "+time=2", "+tries=1", "+short", "-f"];
    let path = batch.to_string_lossy().into_owned();
    args.push(&path);
    if tcp {
        args.push("+tcp");
    }
    let out = h.exec("dig", &args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
        .count()
}

/// Runs `script` in a new busybox container of `h` that asks the node (at the host's address)
/// for names; returns its output.
fn in_container(h: &Host, script: &str) -> String {
    let dns = h.addr.to_string();
    h.docker(&[
        "run",
        "--rm",
        "--dns",
        &dns,
        crate::testbed::IMAGE,
        "sh",
        "-c",
        script,
    ])
}

#[test]
fn a_strangers_udp_flood_is_rate_limited_and_containers_and_the_host_are_not() {
    let (h, svc, target) = host_with_svc(&[]);
    // 1,000 queries from the stranger in about a second; answers counted as they come.
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let receiver = socket.try_clone().expect("clone");
    let counting = std::thread::spawn(move || {
        let (mut full, mut truncated) = (0usize, 0usize);
        let mut buf = [0u8; 1500];
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(2) {
            let Ok(n) = receiver.recv(&mut buf) else {
                continue;
            };
            quiet_since = Instant::now();
            let ancount = u16::from_be_bytes([buf[6], buf[7]]);
            if n >= 12 && buf[2] & 0x02 != 0 && ancount == 0 {
                truncated += 1;
            } else if ancount > 0 {
                full += 1;
            }
        }
        (full, truncated)
    });
    let started = Instant::now();
    for i in 0..1000u16 {
        socket
            .send_to(&query(i, "svc.cluster"), target)
            .expect("send");
        std::thread::sleep(Duration::from_millis(1));
    }
    let flood_secs = started.elapsed().as_secs_f64();
    // Meanwhile and right after: the host itself and a container are answered every time.
    let on_loopback = answered_on_loopback(&h, false);
    let from_container = in_container(
        &h,
        "for i in 1 2 3 4 5 6 7 8 9 10; do nslookup svc.cluster >/dev/null && echo ok; done",
    );
    let (full, truncated) = counting.join().expect("counter");
    // 20 per second, with a burst of 20: the flood lasted `flood_secs`.
    let allowed = 20.0 + 20.0 * (flood_secs + 0.5);
    assert!(
        full >= 10 && (full as f64) <= allowed,
        "{full} full answers in {flood_secs:.2} s (at most {allowed:.0})"
    );
    // Slip 2: half of the rest goes out truncated, so a real client could retry over TCP.
    let rest = 1000 - full;
    assert!(
        truncated >= rest * 2 / 5 && truncated <= rest * 3 / 5 + 1,
        "{truncated} truncated of {rest} limited"
    );
    assert_eq!(on_loopback, 100, "the host's own queries are never limited");
    assert_eq!(from_container.matches("ok").count(), 10, "{from_container}");
    expect_answer(&h, "svc.cluster", "A", &[&svc]);
}

/// Whether the server still holds `c` open: a read waits instead of ending.
fn still_open(mut c: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    c.set_read_timeout(Some(Duration::from_millis(2)))
        .expect("timeout");
    matches!(c.read(&mut buf), Err(ref e)
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

#[test]
fn five_thousand_idle_tcp_connections_leave_the_host_and_containers_served() {
    let (h, svc, target) = host_with_svc(&[]);
    // 5,000 connections from the stranger that never send a query.
    let mut idle = Vec::with_capacity(5000);
    for _ in 0..5000 {
        if let Ok(c) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            idle.push(c);
        }
    }
    assert!(idle.len() >= 4900, "{} connected", idle.len());
    // Over UDP and TCP, the host's own queries are all answered, and a container's.
    assert_eq!(answered_on_loopback(&h, false), 100);
    assert_eq!(answered_on_loopback(&h, true), 100);
    let from_container = in_container(&h, "nslookup svc.cluster");
    assert!(from_container.contains(&svc), "{from_container}");
    // The node kept at most 16 of them (its per-client cap) and closed the rest at once; the
    // ones it kept it closes once idle (10 s).
    let open = idle.iter().filter(|c| still_open(c)).count();
    assert!(open <= 16, "{open} idle connections still open");
    std::thread::sleep(Duration::from_secs(11));
    for c in &mut idle {
        assert!(
            !still_open(c),
            "an idle connection outlived the idle timeout"
        );
    }
    // A stranger with a query is still answered over TCP once it has a slot.
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    let mut c = TcpStream::connect(target).expect("connect");
    let q = query(7, "svc.cluster");
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    c.write_all(&framed).expect("write");
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut len = [0u8; 2];
    c.read_exact(&mut len).expect("an answer");
    assert!(u16::from_be_bytes(len) > 12);
}

/// `dig -f` from `from`'s namespace to `server`: 100 queries for `name`, each tried once with a
/// one-second wait, truncated answers not retried over TCP; how many were answered.
fn answered_from(from: &Host, server: &str, name: &str) -> usize {
    let batch = from.dir.join("batch-remote.txt");
    std::fs::write(&batch, format!("{name} A\n").repeat(100)).expect("batch file");
    let path = batch.to_string_lossy().into_owned();
    let at = format!("@{server}");
    let out = from.exec(
        "dig",
        &[&at, "+time=1", "+tries=1", "+ignore", "+short", "-f", &path],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
        .count()
}

/// Another host of the cluster (its address is what a LAN machine forges most easily) asking
/// this node directly: the cluster's names at the cluster rate, and no recursion; this host's
/// own clients are neither limited nor refused.
#[test]
fn the_rest_of_the_cluster_is_limited_at_its_rate_and_gets_no_recursion() {
    let mut hosts: Vec<Host> = (0..2).map(|_| Host::on_lan()).collect();
    let listen = format!("{}:53", hosts[0].addr);
    hosts[0].start_linkdns(&[
        "--dns-listen",
        "127.0.0.1:53",
        "--dns-listen",
        &listen,
        "--rrl-cluster-rate",
        "5",
    ]);
    let token = hosts[0].token();
    let (first, rest) = hosts.split_at_mut(1);
    rest[0].join_linkdns(&first[0], &token, &[]);
    let hosts = crate::cluster::form_joined(hosts);
    let (h1, h2) = (&hosts[0], &hosts[1]);
    h1.run_container("svc", &[]);
    let svc = h1.container_ip("svc");
    expect_answer(h1, "svc.cluster", "A", &[&svc]);
    let server = h1.addr.to_string();

    // 100 queries from h2's address, one after the other (a dropped one waits out dig's one
    // second): a burst of 5, then 5 a second answered.
    let started = Instant::now();
    let answered = answered_from(h2, &server, "svc.cluster");
    let secs = started.elapsed().as_secs_f64();
    let most = 5.0 + 5.0 * (secs + 1.0);
    assert!(
        (5..100).contains(&answered) && answered as f64 <= most,
        "{answered} of 100 answered to another host of the cluster in {secs:.1} s at 5/s (at most {most:.0})"
    );
    let metrics = crate::admin_get(h1, "/metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("linkdns_dns_rate_limited_total{verdict=\"dropped\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    // No recursion for it (its own node forwards its names); the host itself is forwarded to.
    let remote = h2.dig(&[&format!("@{server}"), "example.test", "A"]);
    assert_eq!(remote.status, "REFUSED", "{}", remote.raw);
    let local = h1.dig(&["@127.0.0.1", "example.test", "A"]);
    assert_ne!(local.status, "REFUSED", "{}", local.raw);
    // The host's own queries are never limited.
    assert_eq!(answered_on_loopback(h1, false), 100);
}
