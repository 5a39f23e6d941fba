//! The audit domain: recording sibling events, listing stored records and verifying the chain.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ledger::record::{Draft, InvalidField, Record, Severity, is_reserved_event_type};
use crate::ledger::store::Storage;
use crate::ledger::verify::ChainVerifier;
use crate::ledger::{AppendError, Appended, Decision, Ledger};
use crate::state::{State, events};

/// Most records in one `RecordBatch`.
pub const MAX_BATCH_RECORDS: usize = 1000;
/// Page size of `List` when none is given.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page of `List`.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Most records one `List` call examines; past it, the page ends early with a continuation.
pub const MAX_SCANNED_PER_PAGE: usize = 10_000;
/// A page ends early once its records reach this many bytes, so that a page always fits in a
/// default 4 MiB gRPC message.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Why an audit call failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A field breaks a limit. `index` is the record's place in a batch.
    #[error("{}{}", record_prefix(*index), invalid)]
    Invalid { index: Option<usize>, invalid: InvalidField },
    /// A producer tried to write a type only the service writes.
    #[error("{}event.event_type {event_type:?} is reserved: system.* and override.* events are written by brain-ops only", record_prefix(*index))]
    Reserved { index: Option<usize>, event_type: String },
    /// The idempotency key was used before for a different payload.
    #[error("{}idempotency_key {key:?} was already used for a different event (seq {seq})", record_prefix(*index))]
    KeyConflict { index: Option<usize>, key: String, seq: u64 },
    #[error("the ledger cannot append right now: {0}")]
    Unavailable(String),
    #[error("the ledger could not be read: {0}")]
    Storage(String),
}

fn record_prefix(index: Option<usize>) -> String {
    match index {
        Some(i) => format!("records[{i}]."),
        None => String::new(),
    }
}

/// A `List` request, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    /// Inclusive lower bound on event time, in microseconds.
    pub from: Option<i64>,
    /// Exclusive upper bound on event time, in microseconds.
    pub to: Option<i64>,
    pub event_type_prefix: String,
    pub after_seq: u64,
    pub page_size: usize,
}

/// One stored record as `List` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub seq: u64,
    /// `None` when the stored record does not decode.
    pub time_micros: Option<i64>,
    pub event_type: String,
    pub hash: String,
    /// The stored bytes, exactly (lossily decoded if they are not UTF-8).
    pub json: String,
}

/// A page of `List`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub events: Vec<Listed>,
    /// Where the next page starts; 0 when there is none.
    pub next_after_seq: u64,
}

/// A `VerifyChain` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    pub valid: bool,
    pub checked: u64,
    pub first_bad_seq: u64,
    pub problem: String,
    pub head_seq: u64,
    pub head_hash: String,
}

/// The audit domain handle.
#[derive(Clone, Debug)]
pub struct AuditLog {
    ledger: Ledger,
}

impl AuditLog {
    pub fn new(ledger: Ledger) -> AuditLog {
        AuditLog { ledger }
    }

    /// Validates, redacts and durably appends producer events, all or none.
    pub async fn record(
        &self,
        mut drafts: Vec<Draft>,
        batch: bool,
    ) -> Result<Vec<Appended>, AuditError> {
        let index = |i: usize| batch.then_some(i);
        for (i, draft) in drafts.iter_mut().enumerate() {
            if is_reserved_event_type(&draft.event_type) {
                return Err(AuditError::Reserved {
                    index: index(i),
                    event_type: draft.event_type.clone(),
                });
            }
            draft.validate().map_err(|invalid| AuditError::Invalid {
                index: index(i),
                invalid: InvalidField::new(format!("event.{}", invalid.field), invalid.message),
            })?;
            draft.redact();
        }
        // Decided against the pending state, so that a report and the violation it reveals
        // are stored together, in one batch, or not at all.
        let positions = Arc::new(Mutex::new(Vec::new()));
        let decision = {
            let positions = positions.clone();
            move |state: &State| {
                let mut out = Vec::with_capacity(drafts.len());
                let mut originals = Vec::with_capacity(drafts.len());
                for draft in drafts {
                    let violations = violations_revealed_by(&draft, state);
                    originals.push(out.len());
                    out.push(draft);
                    out.extend(violations);
                }
                *positions.lock().unwrap_or_else(|e| e.into_inner()) = originals;
                Decision { drafts: out, safe_direction: false }
            }
        };
        let decided = self.ledger.decide(decision).await;
        let positions = std::mem::take(&mut *positions.lock().unwrap_or_else(|e| e.into_inner()));
        // Errors name the producer's record, not the position among the stored events.
        let original = |i: usize| positions.iter().rposition(|p| *p <= i).unwrap_or(0);
        let decided = decided.map_err(|e| match e {
            AppendError::TooLarge { index: i, source } => AuditError::Invalid {
                index: index(original(i)),
                invalid: InvalidField::new("event", source.to_string()),
            },
            AppendError::KeyConflict { index: i, key, seq } => {
                AuditError::KeyConflict { index: index(original(i)), key, seq }
            }
            AppendError::Unavailable(why) => AuditError::Unavailable(why),
            AppendError::Closed => AuditError::Unavailable("brain-ops is shutting down".into()),
        })?;
        Ok(positions.iter().filter_map(|p| decided.appended.get(*p).cloned()).collect())
    }

