//! The networks people have, beyond one LAN: hosts on two subnets joined by a router (no
//! shared LAN, each host's default route through the router). Containers reach each other
//! through linkdns's VXLAN tunnel, un-NATed, with full-size packets and bulk TCP; a host with no
//! path to a subnet does not answer its addresses until it has one.

use std::time::Duration;

use crate::cluster::{form_joined, name};
use crate::testbed::{router_ns, wait_until, Bird, Host, Lan, Vm, IMAGE};
use crate::{expect_answer, expect_nodata};

const ROUTES: Duration = Duration::from_secs(30);

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// linkdns's routes on `h` as `ip route` prints them, sorted.
fn owned_routes(h: &Host) -> Vec<String> {
    let out = h.exec("ip", &["route", "show", "proto", "151"]);
    let mut routes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    routes.sort();
    routes
}

fn subnet(h: &Host) -> String {
    format!("192.168.{}.0/24", h.index)
}

/// The route to `to`'s containers through the tunnel, as `ip route` prints it: on-link, its
/// MTU locked (no path MTU learned from the uplink: full-size packets cross, the outer ones
/// fragmented).
fn tunnel_route(to: &Host) -> String {
    format!(
        "{} via 192.168.{}.0 dev linkdns.vx onlink mtu lock 1500",
        subnet(to),
        to.index
    )
}

/// `ping -c 3 -s 1472` (1,500-byte IP packets) from container `from` on `h` to `to`: all three
/// answered, the first included.
fn assert_full_size_pings(h: &Host, from: &str, to: &str) {
    let out = h.try_docker(&["exec", from, "ping", "-c", "3", "-W", "2", "-s", "1472", to]);
    let seen = text(&out);
    assert!(
        out.status.success() && seen.contains("3 packets received"),
        "1,472-byte pings from {from} on {} to {to}:\n{seen}",
        h.ns
    );
}

