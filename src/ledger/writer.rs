//! The writer task: the one owner of the ledger head.
//!
//! It runs on its own thread, because every batch ends in a blocking fsync. Commands queue while
//! a batch is being synced and are then taken together (group commit). For each batch it reads
//! the clock once, assigns seqs, time and chain links, applies the records to a pending copy of
//! the state, stores the batch durably, and only then publishes the state and answers. On a
//! storage error it answers every command of the batch with an error, restores the pending state
//! from the published one, reopens storage, removes anything past the published head, and retries
//! that recovery until it succeeds; an fsync is never merely retried.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::clock::Clock;
use super::idempotency::{IdempotencyIndex, Lookup, draft_digest};
use super::record::{Draft, Record, Sealed, Severity, format_time};
use super::store::Storage;
use super::{AppendError, Appended, StorageHealth};
use crate::state::{State, events};

/// Commands taken into one batch at most.
const MAX_COMMANDS_PER_BATCH: usize = 1024;
/// Commands that may wait for the writer.
const QUEUE_DEPTH: usize = 4096;
/// How often a failed store is recovered.
const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);

pub(super) enum Command {
    Append { drafts: Vec<Draft>, reply: oneshot::Sender<Result<Vec<Appended>, AppendError>> },
    Shutdown { done: oneshot::Sender<()> },
}

struct Writer {
    store: Option<Arc<dyn Storage>>,
    clock: Arc<dyn Clock>,
    committed: Arc<State>,
    pending: State,
    /// Idempotency keys as of the pending state; keys staged in the current batch are undone
    /// if it fails.
    index: IdempotencyIndex,
    /// True while the clock is behind the head's time and the regression has been recorded.
    regressing: bool,
    fault: Option<String>,
    state_tx: watch::Sender<Arc<State>>,
    health_tx: watch::Sender<StorageHealth>,
}

type Spawned = (
    mpsc::Sender<Command>,
    watch::Receiver<Arc<State>>,
    watch::Receiver<StorageHealth>,
    std::thread::JoinHandle<()>,
);

/// Starts the writer thread over `store` (`None`: nothing can be appended, for the reason in
/// `fault`).
pub(super) fn spawn(
    store: Option<Arc<dyn Storage>>,
    state: State,
    index: IdempotencyIndex,
    clock: Arc<dyn Clock>,
    fault: Option<String>,
) -> Spawned {
    let (commands, queue) = mpsc::channel(QUEUE_DEPTH);
    let committed = Arc::new(state);
    let (state_tx, state_rx) = watch::channel(committed.clone());
    let (health_tx, health_rx) = watch::channel(StorageHealth { fault: fault.clone() });
    let writer = Writer {
        pending: (*committed).clone(),
        committed,
        index,
        store,
        clock,
        regressing: false,
        fault,
        state_tx,
        health_tx,
    };
    let thread = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || writer.run(queue))
        .expect("the OS can start the ledger writer thread");
    (commands, state_rx, health_rx, thread)
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Command>) {
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
                        if self.process(batch).is_break() {
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
                        Ok(appended) => answers.push((reply, appended)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::Shutdown { done } => stop = Some(done),
            }
        }
        match self.commit(&staged) {
            Ok(()) => {
                for (reply, appended) in answers {
                    let _ = reply.send(Ok(appended));
                }
            }
            Err(fault) => {
                for (reply, _) in answers {
                    let _ = reply.send(Err(AppendError::Unavailable(fault.clone())));
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
        match store.append(&records) {
            Ok(()) => {
                self.committed = Arc::new(self.pending.clone());
                self.state_tx.send_replace(self.committed.clone());
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
                self.recover();
                Err(fault)
            }
        }
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
            let draft = Draft::new(events::CLOCK_REGRESSION, "brain-ops")
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

    fn recover(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let head = self.committed.head.seq;
        let recovered =
            store.reopen().and_then(|()| store.truncate_after(head)).and_then(|()| store.head());
        match recovered {
            Ok(found) if found.unwrap_or(0) == head => {
                tracing::info!(head, "ledger storage recovered");
                self.set_fault(None);
            }
            Ok(found) => {
                let fault =
                    format!("storage head {found:?} is behind the acknowledged head {head}");
                tracing::error!(%fault, "ledger storage lost acknowledged records");
                self.set_fault(Some(fault));
            }
            Err(e) => {
                tracing::warn!(error = %e, "ledger storage still failing");
                self.set_fault(Some(format!("storage recovery failed: {e}")));
            }
        }
    }

    fn set_fault(&mut self, fault: Option<String>) {
        self.fault.clone_from(&fault);
        self.health_tx.send_replace(StorageHealth { fault });
    }
}
