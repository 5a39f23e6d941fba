//! Idempotency keys. A key is scoped to its principal (`source`) and stored in the record, so the
//! index is rebuilt from the ledger. A repeat with the same payload gets the original seq and hash;
//! the same key with a different payload is a conflict. Keys are forgotten after the retention
//! window (by event time).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::record::{Draft, Mode, Record, Severity};

/// The fields of an event that a repeat must match, with the severity resolved.
#[derive(Serialize)]
struct Payload<'a> {
    bundle_id: Option<&'a str>,
    error: Option<&'a str>,
    event_type: &'a str,
    metadata: &'a BTreeMap<String, String>,
    mode_after: Option<Mode>,
    mode_before: Option<Mode>,
    reason: Option<&'a str>,
    severity: Severity,
    success: bool,
    triggered_by: Option<&'a str>,
}

fn digest(payload: &Payload<'_>) -> [u8; 32] {
    Sha256::digest(serde_json::to_vec(payload).unwrap_or_default()).into()
}

/// Digest of a draft's payload (after redaction, as it would be stored).
pub fn draft_digest(draft: &Draft) -> [u8; 32] {
    digest(&Payload {
        bundle_id: draft.bundle_id.as_deref(),
        error: draft.error.as_deref(),
        event_type: &draft.event_type,
        metadata: &draft.metadata,
        mode_after: draft.mode_after,
        mode_before: draft.mode_before,
        reason: draft.reason.as_deref(),
        severity: draft.resolved_severity(),
        success: draft.success,
        triggered_by: draft.triggered_by.as_deref(),
    })
}

fn record_digest(record: &Record) -> [u8; 32] {
    digest(&Payload {
        bundle_id: record.bundle_id.as_deref(),
        error: record.error.as_deref(),
        event_type: &record.event_type,
        metadata: &record.metadata,
        mode_after: record.mode_after,
        mode_before: record.mode_before,
        reason: record.reason.as_deref(),
        severity: record.severity,
        success: record.success,
        triggered_by: record.triggered_by.as_deref(),
    })
}

type Scope = (String, String);

#[derive(Clone, Debug)]
struct Entry {
    seq: u64,
    hash: String,
    digest: [u8; 32],
}

/// What a key says about a new event.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Not seen (or forgotten): append.
    New,
    /// Seen with the same payload: answer with the original.
    Duplicate { seq: u64, hash: String },
    /// Seen with a different payload.
    Conflict { seq: u64 },
}

/// The index of remembered keys.
#[derive(Debug)]
pub struct IdempotencyIndex {
    retention_micros: i64,
    entries: HashMap<Scope, Entry>,
    /// (time, seq, scope) in seq order, for expiry.
    order: VecDeque<(i64, u64, Scope)>,
}

impl IdempotencyIndex {
    pub fn new(retention: Duration) -> IdempotencyIndex {
        IdempotencyIndex {
            retention_micros: i64::try_from(retention.as_micros()).unwrap_or(i64::MAX),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// What `key` of `source` says about a payload with `digest`.
    pub fn lookup(&self, source: &str, key: &str, digest: &[u8; 32]) -> Lookup {
        match self.entries.get(&(source.to_owned(), key.to_owned())) {
            None => Lookup::New,
            Some(entry) if entry.digest == *digest => {
                Lookup::Duplicate { seq: entry.seq, hash: entry.hash.clone() }
            }
            Some(entry) => Lookup::Conflict { seq: entry.seq },
        }
    }

    /// Remembers the key of a stored (or staged) record, if it has one.
    pub fn insert(&mut self, record: &Record) {
        let Some(key) = &record.idempotency_key else { return };
        let scope = (record.source.clone(), key.clone());
        let entry =
            Entry { seq: record.seq, hash: record.hash.clone(), digest: record_digest(record) };
        let time = record.time_micros().unwrap_or(0);
        self.entries.insert(scope.clone(), entry);
        self.order.push_back((time, record.seq, scope));
    }

    /// Forgets a staged record's key again (its batch failed).
    pub fn remove(&mut self, record: &Record) {
        let Some(key) = &record.idempotency_key else { return };
        let scope = (record.source.clone(), key.clone());
        if self.entries.get(&scope).is_some_and(|e| e.seq == record.seq) {
            self.entries.remove(&scope);
        }
    }

    /// Forgets keys recorded more than the retention window before `now_micros`.
    pub fn expire(&mut self, now_micros: i64) {
        let horizon = now_micros.saturating_sub(self.retention_micros);
        while let Some((time, seq, _)) = self.order.front() {
            if *time >= horizon {
                break;
            }
            let seq = *seq;
            if let Some((_, _, scope)) = self.order.pop_front()
                && self.entries.get(&scope).is_some_and(|e| e.seq == seq)
            {
                self.entries.remove(&scope);
            }
        }
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