#[test]
fn hosts_on_two_subnets_reach_each_other_through_vxlan_un_natted() {
    // h1 and h3 share LAN A; h2 is on LAN B, behind the router.
    let mut hosts = vec![
        Host::on_routed(Lan::A),
        Host::on_routed(Lan::B),
        Host::on_routed(Lan::A),
    ];
    // h1 starts without encapsulation: it has no path to h2's containers.
    hosts[0].start_linkdns(&["--encapsulation", "never"]);
    let token = hosts[0].token();
    let (first, rest) = hosts.split_at_mut(1);
    for h in rest {
        h.join_linkdns(&first[0], &token, &[]);
    }
    let mut hosts = form_joined(hosts);

    // On h2: `far` serves a 5 MB file over HTTP (8080) and tells each client the address it
    // saw (9090).
    hosts[1].docker(&[
        "run",
        "-d",
        "--name",
        "far",
        IMAGE,
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/big bs=1024 count=5120 && httpd -p 8080 -h /tmp && nc -ll -p 9090 -e netstat -tn",
    ]);
    let far = hosts[1].container_ip("far");
    let (h1, h2, h3) = (&hosts[0], &hosts[1], &hosts[2]);

    // h1 refuses the route, says why, and does not answer far's address: it cannot reach it.
    let refusal = format!(
        "not routing {} of node {}: the gateway {} is not on a directly connected network of this host (and encapsulation is never)",
        subnet(h2),
        name(h2),
        h2.addr
    );
    wait_until(ROUTES, "h1 to refuse h2's subnet", || {
        text(&h1.linkdns(&["routes"])).contains(&refusal)
    });
    expect_nodata(h1, "far.cluster", "A");
    // h3 (encapsulation auto) reaches h2 through the tunnel and h1 directly, and answers.
    let want = vec![
        format!(
            "{} via {} dev {}",
            subnet(h1),
            h1.addr,
            h3.lan_if.as_deref().unwrap_or("?")
        ),
        tunnel_route(h2),
    ];
    // `linkdns routes` reports a reconciliation once it has ended (routes, device, rules).
    let status_lines = [
        format!("{} {}: vxlan to {} (dev linkdns.vx)", name(h2), subnet(h2), h2.addr),
        format!("{} {}: direct via {}", name(h1), subnet(h1), h1.addr),
        "-t mangle -A LINKDNS-MSS -o linkdns.vx -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1410".to_string(),
        format!("-t raw -A LINKDNS-PREROUTING -s {} -d {} -i linkdns.vx -j ACCEPT", subnet(h2), subnet(h3)),
    ];
    let reported = || {
        let routes = text(&h3.linkdns(&["routes"]));
        status_lines.iter().all(|l| routes.contains(l))
    };
    let deadline = std::time::Instant::now() + ROUTES;
    while (owned_routes(h3) != want || !reported()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        owned_routes(h3),
        want,
        "h3's routes:\n{}",
        text(&h3.linkdns(&["routes"]))
    );
    assert!(
        reported(),
        "routes on h3 lack one of {status_lines:#?}:\n{}",
        text(&h3.linkdns(&["routes"]))
    );
    expect_answer(h3, "far.cluster", "A", &[&far]);
    let device = text(&h3.exec("ip", &["-d", "link", "show", "linkdns.vx"]));
    assert!(
        device.contains("vxlan id 151")
            && device.contains("dstport 4789")
            && device.contains("nolearning"),
        "{device}"
    );

    // h1 with encapsulation auto: the path comes, and far is answered there too.
    hosts[0].stop_linkdns();
    hosts[0].start_linkdns(&[]);
    let (h1, h2) = (&hosts[0], &hosts[1]);
    wait_until(ROUTES, "h1's tunnel route to h2", || {
        owned_routes(h1).contains(&tunnel_route(h2))
    });
    expect_answer(h1, "far.cluster", "A", &[&far]);

    // A container on h1 reaches far by name across the router: full-size pings, un-NATed
    // connections, 5 MB over TCP; and far's host reaches back the same way.
    let dns = |h: &Host| h.gateway.to_string();
    h1.run_container("near", &["--dns", &dns(h1), "--dns-search", "cluster"]);
    let near = h1.container_ip("near");
    h2.run_container("back", &["--dns", &dns(h2), "--dns-search", "cluster"]);
    expect_answer(h2, "near.cluster", "A", &[&near]);
    assert_full_size_pings(h1, "near", "far");
    assert_full_size_pings(h2, "back", "near");
    let seen = text(&h1.try_docker(&["exec", "near", "nc", "-w", "5", "far", "9090"]));
    assert!(
        seen.lines()
            .any(|l| l.contains(&format!("{far}:9090")) && l.contains(&format!("{near}:"))),
        "far sees near's own address {near}:\n{seen}"
    );
    let out = h1.try_docker(&[
        "exec",
        "near",
        "sh",
        "-c",
        "wget -q -O - http://far:8080/big | wc -c",
    ]);
    assert_eq!(
        text(&out).trim(),
        "5242880",
        "5 MB from far to near over TCP"
    );

    // A stranger behind the router sends VXLAN to h1's tunnel with a source of h2's subnet:
    // h1 takes VXLAN only from the hosts it reaches through the tunnel, and drops it.
    let stranger = Vm::on(Lan::B);
    for cmd in [
        format!(
            "link add vx0 type vxlan id 151 dstport 4789 remote {} local {}",
            h1.addr, stranger.addr
        ),
        format!("addr add 192.168.{}.99/24 dev vx0", h2.index),
        "link set vx0 up".to_string(),
        format!("route add {} dev vx0", subnet(h1)),
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        let out = stranger.exec("ip", &args);
        assert!(out.status.success(), "ip {cmd}: {}", text(&out));
    }
    let _ = stranger.exec("busybox", &["ping", "-c", "3", "-W", "1", &near]);
    let counters = text(&h1.exec(
        "iptables",
        &[
            "-w",
            "-t",
            "raw",
            "-L",
            "LINKDNS-PREROUTING",
            "-v",
            "-n",
            "-x",
        ],
    ));
    let dropped: u64 = counters
        .lines()
        .find(|l| l.contains("DROP") && l.contains("dpt:4789"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        dropped > 0,
        "the stranger's VXLAN was not dropped:\n{counters}"
    );

    // h2 removed: every host's tunnel goes (nobody else is behind the router); h1 and h3 keep
    // their direct routes to each other.
    let out = hosts[0].linkdns(&["remove", &name(&hosts[1])]);
    assert!(out.status.success(), "remove: {}", text(&out));
    hosts[1].wait_linkdns_exit(Duration::from_secs(20));
    for h in [&hosts[0], &hosts[2]] {
        // One reconciliation takes the routes, then the device, then the rules away: wait for
        // its end, the MSS clamp gone with the tunnel.
        wait_until(ROUTES, "the tunnel and its MSS clamp withdrawn", || {
            !h.exec("ip", &["link", "show", "linkdns.vx"])
                .status
                .success()
                && owned_routes(h).len() == 1
                && !text(&h.exec("iptables", &["-w", "-t", "mangle", "-S"])).contains("LINKDNS")
        });
    }
    assert!(
        !hosts[1]
            .exec("ip", &["link", "show", "linkdns.vx"])
            .status
            .success(),
        "h2 withdrew its own tunnel"
    );
}

/// The router's kernel route to `h`'s containers, as BIRD put it there (empty: none).
fn router_route(h: &Host) -> String {
    let out = crate::testbed::run("ip", &["-n", &router_ns(), "route", "show", &subnet(h)]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What `busybox nc` from VM `vm` to `ip`:`port` got back within 3 s.
fn nc_from(vm: &Vm, ip: &str, port: &str) -> String {
    text(&vm.exec("busybox", &["nc", "-w", "3", ip, port]))
}

/// `h`'s BGP sessions as `linkdns routes --json` gives them.
fn bgp_sessions(h: &Host) -> Vec<serde_json::Value> {
    let out = h.linkdns(&["routes", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["bgp"].as_array().cloned())
        .unwrap_or_default()
}

fn session_to<'a>(sessions: &'a [serde_json::Value], peer: &str) -> Option<&'a serde_json::Value> {
    sessions.iter().find(|s| s["peer"] == peer)
}

#[test]
fn a_router_learns_each_hosts_subnet_over_bgp_and_vms_reach_containers_through_it() {
    let lan_a = Lan::A;
    let mut hosts = vec![Host::on_routed(Lan::A), Host::on_routed(Lan::B)];
    let vm_a = Vm::on(Lan::A);
    let vm_b = Vm::on(Lan::B);
    let mut bird = Bird::start();
    let router_a = format!("{}:179", Lan::A.router());
    let router_b = Lan::B.router().to_string();
    let reach = lan_a.subnet();
    // h1 also has a router that never answers (vm_a drops what comes to port 179) and one
    // that sends garbage (vm_b: an HTTP request, whatever arrives on port 179).
    let out = vm_a.exec(
        "iptables",
        &["-A", "INPUT", "-p", "tcp", "--dport", "179", "-j", "DROP"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let silent = format!("{}:179", vm_a.addr);
    let garbage = format!("{}:179", vm_b.addr);
    let mut fake = std::process::Command::new("ip")
        .args([
            "netns", "exec", &vm_b.ns, "busybox", "nc", "-l", "-p", "179",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("a fake router");
    let mut fake_in = fake.stdin.take().expect("stdin");
    {
        use std::io::Write;
        // Sent once the node connects (nc relays its input then).
        fake_in
            .write_all(b"GET / HTTP/1.0\r\nHost: router\r\n\r\n")
            .expect("write to the fake router");
    }
    hosts[0].start_linkdns(&[
        "--bgp-peer",
        &format!("{router_a},{silent},{garbage}"),
        "--reach-from",
        &reach,
    ]);
    let token = hosts[0].token();
    let (first, rest) = hosts.split_at_mut(1);
    rest[0].join_linkdns(
        &first[0],
        &token,
        &["--bgp-peer", &router_b, "--reach-from", &reach],
    );
    let hosts = form_joined(hosts);
    let (h1, h2) = (&hosts[0], &hosts[1]);

    // BIRD learns each host's subnet with that host as next hop, into the router's table.
    wait_until(
        ROUTES,
        "the router's routes to both hosts' containers",
        || {
            router_route(h1).contains(&format!("via {} ", h1.addr))
                && router_route(h2).contains(&format!("via {} ", h2.addr))
        },
    );
    assert!(
        router_route(h1).contains("proto bird"),
        "{}",
        router_route(h1)
    );
    let routes = text(&h1.linkdns(&["routes"]));
    assert!(
        routes.contains(&format!("{router_a} established for"))
            && routes.contains(&format!("next hop {}, announcing {}", h1.addr, subnet(h1))),
        "{routes}"
    );
    let metrics = crate::admin_get(h1, "/metrics");
    assert!(
        metrics.contains(&format!(
            "linkdns_bgp_session_established{{peer=\"{router_a}\"}} 1"
        )) && metrics.contains(&format!(
            "linkdns_bgp_announced_prefixes{{peer=\"{router_a}\"}} 1"
        )),
        "{metrics}"
    );

    // The router that never answers and the one that sent garbage: each said why, and the
    // node goes on (its DNS answers, its other session is up).
    wait_until(ROUTES, "the failed sessions reported", || {
        let sessions = bgp_sessions(h1);
        session_to(&sessions, &silent).is_some_and(|s| {
            s["state"] != "established"
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no answer"))
        }) && h1
            .log()
            .contains("1/1 message header error: connection not synchronized")
    });
    {
        // What the fake router got: the node's OPEN, then (after the garbage) a NOTIFICATION
        // 1/1, connection not synchronized; then the node closed the connection.
        use std::io::Read;
        let _ = fake.wait();
        drop(fake_in);
        let mut got = Vec::new();
        let _ = fake.stdout.take().expect("stdout").read_to_end(&mut got);
        let notification = [[0xffu8; 16].as_slice(), &[0, 21, 3, 1, 1]].concat();
        assert!(
            got.windows(notification.len()).any(|w| w == notification),
            "the fake router got no NOTIFICATION 1/1: {got:02x?}"
        );
    }
    assert!(h1.linkdns_pid().is_some(), "h1 keeps running");

    // A VM in the reach-from network reaches a container on the other LAN by its address,
    // and the container sees the VM's own address. A VM outside it does not get in.
    hosts[1].docker(&[
        "run", "-d", "--name", "far", IMAGE, "nc", "-ll", "-p", "9090", "-e", "netstat", "-tn",
    ]);
    let far = hosts[1].container_ip("far");
    let seen = nc_from(&vm_a, &far, "9090");
    assert!(
        seen.lines()
            .any(|l| l.contains(&format!("{far}:9090")) && l.contains(&format!("{}:", vm_a.addr))),
        "far sees the VM's own address {}:\n{seen}",
        vm_a.addr
    );
    let seen = nc_from(&vm_b, &far, "9090");
    assert!(
        !seen.contains("9090"),
        "a machine outside --reach-from got in:\n{seen}"
    );

    // VPC mode: with encapsulation never, each host reaches the other's containers through
    // the router that learned their subnets, un-NATed.
    let mut hosts = hosts;
    let bgp_args = |router: &str| {
        vec![
            "--encapsulation".to_string(),
            "never".to_string(),
            "--bgp-peer".to_string(),
            router.to_string(),
            "--reach-from".to_string(),
            reach.clone(),
        ]
    };
    for (h, router) in [(0, router_a.clone()), (1, router_b.clone())] {
        hosts[h].stop_linkdns();
        let args = bgp_args(&router);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        hosts[h].start_linkdns(&args);
    }
    let (h1, h2) = (&hosts[0], &hosts[1]);
    let through = format!("{} via {} dev", subnet(h2), Lan::A.router());
    wait_until(
        ROUTES,
        "h1's route to h2's containers through the router",
        || {
            owned_routes(h1).iter().any(|r| r.starts_with(&through))
                && !h1
                    .exec("ip", &["link", "show", "linkdns.vx"])
                    .status
                    .success()
        },
    );
    let routes = text(&h1.linkdns(&["routes"]));
    assert!(
        routes.contains(&format!(
            "{} {}: through the router {}",
            name(h2),
            subnet(h2),
            Lan::A.router()
        )),
        "{routes}"
    );
    expect_answer(h1, "far.cluster", "A", &[&far]);
    h1.run_container(
        "near",
        &["--dns", &h1.gateway.to_string(), "--dns-search", "cluster"],
    );
    let near = h1.container_ip("near");
    wait_until(ROUTES, "near to reach far through the router", || {
        let seen = text(&h1.try_docker(&["exec", "near", "nc", "-w", "3", "far", "9090"]));
        seen.lines()
            .any(|l| l.contains(&format!("{far}:9090")) && l.contains(&format!("{near}:")))
    });

    // A dead router changes nothing in DNS; back, it learns the routes again.
    expect_answer(&hosts[0], "far.cluster", "A", &[&far]);
    bird.kill();
    wait_until(ROUTES, "h1's session to the dead router down", || {
        session_to(&bgp_sessions(&hosts[0]), &router_a).is_some_and(|s| s["state"] != "established")
    });
    let dig = hosts[0].dig(&["@127.0.0.1", "far.cluster", "A"]);
    assert_eq!(
        (dig.status.as_str(), dig.rdata()),
        ("NOERROR", vec![far.clone()])
    );
    bird.restart();
    wait_until(Duration::from_secs(90), "the routes learned again", || {
        router_route(&hosts[0]).contains(&format!("via {} ", hosts[0].addr))
            && router_route(&hosts[1]).contains(&format!("via {} ", hosts[1].addr))
    });

    // h2 stops: the router withdraws its subnet at once (Cease); started again, it announces
    // it again.
    let ceases = bird.log().matches("Administrative shutdown").count();
    hosts[1].stop_linkdns();
    wait_until(Duration::from_secs(10), "h2's subnet withdrawn", || {
        router_route(&hosts[1]).is_empty()
    });
    assert!(
        bird.log().matches("Administrative shutdown").count() > ceases,
        "BIRD saw a Cease:\n{}",
        bird.log()
    );
    hosts[1].restart_linkdns();
    wait_until(
        Duration::from_secs(30),
        "h2's subnet announced again",
        || router_route(&hosts[1]).contains(&format!("via {} ", hosts[1].addr)),
    );
    // Removed from the cluster: withdrawn for good.
    let out = hosts[0].linkdns(&["remove", &name(&hosts[1])]);
    assert!(out.status.success(), "remove: {}", text(&out));
    hosts[1].wait_linkdns_exit(Duration::from_secs(20));
    wait_until(
        Duration::from_secs(10),
        "h2's subnet withdrawn after its removal",
        || router_route(&hosts[1]).is_empty(),
    );
    assert!(router_route(&hosts[0]).contains(&format!("via {} ", hosts[0].addr)));
}
