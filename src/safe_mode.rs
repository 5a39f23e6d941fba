//! The safe-mode domain: the kill switch. Decisions go through the ledger writer, so they are
//! linearisable and audited before they take effect; checks read memory only, and blocked checks
//! are all accounted for in the ledger.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::ledger::clock::Clock;
use crate::ledger::record::{
    Draft, InvalidField, MAX_NAME_CHARS, MAX_TEXT_BYTES, Severity, check_bytes, check_chars,
    format_time, truncate_utf8,
};
use crate::ledger::verify::{Damage, Verification};
use crate::ledger::{AppendError, Decision, FailClosed, Ledger};
use crate::state::{DAMAGE_KEY, OperationKind, SafeMode, SafeModeSource, State, events};
use crate::tally::PerSecondTally;

/// What safe mode blocks, in the words operators know.
pub const BLOCKED_OPERATIONS: [&str; 3] = ["Factory executions", "Deployments", "Bundle loads"];
/// What keeps working in safe mode.
pub const ALLOWED_OPERATIONS: [&str; 4] =
    ["Read-only APIs", "Monitoring", "Audit log access", "Metrics"];

/// The principal the service itself writes events as.
pub const SERVICE_PRINCIPAL: &str = "brain-ops";

/// Distinct (principal, kind, operation) keys that get their own event in one second; beyond,
/// calls are only counted in aggregates, so a flood of distinct names cannot flood the ledger.
const MAX_INDIVIDUAL_PER_SECOND: usize = 1000;
/// Distinct aggregate keys kept; beyond, operations are folded into one name per kind.
const MAX_AGGREGATE_KEYS: usize = 10_000;
const FOLDED_OPERATION: &str = "(other operations)";

/// Why a safe-mode call failed.
#[derive(Debug, thiserror::Error)]
pub enum SafeModeError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("the ledger cannot record this change right now: {0}")]
    Unavailable(String),
}

impl From<AppendError> for SafeModeError {
    fn from(e: AppendError) -> SafeModeError {
        match e {
            AppendError::Closed => SafeModeError::Unavailable("brain-ops is shutting down".into()),
            other => SafeModeError::Unavailable(other.to_string()),
        }
    }
}

/// The answer to `Enable` and `Disable`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub changed: bool,
    pub safe_mode: SafeMode,
}

/// The answer to `CheckOperation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub allowed: bool,
    pub message: String,
    pub safe_mode: SafeMode,
    /// Seq of the event recording this refusal; 0 when allowed or counted in an aggregate.
    pub audit_seq: u64,
}

type TallyKey = (String, OperationKind, String);
type BlockedTally = PerSecondTally<TallyKey, TallyKey>;

fn fold_operation(mut key: TallyKey) -> TallyKey {
    FOLDED_OPERATION.clone_into(&mut key.2);
    key
}

/// The safe-mode domain handle.
#[derive(Debug)]
pub struct SafeModeControl {
    ledger: Ledger,
    clock: Arc<dyn Clock>,
    tally: Mutex<BlockedTally>,
}

impl SafeModeControl {
    pub fn new(ledger: Ledger, clock: Arc<dyn Clock>) -> SafeModeControl {
        let tally =
            PerSecondTally::new(MAX_INDIVIDUAL_PER_SECOND, MAX_AGGREGATE_KEYS, fold_operation);
        SafeModeControl { ledger, clock, tally: Mutex::new(tally) }
    }

    /// The status in effect.
    pub fn status(&self) -> SafeMode {
        self.ledger.state().safe_mode.clone()
    }

