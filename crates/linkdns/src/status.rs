//! `linkdns status`: finds the running node through its data dir and prints its view.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::admin::Status;
use crate::routing::{DockerConfig, RoutesStatus};

pub fn print(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    show(data_dir, "/status", json, render)
}

/// GETs `path` from the node's admin endpoint and prints it as JSON or as `render` makes it.
fn show<T: serde::Serialize + serde::de::DeserializeOwned>(
    data_dir: &Path,
    path: &str,
    json: bool,
    render: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let value: T = runtime.block_on(get(data_dir, path))?;
    let text = if json {
        serde_json::to_string_pretty(&value)? + "\n"
    } else {
        render(&value)
    };
    std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
    Ok(())
}

/// Reads `/status` from the node whose data dir is `data_dir`.
pub async fn fetch(data_dir: &Path) -> anyhow::Result<Status> {
    get(data_dir, "/status").await
}

/// `linkdns routes [--plan] [--json]`.
pub fn print_routes(data_dir: &Path, plan: bool, json: bool) -> anyhow::Result<()> {
    let path = if plan { "/routes?plan=true" } else { "/routes" };
    show(data_dir, path, json, |routes: &RoutesStatus| {
        render_routes(routes, plan)
    })
}

/// `linkdns docker-config`: the daemon.json keys on stdout (JSON, to merge into
/// `/etc/docker/daemon.json`), what they do on stderr.
pub fn print_docker_config(data_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config: DockerConfig = runtime.block_on(get(data_dir, "/docker-config"))?;
    if !config.ready {
        bail!(
            "the node cannot tell this host's Docker settings yet: {}",
            config.notes.join("; ")
        );
    }
    let text = serde_json::to_string_pretty(&config.daemon)? + "\n";
    std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
    let notes: String = config
        .notes
        .iter()
        .map(|n| format!("linkdns: {n}\n"))
        .collect();
    std::io::Write::write_all(&mut std::io::stderr(), notes.as_bytes())?;
    Ok(())
}

/// `linkdns routes`: linkdns's routes and rules on this host; with `plan`, what it would
/// change and what it refuses.
pub fn render_routes(r: &RoutesStatus, plan: bool) -> String {
    let mut out = String::new();
    match &r.disabled {
        None => {
            let _ = writeln!(out, "routing  on (routes marked proto {})", r.protocol);
        }
        Some(reason) => {
            let _ = writeln!(out, "routing  off: {reason}");
        }
    }
    let subnets = if r.subnets.is_empty() {
        "none claimed".to_string()
    } else {
        r.subnets.join(", ")
    };
    let _ = writeln!(out, "subnet   {subnets}");
    if let Some(reason) = &r.claim_refused {
        let _ = writeln!(out, "         claim refused: {reason}");
    }
    let mut section = |title: &str, lines: &[String], empty: &str| {
        let _ = writeln!(out, "\n{title}");
        if lines.is_empty() {
            let _ = writeln!(out, "  {empty}");
        }
        for line in lines {
            let _ = writeln!(out, "  {line}");
        }
    };
    if plan {
        section("PLAN", &r.plan, "nothing to change");
    } else {
        section("PEERS", &r.peers, "none routed");
        if !r.bgp.is_empty() {
            let sessions: Vec<String> = r.bgp.iter().map(render_bgp).collect();
            section("BGP", &sessions, "");
        }
        section("ROUTES", &r.routes, "none");
        section("RULES", &r.rules, "none");
    }
    if !r.refused.is_empty() {
        section("REFUSED", &r.refused, "");
    }
    if !r.errors.is_empty() {
        section("ERRORS", &r.errors, "");
    }
    if !r.notes.is_empty() {
        section("NOTES", &r.notes, "");
    }
    out
}

/// One BGP session: `172.31.201.254:179 established 2m as 172.31.201.1, announcing
/// 192.168.1.0/24`, or its state and why it is not up.
fn render_bgp(b: &crate::announce::BgpSession) -> String {
    let mut line = format!("{} {}", b.peer, b.state);
    if let Some(up) = b.uptime_secs {
        line.push_str(&format!(" for {up}s"));
    }
    if let Some(hop) = &b.next_hop {
        line.push_str(&format!(", next hop {hop}"));
    }
    if b.state == "established" {
        let announced = if b.announced.is_empty() {
            "nothing".to_string()
        } else {
            b.announced.join(", ")
        };
        line.push_str(&format!(", announcing {announced}"));
    } else if let Some(error) = &b.last_error {
        line.push_str(&format!(" ({error})"));
    }
    line
}

