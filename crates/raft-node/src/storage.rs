//! Raft log storage: the [`LogStore`] seam with a durable sled implementation and an in-memory
//! one, both held to the same contract by one shared test suite.
//!
//! Layout of the sled store (one `Db`, one flush makes everything before it durable):
//! - tree `entries`: big-endian index -> protobuf `Entry`
//! - tree `meta`: `hard_state`, `conf_state`, `snapshot_meta` (the snapshot's metadata) ->
//!   protobuf bytes, `cluster` -> identity
//! - the snapshot itself (metadata and data, protobuf) in its own file beside the database,
//!   `registry-snapshots/<index>-<term>`: written and synced before the metadata names it, so
//!   sled never holds the registry (its page cache would keep it in memory). Stores written
//!   before kept the whole snapshot under `meta`'s `snapshot`; they are read as they are and
//!   move to the file at their next snapshot.
//!
//! The snapshot's index is the log's offset: entries at or below it have been compacted away and
//! `first_index` is `snapshot.index + 1`, as in raft-rs's own `MemStorage`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::Error;

/// Raft storage that can also be written: what the driver loop needs beyond `raft::Storage`.
pub trait LogStore: raft::Storage {
    /// Appends entries, first dropping any existing entries at or after the first new index
    /// (a new leader's log wins over an uncommitted suffix). Not durable until [`LogStore::sync`].
    fn append(&mut self, entries: &[Entry]) -> Result<(), Error>;
    fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), Error>;
    /// Records a new commit index (from a light ready), keeping term and vote.
    fn set_commit(&mut self, commit: u64) -> Result<(), Error>;
    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), Error>;
    /// Installs a snapshot: it becomes the log's base, every entry it covers is dropped, and its
    /// conf state becomes the stored one. A snapshot older than the current one is ignored.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Error>;
    /// The snapshot the log currently starts from.
    fn current_snapshot(&self) -> Result<Snapshot, Error>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), Error>;
    /// Whether Raft asked for a snapshot the store could not give (too old, or taken before the
    /// peer it is for was added); the driver then takes a fresh one. Clears the request.
    fn take_snapshot_request(&self) -> bool;
    /// Writes a snapshot's data where [`LogStore::install_snapshot`] takes it from, callable
    /// from another thread, so that a snapshot is encoded and written off the Raft thread;
    /// `None` (the default): the store takes everything in `install_snapshot`.
    fn stager(&self) -> Option<Stager> {
        None
    }
}

/// See [`LogStore::stager`].
pub type Stager = Box<dyn FnOnce(&Snapshot) -> Result<(), Error> + Send>;

fn proto_err(what: &'static str) -> impl Fn(protobuf::ProtobufError) -> Error {
    move |e| Error::Corrupt {
        what,
        reason: e.to_string(),
    }
}

fn encode<M: protobuf::Message>(what: &'static str, m: &M) -> Result<Vec<u8>, Error> {
    m.write_to_bytes().map_err(proto_err(what))
}

fn decode<M: protobuf::Message>(what: &'static str, bytes: &[u8]) -> Result<M, Error> {
    M::parse_from_bytes(bytes).map_err(proto_err(what))
}

fn to_raft(e: Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// Total encoded size limit for `entries`, as raft-rs's `limit_size`: at least one entry.
fn within_size(entries: &mut Vec<Entry>, max_size: Option<u64>) {
    raft::util::limit_size(entries, max_size);
}

/// `term` at or below the snapshot: the snapshot's own term at its index, `Compacted` below it;
/// `None` above it (the log answers).
fn snapshot_term(snapshot: &Snapshot, idx: u64) -> Option<raft::Result<u64>> {
    let meta = snapshot.get_metadata();
    match idx.cmp(&meta.index) {
        std::cmp::Ordering::Equal => Some(Ok(meta.term)),
        std::cmp::Ordering::Less => Some(Err(raft::Error::Store(StorageError::Compacted))),
        std::cmp::Ordering::Greater => None,
    }
}

/// `raft::Storage::snapshot`: the stored snapshot if it is recent enough and its configuration
/// includes the peer `to` (raft-rs refuses a snapshot that does not name the receiver). Otherwise
/// a fresh snapshot is requested through `wanted` and Raft retries later.
fn snapshot_for(
    snapshot: &Snapshot,
    request_index: u64,
    to: u64,
    wanted: &AtomicBool,
) -> raft::Result<Snapshot> {
    let meta = snapshot.get_metadata();
    let conf = meta.get_conf_state();
    let names_peer = conf.voters.contains(&to)
        || conf.learners.contains(&to)
        || conf.voters_outgoing.contains(&to);
    if meta.index < request_index || !names_peer {
        wanted.store(true, Ordering::Relaxed);
        return Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ));
    }
    Ok(snapshot.clone())
}

