//! Several hosts, one cluster: each host a network namespace on a shared LAN with its own
//! Docker engine and `linkdns` node; joined with `linkdns join` and the token of `linkdns token`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::expect_answer;
use crate::testbed::{wait_until, Host};

const FORM: Duration = Duration::from_secs(60);

/// `n` hosts: the first bootstraps the cluster, the others join through it. Returns once the
/// first host sees min(n, 3) voters and the rest as learners, all heard from.
fn form_cluster(n: usize, extra: &[&str]) -> Vec<Host> {
    form((0..n).map(|_| Host::on_lan()).collect(), extra)
}

/// [`form_cluster`] of hosts made already.
pub(crate) fn form(mut hosts: Vec<Host>, extra: &[&str]) -> Vec<Host> {
    hosts[0].start_linkdns(extra);
    let token = hosts[0].token();
    assert!(token.starts_with("LDNS1-"), "token: {token}");
    let (first, rest) = hosts.split_at_mut(1);
    for h in rest {
        h.join_linkdns(&first[0], &token, extra);
    }
    let hosts = form_joined(hosts);
    assert_token_kept_secret(&hosts, &token);
    hosts
}

/// No linkdns process shows the join token in its command line or environment, and no log
/// holds its secret, once the hosts joined.
fn assert_token_kept_secret(hosts: &[Host], token: &str) {
    let secret = token.rsplit('-').next().expect("a token's secret part");
    assert_eq!(secret.len(), 64, "token: {token}");
    for h in hosts {
        let pid = h.linkdns_pid().expect("linkdns runs");
        for what in ["cmdline", "environ"] {
            let bytes = std::fs::read(format!("/proc/{pid}/{what}")).expect("/proc");
            let text = String::from_utf8_lossy(&bytes).replace('\0', " ");
            assert!(
                !text.contains(secret),
                "token in /proc/{pid}/{what}: {text}"
            );
            if what == "cmdline" {
                assert!(text.contains(" run "), "continues as run: {text}");
            }
        }
        assert!(!h.log().contains(secret), "token in the log of {}", h.ns);
    }
}

/// Waits for hosts whose first one bootstrapped and the others joined to form the cluster.
pub(crate) fn form_joined(hosts: Vec<Host>) -> Vec<Host> {
    let n = hosts.len();
    // Promotions go through odd voter counts only: two hosts are one voter and a learner.
    let voters = if n >= 3 { 3 } else { 1 };
    wait_until(FORM, "the cluster to form", || {
        let s = hosts[0].status_json();
        let members = s["members"].as_array().cloned().unwrap_or_default();
        let count = |role: &str| members.iter().filter(|m| m["role"] == role).count();
        members.len() == n
            && count("voter") == voters
            && count("learner") == n - voters
            && members.iter().all(|m| m["alive"] == true)
    });
    hosts
}

pub(crate) fn name(h: &Host) -> String {
    format!("h{}", h.index)
}

/// The index in `hosts` of the leader, as `from` sees it.
fn leader(hosts: &[Host], from: &Host) -> Option<usize> {
    let s = from.status_json();
    let leader = s["leader"].as_str()?.to_string();
    hosts.iter().position(|h| name(h) == leader)
}

/// `token` with the last digit of its secret changed.
fn wrong_secret(token: &str) -> String {
    let mut wrong = token.to_string();
    let last = if wrong.ends_with('0') { '1' } else { '0' };
    wrong.pop();
    wrong.push(last);
    wrong
}