/// GETs `path` from the admin endpoint of the node whose data dir is `data_dir`.
async fn get<T: serde::de::DeserializeOwned>(data_dir: &Path, path: &str) -> anyhow::Result<T> {
    let body = get_bytes(data_dir, path, std::time::Duration::from_secs(5)).await?;
    Ok(serde_json::from_slice::<T>(&body)?)
}

/// The body of `path` from the admin endpoint of the node whose data dir is `data_dir`,
/// within `timeout`.
pub async fn get_bytes(
    data_dir: &Path,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Bytes> {
    let (status, body) = get_answer(data_dir, path, timeout).await?;
    if !status.is_success() {
        bail!("admin endpoint answered {status}");
    }
    Ok(body)
}

/// `linkdns ready`: the node's `/ready` (whether DNS answers from a replica that follows a
/// leader or is caught up, and why not). `Ok(true)` when ready; the line says why either way.
pub async fn ready(data_dir: &Path) -> anyhow::Result<(bool, String)> {
    let (status, body) = get_answer(data_dir, "/ready", std::time::Duration::from_secs(5)).await?;
    let readiness: crate::admin::Readiness =
        serde_json::from_slice(&body).context("the node's /ready answer does not parse")?;
    let ready = status.is_success() && readiness.ready;
    let word = if ready { "ready" } else { "not ready" };
    Ok((ready, format!("{word}: {}\n", readiness.reason)))
}

/// The status and body of `path` from the admin socket of the node whose data dir is
/// `data_dir` (`DIR/admin.sock`, its owner's only), within `timeout`.
async fn get_answer(
    data_dir: &Path,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    let socket = data_dir.join(crate::admin::ADMIN_SOCKET);
    let stream = match tokio::net::UnixStream::connect(&socket).await {
        Ok(stream) => stream,
        Err(e) => match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => bail!(
                "no linkdns node is running on data dir {} (nothing listens on {}); start one with `linkdns run --data-dir {}`",
                data_dir.display(),
                socket.display(),
                data_dir.display()
            ),
            std::io::ErrorKind::PermissionDenied => bail!(
                "{} is its owner's only (the node's user, root for the service): run this as that user",
                socket.display()
            ),
            _ => {
                return Err(e).with_context(|| format!("cannot connect to {}", socket.display()))
            }
        },
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the node on {} did not answer within {timeout:?}",
                socket.display()
            )
        })?
        .with_context(|| {
            format!(
                "cannot read status from the node on {}; is it running?",
                socket.display()
            )
        })
}