/// Shared bounds checks of `raft::Storage::entries`.
fn check_range(low: u64, high: u64, first: u64, last: u64) -> raft::Result<()> {
    if low < first {
        return Err(raft::Error::Store(StorageError::Compacted));
    }
    if high > last + 1 {
        return Err(raft::Error::Store(StorageError::Unavailable));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// sled

const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";
/// The whole snapshot, in stores written before snapshots moved to their own file.
const LEGACY_SNAPSHOT: &[u8] = b"snapshot";
const SNAPSHOT_META: &[u8] = b"snapshot_meta";
/// The directory of snapshot files, inside sled's own (sled reads only its `snap.*` files).
const SNAPSHOT_DIR: &str = "registry-snapshots";

/// Durable Raft storage in a sled database.
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    entries: sled::Tree,
    meta: sled::Tree,
    // Cached copies of what is in `meta`, so reads on the Raft path do not decode protobuf.
    hard_state: HardState,
    conf_state: ConfState,
    /// The snapshot's metadata only: its data (the whole registry) stays on disk until a peer
    /// or a restart needs it, rather than doubling the registry's memory.
    snapshot: Snapshot,
    /// The snapshot's data is still under `meta` (a store written before snapshot files).
    legacy_snapshot: bool,
    /// Snapshot files replaced by a newer one: deleted once the newer one's metadata is durable.
    superseded: Vec<PathBuf>,
    snapshot_wanted: AtomicBool,
}

/// The file of the snapshot at `index` of `term`.
fn snapshot_file(raft_dir: &Path, index: u64, term: u64) -> PathBuf {
    raft_dir
        .join(SNAPSHOT_DIR)
        .join(format!("{index:020}-{term:020}"))
}

/// Writes `snapshot` (metadata and data) durably to its file, unless a file of its length is
/// there already (staged by [`LogStore::stager`]): a temporary file, synced, renamed, and the
/// directory synced.
fn write_snapshot_file(raft_dir: &Path, snapshot: &Snapshot) -> Result<(), Error> {
    use protobuf::Message;
    let meta = snapshot.get_metadata();
    let path = snapshot_file(raft_dir, meta.index, meta.term);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == u64::from(snapshot.compute_size())) {
        return Ok(());
    }
    let bytes = encode("snapshot", snapshot)?;
    let io_err = |what: &str, e: std::io::Error| Error::Storage {
        path: path.display().to_string(),
        reason: format!("{what} the snapshot file: {e}; check free space and permissions"),
    };
    let dir = raft_dir.join(SNAPSHOT_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create the directory of", e))?;
    let temporary = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary).map_err(|e| io_err("cannot create", e))?;
        file.write_all(&bytes)
            .map_err(|e| io_err("cannot write", e))?;
        file.sync_all().map_err(|e| io_err("cannot sync", e))?;
    }
    std::fs::rename(&temporary, &path).map_err(|e| io_err("cannot rename", e))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot sync the directory of", e))
}

fn metadata_only(snapshot: &Snapshot) -> Snapshot {
    let mut s = Snapshot::default();
    s.set_metadata(snapshot.get_metadata().clone());
    s
}

