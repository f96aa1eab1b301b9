//! Routes between hosts: each node routes the other hosts' container subnets via their LAN
//! addresses, so a container on one host reaches a container on another by name, with its own
//! address (no NAT). What is in the way is refused and left alone.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cluster::{form, form_joined, name};
use crate::testbed::{wait_until, Host, IMAGE};

const ROUTES: Duration = Duration::from_secs(30);

/// Container subnet of a test host (Docker's `--bip 192.168.N.1/24`).
fn subnet(h: &Host) -> String {
    format!("192.168.{}.0/24", h.index)
}

/// linkdns's routes on `h` as `ip route` prints them: `<subnet> via <gateway>`, sorted.
fn owned_routes(h: &Host) -> Vec<String> {
    let out = h.exec("ip", &["route", "show", "proto", "151"]);
    assert!(out.status.success(), "ip route: {out:?}");
    let mut routes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect();
    routes.sort();
    routes
}

/// The route `h`'s node should have to `to`'s containers.
fn route_to(to: &Host) -> String {
    format!("{} via {}", subnet(to), to.addr)
}

/// The routes a host should have to the hosts `to`, as [`owned_routes`] lists them.
fn routes_to(to: &[&Host]) -> Vec<String> {
    let mut want: Vec<String> = to.iter().copied().map(route_to).collect();
    want.sort();
    want
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn iptables_s(h: &Host, table: &str) -> String {
    text(&h.exec("iptables", &["-w", "-t", table, "-S"]))
}

/// Whether linkdns's jumps come first in FORWARD (right after a leading jump to Docker's
/// DOCKER-USER, where administrators filter), in nat POSTROUTING and in raw PREROUTING on
/// `h`: before Docker's drops (current engines drop routed traffic to containers in raw
/// PREROUTING) and masquerading.
fn jumps_first(h: &Host) -> bool {
    [
        ("filter", "FORWARD", "LINKDNS-FORWARD"),
        ("nat", "POSTROUTING", "LINKDNS-POSTROUTING"),
        ("raw", "PREROUTING", "LINKDNS-PREROUTING"),
    ]
    .iter()
    .all(|(table, chain, jump)| {
        let listing = iptables_s(h, table);
        let rules: Vec<&str> = listing
            .lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .collect();
        let at = usize::from(rules.first() == Some(&"-A FORWARD -j DOCKER-USER"));
        rules.get(at).copied() == Some(format!("-A {chain} -j {jump}").as_str())
            && rules
                .iter()
                .filter(|r| r.ends_with(&format!("-j {jump}")))
                .count()
                == 1
    })
}

/// Reconciliations `h`'s node has done since it started.
fn reconciliations(h: &Host) -> u64 {
    let out = h.linkdns(&["routes", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["reconciliations"].as_u64())
        .unwrap_or(0)
}

#[test]
fn containers_reach_each_other_across_hosts_by_name_with_their_own_addresses() {
    let hosts: Vec<Host> = (0..3).map(|_| Host::on_lan()).collect();
    // h3 already routes h2's container subnet elsewhere (someone's static route): linkdns
    // must refuse its own route there, say so, and leave that route exactly as it is.
    let elsewhere = crate::testbed::lan_unused().to_string();
    let foreign = format!("{} via {elsewhere}", subnet(&hosts[1]));
    let out = hosts[2].exec(
        "ip",
        &[
            "route",
            "add",
            &subnet(&hosts[1]),
            "via",
            &elsewhere,
            "proto",
            "static",
        ],
    );
    assert!(out.status.success(), "ip route add: {}", text(&out));
    let foreign_before = text(&hosts[2].exec("ip", &["route", "show", &subnet(&hosts[1])]));
    let mut hosts = form(hosts, &[]);

    // Every host routes every other host's subnet via its LAN address (h3 all but h2's).
    wait_until(ROUTES, "the routes on every host", || {
        let (h1, h2, h3) = (&hosts[0], &hosts[1], &hosts[2]);
        owned_routes(h1) == routes_to(&[h2, h3])
            && owned_routes(h2) == routes_to(&[h1, h3])
            && owned_routes(h3) == routes_to(&[h1])
    });
    let (h1, h2, h3) = (&hosts[0], &hosts[1], &hosts[2]);
    assert!(foreign.starts_with(&subnet(h2)));
    assert_eq!(
        text(&h3.exec("ip", &["route", "show", &subnet(h2)])),
        foreign_before,
        "the conflicting route on h3 is untouched"
    );
    let refusal = format!(
        "not routing {} of node {}: overlaps existing route `{} via {elsewhere} dev {} proto static`, which linkdns does not own",
        subnet(h2),
        name(h2),
        subnet(h2),
        h3.lan_if.as_deref().expect("lan host")
    );
    // The status and the log speak of a reconciliation once it has ended (its rules written
    // after its routes).
    wait_until(ROUTES, "h3 to report and log the refusal", || {
        text(&h3.linkdns(&["status"])).contains(&refusal) && h3.log().contains("route refused")
    });
    let plan = text(&h3.linkdns(&["routes", "--plan"]));
    assert!(plan.contains(&refusal), "routes --plan on h3:\n{plan}");
    assert!(plan.contains("PLAN\n  nothing to change"), "{plan}");
    let routes = text(&h1.linkdns(&["routes"]));
    for want in [
        format!("{} via {} dev", subnet(h2), h2.addr),
        format!(
            "-t filter -A LINKDNS-FORWARD -s {} -d {} -i {} -o docker0 -j ACCEPT",
            subnet(h2),
            subnet(h1),
            h1.lan_if.as_deref().expect("lan host")
        ),
        format!(
            "-t nat -A LINKDNS-POSTROUTING -s {} -d {} -j ACCEPT",
            subnet(h1),
            subnet(h2)
        ),
        format!(
            "-t raw -A LINKDNS-PREROUTING -s {} -d {} -i {} -j ACCEPT",
            subnet(h2),
            subnet(h1),
            h1.lan_if.as_deref().expect("lan host")
        ),
    ] {
        assert!(
            routes.contains(&want),
            "routes on h1 lack {want:?}:\n{routes}"
        );
    }
    // linkdns's jumps come before Docker's rules (its drops and its masquerading).
    assert!(
        jumps_first(h1),
        "{}{}{}",
        iptables_s(h1, "filter"),
        iptables_s(h1, "nat"),
        iptables_s(h1, "raw")
    );
    eprintln!("engine: Docker {}", h1.engine_version());

    // A container on h1 pings `web` on h2 by name, and connects to it: `web` sees the
    // connection come from the container's own address.
    let web_id = h2.docker(&[
        "run", "-d", "--name", "web", IMAGE, "nc", "-ll", "-p", "8080", "-e", "netstat", "-tn",
    ]);
    assert!(!web_id.is_empty());
    let web = h2.container_ip("web");
    // Answers follow reachability: h3 has no route of its own to h2's subnet (one it does not
    // own is in the way), so h3 does not answer web's address; h1, which routes it, does.
    crate::expect_answer(h1, "web.cluster", "A", &[&web]);
    crate::expect_nodata(h3, "web.cluster", "A");
    let dns = h1.gateway.to_string();
    h1.run_container("client", &["--dns", &dns, "--dns-search", "cluster"]);
    let client = h1.container_ip("client");
    wait_until(
        Duration::from_secs(20),
        "client on h1 to ping web on h2",
        || {
            let out = h1.try_docker(&["exec", "client", "ping", "-c", "1", "-W", "2", "web"]);
            out.status.success() && text(&out).contains(&format!("from {web}"))
        },
    );
    let out = h1.try_docker(&["exec", "client", "nc", "-w", "5", "web", "8080"]);
    let seen = text(&out);
    let line = seen
        .lines()
        .find(|l| l.contains(&format!("{web}:8080")))
        .unwrap_or_else(|| panic!("no connection in web's netstat:\n{seen}"));
    // An IPv6 socket shows an IPv4 peer as ::ffff:a.b.c.d.
    let peer = line.split_whitespace().nth(4).unwrap_or_default();
    let peer = peer.trim_start_matches("::ffff:");
    assert!(
        peer.starts_with(&format!("{client}:")),
        "web sees the connection from {peer}, not from the client's own {client} (NAT?):\n{seen}"
    );

    // A restart of h1's node changes nothing: no route deleted or added, no duplicates.
    let mut monitor = Command::new("ip")
        .args(["-n", &h1.ns, "monitor", "route"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ip monitor");
    let before = owned_routes(&hosts[0]);
    let rules_before = (
        iptables_s(&hosts[0], "filter"),
        iptables_s(&hosts[0], "nat"),
        iptables_s(&hosts[0], "raw"),
    );
    hosts[0].stop_linkdns();
    hosts[0].restart_linkdns();
    // The first reconciliation after the start, then a periodic one (10 s later).
    wait_until(
        Duration::from_secs(60),
        "two reconciliations after h1's restart",
        || reconciliations(&hosts[0]) >= 2,
    );
    let r = text(&hosts[0].linkdns(&["routes", "--plan"]));
    assert!(
        r.contains("routing  on")
            && r.contains("PLAN\n  nothing to change")
            && r.contains(&format!("subnet   {}", subnet(&hosts[0]))),
        "{r}"
    );
    let _ = monitor.kill();
    let changes = monitor.wait_with_output().expect("monitor output");
    let changes = String::from_utf8_lossy(&changes.stdout);
    assert!(
        !changes.contains("proto 151"),
        "linkdns's routes changed across a restart:\n{changes}"
    );
    assert_eq!(owned_routes(&hosts[0]), before);
    assert_eq!(
        (
            iptables_s(&hosts[0], "filter"),
            iptables_s(&hosts[0], "nat"),
            iptables_s(&hosts[0], "raw")
        ),
        rules_before,
        "the forwarding rules changed across a restart"
    );

    // Docker restarting puts its rules back; linkdns's jumps end up first again, and
    // containers still reach each other.
    hosts[0].stop_dockerd();
    hosts[0].start_dockerd();
    wait_until(
        ROUTES,
        "linkdns's jumps first after Docker's restart",
        || jumps_first(&hosts[0]),
    );
    hosts[0].docker(&["start", "client"]);
    wait_until(
        Duration::from_secs(20),
        "client on h1 to ping web again",
        || {
            let out = hosts[0].try_docker(&["exec", "client", "ping", "-c", "1", "-W", "2", "web"]);
            out.status.success()
        },
    );

    // Removing h2 withdraws its route everywhere; h2 withdraws its own routes and rules.
    let out = hosts[0].linkdns(&["remove", &name(&hosts[1])]);
    assert!(out.status.success(), "remove: {}", text(&out));
    let status = hosts[1].wait_linkdns_exit(Duration::from_secs(20));
    assert!(status.success(), "h2 exits cleanly: {status}");
    wait_until(ROUTES, "h2's route withdrawn everywhere", || {
        let (h1, h3) = (&hosts[0], &hosts[2]);
        owned_routes(h1) == routes_to(&[h3]) && owned_routes(h3) == routes_to(&[h1])
    });
    assert_eq!(owned_routes(&hosts[1]), Vec::<String>::new());
    for table in ["filter", "nat", "raw"] {
        let listing = iptables_s(&hosts[1], table);
        assert!(
            !listing.contains("LINKDNS"),
            "h2 keeps linkdns rules:\n{listing}"
        );
    }
    // h3's foreign route is still there as it was, now that nobody claims that subnet.
    assert_eq!(
        text(&hosts[2].exec("ip", &["route", "show", &subnet(&hosts[1])])),
        foreign_before
    );
}

#[test]
fn a_refused_subnet_no_privilege_or_routing_off_leave_hosts_alone_and_dns_working() {
    let mut hosts: Vec<Host> = (0..3).map(|_| Host::on_lan()).collect();
    // h2's containers live on a Docker network that reuses h1's subnet; h2's node claims it.
    let clash = subnet(&hosts[0]);
    hosts[1].docker(&["network", "create", "--subnet", &clash, "clash"]);
    // h3's node runs without CAP_NET_ADMIN.
    hosts[2].wrapper = [
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
    ]
    .map(String::from)
    .to_vec();
    hosts[0].start_linkdns(&[]);
    let token = hosts[0].token();
    let (first, rest) = hosts.split_at_mut(1);
    rest[0].join_linkdns(&first[0], &token, &["--bridge-network", "clash"]);
    rest[1].join_linkdns(&first[0], &token, &[]);
    let mut hosts = form_joined(hosts);

    // The cluster refuses h2's claim, naming h1 and its subnet; h2 says so and serves DNS.
    let refusal = format!(
        "subnet {clash} overlaps {clash} of node {} (id 1); give this host's Docker network a subnet of its own",
        name(&hosts[0])
    );
    wait_until(ROUTES, "h2 to report its refused claim", || {
        text(&hosts[1].linkdns(&["routes"])).contains(&format!("claim refused: {refusal}"))
    });
    let status = text(&hosts[1].linkdns(&["status"]));
    assert!(status.contains(&refusal), "status on h2:\n{status}");
    assert!(hosts[1]
        .log()
        .contains("the cluster refused this host's container subnet"));
    hosts[1].run_container("api", &["--network", "clash"]);
    let api = hosts[1].container_ip("api");
    // Its address is host-local (nobody routes it to h2; elsewhere it is inside h1's subnet):
    // h2 answers it, the others must not.
    crate::expect_answer(&hosts[1], "api.cluster", "A", &[&api]);
    for h in [&hosts[0], &hosts[2]] {
        crate::expect_nodata(h, "api.cluster", "A");
    }

    // h3 without CAP_NET_ADMIN says so once, claims nothing and changes nothing, but shows
    // what it would do.
    let h3 = &hosts[2];
    let why = "this process lacks CAP_NET_ADMIN";
    let routes = text(&h3.linkdns(&["routes", "--plan"]));
    assert!(routes.contains(&format!("routing  off: {why}")), "{routes}");
    assert!(routes.contains("subnet   none claimed"), "{routes}");
    assert!(
        routes.contains(&format!("add      {}", route_to(&hosts[0]))),
        "h3's plan shows what it would do:\n{routes}"
    );
    assert_eq!(h3.log().matches(why).count(), 1, "said once:\n{}", h3.log());
    assert_eq!(owned_routes(h3), Vec::<String>::new());
    for table in ["filter", "nat", "raw"] {
        assert!(!iptables_s(h3, table).contains("LINKDNS"));
    }
    assert_eq!(
        owned_routes(&hosts[0]),
        Vec::<String>::new(),
        "nobody to route to"
    );
    // Still so after a periodic reconciliation of h1's.
    let done = reconciliations(&hosts[0]);
    wait_until(Duration::from_secs(30), "a reconciliation on h1", || {
        reconciliations(&hosts[0]) > done
    });
    assert_eq!(owned_routes(&hosts[0]), Vec::<String>::new());
    assert!(text(&hosts[2].linkdns(&["routes"])).contains("subnet   none claimed"));

    // With the capability, h3 claims its subnet, and h1 and h3 route to each other.
    hosts[2].stop_linkdns();
    hosts[2].wrapper.clear();
    hosts[2].restart_linkdns();
    wait_until(ROUTES, "h1 and h3 to route to each other", || {
        owned_routes(&hosts[0]) == [route_to(&hosts[2])]
            && owned_routes(&hosts[2]) == [route_to(&hosts[0])]
    });

    // h1 restarted with routing off: it says so once, withdraws its routes and rules, and
    // gives up its claim. That frees the subnet h2 was refused, so h2's claim goes through
    // now, and h3's route to that subnet goes to h2 instead of h1. DNS goes on.
    hosts[0].stop_linkdns();
    hosts[0].start_linkdns(&["--routing", "false"]);
    let to_h2 = format!("{clash} via {}", hosts[1].addr);
    wait_until(ROUTES, "h1's routes withdrawn and h2's claim taken", || {
        owned_routes(&hosts[0]).is_empty() && owned_routes(&hosts[2]) == [to_h2.clone()]
    });
    let routes = text(&hosts[1].linkdns(&["routes"]));
    assert!(routes.contains(&format!("subnet   {clash}")), "{routes}");
    assert!(!routes.contains("claim refused"), "{routes}");
    let why = "routing is off in the configuration";
    let routes = text(&hosts[0].linkdns(&["routes"]));
    assert!(routes.contains(&format!("routing  off: {why}")), "{routes}");
    assert_eq!(hosts[0].log().matches(why).count(), 1);
    for table in ["filter", "nat", "raw"] {
        assert!(!iptables_s(&hosts[0], table).contains("LINKDNS"));
    }
    // api's address is routed now, to every host but h1, whose own Docker network has that
    // subnet: there it would be one of h1's containers.
    crate::expect_answer(&hosts[2], "api.cluster", "A", &[&api]);
    crate::expect_nodata(&hosts[0], "api.cluster", "A");
}

#[test]
fn hosts_get_subnets_from_the_cluster_cidr_and_their_containers_reach_each_other() {
    let pool = "10.77.0.0/16";
    let mut hosts = form(
        (0..2).map(|_| Host::on_lan()).collect(),
        &["--cluster-cidr", pool],
    );
    // Each host claims a block (/20) of the pool of its own, and its Docker network `linkdns`
    // has the block's first /24.
    let claimed = |h: &Host| -> String {
        let routes = text(&h.linkdns(&["routes"]));
        routes
            .lines()
            .find_map(|l| l.strip_prefix("subnet   "))
            .filter(|s| s.starts_with("10.77."))
            .map(str::to_string)
            .unwrap_or_default()
    };
    let network = |h: &Host| {
        let out = h.try_docker(&[
            "network",
            "inspect",
            "linkdns",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_until(
        ROUTES,
        "a network with a subnet of the pool on each host",
        || {
            hosts.iter().all(|h| {
                let (block, net) = (claimed(h), network(h));
                !block.is_empty() && block.ends_with("/20") && net == block.replace("/20", "/24")
            })
        },
    );
    let (s1, s2) = (claimed(&hosts[0]), claimed(&hosts[1]));
    assert_ne!(s1, s2);
    let via = |to: &Host, s: &str| format!("{s} via {}", to.addr);
    wait_until(ROUTES, "routes to the allocated subnets", || {
        owned_routes(&hosts[0]) == [via(&hosts[1], &s2)]
            && owned_routes(&hosts[1]) == [via(&hosts[0], &s1)]
    });

    // Containers on the allocated networks reach each other by name, un-NATed.
    hosts[1].docker(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "linkdns",
        IMAGE,
        "nc",
        "-ll",
        "-p",
        "8080",
        "-e",
        "netstat",
        "-tn",
    ]);
    let web = hosts[1].container_ip("web");
    let gateway = s1.replace(".0/20", ".1");
    hosts[0].run_container(
        "client",
        &[
            "--network",
            "linkdns",
            "--dns",
            &gateway,
            "--dns-search",
            "cluster",
        ],
    );
    let client = hosts[0].container_ip("client");
    wait_until(
        Duration::from_secs(20),
        "client to ping web by name",
        || {
            let out = hosts[0].try_docker(&["exec", "client", "ping", "-c", "1", "-W", "2", "web"]);
            out.status.success() && text(&out).contains(&format!("from {web}"))
        },
    );
    let seen = text(&hosts[0].try_docker(&["exec", "client", "nc", "-w", "5", "web", "8080"]));
    assert!(
        seen.lines()
            .any(|l| l.contains(&format!("{web}:8080")) && l.contains(&format!("{client}:"))),
        "web sees the client's own address {client}:\n{seen}"
    );

    // A restarted node keeps its subnet, and its network is not made again.
    let network_id = hosts[0].docker(&["network", "inspect", "linkdns", "-f", "{{.Id}}"]);
    hosts[0].stop_linkdns();
    hosts[0].restart_linkdns();
    wait_until(ROUTES, "h1 to report its subnet again", || {
        claimed(&hosts[0]) == s1
    });
    assert_eq!(
        hosts[0].docker(&["network", "inspect", "linkdns", "-f", "{{.Id}}"]),
        network_id
    );
}

/// A claim that would take over traffic a host sends elsewhere is not routed there, and that
/// host says why: one that holds its upstream resolver, one outside its claimable ranges.
/// Hosts for which the claim is harmless route it.
#[test]
fn claims_holding_an_upstream_or_outside_the_claimable_ranges_are_not_routed() {
    let mut hosts: Vec<Host> = (0..3).map(|_| Host::on_lan()).collect();
    // h1's upstream resolver lies in h2's container subnet; h3 takes claims only in 10/8.
    let resolver = format!("192.168.{}.53", hosts[1].index);
    hosts[0].start_linkdns(&["--upstream", &format!("{resolver}:53")]);
    let token = hosts[0].token();
    let (first, rest) = hosts.split_at_mut(1);
    rest[0].join_linkdns(&first[0], &token, &[]);
    rest[1].join_linkdns(&first[0], &token, &["--claimable", "10.0.0.0/8"]);
    let hosts = form_joined(hosts);
    let (h1, h2, h3) = (&hosts[0], &hosts[1], &hosts[2]);
    let holds = format!(
        "not routing {} of node {}: holds {resolver}, an upstream resolver of this host",
        subnet(h2),
        name(h2)
    );
    let outside = |of: &Host| {
        format!(
            "not routing {} of node {}: lies outside the claimable ranges (10.0.0.0/8; --claimable)",
            subnet(of),
            name(of)
        )
    };
    wait_until(ROUTES, "the refusals reported where they apply", || {
        text(&h1.linkdns(&["routes"])).contains(&holds) && {
            let on_h3 = text(&h3.linkdns(&["routes"]));
            on_h3.contains(&outside(h1)) && on_h3.contains(&outside(h2))
        }
    });
    // Where the claims harm nothing, they are routed.
    wait_until(ROUTES, "h2 routes both others", || {
        owned_routes(h2) == routes_to(&[h1, h3])
    });
    assert_eq!(owned_routes(h1), routes_to(&[h3]), "h1 routes h3 only");
    assert_eq!(owned_routes(h3), Vec::<String>::new(), "h3 routes nothing");
    assert!(h1.log().contains("route refused"), "the refusal is logged");
}
