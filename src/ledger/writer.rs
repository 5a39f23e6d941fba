//! The writer task: the one owner of the ledger head.
//!
//! It runs on its own thread, because every batch ends in a blocking fsync. Commands queue while
//! a batch is being synced and are then taken together (group commit). For each batch it reads
//! the clock once, assigns seqs, time and chain links, applies the records to a pending copy of
//! the state, stores the batch durably, and only then publishes the state and answers.
//!
//! Decisions (`Command::Decide`) are made here against the pending state, so concurrent
//! decisions are linearisable: of two concurrent `Enable`s one changes and one finds nothing to
//! do.
//!
//! On a storage error it answers every command of the batch with an error, restores the pending
//! state from the published one, reopens storage, removes anything past the published head, and
//! retries that recovery until it succeeds; an fsync is never merely retried. The safe direction
//! never waits for the disk: a decision marked `safe_direction` (a freeze) takes effect in memory
//! at once when its events cannot be stored, and they are written when storage returns. When
//! recovery fails, the fail-closed policy given at open decides what takes effect (a freeze).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::clock::Clock;
use super::idempotency::{IdempotencyIndex, Lookup, draft_digest};
use super::record::{Draft, Record, Sealed, Severity, format_time};
use super::store::{Storage, StorageError};
use super::{AppendError, AppendObserver, Appended, FailClosed, StorageHealth};
use crate::state::{SafeMode, State, events};

/// Commands taken into one batch at most.
const MAX_COMMANDS_PER_BATCH: usize = 1024;
/// Commands that may wait for the writer.
const QUEUE_DEPTH: usize = 4096;
/// How often a failed store is recovered.
const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// The writer's niceness. Ingestion floods make it the busiest thread in the process; running it
/// a few steps below the request workers lets those answer `CheckOperation` first when the cores
/// are saturated, while it still gets most of any idle CPU.
const WRITER_NICENESS: i32 = 10;

/// Decides, against the pending state, which events to append.
pub type Decider = Box<dyn FnOnce(&State) -> Decision + Send>;

/// What a [`Decider`] decided.
#[derive(Debug, Default)]
pub struct Decision {
    /// Events to append; none means there is nothing to change.
    pub drafts: Vec<Draft>,
    /// The change makes the platform safer (a freeze): when storage cannot take its events it
    /// takes effect in memory at once and the events are written when storage returns.
    pub safe_direction: bool,
}

/// The outcome of a decision.
#[derive(Clone, Debug)]
pub struct Decided {
    /// False when the decision found nothing to change.
    pub changed: bool,
    /// Where the events landed; empty when nothing changed or they are still queued.
    pub appended: Vec<Appended>,
    /// The state in effect after the decision.
    pub state: Arc<State>,
}

pub(super) enum Command {
    Append { drafts: Vec<Draft>, reply: oneshot::Sender<Result<Vec<Appended>, AppendError>> },
    Decide { decide: Decider, reply: oneshot::Sender<Result<Decided, AppendError>> },
    Shutdown { done: oneshot::Sender<()> },
}

/// An answer that waits for its batch to be durable.
enum Answer {
    Append(oneshot::Sender<Result<Vec<Appended>, AppendError>>, Vec<Appended>),
    Decide {
        reply: oneshot::Sender<Result<Decided, AppendError>>,
        appended: Vec<Appended>,
        /// The drafts of a safe-direction change, kept to take effect in memory if the batch
        /// fails.
        safe: Option<Vec<Draft>>,
    },
}

struct Writer {
    store: Option<Arc<dyn Storage>>,
    clock: Arc<dyn Clock>,
    fail_closed: FailClosed,
    observer: Option<AppendObserver>,
    /// The durable state.
    committed: Arc<State>,
    pending: State,
    /// Safe mode in effect but not yet durable: its events are in `deferred`.
    overlay: Option<SafeMode>,
    deferred: Vec<Draft>,
    /// Idempotency keys as of the pending state; keys staged in a failed batch are undone.
    index: IdempotencyIndex,
    /// True while the clock is behind the head's time and the regression has been recorded.
    regressing: bool,
    fault: Option<String>,
    keys: Arc<AtomicU64>,
    state_tx: watch::Sender<Arc<State>>,
    /// The durable state alone (no in-memory freeze), for readers that must describe the ledger.
    durable_tx: watch::Sender<Arc<State>>,
    health_tx: watch::Sender<StorageHealth>,
}

