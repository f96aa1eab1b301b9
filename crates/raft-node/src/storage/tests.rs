//! One contract, two stores: every test runs against `MemStore` and `SledStore`.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage, StorageError};

use super::{LogStore, MemStore, SledStore};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: vec![index as u8; 16].into(),
        ..Default::default()
    }
}

fn snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
    let mut s = Snapshot::default();
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().mut_conf_state().voters = voters;
    s.data = b"state".to_vec().into();
    s
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn indexes(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries.iter().map(|e| (e.index, e.term)).collect()
}

/// Runs `check` on a fresh store of each kind.
fn both(check: impl Fn(&mut dyn FnMut() -> Box<dyn Store>)) {
    let mut mem = || Box::new(MemStore::new()) as Box<dyn Store>;
    check(&mut mem);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n = 0;
    let mut sled = || {
        n += 1;
        let store = SledStore::open(&dir.path().join(n.to_string())).expect("open sled");
        Box::new(store) as Box<dyn Store>
    };
    check(&mut sled);
}

/// Object-safe view of both stores for the shared suite.
trait Store {
    fn append(&mut self, entries: &[Entry]);
    fn install(&mut self, s: &Snapshot);
    fn entries(&self, low: u64, high: u64, max: Option<u64>) -> raft::Result<Vec<Entry>>;
    fn term(&self, i: u64) -> raft::Result<u64>;
    fn first(&self) -> u64;
    fn last(&self) -> u64;
    fn snapshot(&self, request: u64) -> raft::Result<Snapshot>;
    fn snapshot_for(&self, to: u64) -> raft::Result<Snapshot>;
    fn wanted(&self) -> bool;
    fn hard_state(&mut self, hs: &HardState);
    fn commit(&mut self, c: u64);
    fn conf(&mut self, cs: &ConfState);
    fn state(&self) -> (HardState, ConfState);
}

impl<S: LogStore> Store for S {
    fn append(&mut self, entries: &[Entry]) {
        LogStore::append(self, entries).expect("append");
        self.sync().expect("sync");
    }
    fn install(&mut self, s: &Snapshot) {
        self.install_snapshot(s).expect("install");
    }
    fn entries(&self, low: u64, high: u64, max: Option<u64>) -> raft::Result<Vec<Entry>> {
        Storage::entries(self, low, high, max, ctx())
    }
    fn term(&self, i: u64) -> raft::Result<u64> {
        Storage::term(self, i)
    }
    fn first(&self) -> u64 {
        self.first_index().expect("first")
    }
    fn last(&self) -> u64 {
        self.last_index().expect("last")
    }
    fn snapshot(&self, request: u64) -> raft::Result<Snapshot> {
        Storage::snapshot(self, request, 1)
    }
    fn snapshot_for(&self, to: u64) -> raft::Result<Snapshot> {
        Storage::snapshot(self, 0, to)
    }
    fn wanted(&self) -> bool {
        self.take_snapshot_request()
    }
    fn hard_state(&mut self, hs: &HardState) {
        self.set_hard_state(hs).expect("hs");
    }
    fn commit(&mut self, c: u64) {
        self.set_commit(c).expect("commit");
    }
    fn conf(&mut self, cs: &ConfState) {
        self.set_conf_state(cs).expect("cs");
    }
    fn state(&self) -> (HardState, ConfState) {
        let s = self.initial_state().expect("state");
        (s.hard_state, s.conf_state)
    }
}

fn is_store_err(r: raft::Result<impl std::fmt::Debug>, want: StorageError) -> bool {
    matches!(r, Err(raft::Error::Store(e)) if e == want)
}

#[test]
fn empty_store_starts_after_index_zero() {
    both(|new| {
        let s = new();
        assert_eq!((s.first(), s.last()), (1, 0));
        assert_eq!(s.term(0).expect("term 0"), 0);
        assert_eq!(s.entries(1, 1, None).expect("empty range"), vec![]);
        assert!(is_store_err(
            s.entries(1, 2, None),
            StorageError::Unavailable
        ));
    });
}