fn nslookup(h: &Host, container: &str, query: &str) -> String {
    let out = h.try_docker(&["exec", container, "nslookup", query]);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn three_hosts_answer_for_each_other_and_survive_losing_the_leader() {
    let mut hosts = form_cluster(3, &[]);
    let (h1, h2, h3) = (&hosts[0], &hosts[1], &hosts[2]);

    // A container on h2 is answered on h1 and h3, also by its node-qualified name.
    h2.run_container("web", &[]);
    let web = h2.container_ip("web");
    for h in [h1, h3] {
        expect_answer(h, "web.cluster", "A", &[&web]);
        expect_answer(h, &format!("web.{}.cluster", name(h2)), "A", &[&web]);
    }
    expect_answer(h1, &format!("web.{}.cluster", name(h1)), "A", &[]);

    // A link across hosts: wordpress on h3 links mysql on h1 as `db`.
    h1.run_container("mysql", &[]);
    let mysql = h1.container_ip("mysql");
    let dns = h3.gateway.to_string();
    h3.run_container(
        "wordpress",
        &[
            "--label",
            "linkdns.links=mysql:db",
            "--dns",
            &dns,
            "--dns-search",
            "cluster",
        ],
    );
    wait_until(Duration::from_secs(20), "db from wordpress on h3", || {
        nslookup(h3, "wordpress", "db").contains(&mysql)
    });

    // Kill the leader while the others answer queries: not one may fail.
    let dead = leader(&hosts, &hosts[1]).expect("a leader");
    let survivors: Vec<usize> = (0..3).filter(|&i| i != dead).collect();
    let pid = hosts[dead].linkdns_pid().expect("running");
    let (failed, asked) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for &i in &survivors {
            let (h, web, failed, asked) = (&hosts[i], &web, &failed, &asked);
            s.spawn(move || {
                for _ in 0..60 {
                    let d = h.dig(&["@127.0.0.1", "web.cluster", "A", "+time=1", "+tries=1"]);
                    asked.fetch_add(1, Ordering::Relaxed);
                    if d.status != "NOERROR" || d.rdata() != [web.clone()] {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed query on {}: {}", h.ns, d.raw);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        crate::testbed::sh("kill", &["-9", &pid.to_string()]);
    });
    hosts[dead].kill_linkdns();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "queries failed during the leader's death"
    );
    assert!(asked.load(Ordering::Relaxed) >= 100);

    // A new leader; writes resume: a container started now is answered on the other survivor.
    let (a, b) = (survivors[0], survivors[1]);
    wait_until(Duration::from_secs(15), "a new leader", || {
        leader(&hosts, &hosts[a]).is_some_and(|l| l != dead)
    });
    hosts[a].run_container("api", &[]);
    let api = hosts[a].container_ip("api");
    expect_answer(&hosts[b], "api.cluster", "A", &[&api]);

    // What the survivors' /metrics say about it.
    let metrics: Vec<String> = [a, b]
        .iter()
        .map(|&i| admin_get(&hosts[i], "/metrics").expect("metrics"))
        .collect();
    let leaders: f64 = metrics
        .iter()
        .map(|m| metric(m, "linkdns_raft_is_leader").expect("is_leader"))
        .sum();
    assert_eq!(leaders, 1.0, "one of the survivors leads");
    let new_leader = leader(&hosts, &hosts[a]).expect("leader");
    for (m, &i) in metrics.iter().zip(&[a, b]) {
        let id = hosts[i].status_json()["leader_id"].as_f64();
        assert_eq!(metric(m, "linkdns_raft_leader_id"), id, "{m}");
        assert!(
            metric(m, "linkdns_raft_leader_changes_total") >= Some(1.0),
            "{m}"
        );
        assert_eq!(metric(m, "linkdns_members"), Some(3.0), "{m}");
        for other in (0..3).filter(|&o| o != i) {
            let peer = format!(
                "linkdns_peer_last_contact_seconds{{peer=\"{}\"}}",
                name(&hosts[other])
            );
            assert!(metric(m, &peer).is_some(), "{peer} in {m}");
        }
        assert!(metric(m, "linkdns_data_dir_bytes") > Some(0.0), "{m}");
        assert!(
            metric(m, "linkdns_route_reconciliations_total") >= Some(1.0),
            "{m}"
        );
        assert_eq!(metric(m, "linkdns_routes"), Some(2.0), "{m}");
        assert!(metric(m, "linkdns_snapshot_bytes").is_some(), "{m}");
    }
    // The Grafana dashboard in config/ asks only for metrics a node exposes.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../config/grafana-dashboard.json"),
    )
    .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("linkdns_") {
                    let base = word.trim_end_matches("_total").trim_end_matches("_bucket");
                    let typed = format!("# TYPE {base} ");
                    assert!(
                        metrics[0].contains(&typed),
                        "the dashboard asks for {word}: {typed:?} not in /metrics"
                    );
                    asked += 1;
                }
            }
        }
    }
    assert!(asked >= 20, "{asked}");
    let applied = "linkdns_proposals_total{outcome=\"applied\"}";
    assert!(metric(&metrics[0], applied) >= Some(1.0), "{}", metrics[0]);
    assert!(new_leader != dead);

    // The killed node restarts with plain `linkdns run` and catches up.
    hosts[dead].restart_linkdns();
    expect_answer(&hosts[dead], "api.cluster", "A", &[&api]);
    expect_answer(&hosts[dead], "web.cluster", "A", &[&web]);

    // So does a node that joined (h3 was never the bootstrap node), killed while a container
    // starts on another host.
    hosts[2].kill_linkdns();
    hosts[0].run_container("late", &[]);
    let late = hosts[0].container_ip("late");
    hosts[2].restart_linkdns();
    expect_answer(&hosts[2], "late.cluster", "A", &[&late]);
}

