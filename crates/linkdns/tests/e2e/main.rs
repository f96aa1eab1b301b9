//! End-to-end tests: the real `linkdns` binary in a network namespace with its own Docker
//! engine, asked by `dig` and by busybox `nslookup` inside containers.

mod answers;
mod cluster;
mod limits;
mod networks;
mod routes;
mod service;
mod upstream;
mod workloads;

use std::net::SocketAddr;
use std::time::Duration;

// The test bed is a crate of its own (the cluster benchmarks use it too).
pub(crate) use linkdns_testbed as testbed;
use testbed::{wait_until, Dig, Host};

pub(crate) const SETTLE: Duration = Duration::from_secs(10);

/// Waits until `dig` of `name` from inside `host` gives `want` (sorted rdata; empty = NXDOMAIN).
pub(crate) fn expect_answer(host: &Host, name: &str, qtype: &str, want: &[&str]) -> Dig {
    let mut last = Dig::default();
    let want_sorted = {
        let mut w: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        w.sort();
        w
    };
    let ok = (0..100).any(|_| {
        last = host.dig(&["@127.0.0.1", name, qtype]);
        let done = if want.is_empty() {
            last.status == "NXDOMAIN"
        } else {
            last.status == "NOERROR" && last.rdata() == want_sorted
        };
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(
        ok,
        "{name} {qtype}: wanted {want:?}, last answer:\n{}",
        last.raw
    );
    last
}

#[test]
fn names_follow_container_lifecycle() {
    let mut h = Host::new();
    h.run_container("web", &[]);
    h.start_linkdns(&[]);
    let ip = h.container_ip("web");
    let node = format!("h{}", h.index);

    let answer = expect_answer(&h, "web.cluster", "A", &[&ip]);
    assert!(answer.has_flag("aa"), "authoritative: {:?}", answer.flags);
    assert_eq!(
        answer.answers[0],
        format!("web.cluster. 5 IN A {ip}"),
        "default TTL is 5 s"
    );
    expect_answer(&h, &format!("web.{node}.cluster"), "A", &[&ip]);
    expect_answer(&h, "WEB.Cluster", "A", &[&ip]);

    // Stop: gone. Start again after another container took its address: the new address.
    h.docker(&["stop", "-t", "0", "web"]);
    expect_answer(&h, "web.cluster", "A", &[]);
    h.run_container("filler", &[]);
    h.docker(&["start", "web"]);
    let new_ip = h.container_ip("web");
    assert_ne!(new_ip, ip, "the test wants web to move");
    expect_answer(&h, "web.cluster", "A", &[&new_ip]);

    // Rename: the old name goes, the new one answers.
    h.docker(&["rename", "web", "shop"]);
    expect_answer(&h, "shop.cluster", "A", &[&new_ip]);
    expect_answer(&h, "web.cluster", "A", &[]);

    // docker restart keeps it answered.
    h.docker(&["restart", "-t", "0", "shop"]);
    let after_restart = h.container_ip("shop");
    expect_answer(&h, "shop.cluster", "A", &[&after_restart]);

    // Destroy.
    h.docker(&["rm", "-f", "shop"]);
    expect_answer(&h, "shop.cluster", "A", &[]);

    // Status and metrics tell the same story.
    let status = h.status_json();
    assert_eq!(status["node"], node.as_str());
    assert_eq!(status["leader"], node.as_str());
    assert_eq!(status["records"], 1, "only filler is left: {status}");
    assert!(status["term"].as_u64() >= Some(1));
    assert_eq!(status["commit_index"], status["applied_index"]);
    assert_eq!(status["members"][0]["role"], "voter");
    assert_eq!(status["members"][0]["alive"], true);
    assert_eq!(status["docker"]["connected"], true);
    let text = admin_get(&h, "/metrics");
    for needle in [
        "linkdns_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}",
        "linkdns_dns_queries_total{qtype=\"A\",rcode=\"NXDOMAIN\"}",
        "linkdns_dns_answer_seconds_bucket",
        "linkdns_records 1",
        "linkdns_raft_applied_index",
        "linkdns_docker_resyncs_total 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}

/// Waits until `dig` of `name` from inside `host` is NODATA: the name exists, with no record
/// of that type (or none that reaches the asker).
pub(crate) fn expect_nodata(host: &Host, name: &str, qtype: &str) -> Dig {
    let mut last = Dig::default();
    let ok = (0..100).any(|_| {
        last = host.dig(&["@127.0.0.1", name, qtype]);
        let done = last.status == "NOERROR" && last.answers.is_empty();
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(
        ok,
        "{name} {qtype}: wanted NODATA, last answer:
{}",
        last.raw
    );
    last
}

/// GET on the admin endpoint from inside the host (busybox wget in the host namespace).
pub(crate) fn admin_get(h: &Host, path: &str) -> String {
    let out = h.exec(
        "busybox",
        &[
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://127.0.0.1:7381{path}"),
        ],
    );
    assert!(
        out.status.success(),
        "GET {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn aliases_links_ptr_and_negative_answers() {
    let mut h = Host::new();
    h.docker(&[
        "network",
        "create",
        "--subnet",
        &format!("10.{}.0.0/24", h.index),
        "app",
    ]);
    h.run_container("mysql", &["--label", "linkdns.alias=database,sql"]);
    h.run_container(
        "cache",
        &[
            "--network",
            "app",
            "--network-alias",
            "redis-main",
            "--label",
            "com.docker.compose.service=redis",
        ],
    );
    let dns = h.gateway.to_string();
    h.run_container(
        "wordpress",
        &[
            "--label",
            "linkdns.links=mysql:db,cache",
            "--dns",
            &dns,
            "--dns-search",
            "cluster",
        ],
    );
    h.run_container("other", &["--dns", &dns, "--dns-search", "cluster"]);
    h.start_linkdns(&[]);
    let mysql = h.container_ip("mysql");
    let cache = h.container_ip("cache");
    let wordpress = h.container_ip("wordpress");

    expect_answer(&h, "database.cluster", "A", &[&mysql]);
    expect_answer(&h, "sql.cluster", "A", &[&mysql]);
    expect_answer(&h, "redis-main.cluster", "A", &[&cache]);
    expect_answer(&h, "redis.cluster", "A", &[&cache]);

    // Link aliases, asked from inside the linking container with busybox nslookup.
    let nslookup = |container: &str, name: &str| {
        let out = h.try_docker(&["exec", container, "nslookup", name]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    wait_until(SETTLE, "db from wordpress", || {
        nslookup("wordpress", "db").contains(&mysql)
    });
    assert!(nslookup("wordpress", "db.cluster").contains(&mysql));
    // `cache` is on the network `app`, wordpress on the bridge: Docker keeps its networks
    // apart, so wordpress is not told an address it cannot reach ...
    let out = h.try_docker(&["exec", "wordpress", "nslookup", "cache"]);
    let apart =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // busybox answers NODATA with no address and success; NXDOMAIN or no answer fail.
    assert!(
        out.status.success() && !apart.contains(&cache) && !apart.contains("can't find"),
        "cache is wordpress's link, with no address that reaches it (NODATA):\n{apart}"
    );
    // ... until it is on that network too.
    h.docker(&["network", "connect", "app", "wordpress"]);
    wait_until(SETTLE, "cache from wordpress, now on app", || {
        nslookup("wordpress", "cache").contains(&cache)
    });
    let from_other = nslookup("other", "db.cluster");
    assert!(
        !from_other.contains(&mysql),
        "db is wordpress's link, not other's:\n{from_other}"
    );
    // dig with a bare name from the host is not a link of anybody: NXDOMAIN (from the cluster
    // zone) for db.cluster.
    expect_answer(&h, "db.cluster", "A", &[]);

    // PTR.
    let ptr = h.dig(&["@127.0.0.1", "-x", &wordpress]);
    assert_eq!(ptr.rdata(), ["wordpress.cluster."], "{}", ptr.raw);

    // NXDOMAIN and NODATA carry the zone's SOA.
    let nx = h.dig(&["@127.0.0.1", "nope.cluster", "A"]);
    assert_eq!(nx.status, "NXDOMAIN");
    assert!(
        nx.authority
            .iter()
            .any(|r| r.starts_with("cluster. 5 IN SOA")),
        "{}",
        nx.raw
    );
    let nodata = h.dig(&["@127.0.0.1", "mysql.cluster", "AAAA"]);
    assert_eq!(nodata.status, "NOERROR", "{}", nodata.raw);
    assert!(nodata.answers.is_empty());
    assert!(
        nodata.authority.iter().any(|r| r.contains(" SOA ")),
        "{}",
        nodata.raw
    );
    let apex = h.dig(&["@127.0.0.1", "cluster", "SOA"]);
    assert_eq!(apex.answers.len(), 1, "{}", apex.raw);

    // EDNS is echoed with our payload size; no EDNS, none back.
    let edns = h.dig(&["@127.0.0.1", "mysql.cluster", "+edns=0", "+bufsize=4096"]);
    assert_eq!(edns.edns_udp, Some(1232), "{}", edns.raw);
    let plain = h.dig(&["@127.0.0.1", "mysql.cluster", "+noedns"]);
    assert_eq!(plain.edns_udp, None, "{}", plain.raw);
    assert_eq!(plain.rdata(), [mysql.as_str()]);
}

#[test]
fn health_checks_gate_answers() {
    let mut h = Host::new();
    let check = [
        "--health-cmd",
        "test -f /tmp/ready",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
    ];
    h.run_container("api", &check);
    h.run_container("plain", &[]);
    h.start_linkdns(&[]);
    let plain = h.container_ip("plain");
    let api = h.container_ip("api");
    expect_answer(&h, "plain.cluster", "A", &[&plain]);
    // Starting, then unhealthy: not answered.
    expect_answer(&h, "api.cluster", "A", &[]);
    wait_until(SETTLE, "api to be unhealthy", || {
        h.docker(&["inspect", "-f", "{{.State.Health.Status}}", "api"]) == "unhealthy"
    });
    expect_answer(&h, "api.cluster", "A", &[]);
    // Healthy: answered. Unhealthy again: gone again.
    h.docker(&["exec", "api", "touch", "/tmp/ready"]);
    expect_answer(&h, "api.cluster", "A", &[&api]);
    h.docker(&["exec", "api", "rm", "/tmp/ready"]);
    expect_answer(&h, "api.cluster", "A", &[]);
}

#[test]
fn large_answers_truncate_over_udp_and_complete_over_tcp() {
    let mut h = Host::new();
    let count = 40;
    for i in 0..count {
        h.run_container(&format!("w{i}"), &["--label", "linkdns.alias=farm"]);
    }
    h.start_linkdns(&[]);
    wait_until(SETTLE, "all farm members", || {
        h.dig(&["@127.0.0.1", "farm.cluster", "+tcp"]).answers.len() == count
    });
    let udp = h.dig(&["@127.0.0.1", "farm.cluster", "+noedns", "+ignore"]);
    assert!(
        udp.has_flag("tc"),
        "512-byte UDP answer must be truncated: {}",
        udp.raw
    );
    assert!(udp.answers.len() < count);
    let edns = h.dig(&["@127.0.0.1", "farm.cluster", "+bufsize=600", "+ignore"]);
    assert!(edns.has_flag("tc"), "{}", edns.raw);
    assert_eq!(
        edns.edns_udp,
        Some(1232),
        "a truncated answer still echoes EDNS: {}",
        edns.raw
    );
    let tcp = h.dig(&["@127.0.0.1", "farm.cluster", "+tcp"]);
    assert!(!tcp.has_flag("tc"));
    assert_eq!(tcp.answers.len(), count);
    // dig retries over TCP by itself after TC.
    let auto = h.dig(&["@127.0.0.1", "farm.cluster", "+noedns"]);
    assert_eq!(auto.answers.len(), count, "{}", auto.raw);
}

#[test]
fn forwards_for_allowed_clients_and_refuses_outsiders() {
    let mut h = Host::new();
    let upstream = upstream::Upstream::start(SocketAddr::new(h.outside.into(), 5300));
    // The first upstream listed never answers (a resolver that died): it costs the first
    // lookup one timeout, then goes last.
    let silent = upstream::Silent::start(SocketAddr::new(h.outside.into(), 5301));
    let listen_outside = format!("{}:53", h.addr);
    let upstreams = format!("{},{}", silent.addr, upstream.addr);
    let gateway_listen = format!("{}:53", h.gateway);
    h.start_linkdns(&[
        "--upstream",
        &upstreams,
        "--dns-listen",
        "127.0.0.1:53",
        "--dns-listen",
        &listen_outside,
        "--dns-listen",
        &gateway_listen,
    ]);
    h.run_container("app", &["--dns", &h.gateway.to_string()]);
    let app = h.container_ip("app");
    expect_answer(&h, "app.cluster", "A", &[&app]);

    // From the host itself (loopback): forwarded, over UDP and over TCP. The first lookup
    // waits out the silent upstream (2 s), so dig waits longer for it.
    let fwd = h.dig(&["@127.0.0.1", "example.test", "A", "+time=5"]);
    assert_eq!(fwd.rdata(), [upstream::ANSWER], "{}", fwd.raw);
    assert_eq!(silent.queries(), 1);
    let fwd_tcp = h.dig(&["@127.0.0.1", "example.test", "A", "+tcp"]);
    assert_eq!(fwd_tcp.rdata(), [upstream::ANSWER], "{}", fwd_tcp.raw);
    let nx = h.dig(&["@127.0.0.1", "missing.test", "A"]);
    assert_eq!(
        nx.status, "NXDOMAIN",
        "upstream's NXDOMAIN is passed on: {}",
        nx.raw
    );

    // From a container: forwarded.
    let out = h.docker(&["exec", "app", "nslookup", "example.test"]);
    assert!(out.contains(upstream::ANSWER), "{out}");

    // From outside the cluster (the root namespace): cluster names yes, forwarding no.
    let outsider = |name: &str| {
        let out = testbed::run(
            "dig",
            &["+time=2", "+tries=1", &format!("@{}", h.addr), name, "A"],
        );
        Dig::parse(&String::from_utf8_lossy(&out.stdout))
    };
    assert_eq!(outsider("example.test").status, "REFUSED");
    assert_eq!(outsider("app.cluster").rdata(), [app.as_str()]);
    assert!(
        upstream.queries() >= 4,
        "upstream saw the forwarded queries"
    );
    assert_eq!(
        silent.queries(),
        1,
        "after its timeout the silent upstream was tried last, so never again"
    );
}

#[test]
fn docker_restart_resyncs_and_dns_keeps_serving() {
    let mut h = Host::new();
    h.run_container("stay", &["--restart", "always"]);
    h.run_container("vanish", &[]);
    h.start_linkdns(&[]);
    let stay = h.container_ip("stay");
    let vanish = h.container_ip("vanish");
    expect_answer(&h, "vanish.cluster", "A", &[&vanish]);

    h.stop_dockerd();
    // Docker is gone, and its containers died with it (no live-restore): the node says so,
    // and withdraws their records once their processes are gone.
    wait_until(SETTLE, "status to show docker disconnected", || {
        h.status_json()["docker"]["connected"] == false
    });
    wait_until(SETTLE * 3, "stay's records withdrawn", || {
        h.dig(&["@127.0.0.1", "stay.cluster", "A"]).status == "NXDOMAIN"
    });
    let _ = stay;

    h.start_dockerd();
    // The resync drops what did not come back and keeps what did.
    expect_answer(&h, "vanish.cluster", "A", &[]);
    wait_until(SETTLE, "stay to run again", || {
        !h.container_ip("stay").is_empty()
    });
    let stay_now = h.container_ip("stay");
    expect_answer(&h, "stay.cluster", "A", &[&stay_now]);
    assert_eq!(h.status_json()["docker"]["connected"], true);
    // And it keeps following events after the resync.
    h.run_container("fresh", &[]);
    let fresh = h.container_ip("fresh");
    expect_answer(&h, "fresh.cluster", "A", &[&fresh]);
}

#[test]
fn node_restart_keeps_state_then_reconciles() {
    let mut h = Host::new();
    h.run_container("keep", &[]);
    h.run_container("drop", &[]);
    h.start_linkdns(&[]);
    let keep = h.container_ip("keep");
    let dropped = h.container_ip("drop");
    expect_answer(&h, "drop.cluster", "A", &[&dropped]);
    let applied_before = h.status_json()["applied_index"].as_u64().expect("applied");

    // kill -9, then change Docker while the node is down.
    h.kill_linkdns();
    h.docker(&["rm", "-f", "drop"]);
    h.run_container("late", &[]);
    let late = h.container_ip("late");

    // Restarted without Docker, it serves what it had: state came back from disk.
    let missing = h.dir.join("no-such.sock");
    let missing_uri = format!("unix://{}", missing.display());
    h.start_linkdns(&["--docker", &missing_uri]);
    expect_answer(&h, "keep.cluster", "A", &[&keep]);
    expect_answer(&h, "drop.cluster", "A", &[&dropped]);
    expect_answer(&h, "late.cluster", "A", &[]);
    let status = h.status_json();
    assert!(
        status["applied_index"].as_u64() >= Some(applied_before),
        "{status}"
    );
    assert_eq!(status["docker"]["connected"], false);
    assert!(
        status["docker"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such.sock")),
        "the missing socket is named: {status}"
    );
    assert_eq!(h.stop_linkdns().code(), Some(0), "clean shutdown");

    // With Docker: reconciled.
    h.start_linkdns(&[]);
    expect_answer(&h, "late.cluster", "A", &[&late]);
    expect_answer(&h, "drop.cluster", "A", &[]);
    expect_answer(&h, "keep.cluster", "A", &[&keep]);
}

#[test]
fn malformed_packets_and_stalled_tcp_clients_do_not_hurt() {
    let mut h = Host::new();
    let listen = format!("{}:53", h.addr);
    h.start_linkdns(&["--dns-listen", "127.0.0.1:53", "--dns-listen", &listen]);
    h.run_container("svc", &[]);
    let svc = h.container_ip("svc");
    expect_answer(&h, "svc.cluster", "A", &[&svc]);
    let target = SocketAddr::new(h.addr.into(), 53);

    // A valid query to take apart.
    let query: Vec<u8> = {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["svc", "cluster"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    let reply = Host::udp_exchange(target, &query).expect("valid query answered");
    assert_eq!(&reply[..2], &[0x12, 0x34]);

    // Truncated at every length: never a crash; a header-sized one gets FORMERR.
    for len in 0..query.len() {
        if let Some(r) = Host::udp_exchange(target, &query[..len]) {
            assert_eq!(r[3] & 0x0f, 1, "truncated query of {len} bytes: FORMERR");
        }
    }
    // Random bytes, deterministic seed.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..300 {
        let len = 1 + (round * 7) % 600;
        let packet: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(&packet, target));
    }
    // Oversized: a 60 KB datagram.
    let mut big = query.clone();
    big.resize(60_000, 0xff);
    let _ = Host::udp_exchange(target, &big);
    // A response sent to us is never answered (no loops).
    let mut response = query.clone();
    response[2] |= 0x80;
    assert!(Host::udp_exchange(target, &response).is_none());

    // A TCP client that sends half a message and stalls does not block others.
    use std::io::Write as _;
    let mut stalled = std::net::TcpStream::connect(target).expect("tcp connect");
    stalled.write_all(&[0, 40, 0x12]).expect("half a message");
    let tcp = h.dig(&["@127.0.0.1", "svc.cluster", "+tcp"]);
    assert_eq!(tcp.rdata(), [svc.as_str()], "{}", tcp.raw);
    let udp = h.dig(&["@127.0.0.1", "svc.cluster"]);
    assert_eq!(udp.rdata(), [svc.as_str()]);
    drop(stalled);

    let text = admin_get(&h, "/metrics");
    assert!(text.contains("linkdns_dns_malformed_total"), "{text}");
    assert!(
        !text.contains("linkdns_dns_malformed_total 0"),
        "malformed packets were counted:\n{text}"
    );
}

#[test]
fn corrupt_data_dir_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A real data dir first: run a node briefly, on unprivileged ports, no Docker.
    run_solo_until_it_holds_state(&data);

    // Scribble over the store.
    let mut files = Vec::new();
    collect_files(&data.join("raft"), &mut files);
    assert!(!files.is_empty());
    for f in &files {
        std::fs::write(f, vec![0x5a; 1024]).expect("scribble");
    }
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("read"))
        .collect();
    let out = solo_node(&data).output().expect("run");
    assert!(!out.status.success(), "a damaged data dir must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("damaged") && stderr.contains(&*data.to_string_lossy()),
        "clear error naming the dir:\n{stderr}"
    );
    let after: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("read"))
        .collect();
    assert!(before == after, "nothing was overwritten");
}

#[test]
fn a_first_node_that_lost_its_identity_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    run_solo_until_it_holds_state(&data);
    let cluster = std::fs::read(data.join("cluster.json")).expect("identity");
    std::fs::remove_file(data.join("cluster.json")).expect("lose it");

    // Not a new cluster under the old log: refused, with what to do, and nothing written.
    let out = solo_node(&data).output().expect("run");
    assert!(
        !out.status.success(),
        "a node without its identity must not start"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no cluster.json") && stderr.contains("restore the file"),
        "{stderr}"
    );
    assert!(
        !data.join("cluster.json").exists(),
        "no new identity was made"
    );
    // With the file back, it starts as the node it was.
    std::fs::write(data.join("cluster.json"), &cluster).expect("restore");
    run_solo_until_it_holds_state(&data);
    assert_eq!(
        std::fs::read(data.join("cluster.json")).expect("identity"),
        cluster
    );
}

/// Runs [`solo_node`] on `data` until it serves (its admin address written) and holds state
/// (its marker written), then stops it with SIGTERM; it must exit cleanly.
fn run_solo_until_it_holds_state(data: &std::path::Path) {
    let mut child = solo_node(data)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    wait_until(SETTLE, "the node to serve and hold state", || {
        data.join("admin.addr").exists() && data.join("raft.started").exists()
    });
    let _ = testbed::run("kill", &["-TERM", &child.id().to_string()]);
    assert!(child.wait().expect("wait").success());
}

/// `linkdns run` on `data`, unprivileged ports, no Docker: a node that needs no test host.
fn solo_node(data: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(testbed::linkdns_bin());
    command
        .args([
            "run",
            "--data-dir",
            &data.to_string_lossy(),
            "--node-name",
            "solo",
        ])
        .args([
            "--dns-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            // Two of these may run at once.
            "--peer-listen",
            "127.0.0.1:0",
        ])
        .args(["--docker", "unix:///nonexistent.sock"]);
    command
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "ttl = 5\ndns_listen = [\"not-an-address\"]\n").expect("write");
    let out = std::process::Command::new(testbed::linkdns_bin())
        .args(["run", "--config", &path.to_string_lossy()])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("dns_listen") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    // And status without a running node says so.
    let out = std::process::Command::new(testbed::linkdns_bin())
        .args(["status", "--data-dir", &dir.path().to_string_lossy()])
        .output()
        .expect("status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no linkdns node is running"));
}

/// `linkdns ready` on `h`: whether it exits 0, and what it says.
fn ready(h: &Host) -> (bool, String) {
    let out = h.linkdns(&["ready"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_full_data_dir_degrades_the_node_and_it_recovers_with_space() {
    let mut h = Host::new();
    let data = h.data_dir();
    std::fs::create_dir_all(&data).expect("data dir");
    testbed::sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=16m",
            "tmpfs",
            &data.to_string_lossy(),
        ],
    );
    h.run_container("before", &[]);
    h.start_linkdns(&[]);
    let before = h.container_ip("before");
    expect_answer(&h, "before.cluster", "A", &[&before]);
    let pid = h.linkdns_pid().expect("running");

    // Fill the disk, then make the watcher write.
    let filler = data.join("filler");
    let _ = testbed::run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", filler.display()),
            "bs=1M",
            "count=64",
        ],
    );
    for i in 0..20 {
        h.run_container(&format!("during{i}"), &[]);
    }
    // The node says it cannot write, and why; it does not stop, and DNS answers from memory.
    wait_until(
        Duration::from_secs(60),
        "`linkdns ready` to say the disk is full",
        || {
            let (ok, said) = ready(&h);
            !ok && said.starts_with("not ready: the data dir cannot be written")
        },
    );
    let log = h.log();
    assert!(
        log.contains("No space left") || log.contains("os error 28"),
        "the log says why:\n{log}"
    );
    assert_eq!(h.linkdns_pid(), Some(pid));
    let answer = h.dig(&["@127.0.0.1", "before.cluster", "A", "+time=1", "+tries=1"]);
    assert_eq!(
        answer.rdata(),
        std::slice::from_ref(&before),
        "{}",
        answer.raw
    );

    // Space again: the node goes on by itself, writes what Docker has meanwhile, and all of
    // it is on disk (a restart answers it).
    std::fs::remove_file(&filler).expect("free space");
    wait_until(
        Duration::from_secs(30),
        "`linkdns ready` once space is back",
        || ready(&h).0,
    );
    assert!(ready(&h).1.starts_with("ready: "), "{}", ready(&h).1);
    assert!(h.log().contains("can be written again"));
    let during = h.container_ip("during19");
    wait_until(
        Duration::from_secs(30),
        "the containers started meanwhile to commit",
        || h.status_json()["records"] == 21,
    );
    assert_eq!(h.linkdns_pid(), Some(pid));
    h.stop_linkdns();
    h.start_linkdns(&[]);
    expect_answer(&h, "before.cluster", "A", &[&before]);
    expect_answer(&h, "during19.cluster", "A", &[&during]);
}

#[test]
fn a_burst_of_changes_all_arrive() {
    let mut h = Host::new();
    h.start_linkdns(&[]);
    // 24 containers started at once, then every other one removed at once.
    let sock = format!("unix://{}", h.docker_sock().display());
    let parallel = |commands: Vec<Vec<String>>| {
        let children: Vec<_> = commands
            .into_iter()
            .map(|args| {
                std::process::Command::new("docker")
                    .arg("-H")
                    .arg(&sock)
                    .args(args)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("docker")
            })
            .collect();
        for mut child in children {
            assert!(child.wait().expect("wait").success());
        }
    };
    parallel(
        (0..24)
            .map(|i| {
                [
                    "run",
                    "-d",
                    "--name",
                    &format!("b{i}"),
                    testbed::IMAGE,
                    "sleep",
                    "3600",
                ]
                .map(String::from)
                .to_vec()
            })
            .collect(),
    );
    parallel(
        (0..24)
            .step_by(2)
            .map(|i| ["rm", "-f", &format!("b{i}")].map(String::from).to_vec())
            .collect(),
    );
    for i in 0..24 {
        let name = format!("b{i}.cluster");
        if i % 2 == 0 {
            expect_answer(&h, &name, "A", &[]);
        } else {
            let ip = h.container_ip(&format!("b{i}"));
            expect_answer(&h, &name, "A", &[&ip]);
        }
    }
    assert_eq!(h.status_json()["records"], 12);
}

/// The TCP admin endpoint serves monitoring alone; the cluster's state is on the admin socket,
/// which only its owner (root here) reaches, in a data dir made private.
#[test]
fn the_admin_socket_is_its_owners_alone_and_tcp_serves_monitoring() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mut h = Host::new();
    // A data dir another tool made open to everyone (as `docker run -v` does).
    let data = h.data_dir();
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    h.run_container("web", &[]);
    h.start_linkdns(&[]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode();
    assert_eq!(mode(&data) & 0o777, 0o700, "the data dir is made private");
    assert!(h.log().contains("made it 0700"), "and the node says so");
    let socket = data.join("admin.sock");
    let meta = std::fs::metadata(&socket).expect("admin.sock");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Over TCP: /health, /ready and /metrics; nothing that shows or exports the cluster.
    assert!(admin_get(&h, "/metrics").contains("linkdns_"));
    assert!(admin_get(&h, "/health").contains("ok"));
    for path in ["/status", "/backup", "/routes", "/docker-config"] {
        let url = format!("http://127.0.0.1:7381{path}");
        let out = h.exec("busybox", &["wget", "-q", "-O", "-", &url]);
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "GET {path} over TCP: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The CLI, as root, through the socket.
    let status = h.linkdns(&["status"]);
    assert!(status.status.success(), "{status:?}");
    let backup = h.dir.join("b.backup");
    let out = h.linkdns(&["backup", &backup.to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::metadata(&backup).expect("backup").len() > 0);
    // Any other local user: refused, and told why. (The binary is copied where any user may
    // run it, and the host's directory is left open, so only the data dir and the socket
    // keep that user out.)
    let bin = h.dir.join("linkdns-for-anyone");
    std::fs::copy(testbed::linkdns_bin(), &bin).expect("copy the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_nobody = h.exec(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &bin.to_string_lossy(),
            "status",
            "--data-dir",
            &data.to_string_lossy(),
        ],
    );
    let said = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(
        !as_nobody.status.success() && said.contains("its owner's only"),
        "{said}"
    );
}

/// Docker crashes (killed): the containers keep running without it. One is killed by its pid
/// meanwhile: its records go; the other's stay.
#[test]
fn a_container_that_dies_while_docker_is_away_is_withdrawn_and_a_running_one_stays() {
    let mut h = Host::new();
    h.run_container("alive", &[]);
    h.run_container("doomed", &[]);
    h.start_linkdns(&[]);
    let alive = h.container_ip("alive");
    let doomed = h.container_ip("doomed");
    expect_answer(&h, "doomed.cluster", "A", &[&doomed]);
    let pid = h.docker(&["inspect", "-f", "{{.State.Pid}}", "doomed"]);
    assert!(
        pid.parse::<u32>().is_ok_and(|p| p > 1),
        "doomed's pid: {pid}"
    );

    h.kill_dockerd();
    wait_until(SETTLE, "status to show docker disconnected", || {
        h.status_json()["docker"]["connected"] == false
    });
    // Still running without the engine: still answered.
    expect_answer(&h, "doomed.cluster", "A", &[&doomed]);
    let out = testbed::run("kill", &["-9", &pid]);
    assert!(out.status.success(), "kill {pid}: {out:?}");
    wait_until(SETTLE * 3, "doomed's records withdrawn", || {
        h.dig(&["@127.0.0.1", "doomed.cluster", "A"]).status == "NXDOMAIN"
    });
    expect_answer(&h, "alive.cluster", "A", &[&alive]);
    assert!(
        h.log().contains("container gone while Docker is away"),
        "the node says why"
    );
    // (The engine is not started again here: the host's drop kills the containerd, shims
    // and container it left. Its return after a stop is `docker_restart_resyncs_...`.)
}
