//! The session against a router played by the test on loopback: what it sends, in order, and
//! what it does with bad input. BIRD as the real router is the end-to-end test's
//! (`crates/linkdns/tests/e2e/bgp.rs`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::wire::{Capability, Message, Notification, Open, Update};

const WAIT: Duration = Duration::from_secs(10);

fn prefix(s: &str) -> Prefix {
    let (a, l) = s.split_once('/').expect("prefix");
    Prefix::new(a.parse().expect("addr"), l.parse().expect("len")).expect("prefix")
}

async fn read(stream: &mut TcpStream) -> Option<Message> {
    let mut head = [0u8; wire::HEADER_LEN];
    tokio::time::timeout(WAIT, stream.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let (len, _) = wire::header(&head).expect("the speaker sends good headers");
    let mut frame = head.to_vec();
    frame.resize(len, 0);
    stream
        .read_exact(&mut frame[wire::HEADER_LEN..])
        .await
        .ok()?;
    Some(wire::decode(&frame, true).expect("the speaker sends good messages"))
}

async fn write(stream: &mut TcpStream, m: &Message) {
    stream
        .write_all(&wire::encode(m, true))
        .await
        .expect("write");
}

/// A router on loopback: the listener, and a speaker of AS `speaker_asn` started against it
/// announcing `prefixes`.
async fn router(speaker_asn: u32, prefixes: &[&str]) -> (TcpListener, Speaker) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let speaker = Speaker::start(
        Config {
            peers: vec![addr],
            asn: speaker_asn,
            peer_asn: DEFAULT_ASN,
            hold_time: HOLD_TIME,
        },
        prefixes.iter().map(|p| prefix(p)).collect(),
    );
    (listener, speaker)
}

async fn accept(listener: &TcpListener) -> TcpStream {
    tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the speaker connects")
        .expect("accept")
        .0
}

/// The router's half of the opening: reads the speaker's OPEN, answers OPEN and KEEPALIVE,
/// reads the speaker's KEEPALIVE. Returns the speaker's OPEN.
async fn open(stream: &mut TcpStream) -> Open {
    let Some(Message::Open(theirs)) = read(stream).await else {
        panic!("no OPEN first");
    };
    write(
        stream,
        &Message::Open(Open::ours(DEFAULT_ASN, 90, Ipv4Addr::new(10, 0, 0, 254))),
    )
    .await;
    write(stream, &Message::Keepalive).await;
    assert_eq!(read(stream).await, Some(Message::Keepalive));
    theirs
}

