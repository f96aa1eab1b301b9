//! Workloads as people run them: a compose project split across two hosts with the real
//! docker-compose, SRV records of exposed ports and named services, answers that rotate with
//! the asker's own host first, and container names with dots in them.

use std::time::Duration;

use crate::cluster::{form, name};
use crate::testbed::{wait_until, Host, IMAGE};
use crate::{expect_answer, SETTLE};

const ROUTES: Duration = Duration::from_secs(30);

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The block of `cluster_cidr` a host's node claims, as `linkdns routes` says.
fn block(h: &Host) -> String {
    text(&h.linkdns(&["routes"]))
        .lines()
        .find_map(|l| l.strip_prefix("subnet   "))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn subnet_of(h: &Host, network: &str) -> String {
    h.docker(&[
        "network",
        "inspect",
        network,
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
    ])
}

fn within(inner: &str, outer: &str) -> bool {
    let (Ok(inner), Ok(outer)) = (
        inner.parse::<linkdns_registry::Subnet>(),
        outer.parse::<linkdns_registry::Subnet>(),
    ) else {
        return false;
    };
    outer.covers(&inner)
}

/// db on h1, web on h2, both of compose project `shop`, each host's Docker set up with
/// `linkdns docker-config`: web reaches db by service name and as `db.shop.cluster`, and db
/// sees web's own address.
#[test]
fn a_compose_project_split_across_hosts_reaches_itself_by_service_name() {
    let mut hosts = form(
        (0..2).map(|_| Host::on_lan()).collect(),
        &["--cluster-cidr", "10.77.0.0/16"],
    );
    // Each host's Docker takes the settings its node gives: bridge and address pools inside
    // the host's block, the node as DNS server, the cluster as search domain.
    for h in hosts.iter_mut() {
        let mut config = String::new();
        wait_until(ROUTES, "the host's block and its Docker settings", || {
            let out = h.linkdns(&["docker-config"]);
            config = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
        });
        let json: serde_json::Value = serde_json::from_str(&config).expect("docker-config JSON");
        assert_eq!(
            json["dns-search"],
            serde_json::json!(["cluster"]),
            "{config}"
        );
        assert_eq!(
            json["default-address-pools"][0]["base"].as_str(),
            Some(block(h).as_str()),
            "{config}"
        );
        h.restart_dockerd_with(&config);
        assert!(
            within(&subnet_of(h, "bridge"), &block(h)),
            "Docker's bridge is in the block now"
        );
    }
    let (h1, h2) = (&hosts[0], &hosts[1]);
    h1.compose_up(
        "shop",
        &format!(
            r#"version: "2.4"
services:
  db:
    image: {IMAGE}
    command: ["nc", "-ll", "-p", "3306", "-e", "netstat", "-tn"]
    expose: ["3306"]
"#
        ),
    );
    h2.compose_up(
        "shop",
        &format!(
            r#"version: "2.4"
services:
  web:
    image: {IMAGE}
    command: ["sleep", "3600"]
"#
        ),
    );
    // Compose made `shop_default` on each host from Docker's pools: inside the host's block,
    // so routed cluster-wide.
    for h in [h1, h2] {
        let net = subnet_of(h, "shop_default");
        assert!(
            within(&net, &block(h)),
            "shop_default {net} on {} is in its block {}",
            name(h),
            block(h)
        );
    }
    let service = |h: &Host, name: &str| {
        let id = h.docker(&[
            "ps",
            "-q",
            "--filter",
            "label=com.docker.compose.project=shop",
            "--filter",
            &format!("label=com.docker.compose.service={name}"),
        ]);
        assert!(!id.is_empty(), "compose service {name} runs on {}", h.ns);
        id
    };
    let (db_id, web_id) = (service(h1, "db"), service(h2, "web"));
    let db = h1.container_ip(&db_id);
    let web = h2.container_ip(&web_id);
    expect_answer(h2, "db.shop.cluster", "A", &[&db]);
    expect_answer(h1, "web.shop.cluster", "A", &[&web]);
    let exec = |args: &[&str]| {
        let mut full = vec!["exec", web_id.as_str()];
        full.extend_from_slice(args);
        text(&h2.try_docker(&full))
    };
    // Through Docker's embedded DNS, which asks the node for what it does not know.
    for query in ["db", "db.shop.cluster", "db.cluster"] {
        let out = exec(&["nslookup", query]);
        assert!(out.contains(&db), "nslookup {query} from web on h2:\n{out}");
    }
    let ping = exec(&["ping", "-c", "1", "-W", "5", "db"]);
    assert!(
        ping.contains(&format!("from {db}")),
        "web pings db by service name:\n{ping}"
    );
    // db's netstat shows web's connection coming from web's own address: no NAT.
    let seen = exec(&["nc", "-w", "5", "db", "3306"]);
    let line = seen
        .lines()
        .find(|l| l.contains(&format!("{db}:3306")))
        .unwrap_or_else(|| panic!("no connection in db's netstat:\n{seen}"));
    let peer = line.split_whitespace().nth(4).unwrap_or_default();
    assert!(
        peer.trim_start_matches("::ffff:")
            .starts_with(&format!("{web}:")),
        "db sees web at {peer}, not at web's own {web}:\n{seen}"
    );
}

/// The SRV records of `name` from inside `h`, as `port target` lines in answer order.
fn srv(h: &Host, name: &str) -> (String, Vec<String>) {
    let d = h.dig(&["@127.0.0.1", name, "SRV"]);
    let records = d
        .answers
        .iter()
        .filter_map(|r| {
            let f: Vec<&str> = r.split_whitespace().collect();
            (f.get(3) == Some(&"SRV")).then(|| format!("{} {}", f[6], f[7]))
        })
        .collect();
    (d.status.clone(), records)
}

#[test]
fn srv_records_come_from_exposed_ports_labels_and_link_aliases() {
    let hosts = form((0..2).map(|_| Host::on_lan()).collect(), &[]);
    let (h1, h2) = (&hosts[0], &hosts[1]);
    let (n1, n2) = (name(h1), name(h2));
    h1.run_container(
        "api",
        &[
            "--expose",
            "8080",
            "--label",
            "linkdns.srv=http:8080,metrics:9100",
        ],
    );
    h2.run_container("api", &["--expose", "8080", "--expose", "53/udp"]);
    let api1 = h1.container_ip("api");
    let api2 = h2.container_ip("api");
    expect_answer(h2, "api.cluster", "A", &[&api1, &api2]);
    // Port 8080 of both, h2's own first when h2 is asked; each target's address as glue.
    let d = h2.dig(&["@127.0.0.1", "_8080._tcp.api.cluster", "SRV", "+additional"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    let (_, records) = srv(h2, "_8080._tcp.api.cluster");
    assert_eq!(
        records,
        [
            format!("8080 api.{n2}.cluster."),
            format!("8080 api.{n1}.cluster.")
        ]
    );
    let lines: Vec<String> = d
        .raw
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for (n, ip) in [(&n1, &api1), (&n2, &api2)] {
        let glue = format!("api.{n}.cluster. 5 IN A {ip}");
        assert!(lines.contains(&glue), "glue {glue:?}:\n{}", d.raw);
    }
    // Named services from the label; protocols as exposed; every port of a plain name.
    assert_eq!(
        srv(h2, "_http._tcp.api.cluster").1,
        [format!("8080 api.{n1}.cluster.")]
    );
    assert_eq!(
        srv(h2, "_metrics._tcp.api.cluster").1,
        [format!("9100 api.{n1}.cluster.")]
    );
    assert_eq!(
        srv(h2, "_53._udp.api.cluster").1,
        [format!("53 api.{n2}.cluster.")]
    );
    assert_eq!(srv(h2, "_53._tcp.api.cluster").0, "NXDOMAIN");
    assert_eq!(srv(h2, "_9999._tcp.api.cluster").0, "NXDOMAIN");
    let mut all = srv(h2, "api.cluster").1;
    all.sort();
    let mut want = vec![
        format!("53 api.{n2}.cluster."),
        format!("8080 api.{n1}.cluster."),
        format!("8080 api.{n2}.cluster."),
        format!("9100 api.{n1}.cluster."),
    ];
    want.sort();
    assert_eq!(all, want);
    assert_eq!(
        srv(h2, &format!("_8080._tcp.api.{n1}.cluster")).1,
        [format!("8080 api.{n1}.cluster.")]
    );
    // A link alias, from the linking container's first instruction, bare and in the domain.
    for query in ["_8080._tcp.backend", "_8080._tcp.backend.cluster"] {
        let out = text(&h2.try_docker(&[
            "run",
            "--rm",
            "--label",
            "linkdns.links=api:backend",
            "--dns",
            &h2.gateway.to_string(),
            "--dns-search",
            "cluster",
            IMAGE,
            "nslookup",
            "-type=srv",
            query,
        ]));
        assert!(
            out.contains(&format!("8080 api.{n1}.cluster"))
                && out.contains(&format!("8080 api.{n2}.cluster")),
            "{query} from the linking container:\n{out}"
        );
    }
    assert_eq!(
        srv(h2, "_8080._tcp.backend.cluster").0,
        "NXDOMAIN",
        "nobody's link from the host"
    );
}

/// The A records of `name` from inside `h`, in answer order.
fn in_order(h: &Host, name: &str) -> Vec<String> {
    h.dig(&["@127.0.0.1", name, "A"])
        .answers
        .iter()
        .filter_map(|r| r.split_whitespace().nth(4).map(str::to_string))
        .collect()
}

#[test]
fn answers_rotate_over_three_hosts_with_the_askers_host_first() {
    let hosts = form((0..3).map(|_| Host::on_lan()).collect(), &[]);
    let mut ips = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        h.run_container(&format!("pool-{i}"), &["--label", "linkdns.alias=pool"]);
        ips.push(h.container_ip(&format!("pool-{i}")));
    }
    let all: Vec<&str> = ips.iter().map(String::as_str).collect();
    for h in &hosts {
        expect_answer(h, "pool.cluster", "A", &all);
    }
    for (i, h) in hosts.iter().enumerate() {
        let orders: Vec<Vec<String>> = (0..6).map(|_| in_order(h, "pool.cluster")).collect();
        for order in &orders {
            assert_eq!(order.len(), 3, "{orders:?}");
            assert_eq!(
                order[0],
                ips[i],
                "{}'s own container first: {orders:?}",
                name(h)
            );
        }
        let seconds: std::collections::BTreeSet<&String> = orders.iter().map(|o| &o[1]).collect();
        assert_eq!(
            seconds.len(),
            2,
            "the other two hosts' containers take turns on {}: {orders:?}",
            name(h)
        );
    }
    // Inside a container too (busybox prints the addresses in the order it got them).
    let h1 = &hosts[0];
    h1.run_container("asker", &["--dns", &h1.gateway.to_string()]);
    wait_until(SETTLE, "asker to run", || {
        h1.try_docker(&["exec", "asker", "true"]).status.success()
    });
    let out = text(&h1.try_docker(&["exec", "asker", "nslookup", "pool.cluster"]));
    // The server's own lines come first, then `Name:` and the answers.
    let first = out
        .lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .find_map(|l| l.strip_prefix("Address:"))
        .map(str::trim)
        .unwrap_or_default();
    assert_eq!(first, ips[0], "{out}");
}

#[test]
fn dotted_container_names_follow_the_node_qualified_rule() {
    let hosts = form((0..2).map(|_| Host::on_lan()).collect(), &[]);
    let (h1, h2) = (&hosts[0], &hosts[1]);
    let (n1, n2) = (name(h1), name(h2));
    // On h1 a container named like "web on h2"; on h2 that web.
    let dotted = format!("web.{n2}");
    h1.run_container(&dotted, &[]);
    h2.run_container("web", &[]);
    h1.run_container("api.v2", &[]);
    let dotted_ip = h1.container_ip(&dotted);
    let web = h2.container_ip("web");
    let api = h1.container_ip("api.v2");
    for h in [h1, h2] {
        // The last label names a node: node-qualified, whatever the containers are called.
        expect_answer(h, &format!("web.{n2}.cluster"), "A", &[&web]);
        // The dotted container is found under its own node.
        expect_answer(h, &format!("web.{n2}.{n1}.cluster"), "A", &[&dotted_ip]);
        expect_answer(h, "api.v2.cluster", "A", &[&api]);
    }
    let ptr = h2.dig(&["@127.0.0.1", "-x", &dotted_ip]);
    assert_eq!(
        ptr.rdata(),
        [format!("web.{n2}.{n1}.cluster.")],
        "{}",
        ptr.raw
    );
    let ptr = h2.dig(&["@127.0.0.1", "-x", &api]);
    assert_eq!(ptr.rdata(), ["api.v2.cluster."], "{}", ptr.raw);
}