impl SledStore {
    /// The stored snapshot with its data, read from disk.
    fn load_snapshot(&self) -> Result<Snapshot, Error> {
        if self.legacy_snapshot {
            return match self.meta.get(LEGACY_SNAPSHOT).map_err(self.sled_err())? {
                Some(v) => decode("snapshot", &v),
                None => Ok(Snapshot::default()),
            };
        }
        let meta = self.snapshot.get_metadata();
        if meta.index == 0 {
            return Ok(Snapshot::default());
        }
        let path = snapshot_file(&self.path, meta.index, meta.term);
        let bytes = std::fs::read(&path).map_err(|e| Error::Corrupt {
            what: "snapshot",
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let snapshot: Snapshot = decode("snapshot", &bytes)?;
        if snapshot.get_metadata() != meta {
            return Err(Error::Corrupt {
                what: "snapshot",
                reason: format!(
                    "{} does not hold the snapshot its name says",
                    path.display()
                ),
            });
        }
        Ok(snapshot)
    }

    /// Removes snapshot files no metadata names (a crash between writing one and recording
    /// it, or before the one it replaced was deleted).
    fn remove_stray_snapshots(&self) {
        let meta = self.snapshot.get_metadata();
        let current = snapshot_file(&self.path, meta.index, meta.term);
        let Ok(files) = std::fs::read_dir(self.path.join(SNAPSHOT_DIR)) else {
            return;
        };
        for file in files.flatten() {
            let path = file.path();
            if self.legacy_snapshot || path != current {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a stray snapshot file");
                }
            }
        }
    }

    /// Opens (or creates) the store in `dir`. A directory that is not a linkdns store, or one
    /// that is damaged, is refused without being written to.
    pub fn open(dir: &Path) -> Result<SledStore, Error> {
        let path = dir.join("raft");
        // sled lets go of its file lock a moment after the store is dropped (its flusher
        // thread ends last): a store reopened at once by the same process waits that out. A
        // store held by another process is still refused, after half a second.
        let mut result = SledStore::open_at(path.clone());
        for _ in 0..10 {
            if !matches!(result, Err(Error::Locked { .. })) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            result = SledStore::open_at(path.clone());
        }
        result.map_err(|e| match e {
            Error::Corrupt { what, reason } => Error::DamagedDataDir {
                path: path.display().to_string(),
                reason: format!("{what}: {reason}"),
            },
            other => other,
        })
    }

    fn open_at(path: PathBuf) -> Result<SledStore, Error> {
        let sled_err = |e: sled::Error| Error::from_sled(&path, e);
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::LowSpace)
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .map_err(sled_err)?;
        let entries = db.open_tree("entries").map_err(sled_err)?;
        let meta = db.open_tree("meta").map_err(sled_err)?;
        let read = |key: &[u8]| meta.get(key).map_err(sled_err);
        let hard_state = match read(HARD_STATE)? {
            Some(v) => decode("hard state", &v)?,
            None => HardState::default(),
        };
        let conf_state = match read(CONF_STATE)? {
            Some(v) => decode("conf state", &v)?,
            None => ConfState::default(),
        };
        let (snapshot, legacy_snapshot) = match read(SNAPSHOT_META)? {
            Some(v) => (decode("snapshot metadata", &v)?, false),
            None => match read(LEGACY_SNAPSHOT)? {
                Some(v) => (metadata_only(&decode("snapshot", &v)?), true),
                None => (Snapshot::default(), false),
            },
        };
        let store = SledStore {
            path,
            db,
            entries,
            meta,
            hard_state,
            conf_state,
            snapshot,
            legacy_snapshot,
            superseded: Vec::new(),
            snapshot_wanted: AtomicBool::new(false),
        };
        store.check_consistency()?;
        store.remove_stray_snapshots();
        Ok(store)
    }

    /// Whether nothing was ever stored (a data dir that never bootstrapped or joined).
    pub fn is_fresh(&self) -> bool {
        self.conf_state.voters.is_empty()
            && self.conf_state.learners.is_empty()
            && self.snapshot.get_metadata().index == 0
    }

    /// Voters of the stored configuration (that of the latest snapshot).
    pub fn stored_voters(&self) -> &[u64] {
        &self.conf_state.voters
    }

    fn sled_err(&self) -> impl Fn(sled::Error) -> Error + '_ {
        |e| Error::from_sled(&self.path, e)
    }

    /// The log must be contiguous from the snapshot on, and the commit index inside it.
    fn check_consistency(&self) -> Result<(), Error> {
        let meta = self.snapshot.get_metadata();
        if !self.legacy_snapshot && meta.index > 0 {
            let path = snapshot_file(&self.path, meta.index, meta.term);
            if !path.is_file() {
                return Err(Error::Corrupt {
                    what: "snapshot",
                    reason: format!("{} is missing", path.display()),
                });
            }
        }
        let first = meta.index + 1;
        let last = self.last_index_inner()?;
        if let Some(item) = self.entries.iter().next() {
            let (key, _) = item.map_err(self.sled_err())?;
            let index = key_index(&key)?;
            if index != first {
                return Err(Error::Corrupt {
                    what: "raft log",
                    reason: format!("log starts at {index}, snapshot ends at {}", first - 1),
                });
            }
        }
        let count = self.entries.len() as u64;
        if count != last + 1 - first {
            return Err(Error::Corrupt {
                what: "raft log",
                reason: format!("{count} entries between {first} and {last}: the log has holes"),
            });
        }
        if self.hard_state.commit > last {
            return Err(Error::Corrupt {
                what: "raft log",
                reason: format!(
                    "commit index {} is past the last entry {last}",
                    self.hard_state.commit
                ),
            });
        }
        Ok(())
    }

    fn last_index_inner(&self) -> Result<u64, Error> {
        match self.entries.last().map_err(self.sled_err())? {
            Some((key, _)) => key_index(&key),
            None => Ok(self.snapshot.get_metadata().index),
        }
    }

    fn entry(&self, index: u64) -> Result<Option<Entry>, Error> {
        match self
            .entries
            .get(index.to_be_bytes())
            .map_err(self.sled_err())?
        {
            Some(v) => Ok(Some(decode("log entry", &v)?)),
            None => Ok(None),
        }
    }

    fn put_meta<M: protobuf::Message>(
        &self,
        key: &[u8],
        what: &'static str,
        m: &M,
    ) -> Result<(), Error> {
        self.meta
            .insert(key, encode(what, m)?)
            .map_err(self.sled_err())?;
        Ok(())
    }
}

