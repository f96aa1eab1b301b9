//! One BGP session with one router, kept up for as long as the speaker runs: connect (this
//! side is always the active one), OPEN, KEEPALIVE, then announce the node's prefixes and
//! follow their changes with UPDATEs; keepalives every third of the hold time; a NOTIFICATION
//! for anything malformed or unexpected, after which the connection closes and is made again
//! after a jittered, growing pause. A stop sends Cease (administrative shutdown), so the
//! router withdraws the routes at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::wire::{self, Capability, Message, Notification, Open, Path, Prefix};
use crate::{Config, SessionStatus, State};

/// How long a router has to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The hold time while waiting for the router's OPEN (RFC 4271 §8.2.2's "large value").
const OPEN_WAIT: Duration = Duration::from_secs(240);

/// Reconnection pauses: from the first to the longest, doubling, jittered.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Frames read ahead of the session: a router that floods waits for the session.
const READ_AHEAD: usize = 16;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The speaker stopped (Cease sent).
    Stopped,
    /// Anything else, said as the status shows it.
    Failed(String),
}

/// Keeps the session with `peer` up until `stop` turns true.
pub(crate) async fn run(
    peer: SocketAddr,
    config: Arc<Config>,
    mut prefixes: watch::Receiver<Vec<Prefix>>,
    mut stop: watch::Receiver<bool>,
    status: Arc<Mutex<SessionStatus>>,
) {
    let mut pause = RETRY_FIRST;
    loop {
        if *stop.borrow() {
            break;
        }
        set(&status, |s| s.state = State::Connect);
        let connected = tokio::select! {
            c = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer)) => c,
            _ = stop.changed() => break,
        };
        let end = match connected {
            Err(_) => End::Failed(format!(
                "no answer from {peer} within {} s",
                CONNECT_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => End::Failed(format!("cannot connect to {peer}: {e}")),
            Ok(Ok(stream)) => {
                let started = Instant::now();
                let end = session(stream, &config, &mut prefixes, &mut stop, &status).await;
                // A session that held for a hold time was a good one: start afresh.
                if started.elapsed() > Duration::from_secs(u64::from(config.hold_time)) {
                    pause = RETRY_FIRST;
                }
                end
            }
        };
        match end {
            End::Stopped => break,
            End::Failed(why) => {
                let was = status.lock().map(|s| s.state).unwrap_or(State::Idle);
                if was == State::Established {
                    tracing::warn!(%peer, error = %why, "BGP session lost; the router withdraws this host's routes");
                } else {
                    tracing::warn!(%peer, error = %why, retry_in_s = pause.as_secs(), "no BGP session");
                }
                set(&status, |s| {
                    s.state = State::Idle;
                    s.last_error = Some(why);
                    s.announced.clear();
                    s.established_since = None;
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(jittered(pause)) => {}
            _ = stop.changed() => break,
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
    set(&status, |s| {
        s.state = State::Idle;
        s.announced.clear();
        s.established_since = None;
    });
}

fn set(status: &Mutex<SessionStatus>, change: impl FnOnce(&mut SessionStatus)) {
    if let Ok(mut s) = status.lock() {
        change(&mut s);
    }
}

/// `pause` scaled by a random factor from 0.75 to 1 (RFC 4271 §10's jitter), so nodes that
/// lost a router together do not come back in step.
fn jittered(pause: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(pause.as_nanos());
    let per_mille = 750 + hasher.finish() % 251;
    pause * u32::try_from(per_mille).unwrap_or(1000) / 1000
}

/// Reads whole frames (header checked) into `frames` until the connection ends; a bad header
/// ends it with its error.
async fn read_frames(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    frames: mpsc::Sender<Result<Vec<u8>, wire::Error>>,
) {
    loop {
        let mut head = [0u8; wire::HEADER_LEN];
        if reader.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = match wire::header(&head) {
            Ok((len, _)) => len,
            Err(e) => {
                let _ = frames.send(Err(e)).await;
                return;
            }
        };
        let mut frame = head.to_vec();
        frame.resize(len, 0);
        if reader
            .read_exact(&mut frame[wire::HEADER_LEN..])
            .await
            .is_err()
        {
            return;
        }
        if frames.send(Ok(frame)).await.is_err() {
            return;
        }
    }
}

/// One connection's session, from our OPEN to its end.
async fn session(
    stream: TcpStream,
    config: &Config,
    prefixes: &mut watch::Receiver<Vec<Prefix>>,
    stop: &mut watch::Receiver<bool>,
    status: &Mutex<SessionStatus>,
) -> End {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(e) => return End::Failed(format!("no local address: {e}")),
    };
    let IpAddr::V4(id) = local.ip() else {
        return End::Failed(format!(
            "the connection's local address {local} is IPv6; this speaker announces IPv4 only"
        ));
    };
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.into_split();
    let (frames_tx, mut frames) = mpsc::channel(READ_AHEAD);
    let reading = tokio::spawn(read_frames(reader, frames_tx));
    let end = exchange(id, config, &mut writer, &mut frames, prefixes, stop, status).await;
    reading.abort();
    let _ = writer.shutdown().await;
    end
}

/// The router's side of the conversation, as this session receives it.
enum Received {
    Message(Message),
    /// Malformed: answered with its NOTIFICATION.
    Malformed(wire::Error),
    Closed,
}

async fn receive(
    frames: &mut mpsc::Receiver<Result<Vec<u8>, wire::Error>>,
    four_octet: bool,
) -> Received {
    match frames.recv().await {
        None => Received::Closed,
        Some(Err(e)) => Received::Malformed(e),
        Some(Ok(frame)) => match wire::decode(&frame, four_octet) {
            Ok(m) => Received::Message(m),
            Err(e) => Received::Malformed(e),
        },
    }
}

async fn send(writer: &mut OwnedWriteHalf, message: &Message, four_octet: bool) -> Result<(), End> {
    writer
        .write_all(&wire::encode(message, four_octet))
        .await
        .map_err(|e| End::Failed(format!("cannot send: {e}")))
}

/// Sends `notification` and ends the session with `why`.
async fn fail(writer: &mut OwnedWriteHalf, notification: Notification, why: String) -> End {
    let _ = send(writer, &Message::Notification(notification.clone()), false).await;
    End::Failed(format!("{why}; sent NOTIFICATION {notification}"))
}

/// Checks the router's OPEN against the configuration; the NOTIFICATION to send if it fails.
fn check_open(open: &Open, config: &Config, id: Ipv4Addr) -> Result<(), (Notification, String)> {
    let ipv4 = Capability::Multiprotocol {
        afi: wire::AFI_IPV4,
        safi: wire::SAFI_UNICAST,
    };
    if !open.capabilities.is_empty() && !open.has(&ipv4) {
        return Err((
            Notification::new(2, 7),
            "the router does not offer IPv4 unicast".to_string(),
        ));
    }
    if open.asn() != config.peer_asn {
        return Err((
            Notification::new(2, 2),
            format!(
                "the router is AS {}, not AS {} (--bgp-peer-asn)",
                open.asn(),
                config.peer_asn
            ),
        ));
    }
    if matches!(open.hold_time, 1 | 2) {
        return Err((
            Notification::new(2, 6),
            format!("the router's hold time {} s", open.hold_time),
        ));
    }
    if open.id.is_unspecified() || open.id == id {
        return Err((
            Notification::new(2, 3),
            format!("the router's BGP identifier {}", open.id),
        ));
    }
    Ok(())
}

async fn exchange(
    id: Ipv4Addr,
    config: &Config,
    writer: &mut OwnedWriteHalf,
    frames: &mut mpsc::Receiver<Result<Vec<u8>, wire::Error>>,
    prefixes: &mut watch::Receiver<Vec<Prefix>>,
    stop: &mut watch::Receiver<bool>,
    status: &Mutex<SessionStatus>,
) -> End {
    let ours = Open::ours(config.asn, config.hold_time, id);
    if let Err(end) = send(writer, &Message::Open(ours.clone()), false).await {
        return end;
    }
    set(status, |s| {
        s.state = State::OpenSent;
        s.local = Some(id);
    });

    // OpenSent: the router's OPEN.
    let theirs = tokio::select! {
        r = tokio::time::timeout(OPEN_WAIT, receive(frames, false)) => match r {
            Err(_) => return fail(writer, Notification::hold_timer_expired(), "no OPEN from the router".into()).await,
            Ok(Received::Message(Message::Open(open))) => open,
            Ok(Received::Message(Message::Notification(n))) => return End::Failed(format!("the router sent NOTIFICATION {n}")),
            Ok(Received::Message(other)) => return fail(writer, Notification::unexpected(1), format!("{} before the router's OPEN", kind(&other))).await,
            Ok(Received::Malformed(e)) => return fail(writer, e.notification, e.reason).await,
            Ok(Received::Closed) => return End::Failed("the router closed the connection before its OPEN".into()),
        },
        _ = stop.changed() => return cease(writer).await,
    };
    if let Err((notification, why)) = check_open(&theirs, config, id) {
        return fail(writer, notification, why).await;
    }
    let four_octet = theirs
        .capabilities
        .iter()
        .any(|c| matches!(c, Capability::FourOctetAs(_)));
    let hold = config.hold_time.min(theirs.hold_time);
    let hold_time = (hold > 0).then(|| Duration::from_secs(u64::from(hold)));
    let keepalive_every = hold_time.map(|h| (h / 3).max(Duration::from_secs(1)));
    let internal = config.asn == config.peer_asn;
    let path = Path {
        next_hop: id,
        as_path: if internal {
            Vec::new()
        } else {
            vec![config.asn]
        },
        local_pref: internal.then_some(100),
    };
    if let Err(end) = send(writer, &Message::Keepalive, four_octet).await {
        return end;
    }
    set(status, |s| {
        s.state = State::OpenConfirm;
        s.peer_id = Some(theirs.id);
        s.hold_time = hold;
    });

    // OpenConfirm: the router's KEEPALIVE (an UPDATE counts too).
    let wait = hold_time.unwrap_or(OPEN_WAIT);
    tokio::select! {
        r = tokio::time::timeout(wait, receive(frames, four_octet)) => match r {
            Err(_) => return fail(writer, Notification::hold_timer_expired(), "no KEEPALIVE from the router".into()).await,
            Ok(Received::Message(Message::Keepalive | Message::Update(_))) => {}
            Ok(Received::Message(Message::Notification(n))) => return End::Failed(format!("the router sent NOTIFICATION {n}")),
            Ok(Received::Message(other)) => return fail(writer, Notification::unexpected(2), format!("{} instead of a KEEPALIVE", kind(&other))).await,
            Ok(Received::Malformed(e)) => return fail(writer, e.notification, e.reason).await,
            Ok(Received::Closed) => return End::Failed("the router closed the connection after its OPEN".into()),
        },
        _ = stop.changed() => return cease(writer).await,
    }

    // Established.
    let mut announced: Vec<Prefix> = Vec::new();
    let current = prefixes.borrow_and_update().clone();
    if let Err(end) = announce(writer, &mut announced, &current, &path, four_octet).await {
        return end;
    }
    tracing::info!(peer_id = %theirs.id, next_hop = %id, hold_s = hold, prefixes = announced.len(), "BGP session established");
    set(status, |s| {
        s.state = State::Established;
        s.announced = announced.clone();
        s.established_since = Some(Instant::now());
        s.established += 1;
        s.last_error = None;
    });
    let far_future = Duration::from_secs(365 * 24 * 3600);
    let mut hold_deadline = tokio::time::Instant::now() + hold_time.unwrap_or(far_future);
    let mut keepalive = tokio::time::interval(keepalive_every.unwrap_or(far_future));
    keepalive.tick().await;
    loop {
        tokio::select! {
            received = receive(frames, four_octet) => match received {
                Received::Message(Message::Keepalive | Message::Update(_)) => {
                    hold_deadline = tokio::time::Instant::now() + hold_time.unwrap_or(far_future);
                }
                Received::Message(Message::RouteRefresh { .. }) => {
                    let everything = announced.clone();
                    announced.clear();
                    if let Err(end) = announce(writer, &mut announced, &everything, &path, four_octet).await {
                        return end;
                    }
                }
                Received::Message(Message::Notification(n)) => {
                    return End::Failed(format!("the router sent NOTIFICATION {n}"))
                }
                Received::Message(Message::Open(_)) => {
                    return fail(writer, Notification::unexpected(3), "an OPEN in an established session".into()).await
                }
                Received::Malformed(e) => return fail(writer, e.notification, e.reason).await,
                Received::Closed => return End::Failed("the router closed the connection".into()),
            },
            _ = tokio::time::sleep_until(hold_deadline) => {
                return fail(writer, Notification::hold_timer_expired(), format!("nothing from the router for {hold} s")).await;
            }
            _ = keepalive.tick() => {
                if let Err(end) = send(writer, &Message::Keepalive, four_octet).await {
                    return end;
                }
            }
            changed = prefixes.changed() => {
                if changed.is_err() {
                    return cease(writer).await;
                }
                let wanted = prefixes.borrow_and_update().clone();
                if let Err(end) = announce(writer, &mut announced, &wanted, &path, four_octet).await {
                    return end;
                }
                set(status, |s| s.announced = announced.clone());
            }
            _ = stop.changed() => return cease(writer).await,
        }
    }
}

/// Brings what the router has from this session (`announced`) to `wanted`.
async fn announce(
    writer: &mut OwnedWriteHalf,
    announced: &mut Vec<Prefix>,
    wanted: &[Prefix],
    path: &Path,
    four_octet: bool,
) -> Result<(), End> {
    let withdrawn: Vec<Prefix> = announced
        .iter()
        .filter(|p| !wanted.contains(p))
        .copied()
        .collect();
    let new: Vec<Prefix> = wanted
        .iter()
        .filter(|p| !announced.contains(p))
        .copied()
        .collect();
    for update in wire::updates(&withdrawn, &new, path, four_octet) {
        send(writer, &Message::Update(update), four_octet).await?;
    }
    if !withdrawn.is_empty() || !new.is_empty() {
        tracing::info!(announced = ?new.iter().map(ToString::to_string).collect::<Vec<_>>(), withdrawn = ?withdrawn.iter().map(ToString::to_string).collect::<Vec<_>>(), "BGP routes updated");
    }
    *announced = wanted.to_vec();
    Ok(())
}

/// Ends the session as a stopping speaker does: Cease, administrative shutdown.
async fn cease(writer: &mut OwnedWriteHalf) -> End {
    let _ = send(
        writer,
        &Message::Notification(Notification::shutdown()),
        false,
    )
    .await;
    End::Stopped
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Open(_) => "an OPEN",
        Message::Update(_) => "an UPDATE",
        Message::Notification(_) => "a NOTIFICATION",
        Message::Keepalive => "a KEEPALIVE",
        Message::RouteRefresh { .. } => "a ROUTE-REFRESH",
    }
}
