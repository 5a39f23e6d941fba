//! Building and verifying evidence packs. A pack is a pure function of (the ledger prefix up to
//! `as_of`, the request, the signing key): the same inputs give a byte-identical file.
//!
//! The file is `{"pack": …, "content_hash": …, "pack_id": …, "signature": …}` with `pack`
//! first, serialised as JCS; `content_hash` is `sha256:` + hex of SHA-256 of JCS(pack), and the
//! signature is Ed25519 over the ASCII bytes of the `content_hash` string.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::keys::Signer;
use crate::governance::InForce;
use crate::ledger::record::{GENESIS_HASH, Record, format_time};
use crate::ledger::store::Storage;
use crate::state::{State, events};

/// Pack format identifier.
pub const FORMAT: &str = "brain-evidence-pack/1";
/// Events an AUDIT pack includes in full.
pub const AUDIT_EVENT_LIMIT: usize = 100;

/// What a pack shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every summary plus the first 100 events in full.
    Audit,
    /// Aggregates only: no events, reasons, metadata or principal names.
    Investor,
    /// Every event.
    Internal,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Audit => "audit",
            Scope::Investor => "investor",
            Scope::Internal => "internal",
        }
    }
}

/// A validated export request. Times in microseconds; the range is `[from, to)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRequest {
    pub from: i64,
    pub to: i64,
    pub scope: Scope,
    pub exclude_executor_summary: bool,
    /// 0: the head.
    pub as_of_seq: u64,
}

/// A built pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pack {
    pub file: String,
    pub pack_id: String,
    pub content_hash: String,
    pub events_total: u64,
    pub events_included: u64,
}

/// Why a pack could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{field} {message}")]
    Invalid { field: &'static str, message: String },
    #[error("the ledger could not be read: {0}")]
    Storage(String),
}

/// The state at `as_of` and the summaries of the events in the range.
#[derive(Default)]
struct Gathered {
    state: State,
    as_of_hash: String,
    /// Hash of the last record before the range.
    prev_hash: String,
    first_seq: u64,
    last_seq: u64,
    last_hash: String,
    audit_summary: BTreeMap<String, u64>,
    mode_history: Vec<Value>,
    override_usage: BTreeMap<&'static str, u64>,
    quarantined: u64,
    released: u64,
    loaded: u64,
    bundles: BTreeSet<String>,
    executor: BTreeMap<&'static str, u64>,
    events_total: u64,
    /// Events the scope includes: seqs `first_seq ..= first_seq + included - 1`.
    included: u64,
    /// Their stored size in bytes.
    included_bytes: usize,
}

/// The pack minus its events, computed in a first pass; the events follow in a second.
#[derive(Clone, Debug)]
pub struct Plan {
    /// JCS of the pack up to (not including) its `"events":[…]` member, and after it.
    prefix: String,
    suffix: String,
    first_event: u64,
    pub events_total: u64,
    pub events_included: u64,
    /// The size of the file to come, in bytes (close to exact).
    pub approx_bytes: usize,
}

/// The first pass: every summary. The state at `as_of_seq` (the head when 0) is `durable`
/// itself when that is the head, else a fold of the ledger prefix; the events in the time range
/// are found by bisection, since times never decrease along seqs, and only they are read.
pub fn plan(
    store: &dyn Storage,
    durable: &State,
    request: &ExportRequest,
) -> Result<Plan, PackError> {
    if request.from >= request.to {
        return Err(PackError::Invalid {
            field: "to",
            message: "must be after from (the range is [from, to))".into(),
        });
    }
    let head_seq = durable.head.seq;
    let as_of = if request.as_of_seq == 0 { head_seq } else { request.as_of_seq };
    if as_of > head_seq {
        return Err(PackError::Invalid {
            field: "as_of_seq",
            message: format!("{as_of} is beyond the head seq {head_seq}"),
        });
    }
    let state = if as_of == head_seq { durable.clone() } else { fold(store, as_of)? };
    let first = first_at_or_after(store, as_of, request.from)?;
    let end = first_at_or_after(store, as_of, request.to)?;
    let prev_hash = if first > 1 { read(store, first - 1)?.hash } else { GENESIS_HASH.to_owned() };
    let mut g = Gathered {
        as_of_hash: state.head.hash.clone(),
        state,
        last_hash: prev_hash.clone(),
        prev_hash,
        ..Gathered::default()
    };
    if first < end {
        let prev_hash = g.prev_hash.clone();
        verified(store, first, end - 1, &prev_hash, &mut |record, stored| {
            gather(&mut g, &record, stored, request.scope);
        })?;
    }
    let (first_event, events_total, events_included) = (g.first_seq, g.events_total, g.included);
    let included_bytes = g.included_bytes;
    let canonical =
        serde_json_canonicalizer::to_string(&assemble(g, request, as_of)).map_err(storage)?;
    // JCS puts "events" between "current_mode" and "events_included". No member sorted before it
    // can contain this text, so its first occurrence is the member.
    let (prefix, suffix) = canonical
        .split_once(EMPTY_EVENTS)
        .map(|(p, s)| (p.to_owned(), s.to_owned()))
        .ok_or_else(|| PackError::Storage("the pack has no events member".into()))?;
    Ok(Plan {
        approx_bytes: prefix.len() + suffix.len() + included_bytes + 400,
        prefix,
        suffix,
        first_event,
        events_total,
        events_included,
    })
}

