//! The audit ledger: an append-only, SHA-256 hash-chained log of governance events.
//!
//! One writer task owns the head ([`writer`]); everything else holds a cheap [`Ledger`] handle
//! that sends it drafts and reads the published [`State`]. Stored records are read straight from
//! [`store::Storage`] for listing and verification.

pub mod clock;
pub mod idempotency;
pub mod record;
pub mod store;
pub mod verify;
mod writer;

pub use self::writer::{Decided, Decider, Decision};

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use self::clock::Clock;
use self::idempotency::IdempotencyIndex;
use self::record::{Draft, TooLarge};
use self::store::{Faults, SledOptions, SledStore, Storage};
use self::verify::{ChainVerifier, Verification};
use crate::state::{Head, State};

/// How the ledger is opened.
#[derive(Clone)]
pub struct LedgerOptions {
    pub dir: PathBuf,
    pub sled: SledOptions,
    /// Faults to inject into storage (tests only; empty otherwise).
    pub faults: Arc<Faults>,
    pub clock: Arc<dyn Clock>,
    /// How long idempotency keys are remembered.
    pub idempotency_retention: Duration,
    /// What takes effect when storage fails and cannot be recovered (a freeze).
    pub fail_closed: FailClosed,
    /// Told how long every storage append took and whether it succeeded.
    pub observer: Option<AppendObserver>,
}

/// Called by the writer after every storage append with its duration and outcome.
pub type AppendObserver = Arc<dyn Fn(Duration, bool) + Send + Sync>;

impl std::fmt::Debug for LedgerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerOptions").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Given the state in effect and the storage fault, the events that must take effect at once
/// (in memory, written when storage returns). Called by the writer.
pub type FailClosed = Arc<dyn Fn(&State, &str) -> Vec<Draft> + Send + Sync>;

/// Where one appended event landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub hash: String,
    /// True when an idempotency key matched an earlier event with the same payload; `seq` and
    /// `hash` are then the original's and nothing was appended.
    pub duplicate: bool,
}

/// Why an append was not acknowledged. Nothing from a failed append is ever acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("record {index}: {source}")]
    TooLarge { index: usize, source: TooLarge },
    /// An idempotency key was used before, by the same principal, for a different payload.
    #[error(
        "record {index}: idempotency key {key:?} was already used for a different event (seq {seq})"
    )]
    KeyConflict { index: usize, key: String, seq: u64 },
    #[error("the ledger cannot append right now: {0}")]
    Unavailable(String),
    #[error("the ledger is shut down")]
    Closed,
}

/// Storage health as the writer sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageHealth {
    /// `None` while storage appends; else why it cannot.
    pub fault: Option<String>,
}

/// What opening the ledger found.
#[derive(Debug)]
pub struct StartReport {
    /// `Some` when the store could not be opened at all; the ledger then serves from empty
    /// in-memory state and refuses appends.
    pub storage_error: Option<String>,
    /// The verification of every stored record.
    pub verification: Verification,
}

/// A handle on the ledger. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Ledger {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::Sender<writer::Command>,
    state: watch::Receiver<Arc<State>>,
    durable: watch::Receiver<Arc<State>>,
    health: watch::Receiver<StorageHealth>,
    store: Option<Arc<dyn Storage>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    keys: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for dyn Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Storage")
    }
}