async fn wait_for(speaker: &Speaker, what: impl Fn(&SessionStatus) -> bool) -> SessionStatus {
    for _ in 0..200 {
        if let Some(s) = speaker.status().into_iter().find(|s| what(s)) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("status never came: {:?}", speaker.status());
}

#[tokio::test]
async fn a_session_announces_follows_changes_and_ceases_on_stop() {
    let (listener, speaker) = router(DEFAULT_ASN, &["192.168.1.0/24"]).await;
    let mut stream = accept(&listener).await;
    let theirs = open(&mut stream).await;
    assert_eq!(theirs.asn(), DEFAULT_ASN);
    assert_eq!(theirs.hold_time, HOLD_TIME);
    assert_eq!(
        theirs.id,
        Ipv4Addr::LOCALHOST,
        "its address towards the router"
    );
    assert!(theirs.has(&Capability::Multiprotocol { afi: 1, safi: 1 }));
    // Internal BGP: empty AS_PATH, LOCAL_PREF 100, itself as next hop.
    let path = wire::Path {
        next_hop: Ipv4Addr::LOCALHOST,
        as_path: vec![],
        local_pref: Some(100),
    };
    assert_eq!(
        read(&mut stream).await,
        Some(Message::Update(Update {
            withdrawn: vec![],
            path: Some(path.clone()),
            nlri: vec![prefix("192.168.1.0/24")],
        }))
    );
    let s = wait_for(&speaker, |s| s.state == State::Established).await;
    assert_eq!(s.hold_time, HOLD_TIME, "the smaller of 30 and 90");
    assert_eq!(s.peer_id, Some(Ipv4Addr::new(10, 0, 0, 254)));

    // A claim added, then the first one given up.
    speaker.announce(vec![prefix("10.77.16.0/20"), prefix("192.168.1.0/24")]);
    assert_eq!(
        read(&mut stream).await,
        Some(Message::Update(Update {
            withdrawn: vec![],
            path: Some(path),
            nlri: vec![prefix("10.77.16.0/20")],
        }))
    );
    speaker.announce(vec![prefix("10.77.16.0/20")]);
    assert_eq!(
        read(&mut stream).await,
        Some(Message::Update(Update {
            withdrawn: vec![prefix("192.168.1.0/24")],
            ..Update::default()
        }))
    );
    // The router's End-of-RIB and keepalives are taken quietly.
    write(&mut stream, &Message::Update(Update::default())).await;
    write(&mut stream, &Message::Keepalive).await;
    wait_for(&speaker, |s| s.announced == [prefix("10.77.16.0/20")]).await;

    // Stopping: Cease, administrative shutdown, then the connection closes.
    let stopping = tokio::spawn(speaker.stop(WAIT));
    assert_eq!(
        read(&mut stream).await,
        Some(Message::Notification(Notification::shutdown()))
    );
    assert_eq!(read(&mut stream).await, None);
    stopping.await.expect("stopped");
}

#[tokio::test]
async fn garbage_from_the_router_is_answered_with_a_notification_and_the_session_comes_back() {
    let (listener, speaker) = router(DEFAULT_ASN, &["192.168.1.0/24"]).await;
    let mut stream = accept(&listener).await;
    open(&mut stream).await;
    assert!(matches!(read(&mut stream).await, Some(Message::Update(_))));
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: router\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(
        read(&mut stream).await,
        Some(Message::Notification(Notification::new(1, 1))),
        "connection not synchronized"
    );
    assert_eq!(
        read(&mut stream).await,
        None,
        "closed after the NOTIFICATION"
    );
    let s = wait_for(&speaker, |s| s.state != State::Established).await;
    let error = s.last_error.unwrap_or_default();
    assert!(error.contains("marker") && error.contains("1/1"), "{error}");
    // It connects again (after a jittered pause of about a second) and announces again.
    let mut again = accept(&listener).await;
    open(&mut again).await;
    assert!(matches!(read(&mut again).await, Some(Message::Update(_))));
    wait_for(&speaker, |s| s.established == 2).await;
    speaker.stop(WAIT).await;
}

#[tokio::test]
async fn a_router_of_another_as_or_a_bad_message_is_refused_with_the_right_code() {
    // The router speaks AS 64512; this speaker expects a router of AS 65000.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let speaker = Speaker::start(
        Config {
            peers: vec![listener.local_addr().expect("addr")],
            asn: 65001,
            peer_asn: 65000,
            hold_time: HOLD_TIME,
        },
        vec![prefix("192.168.1.0/24")],
    );
    let mut stream = accept(&listener).await;
    let Some(Message::Open(theirs)) = read(&mut stream).await else {
        panic!("no OPEN");
    };
    assert_eq!(theirs.asn(), 65001);
    write(
        &mut stream,
        &Message::Open(Open::ours(64512, 90, Ipv4Addr::new(10, 0, 0, 254))),
    )
    .await;
    assert_eq!(
        read(&mut stream).await,
        Some(Message::Notification(Notification::new(2, 2))),
        "bad peer AS"
    );
    let s = wait_for(&speaker, |s| s.last_error.is_some()).await;
    assert!(
        s.last_error
            .unwrap_or_default()
            .contains("AS 64512, not AS 65000"),
        "{:?}",
        speaker.status()
    );
    // An external session carries this AS in the path, without LOCAL_PREF.
    let mut stream = accept(&listener).await;
    assert!(matches!(read(&mut stream).await, Some(Message::Open(_))));
    write(
        &mut stream,
        &Message::Open(Open::ours(65000, 90, Ipv4Addr::new(10, 0, 0, 254))),
    )
    .await;
    write(&mut stream, &Message::Keepalive).await;
    assert_eq!(read(&mut stream).await, Some(Message::Keepalive));
    let Some(Message::Update(update)) = read(&mut stream).await else {
        panic!("no UPDATE");
    };
    let path = update.path.expect("a path");
    assert_eq!((path.as_path, path.local_pref), (vec![65001], None));
    // A KEEPALIVE before the OPEN is out of order: FSM error.
    drop(stream);
    let mut stream = accept(&listener).await;
    assert!(matches!(read(&mut stream).await, Some(Message::Open(_))));
    write(&mut stream, &Message::Keepalive).await;
    assert_eq!(
        read(&mut stream).await,
        Some(Message::Notification(Notification::unexpected(1)))
    );
    speaker.stop(WAIT).await;
    assert!(check_asn(0).is_err());
    assert!(check_asn(23456).expect_err("AS_TRANS").contains("AS_TRANS"));
    assert_eq!(check_asn(64512), Ok(()));
}