/// The state folded from the ledger up to `as_of`.
fn fold(store: &dyn Storage, as_of: u64) -> Result<State, PackError> {
    let mut state = State::default();
    verified(store, 1, as_of, GENESIS_HASH, &mut |record, _| state.apply(&record))?;
    Ok(state)
}

/// Seqs per range a thread reads and decodes (a few ranges are in flight per thread: about
/// 300 KiB each decoded).
const RANGE: u64 = 256;
/// Seqs per range a thread reads to copy out (about 500 KiB each).
const COPY_RANGE: u64 = 1024;

/// Reads seqs `from..=to` (all present), checks each record on its own on every core, then in
/// order its seq and its link to the one before (`prev_hash` for the first), and hands each to
/// `visit` with its stored size.
fn verified(
    store: &dyn Storage,
    from: u64,
    to: u64,
    prev_hash: &str,
    visit: &mut dyn FnMut(Record, usize),
) -> Result<(), PackError> {
    let (mut prev, mut next, mut problem) = (prev_hash.to_owned(), from, None);
    crate::parallel::ordered_map(
        |emit| {
            let mut start = from;
            while start <= to && emit((start, to.min(start.saturating_add(RANGE - 1)))) {
                start = start.saturating_add(RANGE);
            }
        },
        |(start, end)| {
            let mut decoded = Vec::new();
            let scanned = store.scan(start, end, &mut |seq, bytes| {
                decoded.push((seq, bytes.len(), Record::decode_verified(bytes)));
                ControlFlow::Continue(())
            });
            (decoded, scanned)
        },
        |(decoded, scanned)| {
            for (seq, stored, record) in decoded {
                if problem.is_some() {
                    return;
                }
                match record {
                    _ if seq != next => problem = Some(damaged(next, "the seq is missing")),
                    Err(e) => problem = Some(damaged(seq, &e.to_string())),
                    Ok(record) if record.seq != seq || record.prev_hash != prev => {
                        problem =
                            Some(damaged(seq, "the record is not the one the chain links to"));
                    }
                    Ok(record) => {
                        prev.clone_from(&record.hash);
                        next = seq + 1;
                        visit(record, stored);
                    }
                }
            }
            if let Err(e) = scanned
                && problem.is_none()
            {
                problem = Some(storage(e));
            }
        },
    );
    match problem {
        Some(problem) => Err(problem),
        None if next <= to => Err(damaged(next, "the seq is missing")),
        None => Ok(()),
    }
}