impl Ledger {
    /// Opens the store, verifies every record, rebuilds the state and starts the writer.
    /// Blocking: call it from a blocking context. Never fails: a store that cannot be opened
    /// yields a ledger that refuses appends, as the report says.
    pub fn open(options: LedgerOptions) -> (Ledger, StartReport) {
        let opened = SledStore::open(&options.dir, options.sled.clone(), options.faults.clone());
        let (store, storage_error) = match opened {
            Ok(store) => (Some(Arc::new(store) as Arc<dyn Storage>), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let mut index = IdempotencyIndex::new(options.idempotency_retention);
        let (state, verification, storage_error) = match &store {
            Some(store) => match rebuild(store.as_ref(), &mut index) {
                Ok((state, verification)) => (state, verification, storage_error),
                Err(e) => (State::default(), Verification::default(), Some(e.to_string())),
            },
            None => (State::default(), Verification::default(), storage_error),
        };
        index.expire(options.clock.now_micros());
        let writable = if storage_error.is_some() { None } else { store.clone() };
        let spawned = writer::spawn(
            writable,
            state,
            index,
            options.clock,
            options.fail_closed,
            options.observer,
            storage_error.clone(),
        );
        let ledger = Ledger {
            inner: Arc::new(Inner {
                commands: spawned.commands,
                state: spawned.state,
                durable: spawned.durable,
                health: spawned.health,
                store,
                thread: Mutex::new(Some(spawned.thread)),
                keys: spawned.keys,
            }),
        };
        (ledger, StartReport { storage_error, verification })
    }

    /// Appends drafts as one atomic unit and answers once they are durable.
    pub async fn append(&self, drafts: Vec<Draft>) -> Result<Vec<Appended>, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(writer::Command::Append { drafts, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        match answer.await {
            Ok(answered) => answered,
            Err(_) => Err(self.gone().await),
        }
    }

    /// Decides against the pending state and appends what the decision asks for; see
    /// [`Decision`]. Answers once the events are durable, or (safe direction only) once they
    /// took effect in memory while storage is failing.
    pub async fn decide(
        &self,
        decide: impl FnOnce(&State) -> Decision + Send + 'static,
    ) -> Result<Decided, AppendError> {
        let (reply, answer) = oneshot::channel();
        let decide: Decider = Box::new(decide);
        self.inner
            .commands
            .send(writer::Command::Decide { decide, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        match answer.await {
            Ok(answered) => answered,
            Err(_) => Err(self.gone().await),
        }
    }

    /// Why a call was dropped unanswered. The writer stopped; once its thread has ended, what it
    /// did on the way out (a freeze, after a panic) is published, so no caller is told "failed"
    /// and then sees the state from before.
    async fn gone(&self) -> AppendError {
        for _ in 0..400 {
            let ended = {
                let thread = self.inner.thread.lock().unwrap_or_else(|e| e.into_inner());
                thread.as_ref().is_none_or(std::thread::JoinHandle::is_finished)
            };
            if ended {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match self.health().fault {
            Some(fault) => AppendError::Unavailable(fault),
            None => AppendError::Closed,
        }
    }

    /// The state in effect: durable, plus a freeze that took effect while storage failed.
    pub fn state(&self) -> Arc<State> {
        self.inner.state.borrow().clone()
    }

    /// The state folded from durable records alone, without a freeze that is in effect only in
    /// memory: exactly what a fold of the ledger up to its head gives.
    pub fn durable_state(&self) -> Arc<State> {
        self.inner.durable.borrow().clone()
    }

    /// A receiver that sees every published state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.inner.state.clone()
    }

    /// Idempotency keys remembered (bounded by the retention window).
    pub fn idempotency_keys(&self) -> u64 {
        self.inner.keys.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Storage health as of now.
    pub fn health(&self) -> StorageHealth {
        self.inner.health.borrow().clone()
    }

    /// False once the writer thread has ended (after shutdown, or if it died).
    pub fn writer_alive(&self) -> bool {
        let thread = self.inner.thread.lock().unwrap_or_else(|e| e.into_inner());
        thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// The store, for reading stored records; `None` when it could not be opened.
    pub fn store(&self) -> Option<Arc<dyn Storage>> {
        self.inner.store.clone()
    }

    /// Lets every queued append finish, then stops the writer. Later appends fail with
    /// [`AppendError::Closed`].
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.inner.commands.send(writer::Command::Shutdown { done }).await.is_ok() {
            let _ = finished.await;
        }
        let thread = self.inner.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Seqs per range a start-up thread reads and decodes.
const REBUILD_RANGE: u64 = 512;

/// A stored record decoded and verified on its own, or the problem and its bytes.
type Decoded = (u64, Result<record::Record, (record::RecordProblem, Vec<u8>)>);

/// Verifies every stored record and folds the intact ones into a fresh state.
///
/// Reading a record, decoding it and checking its own hash do not depend on the records before
/// it, so that part runs on every core, a range of seqs at a time
/// ([`crate::parallel::ordered_map`]); this thread takes the results in seq order, checks the
/// links and folds the state.
fn rebuild(
    store: &dyn Storage,
    index: &mut IdempotencyIndex,
) -> Result<(State, Verification), store::StorageError> {
    let head = store.head()?.unwrap_or(0);
    let mut state = State::default();
    let mut verifier = ChainVerifier::new(1, Some(state.head.hash.clone()));
    let mut last_seq = 0;
    let mut scanned = Ok(());
    crate::parallel::ordered_map(
        |emit| {
            let mut from = 1;
            while from <= head && emit((from, head.min(from + REBUILD_RANGE - 1))) {
                from += REBUILD_RANGE;
            }
        },
        |(from, to)| {
            let mut decoded: Vec<Decoded> = Vec::with_capacity(REBUILD_RANGE as usize);
            let scanned = store.scan(from, to, &mut |seq, bytes| {
                let record = record::Record::decode_verified(bytes);
                decoded.push((seq, record.map_err(|problem| (problem, bytes.to_vec()))));
                ControlFlow::Continue(())
            });
            (decoded, scanned)
        },
        |(decoded, range_scanned)| {
            if scanned.is_ok() {
                scanned = range_scanned;
            }
            for (seq, decoded) in decoded {
                let stored = || store.get(seq).ok().flatten().unwrap_or_default();
                let record = match decoded {
                    Ok(record) => verifier.check_decoded(seq, Ok(record), &stored),
                    Err((problem, bytes)) => {
                        verifier.check_decoded(seq, Err((problem, &bytes)), &stored)
                    }
                };
                if let Some(record) = record {
                    state.apply(&record);
                    index.insert(&record);
                }
                last_seq = seq;
            }
        },
    );
    scanned?;
    let verification = verifier.finish(last_seq);
    if last_seq > state.head.seq {
        // The newest record does not decode: later records chain to the digest of its bytes.
        state.head = Head {
            seq: last_seq,
            hash: verification.last_hash.clone().unwrap_or_default(),
            time_micros: state.head.time_micros,
        };
    }
    Ok((state, verification))
}