    /// One page of stored records, up to the acknowledged head.
    pub async fn list(&self, query: ListQuery) -> Result<Page, AuditError> {
        let head = self.ledger.state().head.seq;
        let store = self.store()?;
        blocking(move || list_page(store.as_ref(), head, &query)).await
    }

    /// Verifies `from_seq..=to_seq` (0 means the first and the head).
    pub async fn verify_chain(
        &self,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<ChainReport, AuditError> {
        let head = self.ledger.state().head.clone();
        let from = from_seq.max(1);
        let to = if to_seq == 0 { head.seq } else { to_seq };
        if to > head.seq {
            return Err(invalid("to_seq", format!("{to} is beyond the head seq {}", head.seq)));
        }
        if from > to && (from_seq != 0 || to_seq != 0) {
            return Err(invalid("from_seq", format!("{from} is after to_seq {to}")));
        }
        let store = self.store()?;
        let verification = blocking(move || {
            let prev_hash = if from == 1 {
                Some(crate::ledger::record::GENESIS_HASH.to_owned())
            } else {
                store.get(from - 1).map_err(storage)?.map(|bytes| stored_hash(&bytes))
            };
            let mut verifier = ChainVerifier::new(from, prev_hash);
            store
                .scan(from, to, &mut |seq, bytes| {
                    verifier.check(seq, bytes);
                    ControlFlow::Continue(())
                })
                .map_err(storage)?;
            Ok(verifier.finish(to))
        })
        .await?;
        let first_bad = verification.first_bad();
        Ok(ChainReport {
            valid: first_bad.is_none(),
            checked: verification.checked,
            first_bad_seq: first_bad.map_or(0, |d| d.seq),
            problem: first_bad.map(|d| d.problem.clone()).unwrap_or_default(),
            head_seq: head.seq,
            head_hash: head.hash,
        })
    }

    fn store(&self) -> Result<Arc<dyn Storage>, AuditError> {
        self.ledger
            .store()
            .ok_or_else(|| AuditError::Storage("ledger storage could not be opened".into()))
    }
}

fn invalid(field: &str, message: String) -> AuditError {
    AuditError::Invalid { index: None, invalid: InvalidField::new(field, message) }
}

fn storage(e: crate::ledger::store::StorageError) -> AuditError {
    AuditError::Storage(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Result<T, AuditError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AuditError::Storage(format!("reader task failed: {e}")))?
}

/// The hash a record's successor links to: its stored hash, or the digest of its bytes when it
/// does not decode (the rule the writer uses too).
fn stored_hash(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct HashOnly {
        hash: String,
    }
    serde_json::from_slice::<HashOnly>(bytes)
        .map(|h| h.hash)
        .unwrap_or_else(|_| hex::encode(Sha256::digest(bytes)))
}

/// Work reported as started while safe mode is on.
fn is_work_started(event_type: &str) -> bool {
    event_type == "factory.execution_started"
        || event_type.ends_with(".deployment_started")
        || event_type == "sovereign.bundle_loaded"
}

/// The CRITICAL events a report reveals: work started during a freeze (a bypass of safe mode),
/// or a forced action that names no consumed override. A retried report (same idempotency key)
/// reveals the same violation, which is then a duplicate too.
fn violations_revealed_by(draft: &Draft, state: &State) -> Vec<Draft> {
    let mut found = Vec::new();
    let derived_key =
        |suffix: &str| draft.idempotency_key.as_ref().map(|k| format!("{k}#{suffix}"));
    if state.safe_mode.enabled && is_work_started(&draft.event_type) {
        let mut violation = Draft::new(events::SAFE_MODE_VIOLATION, &draft.source)
            .severity(Severity::Critical)
            .failed()
            .reason(format!(
                "{} reported by {} while safe mode is on: work started during a freeze",
                draft.event_type, draft.source
            ))
            .meta("reported_event_type", draft.event_type.clone())
            .meta("safe_mode_revision", state.safe_mode.revision.to_string());
        violation.bundle_id.clone_from(&draft.bundle_id);
        violation.idempotency_key = derived_key("safe_mode_violation");
        found.push(violation);
    }
    if draft.metadata.get("forced").is_some_and(|f| f == "true") {
        let named = draft.metadata.get("override_id");
        if !named.is_some_and(|id| state.override_consumed(id)) {
            let mut violation = Draft::new(events::OVERRIDE_VIOLATION, &draft.source)
                .severity(Severity::Critical)
                .failed()
                .reason(format!(
                    "{} reported by {} as forced without a consumed override{}",
                    draft.event_type,
                    draft.source,
                    named
                        .map(|id| format!(" (override_id {id:?} was not consumed)"))
                        .unwrap_or_default()
                ))
                .meta("reported_event_type", draft.event_type.clone());
            violation.idempotency_key = derived_key("override_violation");
            found.push(violation);
        }
    }
    found
}

/// The fields `List` needs, read without decoding the whole record.
#[derive(Deserialize)]
struct Summary {
    event_type: String,
    hash: String,
    time: String,
}

fn summarize(seq: u64, bytes: &[u8]) -> Listed {
    let json = String::from_utf8_lossy(bytes).into_owned();
    match serde_json::from_slice::<Summary>(bytes) {
        Ok(s) => Listed {
            seq,
            time_micros: crate::ledger::record::parse_time(&s.time),
            event_type: s.event_type,
            hash: s.hash,
            json,
        },
        Err(_) => Listed {
            seq,
            time_micros: None,
            event_type: String::new(),
            hash: hex::encode(Sha256::digest(bytes)),
            json,
        },
    }
}

fn list_page(store: &dyn Storage, head: u64, query: &ListQuery) -> Result<Page, AuditError> {
    let mut start = query.after_seq.saturating_add(1);
    if let Some(from) = query.from {
        start = start.max(first_seq_at_or_after(store, head, from)?);
    }
    let mut page = Page::default();
    let mut scanned = 0;
    let mut bytes_in_page = 0;
    store
        .scan(start, head, &mut |seq, bytes| {
            scanned += 1;
            let listed = summarize(seq, bytes);
            if let (Some(to), Some(time)) = (query.to, listed.time_micros)
                && time >= to
            {
                return ControlFlow::Break(());
            }
            let in_range =
                query.from.is_none_or(|from| listed.time_micros.is_some_and(|t| t >= from));
            if in_range && listed.event_type.starts_with(&query.event_type_prefix) {
                bytes_in_page += listed.json.len();
                page.events.push(listed);
            }
            if page.events.len() >= query.page_size
                || scanned >= MAX_SCANNED_PER_PAGE
                || bytes_in_page >= MAX_PAGE_BYTES
            {
                if seq < head {
                    page.next_after_seq = seq;
                }
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .map_err(storage)?;
    Ok(page)
}

/// The first seq whose time is at or after `time`, by binary search (times never decrease
/// along seqs). Returns `head + 1` when there is none.
fn first_seq_at_or_after(store: &dyn Storage, head: u64, time: i64) -> Result<u64, AuditError> {
    let (mut lo, mut hi) = (1, head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // A record that does not decode has no time: use the next one that does.
        let mut probe = None;
        store
            .scan(mid, hi - 1, &mut |_, bytes| match serde_json::from_slice::<Record>(bytes) {
                Ok(r) => {
                    probe = r.time_micros();
                    ControlFlow::Break(())
                }
                Err(_) => ControlFlow::Continue(()),
            })
            .map_err(storage)?;
        match probe {
            Some(t) if t < time => lo = mid + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}