#[test]
fn append_then_read_ranges_terms_and_limits() {
    both(|new| {
        let mut s = new();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 2)]);
        assert_eq!((s.first(), s.last()), (1, 3));
        assert_eq!(
            indexes(&s.entries(1, 4, None).expect("all")),
            [(1, 1), (2, 1), (3, 2)]
        );
        assert_eq!(indexes(&s.entries(2, 3, None).expect("one")), [(2, 1)]);
        // A size limit still returns at least one entry.
        assert_eq!(s.entries(1, 4, Some(0)).expect("limited").len(), 1);
        assert_eq!(s.term(3).expect("term"), 2);
        assert!(is_store_err(s.term(4), StorageError::Unavailable));
        assert!(is_store_err(
            s.entries(2, 5, None),
            StorageError::Unavailable
        ));
    });
}

#[test]
fn append_replaces_a_conflicting_suffix() {
    both(|new| {
        let mut s = new();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1), entry(4, 1)]);
        s.append(&[entry(3, 2)]);
        assert_eq!(s.last(), 3);
        assert_eq!(
            indexes(&s.entries(1, 4, None).expect("all")),
            [(1, 1), (2, 1), (3, 2)]
        );
        s.append(&[entry(4, 2), entry(5, 2)]);
        assert_eq!(s.last(), 5);
    });
}

#[test]
fn snapshot_compacts_and_keeps_a_matching_tail() {
    both(|new| {
        let mut s = new();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)]);
        s.install(&snapshot(2, 1, vec![1]));
        assert_eq!((s.first(), s.last()), (3, 4));
        assert_eq!(s.term(2).expect("snapshot term"), 1);
        assert!(is_store_err(s.term(1), StorageError::Compacted));
        assert!(is_store_err(s.entries(2, 4, None), StorageError::Compacted));
        assert_eq!(
            indexes(&s.entries(3, 5, None).expect("tail")),
            [(3, 2), (4, 2)]
        );
        assert_eq!(s.state().1.voters, vec![1]);
        assert_eq!(s.snapshot(2).expect("snapshot").get_metadata().index, 2);
        assert!(!s.wanted());
        assert!(is_store_err(
            s.snapshot(3),
            StorageError::SnapshotTemporarilyUnavailable
        ));
        assert!(s.wanted(), "a too-old snapshot asks for a fresh one");
        assert!(!s.wanted(), "the request is taken once");
        // A snapshot for a peer that its configuration does not name would be refused by
        // that peer (a node that just joined): the store asks for a fresh one instead.
        assert!(is_store_err(
            s.snapshot_for(7),
            StorageError::SnapshotTemporarilyUnavailable
        ));
        assert!(s.wanted());
        // An older snapshot changes nothing.
        s.install(&snapshot(1, 1, vec![9]));
        assert_eq!((s.first(), s.state().1.voters), (3, vec![1]));
    });
}

#[test]
fn snapshot_ahead_of_the_log_replaces_it() {
    both(|new| {
        let mut s = new();
        s.append(&[entry(1, 1), entry(2, 1)]);
        s.install(&snapshot(10, 3, vec![1, 2, 3]));
        assert_eq!((s.first(), s.last()), (11, 10));
        assert_eq!(s.state().0.commit, 10);
        s.append(&[entry(11, 3)]);
        assert_eq!(s.last(), 11);
    });
}

#[test]
fn holes_and_writes_below_the_snapshot_are_refused() {
    let mut mem = MemStore::new();
    LogStore::append(&mut mem, &[entry(1, 1)]).expect("append");
    assert!(LogStore::append(&mut mem, &[entry(3, 1)]).is_err());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sled = SledStore::open(dir.path()).expect("open");
    LogStore::append(&mut sled, &[entry(1, 1)]).expect("append");
    assert!(LogStore::append(&mut sled, &[entry(3, 1)]).is_err());
    sled.install_snapshot(&snapshot(1, 1, vec![1]))
        .expect("install");
    assert!(LogStore::append(&mut sled, &[entry(1, 1)]).is_err());
}