pub(super) struct Spawned {
    pub commands: mpsc::Sender<Command>,
    pub state: watch::Receiver<Arc<State>>,
    pub durable: watch::Receiver<Arc<State>>,
    pub health: watch::Receiver<StorageHealth>,
    pub thread: std::thread::JoinHandle<()>,
    /// Idempotency keys remembered, refreshed after every batch.
    pub keys: Arc<AtomicU64>,
}

/// Starts the writer thread over `store` (`None`: nothing can be appended, for the reason in
/// `fault`, and the fail-closed policy applies from the start).
pub(super) fn spawn(
    store: Option<Arc<dyn Storage>>,
    state: State,
    index: IdempotencyIndex,
    clock: Arc<dyn Clock>,
    fail_closed: FailClosed,
    observer: Option<AppendObserver>,
    fault: Option<String>,
) -> Spawned {
    let (commands, queue) = mpsc::channel(QUEUE_DEPTH);
    let committed = Arc::new(state);
    let (state_tx, state_rx) = watch::channel(committed.clone());
    let (durable_tx, durable_rx) = watch::channel(committed.clone());
    let (health_tx, health_rx) = watch::channel(StorageHealth { fault: fault.clone() });
    let index_len = index.len() as u64;
    let mut writer = Writer {
        pending: (*committed).clone(),
        committed,
        overlay: None,
        deferred: Vec::new(),
        index,
        store,
        clock,
        fail_closed,
        observer,
        regressing: false,
        fault,
        keys: Arc::new(AtomicU64::new(index_len)),
        state_tx,
        durable_tx,
        health_tx,
    };
    if let Some(fault) = writer.fault.clone() {
        writer.close_on_fault(&fault);
    }
    let keys = writer.keys.clone();
    let thread = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            yield_cpu_to_request_workers();
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(queue)));
            if let Err(panic) = outcome {
                writer.died(&panic_message(panic.as_ref()));
            }
        })
        .expect("the OS can start the ledger writer thread");
    Spawned { commands, state: state_rx, durable: durable_rx, health: health_rx, thread, keys }
}

/// Lowers this thread's CPU priority to [`WRITER_NICENESS`]. On Linux a thread id names one
/// thread, so the request workers keep theirs. Failure is logged, not fatal: the service stays
/// correct, only less favourable to the kill switch under saturation.
fn yield_cpu_to_request_workers() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), WRITER_NICENESS)
    {
        tracing::warn!(error = %e, "could not lower the ledger writer's CPU priority");
    }
}

impl Writer {
    fn run(&mut self, mut queue: mpsc::Receiver<Command>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds");
        runtime.block_on(async {
            let mut recovery = tokio::time::interval(RECOVERY_INTERVAL);
            loop {
                tokio::select! {
                    first = queue.recv() => {
                        let Some(first) = first else { break };
                        let mut batch = vec![first];
                        while batch.len() < MAX_COMMANDS_PER_BATCH {
                            match queue.try_recv() {
                                Ok(command) => batch.push(command),
                                Err(_) => break,
                            }
                        }
                        let flow = self.process(batch);
                        self.keys.store(self.index.len() as u64, Ordering::Relaxed);
                        if flow.is_break() {
                            break;
                        }
                    }
                    _ = recovery.tick(), if self.fault.is_some() && self.store.is_some() => {
                        self.recover();
                    }
                }
            }
        });
        queue.close();
        while let Ok(command) = queue.try_recv() {
            match command {
                Command::Append { reply, .. } => {
                    let _ = reply.send(Err(AppendError::Closed));
                }
                Command::Decide { reply, .. } => {
                    let _ = reply.send(Err(AppendError::Closed));
                }
                Command::Shutdown { done } => {
                    let _ = done.send(());
                }
            }
        }
    }