fn key_index(key: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| Error::Corrupt {
        what: "raft log",
        reason: format!("entry key of {} bytes", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

impl raft::Storage for SledStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.snapshot.get_metadata().index + 1;
        let last = self.last_index_inner().map_err(to_raft)?;
        check_range(low, high, first, last)?;
        let mut out = Vec::with_capacity((high - low) as usize);
        for item in self.entries.range(low.to_be_bytes()..high.to_be_bytes()) {
            let (_, v) = item.map_err(|e| to_raft(Error::from_sled(&self.path, e)))?;
            out.push(decode("log entry", &v).map_err(to_raft)?);
        }
        if out.len() as u64 != high - low {
            return Err(to_raft(Error::Corrupt {
                what: "raft log",
                reason: format!("entries {low}..{high} are not all present"),
            }));
        }
        within_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if let Some(at_or_below) = snapshot_term(&self.snapshot, idx) {
            return at_or_below;
        }
        match self.entry(idx).map_err(to_raft)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot.get_metadata().index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.last_index_inner().map_err(to_raft)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // Decided on the metadata; the data is read only for a snapshot that will be sent.
        snapshot_for(&self.snapshot, request_index, to, &self.snapshot_wanted)?;
        // raft-rs stops the node on any other error here: a snapshot file that cannot be read
        // (removed or damaged under the node) is replaced by a fresh snapshot instead.
        self.load_snapshot().map_err(|e| {
            tracing::error!(error = %e, "cannot read the snapshot to send; taking a new one");
            self.snapshot_wanted.store(true, Ordering::Relaxed);
            raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)
        })
    }
}