#[test]
fn hard_and_conf_state_round_trip() {
    both(|new| {
        let mut s = new();
        s.append(&[entry(1, 1), entry(2, 1)]);
        let hs = HardState {
            term: 4,
            vote: 2,
            commit: 1,
            ..Default::default()
        };
        s.hard_state(&hs);
        s.commit(2);
        let cs = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..Default::default()
        };
        s.conf(&cs);
        let (hs2, cs2) = s.state();
        assert_eq!((hs2.term, hs2.vote, hs2.commit), (4, 2, 2));
        assert_eq!(cs2, cs);
    });
}

#[test]
fn sled_store_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = SledStore::open(dir.path()).expect("open");
        LogStore::append(&mut s, &[entry(1, 1), entry(2, 1), entry(3, 1)]).expect("append");
        s.install_snapshot(&snapshot(1, 1, vec![1]))
            .expect("install");
        s.set_commit(3).expect("commit");
        s.sync().expect("sync");
    }
    let s = SledStore::open(dir.path()).expect("reopen");
    assert_eq!(
        (s.first_index().ok(), s.last_index().ok()),
        (Some(2), Some(3))
    );
    assert_eq!(s.initial_state().expect("state").hard_state.commit, 3);
    assert_eq!(s.current_snapshot().expect("snap").data.as_ref(), b"state");
}

#[test]
fn a_damaged_store_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = SledStore::open(dir.path()).expect("open");
        LogStore::append(&mut s, &[entry(1, 1)]).expect("append");
        s.sync().expect("sync");
    }
    // Overwrite every file of the database with garbage.
    let raft_dir = dir.path().join("raft");
    let mut damaged = 0;
    for f in walk(&raft_dir) {
        std::fs::write(&f, vec![0xA5; 4096]).expect("scribble");
        damaged += 1;
    }
    assert!(damaged > 0);
    let before = snapshot_files(&raft_dir);
    let err = match SledStore::open(dir.path()) {
        Ok(_) => panic!("a scribbled store must not open"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("raft"), "error names the store: {err}");
    assert_eq!(snapshot_files(&raft_dir), before, "nothing was rewritten");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn snapshot_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    walk(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read");
            (p, bytes)
        })
        .collect()
}