    fn process(&mut self, batch: Vec<Command>) -> std::ops::ControlFlow<()> {
        let mut staged = Vec::new();
        let mut answers = Vec::new();
        let mut stop = None;
        let time = self.batch_time(&mut staged);
        self.index.expire(time);
        for command in batch {
            match command {
                Command::Append { drafts, reply } => {
                    if let Some(fault) = &self.fault {
                        let _ = reply.send(Err(AppendError::Unavailable(fault.clone())));
                        continue;
                    }
                    match self.stage(drafts, time, &mut staged) {
                        Ok(appended) => answers.push(Answer::Append(reply, appended)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::Decide { decide, reply } => {
                    self.decide(decide, reply, time, &mut staged, &mut answers);
                }
                Command::Shutdown { done } => stop = Some(done),
            }
        }
        let committed = self.commit(&staged);
        let failure = committed.as_ref().err().cloned();
        if let Some(fault) = &failure {
            // Safe-direction changes of the failed batch take effect now; the rest fail.
            for answer in &answers {
                if let Answer::Decide { safe: Some(drafts), .. } = answer {
                    self.take_effect_in_memory(drafts.clone());
                }
            }
            tracing::warn!(%fault, "batch failed; safe-direction changes took effect in memory");
        }
        if failure.is_some() {
            // Before answering, so that a caller who sees the failure also sees the freeze that
            // an unrecoverable store causes.
            self.recover();
        }
        let state = self.state_tx.borrow().clone();
        for answer in answers {
            match (answer, &failure) {
                (Answer::Append(reply, appended), None) => {
                    let _ = reply.send(Ok(appended));
                }
                (Answer::Append(reply, _), Some(fault)) => {
                    let _ = reply.send(Err(AppendError::Unavailable(fault.clone())));
                }
                (Answer::Decide { reply, appended, .. }, None) => {
                    let changed = !appended.is_empty();
                    let _ = reply.send(Ok(Decided { changed, appended, state: state.clone() }));
                }
                (Answer::Decide { reply, safe: Some(_), .. }, Some(_)) => {
                    let decided =
                        Decided { changed: true, appended: Vec::new(), state: state.clone() };
                    let _ = reply.send(Ok(decided));
                }
                (Answer::Decide { reply, safe: None, appended }, Some(fault)) => {
                    let _ = reply.send(if appended.is_empty() {
                        Ok(Decided { changed: false, appended, state: state.clone() })
                    } else {
                        Err(AppendError::Unavailable(fault.clone()))
                    });
                }
            }
        }
        match stop {
            Some(done) => {
                let _ = done.send(());
                std::ops::ControlFlow::Break(())
            }
            None => std::ops::ControlFlow::Continue(()),
        }
    }

    /// Runs a decision against the pending state (with any in-memory freeze in effect).
    fn decide(
        &mut self,
        decide: Decider,
        reply: oneshot::Sender<Result<Decided, AppendError>>,
        time: i64,
        staged: &mut Vec<Sealed>,
        answers: &mut Vec<Answer>,
    ) {
        let decision = match &self.overlay {
            None => decide(&self.pending),
            Some(overlay) => {
                let mut effective = self.pending.clone();
                effective.safe_mode = overlay.clone();
                decide(&effective)
            }
        };
        if decision.drafts.is_empty() {
            answers.push(Answer::Decide { reply, appended: Vec::new(), safe: None });
            return;
        }
        if self.fault.is_some() {
            if decision.safe_direction {
                self.take_effect_in_memory(decision.drafts);
                let state = self.state_tx.borrow().clone();
                let _ = reply.send(Ok(Decided { changed: true, appended: Vec::new(), state }));
            } else {
                let fault = self.fault.clone().unwrap_or_default();
                let _ = reply.send(Err(AppendError::Unavailable(fault)));
            }
            return;
        }
        let safe = decision.safe_direction.then(|| decision.drafts.clone());
        match self.stage(decision.drafts, time, staged) {
            Ok(appended) => answers.push(Answer::Decide { reply, appended, safe }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Stores the staged records durably and publishes the pending state, or rolls it back.
    fn commit(&mut self, staged: &[Sealed]) -> Result<(), String> {
        if staged.is_empty() {
            return Ok(());
        }
        let Some(store) = self.store.clone() else {
            return Err("storage is not open".into());
        };
        let records: Vec<(u64, &[u8])> =
            staged.iter().map(|s| (s.record.seq, s.bytes.as_slice())).collect();
        let started = std::time::Instant::now();
        // A panic inside the storage engine is a storage fault like any other: the batch fails
        // and the fail-closed path runs before anyone is answered.
        let appended =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.append(&records)))
                .unwrap_or_else(|panic| {
                    Err(StorageError::Io(std::io::Error::other(format!(
                        "the storage engine panicked: {}",
                        panic_message(panic.as_ref())
                    ))))
                });
        if let Some(observer) = &self.observer {
            observer(started.elapsed(), appended.is_ok());
        }
        match appended {
            Ok(()) => {
                self.committed = Arc::new(self.pending.clone());
                self.durable_tx.send_replace(self.committed.clone());
                self.publish();
                Ok(())
            }
            Err(e) => {
                for record in staged {
                    self.index.remove(&record.record);
                }
                let fault = format!("append failed: {e}");
                tracing::error!(error = %e, batch = staged.len(), "ledger append failed; nothing in the batch is acknowledged");
                self.pending = (*self.committed).clone();
                self.regressing = false;
                self.set_fault(Some(fault.clone()));
                Err(fault)
            }
        }
    }

    /// Publishes the durable state with any in-memory freeze on top.
    fn publish(&mut self) {
        let state = match &self.overlay {
            None => self.committed.clone(),
            Some(overlay) => {
                let mut state = (*self.committed).clone();
                state.safe_mode = overlay.clone();
                Arc::new(state)
            }
        };
        self.state_tx.send_replace(state);
    }

    /// Makes safe-direction events take effect without storage: their safe-mode effect goes on
    /// top of the durable state at once, and they are queued until storage returns. The
    /// revision stays that of the last durable change until they are written.
    fn take_effect_in_memory(&mut self, drafts: Vec<Draft>) {
        let mut effective = (*self.committed).clone();
        if let Some(overlay) = &self.overlay {
            effective.safe_mode = overlay.clone();
        }
        let revision = effective.safe_mode.revision;
        let now = self.clock.now_micros();
        let mut seq = effective.head.seq;
        for draft in &drafts {
            seq += 1;
            // A provisional seal, only to fold the event into the in-memory state.
            if let Ok(sealed) = Record::seal(draft.clone(), seq, now, &effective.head.hash) {
                effective.apply(&sealed.record);
            }
        }
        effective.safe_mode.revision = revision;
        self.overlay = Some(effective.safe_mode);
        self.deferred.extend(drafts);
        self.publish();
    }

    /// Seals `drafts` after the pending head; all of them or none. A draft whose idempotency
    /// key was seen with the same payload is answered with the original and not appended.
    fn stage(
        &mut self,
        drafts: Vec<Draft>,
        time: i64,
        staged: &mut Vec<Sealed>,
    ) -> Result<Vec<Appended>, AppendError> {
        let mut seq = self.pending.head.seq;
        let mut prev_hash = self.pending.head.hash.clone();
        let mut sealed: Vec<Sealed> = Vec::with_capacity(drafts.len());
        let mut appended = Vec::with_capacity(drafts.len());
        let undo = |index: &mut IdempotencyIndex, sealed: &[Sealed]| {
            for record in sealed {
                index.remove(&record.record);
            }
        };
        for (i, draft) in drafts.into_iter().enumerate() {
            if let Some(key) = &draft.idempotency_key {
                match self.index.lookup(&draft.source, key, &draft_digest(&draft)) {
                    Lookup::New => {}
                    Lookup::Duplicate { seq, hash } => {
                        appended.push(Appended { seq, hash, duplicate: true });
                        continue;
                    }
                    Lookup::Conflict { seq } => {
                        undo(&mut self.index, &sealed);
                        return Err(AppendError::KeyConflict { index: i, key: key.clone(), seq });
                    }
                }
            }
            seq += 1;
            let record = match Record::seal(draft, seq, time, &prev_hash) {
                Ok(record) => record,
                Err(source) => {
                    undo(&mut self.index, &sealed);
                    return Err(AppendError::TooLarge { index: i, source });
                }
            };
            prev_hash.clone_from(&record.record.hash);
            // Remembered at once, so that a repeat later in the same batch is a duplicate.
            self.index.insert(&record.record);
            appended.push(Appended {
                seq: record.record.seq,
                hash: record.record.hash.clone(),
                duplicate: false,
            });
            sealed.push(record);
        }
        for record in &sealed {
            self.pending.apply(&record.record);
        }
        staged.extend(sealed);
        Ok(appended)
    }

    /// The time for every record of this batch: the clock, or the head's time if the clock has
    /// stepped back, in which case the first batch of the regression records it.
    fn batch_time(&mut self, staged: &mut Vec<Sealed>) -> i64 {
        let now = self.clock.now_micros();
        let last = self.pending.head.time_micros;
        if now >= last {
            self.regressing = false;
            return now;
        }
        if !self.regressing && self.fault.is_none() {
            self.regressing = true;
            tracing::warn!(
                clock = %format_time(now),
                head = %format_time(last),
                "the clock stepped back; reusing the head's time"
            );
            let draft = Draft::new(events::CLOCK_REGRESSION, crate::safe_mode::SERVICE_PRINCIPAL)
                .severity(Severity::Warning)
                .reason("the system clock stepped back; event times stay at the previous time")
                .meta("observed_time", format_time(now))
                .meta("previous_time", format_time(last))
                .meta("step_micros", (last - now).to_string());
            if let Err(e) = self.stage(vec![draft], last, staged) {
                tracing::error!(error = %e, "could not stage the clock regression event");
            }
        }
        last
    }

    /// Reopens storage and drops anything past the durable head; on success writes what was
    /// queued, on failure applies the fail-closed policy.
    fn recover(&mut self) {
        let Some(store) = self.store.clone() else { return };
        let head = self.committed.head.seq;
        let recovered =
            store.reopen().and_then(|()| store.truncate_after(head)).and_then(|()| store.head());
        match recovered {
            Ok(found) if found.unwrap_or(0) == head => {
                tracing::info!(head, "ledger storage recovered");
                self.set_fault(None);
                self.write_deferred();
            }
            Ok(found) => {
                let fault =
                    format!("storage head {found:?} is behind the acknowledged head {head}");
                tracing::error!(%fault, "ledger storage lost acknowledged records");
                self.set_fault(Some(fault.clone()));
                self.close_on_fault(&fault);
            }
            Err(e) => {
                let fault = format!("storage recovery failed: {e}");
                tracing::warn!(%fault, "ledger storage still failing");
                self.set_fault(Some(fault.clone()));
                self.close_on_fault(&fault);
            }
        }
    }

    /// Applies the fail-closed policy for a storage fault that recovery did not clear.
    fn close_on_fault(&mut self, fault: &str) {
        let mut effective = (*self.committed).clone();
        if let Some(overlay) = &self.overlay {
            effective.safe_mode = overlay.clone();
        }
        let drafts = (self.fail_closed)(&effective, fault);
        if !drafts.is_empty() {
            self.take_effect_in_memory(drafts);
        }
    }

    /// Writes the events that took effect while storage was failing.
    fn write_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let drafts = std::mem::take(&mut self.deferred);
        let mut staged = Vec::new();
        let time = self.batch_time(&mut staged);
        if let Err(e) = self.stage(drafts.clone(), time, &mut staged) {
            tracing::error!(error = %e, "queued safe-mode events cannot be staged; dropping them");
            return;
        }
        match self.commit(&staged) {
            Ok(()) => {
                tracing::info!(events = drafts.len(), "queued safe-mode events written");
                self.overlay = None;
                self.publish();
            }
            Err(_) => self.deferred = drafts,
        }
    }

    /// The writer panicked: nothing more can be appended (queued and later calls fail), so the
    /// state in effect freezes, as for a storage fault that cannot be recovered.
    fn died(&mut self, why: &str) {
        let fault = format!("the ledger writer stopped: {why}");
        tracing::error!(%fault, "ledger writer died; safe mode takes effect in memory");
        self.set_fault(Some(fault.clone()));
        self.close_on_fault(&fault);
    }

    fn set_fault(&mut self, fault: Option<String>) {
        self.fault.clone_from(&fault);
        self.health_tx.send_replace(StorageHealth { fault });
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
