//! The narrow storage interface of the ledger, and its embedded sled implementation.
//!
//! This is the only module that imports sled. A store keeps stored records by seq and makes an
//! appended batch durable before it returns: sled 0.34's `flush()` only issues
//! `sync_file_range`, so after flushing the log file is fsynced as well.

use std::fs::File;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// sled's segment size: a log message larger than a quarter of it would go to a blob file that
/// sled never fsyncs, so it must be large enough for any record and any rewritten leaf.
const SEGMENT_SIZE: usize = 8 * 1024 * 1024;
const EVENTS_TREE: &str = "events";
/// Records per sled batch. sled 0.34 keeps far more memory after large batches than the data
/// they hold (measured with `examples/sled_residency.rs`: 100,000 records of 600 bytes in
/// batches of 100 leave 23 MiB resident, in batches of 1,000 leave 244 MiB), so a group commit
/// is applied in chunks of this size and made durable once.
const APPLY_CHUNK: usize = 256;

/// A storage failure. Nothing in the batch that met it may be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage engine failed: {0}")]
    Engine(String),
    #[error("storage is closed")]
    Closed,
    #[error("stored key {0:?} is not a seq")]
    BadKey(Vec<u8>),
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> StorageError {
        match e {
            sled::Error::Io(io) => StorageError::Io(io),
            other => StorageError::Engine(other.to_string()),
        }
    }
}

/// Where the ledger keeps its records.
pub trait Storage: Send + Sync + 'static {
    /// The highest stored seq, if any.
    fn head(&self) -> Result<Option<u64>, StorageError>;
    /// The stored bytes at `seq`.
    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StorageError>;
    /// Calls `visit` for every stored record with `from <= seq <= to`, in seq order, until it
    /// breaks.
    fn scan(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StorageError>;
    /// Stores a batch durably: when this returns `Ok`, the records survive a crash or power
    /// loss. A crash before it returns may leave a prefix of the batch stored (never a gap);
    /// none of it was acknowledged.
    fn append(&self, records: &[(u64, &[u8])]) -> Result<(), StorageError>;
    /// Removes every record after `seq`, durably.
    fn truncate_after(&self, seq: u64) -> Result<(), StorageError>;
    /// Closes and opens the store again, for recovery after a failure.
    fn reopen(&self) -> Result<(), StorageError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> u64;
}

/// Faults to inject into a [`SledStore`], for tests of the failure paths.
#[derive(Debug, Default)]
pub struct Faults {
    failing_appends: AtomicU32,
    failing_fsyncs: AtomicU32,
    panicking_appends: AtomicU32,
    fsync_delay_millis: AtomicU64,
}

impl Faults {
    /// Makes every fsync take at least `delay` longer (a slow disk).
    pub fn delay_fsyncs(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.fsync_delay_millis.store(millis, Ordering::SeqCst);
    }