    /// Every published state, for `Watch`.
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.ledger.subscribe()
    }

    /// Freezes the platform. Takes effect even when storage is failing (the event is then
    /// written when it returns).
    pub async fn enable(&self, principal: &str, reason: String) -> Result<Change, SafeModeError> {
        check_reason(&reason)?;
        let principal = principal.to_owned();
        let decided = self
            .ledger
            .decide(move |state| {
                if state.safe_mode.enabled {
                    return Decision::default();
                }
                Decision {
                    drafts: vec![enable_draft(SafeModeSource::Api, &principal, reason)],
                    safe_direction: true,
                }
            })
            .await?;
        Ok(Change { changed: decided.changed, safe_mode: decided.state.safe_mode.clone() })
    }

    /// Lifts a freeze, acknowledging any integrity damage it was frozen for. Needs storage.
    pub async fn disable(&self, principal: &str, reason: String) -> Result<Change, SafeModeError> {
        check_reason(&reason)?;
        let principal = principal.to_owned();
        let decided = self
            .ledger
            .decide(move |state| {
                if !state.safe_mode.enabled {
                    return Decision::default();
                }
                let mut drafts = Vec::new();
                let unacknowledged: Vec<&str> = state
                    .integrity
                    .reported
                    .iter()
                    .filter(|tag| !state.integrity.acknowledged.contains(*tag))
                    .map(String::as_str)
                    .collect();
                if !unacknowledged.is_empty() {
                    drafts.push(
                        Draft::new(events::INTEGRITY_ACKNOWLEDGED, &principal)
                            .severity(Severity::Warning)
                            .reason(reason.clone())
                            .meta(DAMAGE_KEY, unacknowledged.join(",")),
                    );
                }
                drafts.push(
                    Draft::new(events::SAFE_MODE_DISABLED, &principal)
                        .severity(Severity::Warning)
                        .reason(reason),
                );
                Decision { drafts, safe_direction: false }
            })
            .await?;
        Ok(Change { changed: decided.changed, safe_mode: decided.state.safe_mode.clone() })
    }

    /// May `operation` of `kind` run now? Allowed calls touch memory only. A blocked call is
    /// recorded before the answer: the first per (principal, kind, operation) each second as
    /// its own event, the rest counted into one aggregate per second.
    pub async fn check(
        &self,
        principal: &str,
        kind: OperationKind,
        operation: &str,
    ) -> Result<Check, SafeModeError> {
        check_chars("operation", Some(operation), MAX_NAME_CHARS)?;
        let safe_mode = self.status();
        if !safe_mode.enabled {
            return Ok(Check {
                allowed: true,
                message: "allowed: safe mode is off".into(),
                safe_mode,
                audit_seq: 0,
            });
        }
        let message = blocked_message(&safe_mode, kind, operation);
        let second = self.clock.now_micros().div_euclid(1_000_000);
        let key = (principal.to_owned(), kind, operation.to_owned());
        let first = self.lock().first_in_second(key.clone(), second);
        let mut audit_seq = 0;
        // While storage is failing the answer must not wait for it: the call is counted into the
        // aggregate that is written when storage returns.
        let storage_failing = self.ledger.health().fault.is_some();
        if first && !storage_failing {
            let draft = blocked_draft(principal, kind, operation, 1, None);
            match self.ledger.append(vec![draft]).await {
                Ok(appended) => audit_seq = appended.first().map_or(0, |a| a.seq),
                // Still blocked (fail closed); the call is counted into the next aggregate.
                Err(_) => self.lock().count(key, second, 1),
            }
        } else {
            self.lock().count(key, second, 1);
        }
        Ok(Check { allowed: false, message, safe_mode, audit_seq })
    }

    /// Writes the aggregates of finished seconds (of every second when `all`). Counts that
    /// cannot be written are kept for the next flush.
    pub async fn flush_blocked(&self, all: bool) {
        let now = self.clock.now_micros().div_euclid(1_000_000);
        let taken = self.lock().take(if all { None } else { Some(now) });
        if taken.is_empty() {
            return;
        }
        let drafts = taken
            .iter()
            .map(|((second, (principal, kind, operation)), n)| {
                blocked_draft(principal, *kind, operation, *n, Some(*second))
            })
            .collect();
        if let Err(error) = self.ledger.append(drafts).await {
            let total: u64 = taken.iter().map(|(_, n)| n).sum();
            tracing::warn!(%error, total, "blocked-call aggregates kept for the next attempt");
            let mut tally = self.lock();
            for ((second, key), n) in taken {
                tally.count(key, second, n);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BlockedTally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn check_reason(reason: &str) -> Result<(), InvalidField> {
    if reason.trim().is_empty() {
        return Err(InvalidField::new("reason", "is required: say why"));
    }
    check_bytes("reason", Some(reason), MAX_TEXT_BYTES)
}

fn blocked_message(safe_mode: &SafeMode, kind: OperationKind, operation: &str) -> String {
    let since = safe_mode.enabled_at.map(format_time).unwrap_or_else(|| "an unknown time".into());
    let source = safe_mode.source.map_or("unknown", SafeModeSource::as_str);
    format!(
        "{} {operation:?} is blocked: safe mode has been on since {since} (source {source}, \
         enabled by {}): {}. Lift it once the cause is resolved: `brain-ops safe-mode disable \
         --reason …` or SafeModeService/Disable (operator role).",
        kind.label(),
        safe_mode.enabled_by.as_deref().unwrap_or("unknown"),
        safe_mode.reason.as_deref().unwrap_or("no reason given"),
    )
}

fn blocked_draft(
    principal: &str,
    kind: OperationKind,
    operation: &str,
    count: u64,
    aggregate_of: Option<i64>,
) -> Draft {
    let mut draft = Draft::new(events::EXECUTION_BLOCKED, principal)
        .severity(Severity::Warning)
        .failed()
        .reason(format!("Operation blocked: {operation}"))
        .meta("kind", kind.as_str())
        .meta("operation", operation)
        .meta("count", count.to_string());
    if let Some(second) = aggregate_of {
        draft = draft
            .reason(format!("Operation blocked: {operation} ({count} calls in this second)"))
            .meta("aggregated", "true")
            .meta("window_start", format_time(second * 1_000_000));
    }
    draft
}

/// The event that turns safe mode on.
pub fn enable_draft(source: SafeModeSource, principal: &str, reason: String) -> Draft {
    Draft::new(events::SAFE_MODE_ENABLED, principal)
        .severity(Severity::Critical)
        .reason(reason)
        .meta("source", source.as_str())
}

/// The fail-closed policy for storage that cannot be recovered: freeze, source STORAGE.
pub fn fail_closed() -> FailClosed {
    Arc::new(|state: &State, fault: &str| {
        if state.safe_mode.enabled {
            return Vec::new();
        }
        let reason = truncate_utf8(format!("ledger storage is failing: {fault}"), MAX_TEXT_BYTES);
        vec![enable_draft(SafeModeSource::Storage, SERVICE_PRINCIPAL, reason)]
    })
}

/// The decision taken at start, in order: an integrity violation for damage not yet on record,
/// a freeze while any damage is unacknowledged, and the freeze `BRAIN_SAFE_MODE` asks for.
pub fn startup_decision(
    verification: Verification,
    safe_mode_env: bool,
) -> impl FnOnce(&State) -> Decision + Send + 'static {
    move |state| Decision {
        drafts: startup_drafts(state, &verification, safe_mode_env),
        safe_direction: true,
    }
}

fn startup_drafts(state: &State, verification: &Verification, safe_mode_env: bool) -> Vec<Draft> {
    let mut drafts = Vec::new();
    let mut enabled = state.safe_mode.enabled;
    let unacknowledged: Vec<_> = verification
        .damage
        .iter()
        .filter(|d| !state.integrity.acknowledged.contains(&d.tag()))
        .collect();
    // Damage already on record is not reported again at every restart; it keeps the service
    // frozen until an operator acknowledges it.
    let new: Vec<_> =
        unacknowledged.iter().filter(|d| !state.integrity.reported.contains(&d.tag())).collect();
    if let Some(first) = new.first() {
        let mut tags = String::new();
        for damage in &new {
            let tag = damage.tag();
            if tags.len() + tag.len() + 1 > MAX_TEXT_BYTES {
                break;
            }
            if !tags.is_empty() {
                tags.push(',');
            }
            tags.push_str(&tag);
        }
        drafts.push(
            Draft::new(events::INTEGRITY_VIOLATION, SERVICE_PRINCIPAL)
                .severity(Severity::Critical)
                .failed()
                .reason(integrity_reason(first))
                .meta("first_bad_seq", first.seq.to_string())
                .meta("damaged_total", verification.damage_total.to_string())
                .meta(DAMAGE_KEY, tags),
        );
    }
    if let Some(first) = unacknowledged.first()
        && !enabled
    {
        drafts.push(enable_draft(
            SafeModeSource::Integrity,
            SERVICE_PRINCIPAL,
            integrity_reason(first),
        ));
        enabled = true;
    }
    if safe_mode_env && !enabled {
        drafts.push(enable_draft(
            SafeModeSource::Env,
            SERVICE_PRINCIPAL,
            "BRAIN_SAFE_MODE is set".into(),
        ));
    }
    drafts
}

fn integrity_reason(damage: &Damage) -> String {
    truncate_utf8(
        format!("ledger verification failed at seq {}: {}", damage.seq, damage.problem),
        MAX_TEXT_BYTES,
    )
}