/// The human table.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let leader = match (&s.leader, s.leader_id) {
        (Some(name), Some(id)) => format!("{name} (id {id})"),
        (None, Some(id)) => format!("id {id}"),
        _ => "none".to_string(),
    };
    let _ = writeln!(out, "cluster  {}", s.cluster);
    let _ = writeln!(out, "node     {} (id {}, {})", s.node, s.node_id, s.role);
    let _ = writeln!(out, "leader   {leader}");
    let _ = writeln!(
        out,
        "raft     term {}  commit {}  applied {}  snapshot {}",
        s.term, s.commit_index, s.applied_index, s.snapshot_index
    );
    let _ = writeln!(out, "records  {}", s.records);
    let docker = if s.docker.connected {
        "connected".to_string()
    } else {
        format!(
            "disconnected ({})",
            s.docker.error.as_deref().unwrap_or("not yet connected")
        )
    };
    let _ = writeln!(out, "docker   {docker}");
    let listen: Vec<String> = s.dns_listen.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "dns      {}", listen.join(", "));
    let r = &s.routing;
    let routing = match &r.disabled {
        Some(reason) => format!("off ({reason})"),
        None => format!(
            "{} route(s), {} refused, subnet {}",
            r.routes.len(),
            r.refused.len(),
            if r.subnets.is_empty() {
                "none claimed".to_string()
            } else {
                r.subnets.join(", ")
            }
        ),
    };
    let _ = writeln!(out, "routing  {routing}");
    let bgp: Vec<String> = r
        .bgp
        .iter()
        .map(|b| format!("bgp {}", render_bgp(b)))
        .collect();
    for line in r
        .peers
        .iter()
        .chain(&bgp)
        .chain(&r.claim_refused)
        .chain(&r.refused)
        .chain(&r.notes)
    {
        let _ = writeln!(out, "         {line}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>4}  {:<22} {:<8} {:<6} {:<13} VERSION",
        "MEMBER", "ID", "PEER", "ROLE", "ALIVE", "LAST CONTACT"
    );
    for m in &s.members {
        let contact = match m.last_contact_ms {
            _ if m.id == s.node_id => "(this node)".to_string(),
            Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
            None => "never".to_string(),
        };
        let line = format!(
            "{:<16} {:>4}  {:<22} {:<8} {:<6} {contact:<13} {}",
            m.name,
            m.id,
            m.peer_addr,
            m.role,
            if m.alive { "yes" } else { "no" },
            m.version.as_deref().unwrap_or("-")
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{DockerStatus, Member};

    #[test]
    fn status_table_golden() {
        let member = |name: &str, id, role: &str, alive, contact| Member {
            name: name.into(),
            id,
            peer_addr: format!("172.30.0.{id}:7380"),
            role: role.into(),
            alive,
            last_contact_ms: contact,
            version: (id != 4).then(|| "0.1.0 (447fd5646e54)".to_string()),
        };
        let status = Status {
            cluster: "5f0c2a1e9b7d4c3a8e6f1b2d3c4a5e6f".into(),
            node: "h1".into(),
            node_id: 1,
            leader: Some("h1".into()),
            leader_id: Some(1),
            role: "leader".into(),
            term: 2,
            commit_index: 17,
            applied_index: 17,
            snapshot_index: 1,
            records: 3,
            members: vec![
                member("h1", 1, "voter", true, None),
                member("h2", 2, "voter", true, Some(412)),
                member("h4", 4, "learner", false, Some(21_800)),
                member("h5", 5, "learner", true, None),
            ],
            docker: DockerStatus {
                connected: false,
                error: Some("connection refused".into()),
            },
            dns_listen: vec!["127.0.0.1:53".parse().expect("addr")],
            routing: RoutesStatus {
                enabled: true,
                protocol: 151,
                subnets: vec!["192.168.1.0/24".into()],
                routes: vec!["192.168.2.0/24 via 172.30.0.2 dev eth0 proto 151".into()],
                refused: vec!["not routing 192.168.4.0/24 of node h4: overlaps existing route `192.168.4.0/24 via 172.30.0.99 dev eth0 proto static`, which linkdns does not own".into()],
                ..RoutesStatus::default()
            },
            join_secret_sha256: None,
        };
        let want = "\
cluster  5f0c2a1e9b7d4c3a8e6f1b2d3c4a5e6f
node     h1 (id 1, leader)
leader   h1 (id 1)
raft     term 2  commit 17  applied 17  snapshot 1
records  3
docker   disconnected (connection refused)
dns      127.0.0.1:53
routing  1 route(s), 1 refused, subnet 192.168.1.0/24
         not routing 192.168.4.0/24 of node h4: overlaps existing route `192.168.4.0/24 via 172.30.0.99 dev eth0 proto static`, which linkdns does not own

MEMBER             ID  PEER                   ROLE     ALIVE  LAST CONTACT  VERSION
h1                  1  172.30.0.1:7380        voter    yes    (this node)   0.1.0 (447fd5646e54)
h2                  2  172.30.0.2:7380        voter    yes    0.4s ago      0.1.0 (447fd5646e54)
h4                  4  172.30.0.4:7380        learner  no     21.8s ago     -
h5                  5  172.30.0.5:7380        learner  yes    never         0.1.0 (447fd5646e54)
";
        assert_eq!(render(&status), want);
        let json = serde_json::to_value(&status).expect("json");
        for key in [
            "node",
            "leader",
            "term",
            "commit_index",
            "applied_index",
            "records",
            "members",
        ] {
            assert!(json.get(key).is_some(), "status JSON has {key}");
        }
        for key in [
            "name",
            "id",
            "peer_addr",
            "role",
            "alive",
            "last_contact_ms",
        ] {
            assert!(
                json["members"][0].get(key).is_some(),
                "member JSON has {key}"
            );
        }
    }
}