    /// Makes the next `n` fsyncs fail.
    pub fn fail_next_fsyncs(&self, n: u32) {
        self.failing_fsyncs.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` appends fail before anything is written.
    pub fn fail_next_appends(&self, n: u32) {
        self.failing_appends.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` appends panic (a bug in the writer).
    pub fn panic_next_appends(&self, n: u32) {
        self.panicking_appends.store(n, Ordering::SeqCst);
    }

    fn take_fsync_failure(&self) -> bool {
        take(&self.failing_fsyncs)
    }

    fn take_append_failure(&self) -> bool {
        take(&self.failing_appends)
    }
}

fn take(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// sled settings the service exposes.
#[derive(Clone, Debug)]
pub struct SledOptions {
    /// sled's page cache budget in bytes (its own default is 1 GiB).
    pub cache_capacity: u64,
}

impl Default for SledOptions {
    fn default() -> SledOptions {
        SledOptions { cache_capacity: 64 * 1024 * 1024 }
    }
}

/// The embedded default store.
#[derive(Debug)]
pub struct SledStore {
    dir: PathBuf,
    options: SledOptions,
    faults: Arc<Faults>,
    open: RwLock<Option<Open>>,
}

#[derive(Debug)]
struct Open {
    db: sled::Db,
    events: sled::Tree,
    /// sled's log file, kept open to fsync it after every flush.
    log: File,
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(
        dir: &Path,
        options: SledOptions,
        faults: Arc<Faults>,
    ) -> Result<SledStore, StorageError> {
        let open = open_with_retry(dir, &options)?;
        Ok(SledStore { dir: dir.to_owned(), options, faults, open: RwLock::new(Some(open)) })
    }

    fn with_open<T>(
        &self,
        f: impl FnOnce(&Open) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let guard = self.open.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(open) => f(open),
            None => Err(StorageError::Closed),
        }
    }

    /// A handle on the events tree that outlives the lock, so long scans never block a reopen
    /// for longer than they take.
    fn events(&self) -> Result<sled::Tree, StorageError> {
        self.with_open(|open| Ok(open.events.clone()))
    }

    fn sync(&self, open: &Open) -> Result<(), StorageError> {
        open.db.flush()?;
        let delay = self.faults.fsync_delay_millis.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if self.faults.take_fsync_failure() {
            return Err(StorageError::Io(std::io::Error::other("injected fsync failure")));
        }
        open.log.sync_data()?;
        Ok(())
    }
}

fn open_sled(dir: &Path, options: &SledOptions) -> Result<Open, StorageError> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new()
        .path(dir)
        .segment_size(SEGMENT_SIZE)
        .cache_capacity(options.cache_capacity)
        .mode(sled::Mode::HighThroughput)
        // Every batch is flushed and fsynced by the writer; sled's own background flusher
        // would only add a thread that outlives the handle.
        .flush_every_ms(None)
        .open()?;
    let events = db.open_tree(EVENTS_TREE)?;
    let log = File::options().read(true).write(true).open(dir.join("db"))?;
    // Make sled's files (log, config, snapshots) and their directory entries durable too.
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            File::open(&path)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(Open { db, events, log })
}

/// sled holds an exclusive file lock until its last handle is gone; a handle that is being
/// dropped (a reader finishing a scan, a previous instance in the same process) holds it for a
/// moment, so opening is retried for a short while.
fn open_with_retry(dir: &Path, options: &SledOptions) -> Result<Open, StorageError> {
    let mut attempts = 0;
    loop {
        match open_sled(dir, options) {
            Ok(open) => return Ok(open),
            Err(e) if attempts < 50 => {
                attempts += 1;
                tracing::debug!(error = %e, attempts, "ledger store busy; retrying");
                std::thread::sleep(Duration::from_millis(40));
            }
            Err(e) => return Err(e),
        }
    }
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(key: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StorageError::BadKey(key.to_vec()))?;
    Ok(u64::from_be_bytes(bytes))
}

impl Storage for SledStore {
    fn head(&self) -> Result<Option<u64>, StorageError> {
        match self.events()?.last()? {
            Some((k, _)) => Ok(Some(seq_of(&k)?)),
            None => Ok(None),
        }
    }

    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.events()?.get(key(seq))?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StorageError> {
        if from > to {
            return Ok(());
        }
        for item in self.events()?.range(key(from)..=key(to)) {
            let (k, v) = item?;
            if visit(seq_of(&k)?, &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn append(&self, records: &[(u64, &[u8])]) -> Result<(), StorageError> {
        if take(&self.faults.panicking_appends) {
            panic!("injected panic in the ledger writer");
        }
        if self.faults.take_append_failure() {
            return Err(StorageError::Io(std::io::Error::other("injected append failure")));
        }
        self.with_open(|open| {
            for chunk in records.chunks(APPLY_CHUNK) {
                let mut batch = sled::Batch::default();
                for (seq, bytes) in chunk {
                    batch.insert(&key(*seq), *bytes);
                }
                open.events.apply_batch(batch)?;
            }
            self.sync(open)
        })
    }

    fn truncate_after(&self, seq: u64) -> Result<(), StorageError> {
        self.with_open(|open| {
            let mut batch = sled::Batch::default();
            for item in open.events.range(key(seq.saturating_add(1))..) {
                batch.remove(item?.0);
            }
            open.events.apply_batch(batch)?;
            self.sync(open)
        })
    }

    fn reopen(&self) -> Result<(), StorageError> {
        let mut guard = self.open.write().unwrap_or_else(|e| e.into_inner());
        guard.take();
        *guard = Some(open_with_retry(&self.dir, &self.options)?);
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        self.with_open(|open| Ok(open.db.size_on_disk()?)).unwrap_or(0)
    }
}