fn registry_snapshots(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("raft").join("registry-snapshots"))
        .map(|files| {
            files
                .flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn sled_keeps_the_snapshot_in_one_file_and_drops_replaced_ones_once_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = |index: u64, term: u64| format!("{index:020}-{term:020}");
    {
        let mut s = SledStore::open(dir.path()).expect("open");
        LogStore::append(&mut s, &[entry(1, 1), entry(2, 1), entry(3, 2)]).expect("append");
        s.install_snapshot(&snapshot(2, 1, vec![1]))
            .expect("install");
        s.sync().expect("sync");
        assert_eq!(registry_snapshots(dir.path()), [name(2, 1)]);
        // Staged from another thread first, as the Raft thread's snapshots are: the install
        // only records it; the replaced file goes at the next sync, not before.
        let stage = s.stager().expect("sled stages snapshot files");
        let mut newer = snapshot(3, 2, vec![1]);
        newer.data = b"newer state".to_vec().into();
        std::thread::spawn(move || stage(&newer))
            .join()
            .expect("stager thread")
            .expect("stage");
        assert_eq!(registry_snapshots(dir.path()), [name(2, 1), name(3, 2)]);
        let mut newer = snapshot(3, 2, vec![1]);
        newer.data = b"newer state".to_vec().into();
        s.install_snapshot(&newer).expect("install");
        assert_eq!(registry_snapshots(dir.path()), [name(2, 1), name(3, 2)]);
        s.sync().expect("sync");
        assert_eq!(registry_snapshots(dir.path()), [name(3, 2)]);
        // A file left by a crash between staging and recording goes at the next open.
        let stage = s.stager().expect("stager");
        stage(&snapshot(9, 2, vec![1])).expect("stage");
    }
    let s = SledStore::open(dir.path()).expect("reopen");
    assert_eq!(registry_snapshots(dir.path()), [name(3, 2)]);
    assert_eq!(
        s.current_snapshot().expect("snap").data.as_ref(),
        b"newer state"
    );
    assert_eq!(s.first_index().ok(), Some(4));
}

#[test]
fn a_store_whose_snapshot_file_is_missing_or_wrong_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = SledStore::open(dir.path()).expect("open");
        s.install_snapshot(&snapshot(4, 2, vec![1]))
            .expect("install");
        s.sync().expect("sync");
    }
    let file = dir
        .path()
        .join("raft")
        .join("registry-snapshots")
        .join(format!("{:020}-{:020}", 4, 2));
    let good = std::fs::read(&file).expect("snapshot file");
    std::fs::write(&file, b"not a snapshot").expect("scribble");
    let s = SledStore::open(dir.path()).expect("opens: the file is read when needed");
    let err = s
        .current_snapshot()
        .expect_err("a scribbled snapshot must not load");
    assert!(err.to_string().contains("snapshot"), "{err}");
    // Asked for by Raft to send: not an error that stops the node, but a fresh one is wanted.
    assert!(is_store_err(
        Storage::snapshot(&s, 4, 1),
        StorageError::SnapshotTemporarilyUnavailable
    ));
    assert!(s.take_snapshot_request());
    drop(s);
    std::fs::remove_file(&file).expect("remove");
    let err = SledStore::open(dir.path())
        .err()
        .expect("a store without its snapshot file must not open");
    assert!(err.to_string().contains("is missing"), "{err}");
    std::fs::write(&file, good).expect("put back");
    SledStore::open(dir.path()).expect("opens again with its file");
}

#[test]
fn a_store_with_its_snapshot_inside_sled_is_read_and_moves_it_to_a_file() {
    use protobuf::Message;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        // The layout before snapshot files: the whole snapshot under meta's `snapshot`.
        let db = sled::open(dir.path().join("raft")).expect("sled");
        let meta = db.open_tree("meta").expect("meta");
        let old = snapshot(5, 3, vec![1]);
        let conf = old.get_metadata().get_conf_state().clone();
        let hard = HardState {
            term: 3,
            commit: 5,
            ..Default::default()
        };
        meta.insert("snapshot", old.write_to_bytes().expect("encode"))
            .expect("insert");
        meta.insert("conf_state", conf.write_to_bytes().expect("encode"))
            .expect("insert");
        meta.insert("hard_state", hard.write_to_bytes().expect("encode"))
            .expect("insert");
        db.flush().expect("flush");
    }
    let mut s = SledStore::open(dir.path()).expect("open the old layout");
    assert_eq!(s.current_snapshot().expect("snap").data.as_ref(), b"state");
    assert_eq!(s.first_index().ok(), Some(6));
    assert!(registry_snapshots(dir.path()).is_empty());
    LogStore::append(&mut s, &[entry(6, 3)]).expect("append");
    s.install_snapshot(&snapshot(6, 3, vec![1]))
        .expect("install");
    s.sync().expect("sync");
    drop(s);
    let s = SledStore::open(dir.path()).expect("reopen");
    assert_eq!(
        registry_snapshots(dir.path()),
        [format!("{:020}-{:020}", 6, 3)]
    );
    assert_eq!(s.first_index().ok(), Some(7));
    assert_eq!(s.current_snapshot().expect("snap").get_metadata().index, 6);
}
