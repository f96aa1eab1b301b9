//! Who is told: a small BGP-4 speaker through which a node announces its own container subnets
//! to routers (a VPC's route table, a top-of-rack router), with its own address towards each
//! router as the next hop, so machines outside the cluster reach containers by their addresses.
//!
//! [`wire`] is the pure codec (fuzzed); `session` keeps one session per router (always the
//! active side); [`Speaker`] starts them, hands them the prefixes to announce and reports
//! their state. It announces, and learns nothing: routes the routers send are ignored.

pub mod wire;

mod session;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use wire::Prefix;

/// The private AS number a node uses by default (iBGP with a router of the same AS).
pub const DEFAULT_ASN: u32 = 64512;

/// The port routers listen on.
pub const PORT: u16 = 179;

/// The hold time offered: a host that vanishes without closing its sessions has its routes
/// withdrawn by the router after this long.
pub const HOLD_TIME: u16 = 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The routers, each at its address and port.
    pub peers: Vec<SocketAddr>,
    /// This node's AS.
    pub asn: u32,
    /// The routers' AS (the same as `asn`: internal BGP).
    pub peer_asn: u32,
    /// The hold time offered (0, or 3 and more).
    pub hold_time: u16,
}

/// Why an AS number cannot be used: 0 and 65535 and 4294967295 are reserved, 23456 stands in
/// for four-octet ones (RFC 7607, 7300, 6793).
pub fn check_asn(asn: u32) -> Result<(), String> {
    match asn {
        0 | 65535 | 4_294_967_295 => Err(format!("AS {asn} is reserved")),
        23456 => Err("AS 23456 is AS_TRANS, which stands in for four-octet AS numbers".into()),
        _ => Ok(()),
    }
}

/// Where a session is (RFC 4271's states; this side never listens, so never Active).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Connect => "connect",
            State::OpenSent => "opensent",
            State::OpenConfirm => "openconfirm",
            State::Established => "established",
        }
    }
}

/// One session as it is now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStatus {
    pub peer: Option<SocketAddr>,
    pub state: State,
    /// This side's address on the connection: the next hop announced, and the BGP identifier.
    pub local: Option<Ipv4Addr>,
    /// The router's BGP identifier.
    pub peer_id: Option<Ipv4Addr>,
    /// The negotiated hold time, seconds.
    pub hold_time: u16,
    /// What the router has from this session.
    pub announced: Vec<Prefix>,
    pub established_since: Option<Instant>,
    /// Sessions established since start.
    pub established: u64,
    /// Why the last session ended or the last attempt failed.
    pub last_error: Option<String>,
}

impl SessionStatus {
    /// How long the session has been established.
    pub fn uptime(&self) -> Option<Duration> {
        self.established_since.map(|t| t.elapsed())
    }
}

/// The speaker: a session per router, announcing one set of prefixes to all.
pub struct Speaker {
    prefixes: watch::Sender<Vec<Prefix>>,
    stop: watch::Sender<bool>,
    sessions: Sessions,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The speaker's sessions as they are, readable from anywhere at any time (also after the
/// speaker stopped).
#[derive(Clone, Debug, Default)]
pub struct Sessions(Arc<Vec<Arc<Mutex<SessionStatus>>>>);

impl Sessions {
    pub fn status(&self) -> Vec<SessionStatus> {
        self.0
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| s.clone()))
            .collect()
    }
}

impl std::fmt::Debug for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speaker")
            .field("sessions", &self.status())
            .finish_non_exhaustive()
    }
}

impl Speaker {
    /// Starts a session with every router of `config`, announcing `prefixes` (IPv4 only).
    /// Runs on the current tokio runtime.
    pub fn start(config: Config, prefixes: Vec<Prefix>) -> Speaker {
        let config = Arc::new(config);
        let (prefixes, prefixes_rx) = watch::channel(normalized(prefixes));
        let (stop, stop_rx) = watch::channel(false);
        let mut sessions = Vec::new();
        let mut tasks = Vec::new();
        for peer in &config.peers {
            let status = Arc::new(Mutex::new(SessionStatus {
                peer: Some(*peer),
                ..SessionStatus::default()
            }));
            sessions.push(status.clone());
            tasks.push(tokio::spawn(session::run(
                *peer,
                config.clone(),
                prefixes_rx.clone(),
                stop_rx.clone(),
                status,
            )));
        }
        Speaker {
            prefixes,
            stop,
            sessions: Sessions(Arc::new(sessions)),
            tasks,
        }
    }

    /// A handle on the sessions' state.
    pub fn sessions(&self) -> Sessions {
        self.sessions.clone()
    }

    /// Announces exactly `prefixes` from now on (withdrawing the others).
    pub fn announce(&self, prefixes: Vec<Prefix>) {
        let prefixes = normalized(prefixes);
        self.prefixes.send_if_modified(|current| {
            let changed = *current != prefixes;
            *current = prefixes;
            changed
        });
    }

    pub fn status(&self) -> Vec<SessionStatus> {
        self.sessions.status()
    }

    /// Ends every session with a Cease (the routers withdraw this node's routes at once), and
    /// waits for them, at most `wait`.
    pub async fn stop(self, wait: Duration) {
        self.stop.send_replace(true);
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(wait, all).await;
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

fn normalized(mut prefixes: Vec<Prefix>) -> Vec<Prefix> {
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

#[cfg(test)]
mod tests;