impl LogStore for SledStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), Error> {
        let Some(first_new) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        let snapshot_index = self.snapshot.get_metadata().index;
        if first_new <= snapshot_index {
            return Err(Error::Corrupt {
                what: "append",
                reason: format!("entry {first_new} is at or below the snapshot {snapshot_index}"),
            });
        }
        let last = self.last_index_inner()?;
        if first_new > last + 1 {
            return Err(Error::Corrupt {
                what: "append",
                reason: format!("entry {first_new} would leave a hole after {last}"),
            });
        }
        let mut batch = sled::Batch::default();
        for index in first_new..=last {
            batch.remove(&index.to_be_bytes());
        }
        for e in entries {
            batch.insert(&e.index.to_be_bytes(), encode("log entry", e)?);
        }
        self.entries.apply_batch(batch).map_err(self.sled_err())
    }

    fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), Error> {
        self.put_meta(HARD_STATE, "hard state", hard_state)?;
        self.hard_state = hard_state.clone();
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), Error> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), Error> {
        self.put_meta(CONF_STATE, "conf state", conf_state)?;
        self.conf_state = conf_state.clone();
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Error> {
        let meta = snapshot.get_metadata();
        let old = self.snapshot.get_metadata().index;
        if meta.index <= old && old != 0 {
            // Older than the one installed: a file staged for it is not needed.
            let staged = snapshot_file(&self.path, meta.index, meta.term);
            if old != meta.index {
                let _ = std::fs::remove_file(staged);
            }
            return Ok(());
        }
        // Keep entries after the snapshot only if the log agrees with it at its index.
        let keep_tail = matches!(self.entry(meta.index)?, Some(e) if e.term == meta.term);
        let end = if keep_tail { meta.index + 1 } else { u64::MAX };
        let mut doomed = Vec::new();
        for item in self.entries.range(0u64.to_be_bytes()..end.to_be_bytes()) {
            let (key, _) = item.map_err(self.sled_err())?;
            doomed.push(key);
        }
        let mut hard_state = self.hard_state.clone();
        if hard_state.commit < meta.index {
            hard_state.commit = meta.index;
            hard_state.term = hard_state.term.max(meta.term);
        }
        write_snapshot_file(&self.path, snapshot)?;
        let metadata_bytes = encode("snapshot metadata", &metadata_only(snapshot))?;
        let conf_bytes = encode("conf state", meta.get_conf_state())?;
        let hard_bytes = encode("hard state", &hard_state)?;
        // One transaction: a crash leaves either the old log and snapshot or the new ones, never
        // a log whose start does not meet its snapshot, nor a commit index below the snapshot.
        (&self.entries, &self.meta)
            .transaction(|(entries, meta_tree)| {
                for key in &doomed {
                    entries.remove(key)?;
                }
                meta_tree.insert(SNAPSHOT_META, metadata_bytes.as_slice())?;
                meta_tree.remove(LEGACY_SNAPSHOT)?;
                meta_tree.insert(CONF_STATE, conf_bytes.as_slice())?;
                meta_tree.insert(HARD_STATE, hard_bytes.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => Error::from_sled(&self.path, e),
                TransactionError::Abort(()) => Error::Corrupt {
                    what: "snapshot install",
                    reason: "transaction aborted".into(),
                },
            })?;
        let old = self.snapshot.get_metadata();
        if !self.legacy_snapshot && old.index > 0 {
            self.superseded
                .push(snapshot_file(&self.path, old.index, old.term));
        }
        self.snapshot = metadata_only(snapshot);
        self.legacy_snapshot = false;
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state = hard_state;
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Snapshot, Error> {
        self.load_snapshot()
    }

    fn sync(&mut self) -> Result<(), Error> {
        self.db.flush().map_err(self.sled_err())?;
        // The metadata naming a newer snapshot is durable: the files it replaced can go.
        for path in self.superseded.drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a replaced snapshot file");
            }
        }
        Ok(())
    }

    fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    fn stager(&self) -> Option<Stager> {
        let raft_dir = self.path.clone();
        Some(Box::new(move |snapshot: &Snapshot| {
            write_snapshot_file(&raft_dir, snapshot)
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// memory

/// In-memory Raft storage with the same contract as [`SledStore`], for the simulated cluster
/// tests and as the reference the sled store is checked against.
#[derive(Default)]
pub struct MemStore {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// Entries after the snapshot, in order; `entries[0].index == snapshot.index + 1`.
    entries: Vec<Entry>,
    snapshot_wanted: AtomicBool,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn offset(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.get_metadata().index, |e| e.index)
    }
}

impl raft::Storage for MemStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        check_range(low, high, self.offset(), self.last())?;
        let start = (low - self.offset()) as usize;
        let end = (high - self.offset()) as usize;
        let mut out = self.entries[start..end].to_vec();
        within_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if let Some(at_or_below) = snapshot_term(&self.snapshot, idx) {
            return at_or_below;
        }
        self.entries
            .get((idx - self.offset()) as usize)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.offset())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        snapshot_for(&self.snapshot, request_index, to, &self.snapshot_wanted)
    }
}

impl LogStore for MemStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), Error> {
        let Some(first_new) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        if first_new < self.offset() {
            return Err(Error::Corrupt {
                what: "append",
                reason: format!(
                    "entry {first_new} is at or below the snapshot {}",
                    self.offset() - 1
                ),
            });
        }
        if first_new > self.last() + 1 {
            return Err(Error::Corrupt {
                what: "append",
                reason: format!("entry {first_new} would leave a hole after {}", self.last()),
            });
        }
        self.entries.truncate((first_new - self.offset()) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), Error> {
        self.hard_state = hard_state.clone();
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), Error> {
        self.hard_state.commit = commit;
        Ok(())
    }

    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), Error> {
        self.conf_state = conf_state.clone();
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Error> {
        let meta = snapshot.get_metadata();
        let old = self.snapshot.get_metadata().index;
        if meta.index <= old && old != 0 {
            return Ok(());
        }
        let agrees = meta.index >= self.offset()
            && self
                .entries
                .get((meta.index - self.offset()) as usize)
                .is_some_and(|e| e.term == meta.term);
        if agrees {
            let drop = (meta.index + 1 - self.offset()) as usize;
            self.entries.drain(..drop);
        } else {
            self.entries.clear();
        }
        self.snapshot = snapshot.clone();
        self.conf_state = meta.get_conf_state().clone();
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
            self.hard_state.term = self.hard_state.term.max(meta.term);
        }
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Snapshot, Error> {
        Ok(self.snapshot.clone())
    }

    fn sync(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
