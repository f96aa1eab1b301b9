//! The Raft node on real sled storage: proposals apply, restarts keep state, compaction works.

use std::time::Duration;

use std::sync::Arc;

use linkdns_raft::{NoPeers, NodeConfig, NodeHandle, Role, SledStore};
use linkdns_registry::{Command, Container, ContainerId, NodeInfo, Outcome, Resolution};

fn start(config: NodeConfig, store: SledStore) -> Result<NodeHandle, linkdns_raft::Error> {
    linkdns_raft::start(config, store, Arc::new(NoPeers))
}

fn config() -> NodeConfig {
    NodeConfig {
        tick: Duration::from_millis(20),
        snapshot_every: 5,
        ..NodeConfig::new(1)
    }
}

fn register(name: &str) -> Command {
    Command::UpsertNode(NodeInfo {
        id: 1,
        name: name.into(),
        peer_addr: "127.0.0.1:7380".into(),
    })
}

fn container(i: u32) -> Command {
    Command::UpsertContainer(
        Container::new(&format!("c{i}"), &format!("svc{i}"), 1).with_ips([format!(
            "10.9.{}.{}",
            i / 250,
            i % 250 + 1
        )
        .parse()
        .expect("ip")]),
    )
}

#[tokio::test]
async fn proposals_apply_and_survive_restart_with_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let node = start(config(), SledStore::open(dir.path()).expect("open")).expect("start");
        assert_eq!(
            node.propose(register("h1")).await.expect("register"),
            Outcome::Changed
        );
        for i in 0..12 {
            node.propose(container(i)).await.expect("container");
        }
        let published = node.published().load_full();
        assert_eq!(published.registry.record_count(), 12);
        let status = node.status();
        assert_eq!(status.role, Role::Leader);
        assert_eq!(status.role.as_str(), "leader");
        assert_eq!(status.leader, Some(1));
        assert_eq!(status.applied_index, status.commit_index);
        // The snapshot is written by a thread of its own (at nice 10): on a busy machine the
        // log is compacted a moment after the entries apply.
        let mut status = status;
        for _ in 0..200 {
            if status.snapshot_index > 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            status = node.status();
        }
        assert!(status.snapshot_index > 1, "log compacted: {status:?}");
        // A rejected command comes back as an error and changes nothing.
        let err = node
            .propose(Command::RemoveContainer {
                node: 7,
                id: ContainerId::new("x"),
                version: 0,
            })
            .await
            .expect_err("unknown node");
        assert!(err.to_string().contains("node 7"), "{err}");
        node.shutdown().expect("clean shutdown");
    }
    let node = start(config(), SledStore::open(dir.path()).expect("reopen")).expect("restart");
    let mut waited = 0;
    while node.published().load().registry.record_count() != 12 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    let published = node.published().load_full();
    assert_eq!(published.registry.record_count(), 12);
    assert_eq!(
        published.registry.resolve("svc11", None, None),
        Resolution::Found(vec!["10.9.0.12".parse().expect("ip")])
    );
    // Writes continue after the restart.
    node.propose(container(12)).await.expect("after restart");
    assert_eq!(node.published().load().registry.record_count(), 13);
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = SledStore::open(dir.path()).expect("open");
    let err = match SledStore::open(dir.path()) {
        Ok(_) => panic!("second open must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use"), "{err}");
}

#[tokio::test]
async fn replayed_entries_never_answer_a_new_runs_proposals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = NodeConfig {
        snapshot_every: 1_000,
        ..config()
    };
    {
        let node =
            start(config.clone(), SledStore::open(dir.path()).expect("open")).expect("start");
        node.propose(register("h1")).await.expect("register");
        node.propose(container(1)).await.expect("container");
        node.shutdown().expect("shutdown");
    }
    // The new run's first requests reuse ids 1 and 2 while the old entries 1.. are replayed;
    // each must get its own answer: this removal of an unknown node's container is rejected.
    let node = start(config, SledStore::open(dir.path()).expect("reopen")).expect("restart");
    for _ in 0..3 {
        let err = node
            .propose(Command::RemoveContainer {
                node: 9,
                id: ContainerId::new("c1"),
                version: 0,
            })
            .await
            .expect_err("node 9 does not exist");
        assert!(err.to_string().contains("node 9"), "{err}");
    }
    assert_eq!(node.published().load().registry.record_count(), 1);
}

#[tokio::test]
async fn subscribers_wake_on_what_changes_and_learn_when_the_node_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(config(), SledStore::open(dir.path()).expect("open")).expect("start");
    let mut changes = node.subscribe();
    // Becoming leader is a change.
    tokio::time::timeout(Duration::from_secs(5), async {
        while node.status().role != Role::Leader {
            changes.changed().await.expect("running");
        }
    })
    .await
    .expect("leader within 5 s, seen through the watch");
    // Quiet: no wake-up while nothing changes (ticks alone are no change).
    changes.borrow_and_update();
    let quiet = tokio::time::timeout(Duration::from_millis(300), changes.changed()).await;
    assert!(quiet.is_err(), "woke up with nothing changed");
    // A publication is.
    node.propose(register("h1")).await.expect("register");
    tokio::time::timeout(Duration::from_secs(1), changes.changed())
        .await
        .expect("a change within 1 s")
        .expect("running");
    // The node stopping ends the watch.
    node.shutdown().expect("shutdown");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch ends with the node");
}

/// A snapshot is due by the bytes the log grew as well as by its entry count; the status says
/// how many were taken, how large the last was and how long it took.
#[tokio::test]
async fn a_log_grown_by_bytes_is_snapshotted_before_its_entry_count_is_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = NodeConfig {
        tick: Duration::from_millis(20),
        snapshot_every: 1_000_000,
        snapshot_log_bytes: 1024,
        ..NodeConfig::new(1)
    };
    let node = start(config, SledStore::open(dir.path()).expect("open")).expect("start");
    node.propose(register("h1")).await.expect("register");
    let before = node.status();
    assert_eq!(before.snapshots_taken, 0, "{before:?}");
    // Some 30 bytes an entry: 1 KiB within some 35 entries.
    for i in 0..100 {
        node.propose(container(i)).await.expect("container");
    }
    let status = node.status();
    assert!(status.snapshots_taken >= 1, "{status:?}");
    assert!(status.snapshot_index > 1, "{status:?}");
    assert!(status.last_snapshot_bytes > 500, "{status:?}");
    node.shutdown().expect("clean shutdown");
}
