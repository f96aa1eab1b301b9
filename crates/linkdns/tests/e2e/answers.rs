//! Answers as workloads see them: apps that resolve their links at their first instruction,
//! and addresses on host-local networks (Docker's default pools repeat on every host), which
//! only their own host may be told.

use crate::cluster::{form, name};
use crate::testbed::{wait_until, Host, IMAGE};
use crate::{expect_answer, expect_nodata, SETTLE};

/// `docker run --rm … nslookup NAME` on `h`, as an app that resolves at its first instruction:
/// one try, no sleep before it. Returns what nslookup printed.
fn first_lookup(h: &Host, flags: &[&str], name: &str) -> String {
    let dns = h.gateway.to_string();
    let mut args = vec!["run", "--rm", "--dns", &dns, "--dns-search", "cluster"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[IMAGE, "nslookup", name]);
    let out = h.try_docker(&args);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn links_are_answered_at_a_containers_first_instruction_on_every_host() {
    let hosts = form((0..3).map(|_| Host::on_lan()).collect(), &[]);
    let (h1, h3) = (&hosts[0], &hosts[2]);
    h1.run_container("mysql", &[]);
    let mysql = h1.container_ip("mysql");
    // mysql exists (replicated to h3) before any of the askers below starts.
    expect_answer(h3, "mysql.cluster", "A", &[&mysql]);
    // A local target too: the link is answered whether its target runs here or elsewhere.
    h3.run_container("cache", &[]);
    let cache = h3.container_ip("cache");
    expect_answer(h3, "cache.cluster", "A", &[&cache]);
    let links = ["--label", "linkdns.links=mysql:db,cache:kv"];
    for round in 1..=20 {
        let out = first_lookup(h3, &links, "db");
        assert!(
            out.contains(&mysql) && !out.contains("NXDOMAIN"),
            "round {round}: db from a new container on {} (mysql on {}):\n{out}",
            name(h3),
            name(h1)
        );
    }
    for round in 1..=5 {
        let out = first_lookup(h3, &links, "kv.cluster");
        assert!(out.contains(&cache), "round {round}: kv.cluster:\n{out}");
        // An app whose health check has not passed yet still resolves its links.
        let mut flags = links.to_vec();
        flags.extend_from_slice(&["--health-cmd", "false", "--health-interval", "60s"]);
        let out = first_lookup(h3, &flags, "db");
        assert!(
            out.contains(&mysql),
            "round {round}: db from a container that is not healthy yet:\n{out}"
        );
    }
    // Without the label, `db` is nobody's link: not answered as mysql.
    let out = first_lookup(h3, &[], "db.cluster");
    assert!(
        !out.contains(&mysql),
        "db is not this container's link:\n{out}"
    );
    let held = crate::admin_get(h3, "/metrics");
    assert!(
        held.contains("linkdns_dns_held_expired_total 0"),
        "no query waited out the hold:\n{held}"
    );
}

#[test]
fn host_local_addresses_are_answered_only_on_their_host() {
    let hosts = form((0..2).map(|_| Host::on_lan()).collect(), &[]);
    let (h1, h2) = (&hosts[0], &hosts[1]);
    // `docker network create app` takes the same subnet from Docker's default pools on both.
    for h in [h1, h2] {
        h.docker(&["network", "create", "app"]);
    }
    let subnet = |h: &Host| {
        h.docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
            "app",
        ])
    };
    assert_eq!(
        subnet(h1),
        subnet(h2),
        "the test wants the same subnet on both"
    );
    h1.run_container("solo", &["--network", "app"]);
    h2.run_container("impostor", &["--network", "app"]);
    let solo = h1.container_ip("solo");
    let impostor = h2.container_ip("impostor");
    assert_eq!(
        solo, impostor,
        "the test wants the same address on both hosts"
    );
    // Dual-homed: on h1's routed bridge and on the host-local `app`.
    h1.run_container("dual", &[]);
    let routed = h1.container_ip("dual");
    h1.docker(&["network", "connect", "app", "dual"]);
    let local_ip = h1
        .docker(&[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"app\").IPAddress}}",
            "dual",
        ])
        .trim()
        .to_string();
    let mut both = vec![routed.as_str(), local_ip.as_str()];
    both.sort();
    expect_answer(h1, "dual.cluster", "A", &both);
    expect_answer(h1, "solo.cluster", "A", &[&solo]);
    // h2 has every record by now (dual came after solo), and answers only what reaches it.
    expect_answer(h2, "dual.cluster", "A", &[&routed]);
    for _ in 0..20 {
        let d = h2.dig(&["@127.0.0.1", "solo.cluster", "A"]);
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert!(
            d.answers.is_empty(),
            "h2 must not answer solo's address:\n{}",
            d.raw
        );
    }
    expect_nodata(h2, "solo.cluster", "A");
    expect_answer(h2, "impostor.cluster", "A", &[&impostor]);
    let ptr = h2.dig(&["@127.0.0.1", "-x", &impostor]);
    assert_eq!(ptr.rdata(), ["impostor.cluster."], "{}", ptr.raw);
    let ptr = h1.dig(&["@127.0.0.1", "-x", &solo]);
    assert_eq!(ptr.rdata(), ["solo.cluster."], "{}", ptr.raw);
    // From inside a container on h2, as an app would ask.
    h2.run_container("client", &["--dns", &h2.gateway.to_string()]);
    wait_until(SETTLE, "client to run", || {
        h2.try_docker(&["exec", "client", "true"]).status.success()
    });
    let out = h2.try_docker(&["exec", "client", "nslookup", "solo.cluster"]);
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.contains(&solo),
        "solo's address reached h2's container:\n{out}"
    );
    let out = h2.try_docker(&["exec", "client", "nslookup", "dual.cluster"]);
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.contains(&routed) && !out.contains(&local_ip),
        "dual from h2: only its routed address:\n{out}"
    );
}

/// Five apps start at once on one host (as `docker-compose up` starts a project), each
/// resolving `db` at its first instruction, each linking a different container as `db`: every
/// one gets its own target's address, none another's.
#[test]
fn apps_starting_together_each_get_their_own_links_at_their_first_query() {
    let hosts = form((0..2).map(|_| Host::on_lan()).collect(), &[]);
    let (h1, h2) = (&hosts[0], &hosts[1]);
    let targets: Vec<String> = (0..5)
        .map(|k| {
            h1.run_container(&format!("db{k}"), &[]);
            h1.container_ip(&format!("db{k}"))
        })
        .collect();
    for (k, ip) in targets.iter().enumerate() {
        expect_answer(h2, &format!("db{k}.cluster"), "A", &[ip]);
    }
    for round in 1..=4 {
        let outputs: Vec<String> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..5)
                .map(|k| {
                    s.spawn(move || {
                        first_lookup(h2, &["--label", &format!("linkdns.links=db{k}:db")], "db")
                    })
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap_or_default())
                .collect()
        });
        for (k, out) in outputs.iter().enumerate() {
            let others: Vec<&String> = targets.iter().filter(|t| **t != targets[k]).collect();
            assert!(
                out.contains(&targets[k]) && others.iter().all(|o| !out.contains(o.as_str())),
                "round {round}, app {k} (links db{k} as db) got:\n{out}"
            );
        }
    }
    let metrics = crate::admin_get(h2, "/metrics");
    assert!(
        metrics.contains("linkdns_dns_held_expired_total 0"),
        "no query waited out the hold:\n{metrics}"
    );
}