#[test]
fn a_partitioned_host_keeps_answering_and_converges_after_healing() {
    let hosts = form_cluster(3, &["--liveness-timeout", "3"]);
    // Cut off the leader: the majority must elect another and carry on.
    let cut = leader(&hosts, &hosts[0]).expect("a leader");
    let majority: Vec<usize> = (0..3).filter(|&i| i != cut).collect();
    let (m0, m1) = (&hosts[majority[0]], &hosts[majority[1]]);
    let c = &hosts[cut];
    c.run_container("before", &[]);
    m0.run_container("web", &[]);
    let before = c.container_ip("before");
    let web = m0.container_ip("web");
    expect_answer(m1, "before.cluster", "A", &[&before]);
    expect_answer(c, "web.cluster", "A", &[&web]);
    for h in &hosts {
        assert_eq!(admin_get(h, "/health"), Some("ok\n".to_string()));
        let ready = readiness(h).expect("ready");
        assert_eq!(ready["leader"], true, "{ready}");
    }

    c.partition();
    // The cut host answers from its replica: still ready (caught up), without a leader.
    wait_until(
        Duration::from_secs(15),
        "the cut host to see it has no leader",
        || readiness(c).is_some_and(|r| r["leader"] == false),
    );
    let ready = readiness(c).expect("still ready: it answers from a caught-up replica");
    assert!(
        ready["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no leader")),
        "{ready}"
    );
    expect_answer(c, "web.cluster", "A", &[&web]);
    expect_answer(c, "before.cluster", "A", &[&before]);
    // The majority hides the silent host's records after the liveness timeout.
    expect_answer(m1, "before.cluster", "A", &[]);
    let s = m1.status_json();
    let cut_member = s["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name(c)).cloned())
        .expect("cut host listed");
    assert_eq!(cut_member["alive"], false, "{s}");
    // Writes on the majority go on; the cut host accepts none and does not see them.
    m0.run_container("during", &[]);
    let during = m0.container_ip("during");
    expect_answer(m1, "during.cluster", "A", &[&during]);
    c.run_container("isolated", &[]);
    let isolated = c.container_ip("isolated");
    std::thread::sleep(Duration::from_secs(2));
    expect_answer(c, "during.cluster", "A", &[]);
    expect_answer(m1, "isolated.cluster", "A", &[]);

    c.heal();
    wait_until(
        Duration::from_secs(15),
        "the cut host to follow a leader again",
        || readiness(c).is_some_and(|r| r["leader"] == true),
    );
    // Everyone converges: the majority's write reaches the cut host, the cut host's containers
    // (the hidden one and the one started while cut off) reach the majority.
    for h in [c, m0, m1] {
        expect_answer(h, "during.cluster", "A", &[&during]);
        expect_answer(h, "isolated.cluster", "A", &[&isolated]);
        expect_answer(h, "before.cluster", "A", &[&before]);
    }
    wait_until(Duration::from_secs(20), "replicas to agree", || {
        let views: Vec<(u64, u64, u64)> = [c, m0, m1]
            .iter()
            .map(|h| {
                let s = h.status_json();
                (
                    s["applied_index"].as_u64().unwrap_or(0),
                    s["records"].as_u64().unwrap_or(0),
                    s["leader_id"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        views.iter().all(|v| *v == views[0])
    });
}

/// GET `path` from a host's admin endpoint (inside its namespace, with busybox wget): the body
/// when the answer is 200, `None` otherwise.
pub(crate) fn admin_get(h: &Host, path: &str) -> Option<String> {
    let addr = std::fs::read_to_string(h.data_dir().join("admin.addr")).ok()?;
    let url = format!("http://{}{path}", addr.trim());
    let out = h.exec("busybox", &["wget", "-q", "-O", "-", &url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the sample `name` (with its labels, as exposed) in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `/ready` of a host, when it answers 200.
fn readiness(h: &Host) -> Option<serde_json::Value> {
    serde_json::from_str(&admin_get(h, "/ready")?).ok()
}

#[test]
fn joining_needs_the_right_token_a_reachable_member_and_a_free_name() {
    let mut h1 = Host::on_lan();
    h1.start_linkdns(&[]);
    let mut other = Host::on_lan();
    other.start_linkdns(&[]);
    let h2 = Host::on_lan();
    let token = h1.token();
    let peer = h1.peer_addr();
    let join = |token: &str, peer: &str, node_name: &str| {
        let data_dir = h2.data_dir();
        let out = h2.exec(
            "timeout",
            &[
                "20",
                crate::testbed::linkdns_bin(),
                "join",
                peer,
                "--token",
                token,
                "--node-name",
                node_name,
                "--data-dir",
                data_dir.to_str().unwrap_or_default(),
            ],
        );
        assert_eq!(out.status.code(), Some(1), "join must fail: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let wrong = wrong_secret(&token);
    assert!(join(&wrong, &peer, "h2").contains("secret does not match"));
    assert!(join(&other.token(), &peer, "h2").contains("member of the token's cluster"));
    assert!(join("not-a-token", &peer, "h2").contains("bad join token"));
    let nobody = format!("{}:7380", crate::testbed::lan_unused());
    assert!(join(&token, &nobody, "h2").contains("cannot reach"));
    assert!(join(&token, &peer, &name(&h1)).contains("already used"));

    // `linkdns token --rotate`: the old token is refused at once, `linkdns token` prints the
    // new one.
    let out = h1.linkdns(&["token", "--rotate"]);
    assert!(out.status.success(), "rotate: {out:?}");
    let rotated = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        rotated.starts_with("LDNS1-") && rotated != token,
        "{rotated}"
    );
    assert_eq!(h1.token(), rotated);
    assert!(join(&token, &peer, "h2").contains("secret does not match"));
    assert!(!h1.log().contains(rotated.rsplit('-').next().unwrap_or("-")));

    // Nothing was admitted, nothing was written on the joining host.
    let s = h1.status_json();
    assert_eq!(s["members"].as_array().map(Vec::len), Some(1), "{s}");
    assert!(!h2.data_dir().join("cluster.json").exists());
    other.stop_linkdns();
}

/// The service's command, `linkdns run --join PEERS --token-file FILE`: started before any
/// listed member is up, it asks until one admits it; it then runs, and the same command on
/// every later start just runs the member it became. A token that can never work stops it at
/// once, with the reason.
#[test]
fn a_service_joins_with_retries_and_restarts_with_the_same_command() {
    let mut h1 = Host::on_lan();
    h1.start_linkdns(&[]);
    let token = h1.token();
    h1.stop_linkdns();

    // No member up: an address nobody has, then h1 (stopped).
    let mut h2 = Host::on_lan();
    let peers = [
        format!("{}:7380", crate::testbed::lan_unused()),
        h1.peer_addr(),
    ];
    h2.start_linkdns_joining(&peers, &token, &[]);
    wait_until(
        Duration::from_secs(30),
        "h2 to ask every member twice",
        || h2.log().matches("no member admitted this host yet").count() >= 2,
    );
    let pid = h2.linkdns_pid().expect("h2 runs");
    assert!(!h2.data_dir().join("cluster.json").exists());

    h1.restart_linkdns();
    h2.wait_linkdns_answers();
    let hosts = form_joined(vec![h1, h2]);
    let (h1, mut h2) = {
        let mut it = hosts.into_iter();
        (it.next().expect("h1"), it.next().expect("h2"))
    };
    assert_token_kept_secret(std::slice::from_ref(&h2), &token);
    // The same process, now `run` without the token (it execs itself).
    assert_eq!(h2.linkdns_pid(), Some(pid));
    let node_id = h2.status_json()["node_id"].clone();

    // A restart with the very same command runs the member: no second join.
    h2.run_container("web", &[]);
    let asked = h2.log().matches("asking to join").count();
    h2.stop_linkdns();
    h2.restart_linkdns();
    assert_eq!(h2.status_json()["node_id"], node_id);
    assert_eq!(h2.log().matches("asking to join").count(), asked);
    assert_eq!(h2.log().matches("admitted as a learner").count(), 1);
    let members = h1.status_json()["members"].as_array().map(Vec::len);
    assert_eq!(members, Some(2));
    expect_answer(
        &h1,
        &format!("web.{}.cluster", name(&h2)),
        "A",
        &[&h2.container_ip("web")],
    );

    // A wrong token: refused for good, so it stops (exit 1) after one try per member.
    let h3 = Host::on_lan();
    let wrong = wrong_secret(&token);
    let file = h3.write_token_file(&wrong);
    let data_dir = h3.data_dir();
    let out = h3.exec(
        "timeout",
        &[
            "20",
            crate::testbed::linkdns_bin(),
            "run",
            "--join",
            &h1.peer_addr(),
            "--token-file",
            file.to_str().unwrap_or_default(),
            "--node-name",
            "h3",
            "--data-dir",
            data_dir.to_str().unwrap_or_default(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("secret does not match"), "{stderr}");
    assert_eq!(stderr.matches("asking to join").count(), 1, "{stderr}");
    assert!(!stderr.contains(wrong.rsplit('-').next().unwrap_or("-")));
    assert!(!data_dir.join("cluster.json").exists());
}

#[test]
fn a_fourth_host_is_a_learner_and_is_promoted_when_a_voter_is_removed() {
    let mut hosts = form_cluster(4, &[]);
    let learner = {
        let s = hosts[0].status_json();
        let members = s["members"].as_array().cloned().unwrap_or_default();
        let m = members
            .iter()
            .find(|m| m["role"] == "learner")
            .expect("a learner")
            .clone();
        hosts
            .iter()
            .position(|h| m["name"] == name(h))
            .expect("learner host")
    };
    // The CA key is on the voters' disks only, never on the learner's.
    let ca_key_on_disk = |h: &Host| {
        let file = std::fs::read(h.data_dir().join("cluster.json")).expect("cluster.json");
        let identity: serde_json::Value = serde_json::from_slice(&file).expect("JSON");
        identity["ca_key"].as_str().is_some_and(|k| !k.is_empty())
    };
    wait_until(
        Duration::from_secs(10),
        "the voters to hold the CA key",
        || {
            (0..4)
                .filter(|&i| i != learner)
                .all(|i| ca_key_on_disk(&hosts[i]))
        },
    );
    assert!(
        !ca_key_on_disk(&hosts[learner]),
        "a learner holds no CA key"
    );

    // The learner holds a full replica.
    hosts[0].run_container("db", &[]);
    let db = hosts[0].container_ip("db");
    expect_answer(&hosts[learner], "db.cluster", "A", &[&db]);

    // Remove a voter that is not the leader, from another host.
    let lead = leader(&hosts, &hosts[0]).expect("leader");
    let victim = (0..4)
        .find(|&i| i != lead && i != learner)
        .expect("a voter");
    let asker = (0..4)
        .find(|&i| i != victim && i != learner)
        .expect("another host");
    hosts[victim].run_container("gone", &[]);
    expect_answer(
        &hosts[learner],
        "gone.cluster",
        "A",
        &[&hosts[victim].container_ip("gone")],
    );
    let out = hosts[asker].linkdns(&["remove", &name(&hosts[victim])]);
    assert!(
        out.status.success(),
        "remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed node"));

    wait_until(Duration::from_secs(20), "the learner's promotion", || {
        let s = hosts[asker].status_json();
        let members = s["members"].as_array().cloned().unwrap_or_default();
        members.len() == 3
            && members
                .iter()
                .all(|m| m["role"] == "voter" && m["name"] != name(&hosts[victim]))
    });
    // The removed host's records are gone, and its node stops and moves its state aside.
    expect_answer(&hosts[learner], "gone.cluster", "A", &[]);
    let status = hosts[victim].wait_linkdns_exit(Duration::from_secs(20));
    assert!(status.success(), "a removed node exits cleanly: {status}");
    let moved = |h: &Host| {
        std::fs::read_dir(h.data_dir())
            .expect("data dir")
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("raft.removed-"))
    };
    assert!(
        moved(&hosts[victim]),
        "the removed node's log is moved aside"
    );
    // ... and its identity, without the CA key it held as a voter, the join secret or its
    // node key.
    let retired = std::fs::read_dir(hosts[victim].data_dir())
        .expect("data dir")
        .filter_map(Result::ok)
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("cluster.json.removed-")
        })
        .expect("the identity moved aside");
    let retired: serde_json::Value =
        serde_json::from_slice(&std::fs::read(retired.path()).expect("read")).expect("JSON");
    assert_eq!(retired["ca_key"], "", "{retired}");
    assert_eq!(retired["secret"], "0".repeat(64));
    assert_eq!(
        retired["node_key"], "",
        "the key of a certificate still valid: {retired}"
    );

    // `leave` on a host takes it out the same way, from the host itself.
    let lead = leader(&hosts, &hosts[asker]).expect("leader");
    let leaver = (0..4)
        .find(|&i| i != victim && i != lead)
        .expect("a non-leader");
    let out = hosts[leaver].linkdns(&["leave"]);
    assert!(
        out.status.success(),
        "leave: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = hosts[leaver].wait_linkdns_exit(Duration::from_secs(20));
    assert!(status.success(), "a node that left exits cleanly: {status}");
    assert!(moved(&hosts[leaver]));
    wait_until(Duration::from_secs(10), "two members left", || {
        hosts[lead].status_json()["members"]
            .as_array()
            .is_some_and(|m| m.len() == 2)
    });
}

#[test]
fn a_copied_data_dir_is_refused_as_a_duplicate_identity() {
    let mut hosts = form_cluster(2, &[]);
    hosts[1].run_container("web", &[]);
    let web = hosts[1].container_ip("web");
    expect_answer(&hosts[0], "web.cluster", "A", &[&web]);
    // h2's data dir, copied to another host (a backup restored there, a cloned VM).
    hosts[1].stop_linkdns();
    let mut copy = Host::on_lan();
    std::fs::create_dir_all(copy.data_dir()).expect("data dir");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", hosts[1].data_dir().display()))
        .arg(copy.data_dir())
        .output()
        .expect("cp");
    assert!(out.status.success(), "cp: {out:?}");
    hosts[1].restart_linkdns();
    wait_until(Duration::from_secs(10), "h2 to be back in touch", || {
        hosts[0].status_json()["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["id"] == 2).cloned())
            .is_some_and(|m| m["last_contact_ms"].as_u64().is_some_and(|ms| ms < 1500))
    });
    copy.start_linkdns(&[]);
    wait_until(Duration::from_secs(20), "the copy to be refused", || {
        copy.log().contains("another process holds its identity")
    });
    assert!(
        hosts[0]
            .log()
            .contains("two processes present one node identity"),
        "the member says what happened too"
    );
    // The cluster keeps h2 where it was, with its records; h2 goes on working.
    let s = hosts[0].status_json();
    let h2 = s["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == 2).cloned())
        .expect("node 2");
    assert_eq!(h2["peer_addr"], hosts[1].peer_addr(), "{s}");
    assert_eq!(h2["name"], name(&hosts[1]));
    hosts[1].run_container("web2", &[]);
    let web2 = hosts[1].container_ip("web2");
    expect_answer(&hosts[0], "web2.cluster", "A", &[&web2]);
    expect_answer(&hosts[0], "web.cluster", "A", &[&web]);
    copy.stop_linkdns();
}

/// The last resorts. A backup taken on a running member; then the majority is gone for good:
/// the survivor, started with `--force-new-cluster`, is a one-voter cluster that takes writes,
/// hides the lost hosts' records, and takes a lost host back under its old name once its data
/// dir is emptied. The backup restores into a new cluster on another emptied host.
#[test]
fn a_lost_majority_is_recovered_by_force_and_a_backup_restores_a_new_cluster() {
    let mut hosts = form_cluster(3, &[]);
    hosts[0].run_container("web", &[]);
    hosts[1].run_container("db", &[]);
    let (web, db) = (hosts[0].container_ip("web"), hosts[1].container_ip("db"));
    let db_name = format!("db.{}.cluster", name(&hosts[1]));
    expect_answer(&hosts[0], &db_name, "A", &[&db]);

    let backup = hosts[0].dir.join("cluster.backup");
    let out = hosts[0].linkdns(&["backup", backup.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "backup: {out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("backed up 2 records of 3 nodes"), "{said}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&backup)
        .expect("backup file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The majority is gone for good.
    hosts[1].kill_linkdns();
    hosts[2].kill_linkdns();
    hosts[0].stop_linkdns();
    hosts[0].start_linkdns(&["--force-new-cluster"]);
    wait_until(FORM, "h1 to lead alone", || {
        let s = hosts[0].status_json();
        s["role"] == "leader" && s["members"].as_array().map(Vec::len) == Some(1)
    });
    assert!(hosts[0].log().contains("forced a new cluster"));
    // It takes writes: a new container is committed (status counts committed records).
    hosts[0].run_container("api", &[]);
    wait_until(FORM, "h1 to commit its new container", || {
        hosts[0].status_json()["records"] == 3
    });
    // The lost hosts' records are kept but not answered.
    let hidden = hosts[0].dig(&["@127.0.0.1", &db_name, "A"]);
    assert!(hidden.rdata().is_empty(), "{}", hidden.raw);
    // Later starts are plain ones.
    hosts[0].stop_linkdns();
    hosts[0].start_linkdns(&[]);
    assert!(hosts[0].log().matches("forced a new cluster").count() == 1);

    // h2 comes back: emptied, it joins under its old name and takes its record's place.
    let token = hosts[0].token();
    std::fs::remove_dir_all(hosts[1].data_dir()).expect("empty h2's data dir");
    let peers = [hosts[0].peer_addr()];
    hosts[1].start_linkdns_joining(&peers, &token, &[]);
    hosts[1].wait_linkdns_answers();
    expect_answer(&hosts[0], &db_name, "A", &[&db]);
    expect_answer(
        &hosts[1],
        &format!("web.{}.cluster", name(&hosts[0])),
        "A",
        &[&web],
    );
    let members = hosts[0].status_json()["members"].clone();
    let h2: Vec<&serde_json::Value> = members
        .as_array()
        .map(|m| m.iter().filter(|m| m["name"] == name(&hosts[1])).collect())
        .unwrap_or_default();
    assert_eq!(h2.len(), 1, "{members}");

    // The backup, restored on emptied h3: a new cluster of h3 alone, with the backup's
    // records, the other hosts' hidden until they join it.
    std::fs::remove_dir_all(hosts[2].data_dir()).expect("empty h3's data dir");
    let mut damaged = std::fs::read(&backup).expect("backup");
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    let broken = hosts[2].dir.join("broken.backup");
    std::fs::write(&broken, damaged).expect("write");
    let out = hosts[2].linkdns(&["restore", broken.to_str().unwrap_or_default()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{out:?}"
    );
    assert!(!hosts[2].data_dir().join("cluster.json").exists());
    let node_name = name(&hosts[2]);
    let out = hosts[2].linkdns(&[
        "restore",
        backup.to_str().unwrap_or_default(),
        "--node-name",
        &node_name,
    ]);
    assert!(out.status.success(), "restore: {out:?}");
    hosts[2].start_linkdns(&[]);
    wait_until(FORM, "h3 to lead its new cluster", || {
        hosts[2].status_json()["role"] == "leader"
    });
    let s = hosts[2].status_json();
    assert_ne!(
        s["cluster"],
        hosts[0].status_json()["cluster"],
        "a new cluster"
    );
    assert_eq!(s["records"], 2, "{s}");
    assert_ne!(hosts[2].token(), token);
    let hidden = hosts[2].dig(&["@127.0.0.1", &db_name, "A"]);
    assert!(hidden.rdata().is_empty(), "{}", hidden.raw);
}
