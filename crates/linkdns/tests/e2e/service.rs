//! `config/linkdns.service` as systemd would run it. This machine's PID 1 is not systemd, so
//! the unit is checked with `systemd-analyze verify`, and its `ExecStart` runs literally (only
//! the program's path is the binary under test) the way the unit says: with its
//! `CapabilityBoundingSet` and `NoNewPrivileges` (through `setpriv`), its settings in the
//! environment as `EnvironmentFile=` gives them, and its `Type=notify` protocol on a
//! `NOTIFY_SOCKET` the test reads.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{form_joined, name};
use crate::expect_answer;
use crate::testbed::{linkdns_bin, run, wait_until, Host, IMAGE};

/// Where the unit says the binary is installed.
const INSTALLED: &str = "/usr/local/bin/linkdns";

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/linkdns.service")
}

/// The `[Service]` settings of the unit, in order (`key`, `value`).
fn service_settings(text: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" {
            let (key, value) = line.split_once('=').expect("key=value");
            out.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

fn one<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    let values: Vec<&str> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(values.len(), 1, "{key}: {values:?}");
    values[0]
}

/// A notification socket, as systemd makes one for a `Type=notify` service.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notifications {
    fn bind(h: &Host) -> Notifications {
        let path = h.dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Notifications { socket, path }
    }

    /// The next notification (panics after a minute without one).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within a minute");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// What a host's `/etc/linkdns/linkdns.env` would hold in the test bed (its data dir stands in
/// for the unit's StateDirectory).
fn environment(h: &Host, notify: &Notifications, more: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "LINKDNS_DATA_DIR",
            h.data_dir().to_string_lossy().into_owned(),
        ),
        ("LINKDNS_NODE_NAME", name(h)),
        (
            "LINKDNS_DOCKER",
            format!("unix://{}", h.docker_sock().display()),
        ),
        ("NOTIFY_SOCKET", notify.path.to_string_lossy().into_owned()),
    ];
    env.extend(more.iter().cloned());
    env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[test]
fn the_service_unit_runs_a_cluster_with_only_its_capabilities() {
    let text = std::fs::read_to_string(unit_path()).expect("config/linkdns.service");
    let settings = service_settings(&text);
    let mut hosts = vec![Host::on_lan(), Host::on_lan()];

    // The unit as systemd reads it: no unknown key, no bad value (verify wants the program
    // to exist, so this copy names the binary under test).
    let checked = hosts[0].dir.join("linkdns.service");
    std::fs::write(&checked, text.replace(INSTALLED, linkdns_bin())).expect("unit copy");
    let out = run("systemd-analyze", &["verify", &checked.to_string_lossy()]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify: {out:?}"
    );

    assert_eq!(one(&settings, "Type"), "notify");
    assert_eq!(one(&settings, "NoNewPrivileges"), "yes");
    let exec: Vec<String> = one(&settings, "ExecStart")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(exec[0], INSTALLED);
    let args = exec[1..].to_vec();
    // CAP_NET_ADMIN → +net_admin, the rest of the bounding set dropped.
    let caps: Vec<String> = one(&settings, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let wrapper = vec![
        "setpriv".to_string(),
        "--no-new-privs".to_string(),
        format!("--bounding-set=-all,{}", caps.join(",")),
    ];

    // The first host: no settings but its own.
    let first = Notifications::bind(&hosts[0]);
    hosts[0].wrapper = wrapper.clone();
    let env = environment(&hosts[0], &first, &[]);
    hosts[0].start_linkdns_service(&args, &env);
    let ready = first.next();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    // Ready means answering: the first query after READY=1 is answered.
    let soa = hosts[0].dig(&["@127.0.0.1", "cluster", "SOA", "+time=1", "+tries=1"]);
    assert_eq!(soa.status, "NOERROR", "{}", soa.raw);

    // The second host joins through it, with the token in a file (LINKDNS_TOKEN_FILE).
    let token = hosts[0].token();
    let file = hosts[1].write_token_file(&token);
    let second = Notifications::bind(&hosts[1]);
    hosts[1].wrapper = wrapper;
    let env = environment(
        &hosts[1],
        &second,
        &[
            ("LINKDNS_JOIN", hosts[0].peer_addr()),
            ("LINKDNS_TOKEN_FILE", file.to_string_lossy().into_owned()),
        ],
    );
    hosts[1].start_linkdns_service(&args, &env);
    let ready = second.next();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    let soa = hosts[1].dig(&["@127.0.0.1", "cluster", "SOA", "+time=1", "+tries=1"]);
    assert_eq!(soa.status, "NOERROR", "{}", soa.raw);
    let mut hosts = form_joined(hosts);
    // `linkdns status` lists the version (and commit) each member runs.
    let out = run(linkdns_bin(), &["--version"]);
    let version = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("linkdns ")
        .to_string();
    assert!(version.contains(" ("), "--version: {version}");
    wait_until(Duration::from_secs(30), "both members' versions", || {
        let members = hosts[1].status_json()["members"].clone();
        members.as_array().is_some_and(|m| {
            m.len() == 2 && m.iter().all(|m| m["version"].as_str() == Some(&version))
        })
    });

    // With only those capabilities, each node routes the other's containers and lets their
    // traffic through: a container on h2 reaches one on h1 by name.
    hosts[0].run_container("web", &[]);
    let web = hosts[0].container_ip("web");
    let query = format!("web.{}.cluster", name(&hosts[0]));
    expect_answer(&hosts[1], &query, "A", &[&web]);
    // Once both have their route to the other, the first packet goes through.
    wait_until(Duration::from_secs(30), "routes both ways", || {
        hosts.iter().all(|h| {
            let out = h.exec("ip", &["route", "show", "proto", "151"]);
            String::from_utf8_lossy(&out.stdout).contains(" via ")
        })
    });
    let gateway = hosts[1].gateway.to_string();
    let out = hosts[1].try_docker(&[
        "run", "--rm", "--dns", &gateway, IMAGE, "ping", "-c", "1", "-W", "2", &query,
    ]);
    assert!(
        out.status.success(),
        "h2's container cannot reach {query}: {out:?}"
    );
    for h in &hosts {
        let log = h.log();
        for sign in ["Operation not permitted", "Permission denied", "not root"] {
            assert!(!log.contains(sign), "{} logged {sign:?}:\n{log}", h.ns);
        }
    }

    // A stop: STOPPING=1, then a clean exit (which Restart=on-failure leaves stopped).
    let status = hosts[1].stop_linkdns();
    let stopping = second.next();
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    assert!(status.success(), "{status}");
}
