use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use linkdns_cluster::identity::{fingerprint, new_node_key, unix_now, RawPublicKey};
use linkdns_cluster::{
    join, keep_credentials, maintain, remove, rotate_token, Error, Identity, JoinAs,
    MaintainConfig, Token, Transport,
};
use linkdns_raft::{Membership, NodeConfig, NodeHandle, Proposal, RetryPolicy, Role, SledStore};
use linkdns_registry::{Command, Container, NodeInfo, Resolution, Subnet};
use raft::eraftpb::{Entry, Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

struct TestNode {
    id: u64,
    node: Arc<NodeHandle>,
    transport: Transport,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.node.shutdown();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

async fn start(identity: Identity, bootstrap: bool, name: &str, port: u16) -> TestNode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop, stopped) = watch::channel(false);
    let id = identity.node_id;
    let transport = Transport::new(identity, stopped.clone()).expect("transport");
    let config = NodeConfig {
        bootstrap,
        tick: Duration::from_millis(20),
        election_ticks: 10,
        heartbeat_ticks: 2,
        ..NodeConfig::new(id)
    };
    let store = SledStore::open(dir.path()).expect("store");
    let node = Arc::new(linkdns_raft::start(config, store, transport.outbox()).expect("start"));
    linkdns_cluster::attach(&transport, node.clone());
    let addr = transport
        .serve(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("serve");
    transport.set_advertised(addr);
    if bootstrap {
        wait("bootstrap leader", || node.status().role == Role::Leader).await;
        node.propose(Command::UpsertNode(NodeInfo {
            id,
            name: name.into(),
            peer_addr: addr.to_string(),
        }))
        .await
        .expect("register");
    }
    tokio::spawn(keep_credentials(
        transport.clone(),
        node.clone(),
        stopped.clone(),
    ));
    tokio::spawn(maintain(
        transport.clone(),
        node.clone(),
        MaintainConfig {
            voters: 3,
            liveness_timeout: Duration::from_secs(2),
            claim_limit: Default::default(),
        },
        stopped,
    ));
    TestNode {
        id,
        node,
        transport,
        addr,
        stop,
        _dir: dir,
    }
}

async fn join_node(via: &TestNode, token: &Token, name: &str) -> TestNode {
    let port = free_port();
    let identity = join(
        &via.addr.to_string(),
        token,
        &JoinAs {
            name: name.into(),
            advertise: None,
            listen_port: port,
        },
    )
    .await
    .expect("join");
    start(identity, false, name, port).await
}

async fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn container(node: u64, name: &str, ip: &str) -> Command {
    Command::UpsertContainer(
        Container::new(&format!("{node}-{name}"), name, node).with_ips([ip.parse().expect("ip")]),
    )
}

/// Proposes as `linkdns run` does: a proposal whose outcome is unknown (forwarded and lost, or
/// overtaken by a snapshot) is retried; commands are idempotent.
async fn propose(node: &NodeHandle, command: Command) {
    let policy = RetryPolicy::times(5, Duration::from_millis(100), Duration::from_millis(100));
    match node.propose_until(&command, policy).await {
        Proposal::Applied(_) => {}
        other => panic!("{command:?}: {other:?}"),
    }
}

fn resolves(node: &TestNode, name: &str) -> bool {
    matches!(
        node.node.published().load().registry.resolve(name, None, None),
        Resolution::Found(ips) if !ips.is_empty()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_join_replicate_get_promoted_and_can_be_removed() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let token = first.transport.identity().token();
    let second = join_node(&first, &token, "h2").await;
    let third = join_node(&first, &token, "h3").await;
    assert_eq!((second.id, third.id), (2, 3));

    // Writes from any node reach every node.
    for n in [&first, &second, &third] {
        wait("a leader is known", || n.node.status().leader == Some(1)).await;
        let ip = format!("10.0.{}.2", n.id);
        propose(&n.node, container(n.id, &format!("web{}", n.id), &ip)).await;
    }
    for n in [&first, &second, &third] {
        wait("replication", || {
            resolves(n, "web1") && resolves(n, "web2") && resolves(n, "web3")
        })
        .await;
    }
    // The leader promotes caught-up learners until there are three voters.
    wait("three voters", || {
        first.node.status().voters == vec![1, 2, 3]
    })
    .await;
    // Voters fetch the CA key; a learner never holds it.
    wait("the new voters hold the CA key", || {
        second.transport.identity().has_ca_key() && third.transport.identity().has_ca_key()
    })
    .await;

    // A fourth host joins through a follower (redirected to the leader) and stays a learner.
    let fourth = join_node(&second, &token, "h4").await;
    wait("learner caught up", || resolves(&fourth, "web3")).await;
    let status = first.node.status();
    assert_eq!(status.learners, vec![4]);
    assert_eq!(fourth.node.status().role, Role::Learner);
    assert!(!fourth.transport.identity().has_ca_key());
    // A learner removes nobody but itself.
    let e = remove(&first.addr.to_string(), &fourth.transport.identity(), "h3")
        .await
        .expect_err("a learner");
    assert!(e.to_string().contains("learner"), "{e}");

    // Every node hears from every other one.
    wait("contacts", || {
        [1, 2, 3].iter().all(|&p| {
            fourth
                .transport
                .last_contact(p)
                .is_some_and(|d| d < Duration::from_secs(2))
        })
    })
    .await;

    // Removing a voter promotes the learner.
    let identity = third.transport.identity();
    let removed = remove(&third.addr.to_string(), &identity, "h2")
        .await
        .expect("remove");
    assert_eq!(removed, 2);
    wait("h4 promoted", || {
        let s = first.node.status();
        s.voters == vec![1, 3, 4] && s.learners.is_empty()
    })
    .await;
    wait("h2 detached", || {
        second.node.status().role == Role::Detached
    })
    .await;

    assert!(first
        .node
        .published()
        .load()
        .registry
        .node_by_name("h2")
        .is_none());
    assert!(
        !resolves(&fourth, "web2"),
        "a removed node's records go with it"
    );

    // The removed node held the CA key as a voter (its moved-aside file does not), but neither
    // its own certificate nor one it mints for a live node's id is accepted any more.
    let stolen = (*second.transport.identity()).clone();
    let e = remove(&first.addr.to_string(), &stolen, "h4")
        .await
        .expect_err("a removed node");
    assert!(e.to_string().contains("only a member"), "{e}");
    let key = linkdns_cluster::identity::new_node_key().expect("key");
    let forged = Identity {
        node_id: 3,
        node_cert: stolen
            .issue(3, &RawPublicKey::of(&key), Duration::from_secs(3600))
            .expect("mint")
            .0,
        node_key: key.serialize_der(),
        ..stolen
    };
    let e = remove(&first.addr.to_string(), &forged, "h4")
        .await
        .expect_err("a forged certificate");
    assert!(e.to_string().contains("only a member"), "{e}");
    assert_eq!(first.node.status().voters, vec![1, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_names_are_refused_and_nothing_is_admitted() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let good = first.transport.identity().token();
    let me = |name: &str| JoinAs {
        name: name.into(),
        advertise: Some("127.0.0.1:1".parse().expect("addr")),
        listen_port: 1,
    };
    let peer = first.addr.to_string();

    // Right cluster, wrong secret.
    let mut wrong_secret = good.clone();
    wrong_secret.secret.0[0] ^= 1;
    let e = join(&peer, &wrong_secret, &me("x"))
        .await
        .expect_err("wrong secret");
    // Final: asking again cannot help (a joiner stops rather than retrying).
    assert!(
        matches!(&e, Error::Denied(r) if r.contains("secret")) && !e.is_transient(),
        "{e}"
    );

    // A token of another cluster: its CA does not match, the TLS handshake fails.
    let other = Identity::bootstrap(1).expect("other").token();
    let e = join(&peer, &other, &me("x"))
        .await
        .expect_err("other cluster");
    assert!(
        e.to_string().contains("member of the token's cluster") && !e.is_transient(),
        "{e}"
    );

    // A name in use.
    let e = join(&peer, &good, &me("H1")).await.expect_err("name taken");
    assert!(e.to_string().contains("already used"), "{e}");
    assert!(!e.is_transient(), "{e}");

    // Nobody listening.
    let dead = format!("127.0.0.1:{}", free_port());
    let e = join(&dead, &good, &me("x")).await.expect_err("unreachable");
    assert!(
        matches!(e, Error::Unreachable { .. }) && e.is_transient(),
        "{e}"
    );

    let status = first.node.status();
    assert_eq!((status.voters, status.learners), (vec![1], vec![]));
    assert_eq!(first.node.published().load().registry.nodes().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_impostors_never_reach_raft() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let applied = first.node.status().applied_index;

    // Plain bytes instead of TLS.
    let mut tcp = tokio::net::TcpStream::connect(first.addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(6), tcp.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert!(n < 64, "no conversation with garbage");

    // Half a TLS hello, then silence: dropped after the handshake timeout, not kept forever.
    let mut tcp = tokio::net::TcpStream::connect(first.addr)
        .await
        .expect("connect");
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .expect("write");

    // A member of another cluster, with a valid certificate of its own CA, claiming to be a
    // member: its handshake fails against this cluster's CA.
    let impostor = start(Identity::bootstrap(2).expect("identity"), true, "imp", 0).await;
    impostor
        .node
        .change_membership(Membership::AddLearner {
            info: NodeInfo {
                id: 3,
                name: "h1".into(),
                peer_addr: first.addr.to_string(),
            },
            cert: [0; 32],
        })
        .await
        .expect("impostor's own registry");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The node kept serving and no foreign entry arrived.
    let status = first.node.status();
    assert_eq!(status.role, Role::Leader);
    assert_eq!(status.voters, vec![1]);
    assert!(first.node.published().load().registry.node(2).is_none());
    assert!(status.applied_index >= applied);
    first
        .node
        .propose(container(1, "still", "10.0.0.9"))
        .await
        .expect("still writable");
}

/// The context a node gives its proposals: proposer node, run, request id.
fn proposer_context(node: u64) -> Vec<u8> {
    [node, 1, 999]
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .collect()
}

/// A forwarded proposal as raft-rs sends it, from `from` to `to`, naming `proposer`.
fn forwarded(from: u64, to: u64, proposer: u64, command: &Command) -> Message {
    let entry = Entry {
        data: command.encode().into(),
        context: proposer_context(proposer).into(),
        ..Default::default()
    };
    Message {
        msg_type: MessageType::MsgPropose,
        from,
        to,
        entries: vec![entry].into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_changes_only_its_own_records() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let token = first.transport.identity().token();
    let second = join_node(&first, &token, "h2").await;
    wait("h2 knows the leader", || {
        second.node.status().leader == Some(1)
    })
    .await;
    propose(&first.node, container(1, "db", "10.0.1.2")).await;
    propose(&second.node, container(2, "web", "10.0.2.2")).await;
    wait("replicated", || {
        resolves(&second, "db") && resolves(&first, "web")
    })
    .await;

    // Through its own node's API: refused at once, with the reason.
    for command in [
        container(1, "db", "10.0.2.66"),
        Command::UpsertNode(NodeInfo {
            id: 1,
            name: "h1".into(),
            peer_addr: second.addr.to_string(),
        }),
        Command::SetNodeDown {
            node: 1,
            down: true,
        },
        Command::SetNodeSubnets {
            node: 2,
            subnets: vec![Subnet::new("10.0.0.0".parse().expect("ip"), 8).expect("subnet")],
        },
    ] {
        let e = second
            .node
            .propose(command.clone())
            .await
            .expect_err("refused");
        assert!(
            e.to_string().contains("may not change") || e.to_string().contains("wider"),
            "{command:?}: {e}"
        );
    }
    // As a member that skips its own checks would send them, over its authenticated
    // connection: the leader drops them before Raft sees them.
    let outbox = second.transport.outbox();
    outbox.send(vec![
        forwarded(2, 1, 2, &container(1, "db", "10.0.2.66")),
        forwarded(2, 1, 1, &container(1, "evil", "10.0.2.67")),
        forwarded(
            2,
            1,
            2,
            &Command::UpsertNode(NodeInfo {
                id: 1,
                name: "h1".into(),
                peer_addr: second.addr.to_string(),
            }),
        ),
        forwarded(2, 1, 2, &Command::RemoveNode { node: 1 }),
    ]);
    // A message claiming another sender than the connection's certificate: the stream closes.
    outbox.send(vec![forwarded(3, 1, 3, &container(1, "evil", "10.0.2.68"))]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    propose(&second.node, container(2, "after", "10.0.2.3")).await;
    wait("its own writes still go through", || {
        resolves(&first, "after")
    })
    .await;
    for n in [&first, &second] {
        let published = n.node.published().load();
        let registry = &published.registry;
        assert_eq!(
            registry.resolve("db", None, None),
            Resolution::Found(vec!["10.0.1.2".parse().expect("ip")])
        );
        assert!(!resolves(n, "evil"));
        assert_eq!(
            registry.node(1).map(|i| i.peer_addr.clone()),
            Some(first.addr.to_string())
        );
        assert!(!registry.is_down(1) && registry.node_subnets(2).is_empty());
    }
    assert_eq!(first.node.status().voters, vec![1]);
}

/// A TLS server with a certificate of the cluster's CA for `node_id`, minted with a leaked CA
/// key, answering every connection with a forged "removed" refusal. Counts the connections on
/// which a dialer said anything.
async fn impostor(
    stolen: &Identity,
    node_id: u64,
    addr: SocketAddr,
) -> Arc<std::sync::atomic::AtomicUsize> {
    let key = linkdns_cluster::identity::new_node_key().expect("key");
    let forged = Identity {
        node_id,
        node_cert: stolen
            .issue(node_id, &RawPublicKey::of(&key), Duration::from_secs(3600))
            .expect("mint")
            .0,
        node_key: key.serialize_der(),
        ..stolen.clone()
    };
    let (chain, key) = forged.chain();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls 1.3")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let spoken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = spoken.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let refusal = b"removed from the cluster: node 1";
                let mut frame = ((refusal.len() + 1) as u32).to_be_bytes().to_vec();
                frame.push(8);
                frame.extend_from_slice(refusal);
                let _ = tls.write_all(&frame).await;
                let mut buf = [0u8; 64];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await
                {
                    if n > 0 {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    spoken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_removal_from_an_unbound_certificate_retires_nobody() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let token = first.transport.identity().token();
    let second = join_node(&first, &token, "h2").await;
    let _third = join_node(&first, &token, "h3").await;
    wait("two learners caught up", || {
        [2, 3].iter().all(|id| {
            first
                .node
                .status()
                .matched
                .get(id)
                .is_some_and(|&m| m >= first.node.status().applied_index)
        })
    })
    .await;
    // h3 is removed. The CA key leaked (from a voter's disk, say): it mints a certificate for
    // node 2 that the CA signed but the registry does not bind.
    let stolen = (*first.transport.identity()).clone();
    remove(&first.addr.to_string(), &first.transport.identity(), "h3")
        .await
        .expect("remove");
    // h2 goes away; the impostor takes its address with a certificate for node 2.
    let second_addr = second.addr;
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spoken = impostor(&stolen, 2, second_addr).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        spoken.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "h1 talked to a certificate that is not the one bound to node 2"
    );
    let status = first.node.status();
    assert_eq!(status.role, Role::Leader);
    assert!(!first.node.published().load().registry.is_retiring(1));
    propose(&first.node, container(1, "still", "10.0.1.9")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_open_connections_leave_members_their_slots() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let token = first.transport.identity().token();
    // 1,000 connections from another address than any node's, each sending a fragment of a
    // TLS ClientHello and then nothing.
    let mut flood = Vec::new();
    for _ in 0..1000 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        let mut tcp = socket.connect(first.addr).await.expect("connect");
        let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
        flood.push(tcp);
    }
    // Meanwhile a host joins (new connections both ways) and its write commits.
    let second = join_node(&first, &token, "h2").await;
    wait("h2 knows the leader", || {
        second.node.status().leader == Some(1)
    })
    .await;
    propose(&second.node, container(2, "web", "10.0.2.2")).await;
    wait("h2's write on h1", || resolves(&first, "web")).await;
    propose(&first.node, container(1, "db", "10.0.1.2")).await;
    wait("h1's write on h2", || resolves(&second, "db")).await;
    // The flood is still connected (or was dropped by the node, never let in).
    assert_eq!(flood.len(), 1000);
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_expire_are_renewed_and_an_expired_one_is_refused() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    // Certificates this leader issues are valid for 9 s: renewed when 3 s are left.
    first.transport.set_cert_validity(Duration::from_secs(9));
    let token = first.transport.identity().token();
    let second = join_node(&first, &token, "h2").await;
    let issued = second.transport.identity();
    assert!(issued.node_cert_expires <= unix_now() + 9);
    assert!(!issued.has_ca_key(), "a learner holds no CA key");
    wait("h2 renewed its certificate", || {
        second.transport.identity().node_cert != issued.node_cert
    })
    .await;
    let renewed = second.transport.identity();
    assert_eq!(
        first.node.published().load().registry.node_cert(2),
        Some(&fingerprint(&renewed.node_cert)),
        "the registry binds the renewed certificate"
    );
    // The one it replaced still carries h2's Raft stream until it expires (a peer that has
    // not applied the renewal locks nobody out), but asks nothing: a stolen old key mints no
    // certificate, removes nobody, rotates no token.
    if issued.node_cert_expires > unix_now() + 1 {
        let replaced = |e: Error| {
            assert!(e.to_string().contains("replaced"), "{e}");
        };
        replaced(
            remove(&first.addr.to_string(), &issued, "nobody")
                .await
                .expect_err("superseded"),
        );
        let key = new_node_key().expect("key");
        replaced(
            linkdns_cluster::client::renew(&first.addr.to_string(), &issued, &key)
                .await
                .expect_err("superseded"),
        );
        replaced(
            rotate_token(&first.addr.to_string(), &issued)
                .await
                .expect_err("superseded"),
        );
    }
    // Past the first certificate's expiry: h2 still speaks as a member with a new
    // connection, and its writes commit.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let current = second.transport.identity();
    let e = remove(&first.addr.to_string(), &current, "nobody")
        .await
        .expect_err("no such node");
    assert!(e.to_string().contains("no node"), "{e}");
    propose(&second.node, container(2, "web", "10.0.2.2")).await;
    wait("h2's write", || resolves(&first, "web")).await;

    // The first certificate, expired: refused, whatever it asks.
    let e = remove(&first.addr.to_string(), &issued, "h1")
        .await
        .expect_err("expired");
    assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
    // An expired certificate the CA signed for the leader's own id: refused too.
    let key = new_node_key().expect("key");
    let now = unix_now();
    let expired = Identity {
        node_cert: first
            .transport
            .identity()
            .issue_between(1, &RawPublicKey::of(&key), now - 7200, now - 3600)
            .expect("mint"),
        node_key: key.serialize_der(),
        ..(*first.transport.identity()).clone()
    };
    let e = remove(&first.addr.to_string(), &expired, "h2")
        .await
        .expect_err("expired");
    assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
    assert_eq!(first.node.status().learners, vec![2]);

    // Renewals come at most one per sixth of the validity (1.5 s here) per node: with the
    // certificate a renewal just issued, the next one is refused.
    let mut current = (*second.transport.identity()).clone();
    let mut refusal = None;
    for _ in 0..3 {
        let key = new_node_key().expect("key");
        match linkdns_cluster::client::renew(&first.addr.to_string(), &current, &key).await {
            Ok((cert, _)) => {
                current.node_cert = cert;
                current.node_key = key.serialize_der();
            }
            Err(e) => {
                refusal = Some(e.to_string());
                break;
            }
        }
    }
    let refusal = refusal.expect("a renewal refused");
    assert!(refusal.contains("at most one per"), "{refusal}");

    // A renewal whose answer was lost: asked again with the certificate it replaced and the
    // same key, the leader hands out the same certificate (nothing new issued or bound);
    // with another key, nothing.
    let before = current;
    let key = new_node_key().expect("key");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (issued_once, _) = linkdns_cluster::client::renew(&first.addr.to_string(), &before, &key)
        .await
        .expect("renewed");
    let (issued_again, _) = linkdns_cluster::client::renew(&first.addr.to_string(), &before, &key)
        .await
        .expect("the same again");
    assert_eq!(issued_again, issued_once);
    let other = new_node_key().expect("key");
    let e = linkdns_cluster::client::renew(&first.addr.to_string(), &before, &other)
        .await
        .expect_err("another key");
    assert!(e.to_string().contains("replaced"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_refuses_the_old_one_at_once_and_members_carry_on() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let old = first.transport.identity().token();
    let second = join_node(&first, &old, "h2").await;
    wait("the log holds the join secret", || {
        first.node.published().load().registry.join_hash() == Some(&old.secret.hash())
    })
    .await;
    wait("h2 caught up", || {
        second
            .node
            .published()
            .load()
            .registry
            .node_cert(2)
            .is_some()
    })
    .await;
    // A learner may not rotate it; a voter asks (here through the learner, which redirects
    // to the leader).
    let e = rotate_token(&first.addr.to_string(), &second.transport.identity())
        .await
        .expect_err("a learner");
    assert!(e.to_string().contains("learner"), "{e}");
    let new = rotate_token(&second.addr.to_string(), &first.transport.identity())
        .await
        .expect("rotate");
    assert_ne!(new.secret, old.secret);
    assert_eq!(new.cluster, old.cluster);
    let me = |name: &str| JoinAs {
        name: name.into(),
        advertise: Some("127.0.0.1:1".parse().expect("addr")),
        listen_port: 1,
    };
    let e = join(&first.addr.to_string(), &old, &me("h3"))
        .await
        .expect_err("the old token");
    assert!(e.to_string().contains("wrong join token"), "{e}");
    // Through a follower too (it checks against the replicated hash before redirecting).
    let e = join(&second.addr.to_string(), &old, &me("h3"))
        .await
        .expect_err("the old token");
    assert!(e.to_string().contains("wrong join token"), "{e}");
    let third = join_node(&second, &new, "h3").await;
    assert_eq!(third.id, 3);
    // A stranger cannot rotate.
    let stranger = Identity::bootstrap(1).expect("other cluster");
    assert!(rotate_token(&first.addr.to_string(), &stranger)
        .await
        .is_err());
    // Members carry on.
    propose(&second.node, container(2, "web", "10.0.2.2")).await;
    wait("h2's write on h3", || resolves(&third, "web")).await;
}

/// A heartbeat from `from` claiming the lead of `term`, committing `commit`.
fn heartbeat(from: u64, to: u64, term: u64, commit: u64) -> Message {
    Message {
        msg_type: MessageType::MsgHeartbeat,
        from,
        to,
        term,
        commit,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_posing_as_leader_in_a_failover_is_refused_and_nobody_vouches_for_it() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let token = first.transport.identity().token();
    let second = join_node(&first, &token, "h2").await;
    let third = join_node(&first, &token, "h3").await;
    wait("three voters", || {
        [&first, &second, &third]
            .iter()
            .all(|n| n.node.status().voters == vec![1, 2, 3])
    })
    .await;
    let fourth = join_node(&second, &token, "h4").await;
    wait("h4 a learner that knows the leader", || {
        fourth.node.status().role == Role::Learner && fourth.node.status().leader == Some(1)
    })
    .await;

    // Each member says who leads it, over a connection to that very node; a learner may ask.
    for peer in [1, 2, 3] {
        let view = fourth.transport.leader_view(peer).await.expect("an answer");
        assert_eq!(
            (view.leader, view.voters.clone()),
            (Some(1), vec![1, 2, 3]),
            "node {peer}: {view:?}"
        );
    }

    // The leader dies. Until the others elect a new one (no replica hears from a leader) and
    // after, the learner claims the next term to each of them, over its own authenticated
    // connections, every 10 ms for 3 s.
    let (h2, h3) = (second.node.clone(), third.node.clone());
    drop(first);
    let outbox = fourth.transport.outbox();
    let mut followed_the_learner = Vec::new();
    for _ in 0..300 {
        for (id, node) in [(2, &h2), (3, &h3)] {
            let status = node.status();
            if status.leader == Some(4) {
                followed_the_learner.push((id, status.term));
            }
            outbox.send(vec![heartbeat(4, id, status.term + 1, status.commit_index)]);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        followed_the_learner.is_empty(),
        "replicas followed the learner {} times, first (node, term): {:?}",
        followed_the_learner.len(),
        &followed_the_learner[..followed_the_learner.len().min(4)]
    );
    wait("h2 or h3 leads", || {
        let (s2, s3) = (h2.status(), h3.status());
        s2.leader.is_some_and(|l| l == 2 || l == 3) && s2.leader == s3.leader
    })
    .await;
    // The writes of the surviving voters go on.
    propose(&h2, container(2, "after", "10.0.2.9")).await;
    wait("replicated", || {
        resolves(&third, "after") && resolves(&fourth, "after")
    })
    .await;
}

/// A Raft stream to `to` at `addr` as the member `identity` is (its certificate, a hello):
/// what a member that skips its own checks can send.
async fn member_stream(
    identity: &Identity,
    addr: SocketAddr,
    to: u64,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.ca_cert_der()).expect("CA");
    let (chain, key) = identity.chain();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls 1.3")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client config");
    let name = rustls::pki_types::ServerName::try_from(linkdns_cluster::identity::node_name(
        identity.cluster,
        to,
    ))
    .expect("name");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let hello = linkdns_cluster::wire::Hello {
        version: linkdns_cluster::wire::PROTOCOL_VERSION,
        cluster: identity.cluster,
        from: identity.node_id,
        to,
        addr: String::new(),
    };
    linkdns_cluster::wire::write_frame(
        &mut tls,
        linkdns_cluster::wire::HELLO,
        &linkdns_cluster::wire::encode(&hello),
    )
    .await
    .expect("hello");
    let (kind, _) = linkdns_cluster::wire::read_frame(&mut tls)
        .await
        .expect("answer");
    assert_eq!(kind, linkdns_cluster::wire::ACCEPT);
    tls
}

/// Whether the acceptor closes `stream` within `within` (a read ends instead of waiting).
async fn closed_within(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_come_from_the_leader_alone_within_the_size_limit() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let token = first.transport.identity().token();
    let second = join_node(&first, &token, "h2").await;
    wait("h2 follows h1", || second.node.status().leader == Some(1)).await;
    let chunk = |total: u64| {
        let mut payload = linkdns_cluster::wire::chunk_header(total, 0).to_vec();
        payload.extend_from_slice(&[0u8; 64]);
        payload
    };

    // A member that does not lead starts a snapshot: its stream is closed (it could hold up
    // to the size limit on every connection it opens).
    let mut stream = member_stream(&second.transport.identity(), first.addr, 1).await;
    linkdns_cluster::wire::write_frame(
        &mut stream,
        linkdns_cluster::wire::CHUNK_KIND,
        &chunk(4096),
    )
    .await
    .expect("chunk");
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "the non-leader's snapshot stream stays open"
    );

    // The leader itself, past the follower's limit: refused at the first chunk.
    second.transport.set_max_snapshot(1024 * 1024);
    let mut stream = member_stream(&first.transport.identity(), second.addr, 2).await;
    linkdns_cluster::wire::write_frame(
        &mut stream,
        linkdns_cluster::wire::CHUNK_KIND,
        &chunk(2 * 1024 * 1024),
    )
    .await
    .expect("chunk");
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "a snapshot over the limit is taken"
    );

    // Both nodes carry on.
    propose(&second.node, container(2, "after", "10.0.2.9")).await;
    wait("replicated", || resolves(&first, "after")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_queue_messages_without_bound_while_raft_is_busy() {
    let first = start(Identity::bootstrap(1).expect("identity"), true, "h1", 0).await;
    let token = first.transport.identity().token();
    let second = join_node(&first, &token, "h2").await;
    wait("h2 follows h1", || second.node.status().leader == Some(1)).await;

    // h1's Raft thread held up (a publication hook that waits, as a slow disk would).
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    first.node.on_publish(Box::new({
        let gate = gate.clone();
        move |_| {
            let (held, wake) = &*gate;
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            while *held {
                held = wake.wait(held).unwrap_or_else(|e| e.into_inner());
            }
        }
    }));
    // Opened again however the test ends (a failed assertion included): the nodes' shutdown
    // joins the Raft thread.
    struct Opens(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);
    impl Drop for Opens {
        fn drop(&mut self) {
            let (held, wake) = &*self.0;
            *held.lock().unwrap_or_else(|e| e.into_inner()) = false;
            wake.notify_all();
        }
    }
    *gate.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let opens = Opens(gate.clone());
    let stuck = {
        let node = first.node.clone();
        tokio::spawn(async move { node.propose(container(1, "held", "10.0.1.9")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // h2's certificate, messages of 64 KiB each (valid ones), 200 MiB of them: the node reads
    // up to its budget (about 64 MiB) and then no further until Raft takes them.
    let term = first.node.status().term;
    let mut stream = member_stream(&second.transport.identity(), first.addr, 1).await;
    let message = Message {
        msg_type: MessageType::MsgHeartbeatResponse,
        from: 2,
        to: 1,
        term,
        context: vec![7u8; 64 * 1024].into(),
        ..Default::default()
    };
    let frame = linkdns_cluster::wire::encode_messages(&vec![message; 16]);
    let mut framed = Vec::new();
    linkdns_cluster::wire::frame(&mut framed, linkdns_cluster::wire::RAFT, &frame);
    let flood = async {
        for _ in 0..200 {
            stream.write_all(&framed).await?;
        }
        stream.flush().await
    };
    let flooded = tokio::time::timeout(Duration::from_secs(5), flood).await;
    assert!(
        flooded.is_err(),
        "200 MiB were taken while Raft took nothing: {flooded:?}"
    );

    // Raft goes on: the held proposal lands, and new ones do.
    drop(opens);
    stuck.await.expect("task").expect("the held proposal");
    propose(&first.node, container(1, "after", "10.0.1.10")).await;
    wait("replicated", || resolves(&second, "after")).await;
}
