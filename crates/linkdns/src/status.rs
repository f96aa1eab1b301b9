//! `linkdns status`: finds the running node through its data dir and prints its view.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::admin::Status;
use crate::run::{reachable, ADMIN_ADDR_FILE};

pub fn print(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(fetch(data_dir))?;
    let text = if json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        render(&status)
    };
    std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
    Ok(())
}

/// Reads `/status` from the node whose data dir is `data_dir`.
pub async fn fetch(data_dir: &Path) -> anyhow::Result<Status> {
    let file = data_dir.join(ADMIN_ADDR_FILE);
    let addr = match std::fs::read_to_string(&file) {
        Ok(text) => text.trim().parse().with_context(|| format!("{} is damaged", file.display()))?,
        Err(_) => bail!("no linkdns node is running on data dir {} (no {}); start one with `linkdns run --data-dir {}`", data_dir.display(), ADMIN_ADDR_FILE, data_dir.display()),
    };
    let addr = reachable(addr);
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get("/status")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        if !response.status().is_success() {
            bail!("admin endpoint answered {}", response.status());
        }
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>(serde_json::from_slice::<Status>(&body)?)
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("the node at {addr} did not answer within 5 s"))?
        .with_context(|| {
            format!(
                "cannot read status from the node at {addr} (data dir {}); is it running?",
                data_dir.display()
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
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>4}  {:<22} {:<8} ALIVE",
        "MEMBER", "ID", "PEER", "ROLE"
    );
    for m in &s.members {
        let _ = writeln!(
            out,
            "{:<16} {:>4}  {:<22} {:<8} {}",
            m.name,
            m.id,
            m.peer_addr,
            m.role,
            if m.alive { "yes" } else { "no" }
        );
    }
    out
}