/// The first seq up to `as_of` whose event time is at or after `time`; `as_of + 1` if none.
fn first_at_or_after(store: &dyn Storage, as_of: u64, time: i64) -> Result<u64, PackError> {
    let (mut low, mut high) = (1, as_of + 1);
    while low < high {
        let mid = low + (high - low) / 2;
        if read(store, mid)?.time_micros().unwrap_or(i64::MIN) < time {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

/// The verified record at `seq`.
fn read(store: &dyn Storage, seq: u64) -> Result<Record, PackError> {
    let bytes =
        store.get(seq).map_err(storage)?.ok_or_else(|| damaged(seq, "the seq is missing"))?;
    Record::decode_verified(&bytes).map_err(|e| damaged(seq, &e.to_string()))
}

fn damaged(seq: u64, problem: &str) -> PackError {
    PackError::Storage(format!(
        "the ledger is damaged at seq {seq}; no pack can vouch for it ({problem})"
    ))
}

const EMPTY_EVENTS: &str = "\"events\":[]";

fn storage(e: impl std::fmt::Display) -> PackError {
    PackError::Storage(e.to_string())
}

/// The second pass: streams the file to `sink` (the stored events copied as they are, read a
/// range at a time on every core) and returns (content hash, pack id). Holds a few ranges of
/// events at a time, never the whole pack.
pub fn write(
    store: &dyn Storage,
    plan: &Plan,
    signer: &Signer,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), PackError>,
) -> Result<(String, String), PackError> {
    let mut hasher = Sha256::new();
    let mut emit =
        |bytes: &[u8], hashed: bool, sink: &mut dyn FnMut(&[u8]) -> Result<(), PackError>| {
            if hashed {
                hasher.update(bytes);
            }
            sink(bytes)
        };
    emit(b"{\"pack\":", false, sink)?;
    emit(plan.prefix.as_bytes(), true, sink)?;
    emit(b"\"events\":[", true, sink)?;
    if plan.events_included > 0 {
        let last = plan.first_event + plan.events_included - 1;
        let (mut result, mut first) = (Ok(()), true);
        let stop = std::sync::atomic::AtomicBool::new(false);
        crate::parallel::ordered_map(
            |emit_range| {
                let mut start = plan.first_event;
                while start <= last
                    && !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && emit_range((start, last.min(start + COPY_RANGE - 1)))
                {
                    start += COPY_RANGE;
                }
            },
            |(start, end)| {
                let mut events = Vec::new();
                let scanned = store.scan(start, end, &mut |_, bytes| {
                    if !events.is_empty() {
                        events.push(b',');
                    }
                    events.extend_from_slice(bytes);
                    ControlFlow::Continue(())
                });
                (events, scanned.map_err(storage))
            },
            |(events, scanned)| {
                if result.is_err() || events.is_empty() && scanned.is_ok() {
                    return;
                }
                let separated = if first { Ok(()) } else { emit(b",", true, sink) };
                first = false;
                result = separated.and_then(|()| emit(&events, true, sink)).and(scanned);
                if result.is_err() {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            },
        );
        result?;
    }
    emit(b"]", true, sink)?;
    emit(plan.suffix.as_bytes(), true, sink)?;
    let content_hash = format!("sha256:{}", hex::encode(hasher.finalize()));
    let pack_id = format!("ep-{}", &content_hash[7..23]);
    let signature = json!({ "alg": "ed25519", "key_id": signer.key_id(), "value": signer.sign_base64(content_hash.as_bytes()) });
    let tail = format!(
        ",\"content_hash\":{},\"pack_id\":{},\"signature\":{}}}\n",
        Value::String(content_hash.clone()),
        Value::String(pack_id.clone()),
        serde_json_canonicalizer::to_string(&signature).map_err(storage)?,
    );
    sink(tail.as_bytes())?;
    Ok((content_hash, pack_id))
}

/// Writes the whole pack in memory (for `Export`; `ExportStream` streams [`write`] instead).
pub fn build(store: &dyn Storage, plan: &Plan, signer: &Signer) -> Result<Pack, PackError> {
    let mut file = Vec::with_capacity(plan.approx_bytes);
    let (content_hash, pack_id) = write(store, plan, signer, &mut |bytes| {
        file.extend_from_slice(bytes);
        Ok(())
    })?;
    let file = String::from_utf8(file).map_err(storage)?;
    Ok(Pack {
        file,
        pack_id,
        content_hash,
        events_total: plan.events_total,
        events_included: plan.events_included,
    })
}

/// Folds one event of the range into the summaries.
fn gather(g: &mut Gathered, record: &Record, stored: usize, scope: Scope) {
    if g.first_seq == 0 {
        g.first_seq = record.seq;
    }
    g.last_seq = record.seq;
    g.last_hash.clone_from(&record.hash);
    g.events_total += 1;
    *g.audit_summary.entry(record.event_type.clone()).or_default() += 1;
    let investor = scope == Scope::Investor;
    match record.event_type.as_str() {
        events::MODE_CHANGED => {
            let mode = |m: Option<crate::ledger::record::Mode>| {
                m.map_or(Value::Null, |m| m.as_str().into())
            };
            let mut entry = json!({ "time": record.time, "from": mode(record.mode_before), "to": mode(record.mode_after) });
            if !investor {
                entry["reason"] = record.reason.clone().map_or(Value::Null, Value::String);
                entry["by"] = Value::String(record.source.clone());
            }
            g.mode_history.push(entry);
        }
        events::BUNDLE_QUARANTINED => g.quarantined += 1,
        events::BUNDLE_RELEASED => g.released += 1,
        "sovereign.bundle_loaded" => g.loaded += 1,
        _ => {}
    }
    if let Some(bundle) = &record.bundle_id {
        g.bundles.insert(bundle.clone());
    }
    let override_kind = match record.event_type.as_str() {
        "override.granted" => Some("grants"),
        "override.consumed" => Some("consumptions"),
        "override.reuse_denied" => Some("denials"),
        "override.revoked" => Some("revocations"),
        "override.expired" => Some("expiries"),
        _ => None,
    };
    if let Some(kind) = override_kind {
        *g.override_usage.entry(kind).or_default() += 1;
    }
    let executor_kind = match record.event_type.as_str() {
        "factory.execution_started" => Some("executions_started"),
        "factory.execution_completed" => Some("executions_completed"),
        "factory.execution_failed" => Some("executions_failed"),
        "factory.step_completed" => Some("steps_completed"),
        "factory.step_failed" => Some("steps_failed"),
        "factory.rollback_started" => Some("rollbacks_started"),
        "factory.rollback_completed" => Some("rollbacks_completed"),
        _ => None,
    };
    if let Some(kind) = executor_kind {
        *g.executor.entry(kind).or_default() += 1;
    }
    let include = match scope {
        Scope::Internal => true,
        Scope::Audit => g.included < AUDIT_EVENT_LIMIT as u64,
        Scope::Investor => false,
    };
    if include {
        g.included += 1;
        g.included_bytes += stored + 1;
    }
}

fn assemble(g: Gathered, request: &ExportRequest, as_of: u64) -> Value {
    let count = |m: &BTreeMap<&'static str, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let executor_summary = if request.exclude_executor_summary {
        Value::Null
    } else {
        let completed = count(&g.executor, "executions_completed");
        let finished = completed + count(&g.executor, "executions_failed");
        let mut summary: Map<String, Value> = [
            "executions_started",
            "executions_completed",
            "executions_failed",
            "steps_completed",
            "steps_failed",
            "rollbacks_started",
            "rollbacks_completed",
        ]
        .iter()
        .map(|k| ((*k).to_owned(), Value::from(count(&g.executor, k))))
        .collect();
        summary.insert(
            "success_rate_permille".into(),
            (completed * 1000).checked_div(finished).map_or(Value::Null, Value::from),
        );
        Value::Object(summary)
    };
    let override_usage: Map<String, Value> =
        ["grants", "consumptions", "denials", "revocations", "expiries"]
            .iter()
            .map(|k| ((*k).to_owned(), Value::from(count(&g.override_usage, k))))
            .collect();
    let safe_mode = &g.state.safe_mode;
    let investor = request.scope == Scope::Investor;
    let events_included = g.included;
    let has_range = g.first_seq != 0;
    json!({
        "format": FORMAT,
        "scope": request.scope.as_str(),
        "time_range": { "from": format_time(request.from), "to": format_time(request.to) },
        "as_of": { "seq": as_of, "hash": g.as_of_hash },
        "governance_config": governance_config(g.state.governance.as_deref(), investor),
        "checkpoint": g.state.checkpoint.as_ref().map_or(Value::Null, |c| json!(c)),
        "current_mode": crate::metrics::current_mode(&g.state).as_str(),
        "safe_mode": {
            "enabled": safe_mode.enabled,
            "revision": safe_mode.revision,
            "since": safe_mode.enabled_at.map(format_time),
            "source": safe_mode.source.map(|s| s.as_str()),
            "reason": if investor { None } else { safe_mode.reason.clone() },
            "enabled_by": if investor { None } else { safe_mode.enabled_by.clone() },
        },
        "audit_summary": g.audit_summary,
        "mode_history": g.mode_history,
        "override_usage": override_usage,
        "bundle_summary": {
            "quarantined": g.quarantined, "released": g.released, "loaded": g.loaded,
            "distinct_bundles": g.bundles.len() as u64,
        },
        "executor_summary": executor_summary,
        "events_total": g.events_total,
        "events_included": events_included,
        "chain": {
            "first_seq": if has_range { Value::from(g.first_seq) } else { Value::Null },
            "last_seq": if has_range { Value::from(g.last_seq) } else { Value::Null },
            "prev_hash": g.prev_hash,
            "last_hash": if has_range { Value::String(g.last_hash) } else { Value::Null },
        },
        // Empty here; the events are streamed into this place (see `write`).
        "events": [],
    })
}

/// The governance configuration in force at `as_of`: where it was recorded, its digest, its
/// settings and (except for INVESTOR, where it would repeat an event's metadata) its text.
fn governance_config(in_force: Option<&InForce>, investor: bool) -> Value {
    let Some(g) = in_force else { return Value::Null };
    json!({
        "seq": g.seq,
        "loaded_at": g.time,
        "sha256": g.sha256,
        "settings": g.config.as_ref().map_or(Value::Null, |c| json!(c)),
        "toml": if investor { Value::Null } else { Value::String(g.text.clone()) },
    })
}
