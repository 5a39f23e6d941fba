//! Conversions between prost messages and domain types, validated here: a missing or malformed
//! field becomes INVALID_ARGUMENT naming it.

use tonic::Status;

use crate::audit::{ChainReport, DEFAULT_PAGE_SIZE, ListQuery, Listed, MAX_PAGE_SIZE};
use crate::ledger::record::{Draft, InvalidField, MAX_EVENT_TYPE_CHARS, Mode, Severity};
use crate::pb;
use crate::safe_mode::{ALLOWED_OPERATIONS, BLOCKED_OPERATIONS};
use crate::state::{OperationKind, SafeMode, SafeModeSource};

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

/// A producer's event as a draft from `source`. Field names in errors are relative to the event.
pub fn draft_from_event(
    event: Option<pb::Event>,
    idempotency_key: String,
    source: &str,
) -> Result<Draft, InvalidField> {
    let event = event.ok_or_else(|| InvalidField::new("event", "is required"))?;
    let severity = match pb::Severity::try_from(event.severity) {
        Ok(pb::Severity::Unspecified) => None,
        Ok(pb::Severity::Info) => Some(Severity::Info),
        Ok(pb::Severity::Warning) => Some(Severity::Warning),
        Ok(pb::Severity::Error) => Some(Severity::Error),
        Ok(pb::Severity::Critical) => Some(Severity::Critical),
        Err(_) => {
            return Err(InvalidField::new(
                "event.severity",
                format!("{} is not a known severity", event.severity),
            ));
        }
    };
    Ok(Draft {
        event_type: event.event_type,
        severity,
        source: source.to_owned(),
        triggered_by: non_empty(event.triggered_by),
        reason: non_empty(event.reason),
        success: event.success.unwrap_or(true),
        error: non_empty(event.error),
        mode_before: mode_from_pb("event.mode_before", event.mode_before)?,
        mode_after: mode_from_pb("event.mode_after", event.mode_after)?,
        bundle_id: non_empty(event.bundle_id),
        metadata: event.metadata.into_iter().collect(),
        idempotency_key: non_empty(idempotency_key),
    })
}

fn mode_from_pb(field: &str, value: i32) -> Result<Option<Mode>, InvalidField> {
    match pb::OperationMode::try_from(value) {
        Ok(pb::OperationMode::Unspecified) => Ok(None),
        Ok(pb::OperationMode::Online) => Ok(Some(Mode::Online)),
        Ok(pb::OperationMode::Offline) => Ok(Some(Mode::Offline)),
        Ok(pb::OperationMode::Sovereign) => Ok(Some(Mode::Sovereign)),
        Ok(pb::OperationMode::Quarantine) => Ok(Some(Mode::Quarantine)),
        Err(_) => Err(InvalidField::new(field, format!("{value} is not a known operation mode"))),
    }
}

/// The operation kind of a `CheckOperation` request.
pub fn kind_from_pb(value: i32) -> Result<OperationKind, Status> {
    match pb::OperationKind::try_from(value) {
        Ok(pb::OperationKind::Execution) => Ok(OperationKind::Execution),
        Ok(pb::OperationKind::Deployment) => Ok(OperationKind::Deployment),
        Ok(pb::OperationKind::BundleLoad) => Ok(OperationKind::BundleLoad),
        Ok(pb::OperationKind::Unspecified) => Err(Status::invalid_argument(
            "kind is required: OPERATION_KIND_EXECUTION, OPERATION_KIND_DEPLOYMENT or OPERATION_KIND_BUNDLE_LOAD",
        )),
        Err(_) => {
            Err(Status::invalid_argument(format!("kind {value} is not a known operation kind")))
        }
    }
}

/// Microseconds since the epoch of a protobuf timestamp.
pub fn micros_from_pb(field: &str, t: &prost_types::Timestamp) -> Result<i64, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Status::invalid_argument(format!("{field}.nanos must be from 0 to 999999999")));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
        .ok_or_else(|| Status::invalid_argument(format!("{field} is out of range")))
}

/// A protobuf timestamp from microseconds since the epoch.
pub fn micros_to_pb(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

impl TryFrom<pb::AuditServiceListRequest> for ListQuery {
    type Error = Status;

    fn try_from(request: pb::AuditServiceListRequest) -> Result<ListQuery, Status> {
        let from = request.from.as_ref().map(|t| micros_from_pb("from", t)).transpose()?;
        let to = request.to.as_ref().map(|t| micros_from_pb("to", t)).transpose()?;
        if let (Some(from), Some(to)) = (from, to)
            && from >= to
        {
            return Err(Status::invalid_argument(
                "to must be after from (the range is [from, to))",
            ));
        }
        let page_size = match request.page_size {
            None => DEFAULT_PAGE_SIZE,
            Some(size) if (1..=MAX_PAGE_SIZE).contains(&(size as usize)) => size as usize,
            Some(size) => {
                return Err(Status::invalid_argument(format!(
                    "page_size {size} is not from 1 to {MAX_PAGE_SIZE}"
                )));
            }
        };
        if request.event_type_prefix.chars().count() > MAX_EVENT_TYPE_CHARS {
            return Err(Status::invalid_argument(format!(
                "event_type_prefix is longer than {MAX_EVENT_TYPE_CHARS} characters"
            )));
        }
        Ok(ListQuery {
            from,
            to,
            event_type_prefix: request.event_type_prefix,
            after_seq: request.after_seq,
            page_size,
        })
    }
}

impl From<Listed> for pb::LedgerEvent {
    fn from(listed: Listed) -> pb::LedgerEvent {
        pb::LedgerEvent {
            seq: listed.seq,
            time: listed.time_micros.map(micros_to_pb),
            event_type: listed.event_type,
            hash: listed.hash,
            record_json: listed.json,
        }
    }
}

/// The streamed RPC's answer is the unary one's, field for field.
impl From<pb::VerifyResponse> for pb::VerifyStreamResponse {
    fn from(v: pb::VerifyResponse) -> pb::VerifyStreamResponse {
        pb::VerifyStreamResponse {
            valid: v.valid,
            hash_valid: v.hash_valid,
            chain_valid: v.chain_valid,
            signature_valid: v.signature_valid,
            matches_log: v.matches_log,
            computed_hash: v.computed_hash,
            problems: v.problems,
        }
    }
}

impl From<ChainReport> for pb::VerifyChainResponse {
    fn from(report: ChainReport) -> pb::VerifyChainResponse {
        pb::VerifyChainResponse {
            valid: report.valid,
            checked: report.checked,
            first_bad_seq: report.first_bad_seq,
            head_seq: report.head_seq,
            head_hash: report.head_hash,
            problem: report.problem,
        }
    }
}

impl From<&SafeMode> for pb::SafeModeStatus {
    fn from(mode: &SafeMode) -> pb::SafeModeStatus {
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let (blocked, allowed) = if mode.enabled {
            (strings(&BLOCKED_OPERATIONS), strings(&ALLOWED_OPERATIONS))
        } else {
            (Vec::new(), strings(&[BLOCKED_OPERATIONS.as_slice(), &ALLOWED_OPERATIONS].concat()))
        };
        let source = match mode.source {
            None => pb::SafeModeSource::Unspecified,
            Some(SafeModeSource::Api) => pb::SafeModeSource::Api,
            Some(SafeModeSource::Env) => pb::SafeModeSource::Env,
            Some(SafeModeSource::Integrity) => pb::SafeModeSource::Integrity,
            Some(SafeModeSource::Storage) => pb::SafeModeSource::Storage,
        };
        pb::SafeModeStatus {
            enabled: mode.enabled,
            revision: mode.revision,
            enabled_at: mode.enabled_at.map(micros_to_pb),
            reason: mode.reason.clone().unwrap_or_default(),
            enabled_by: mode.enabled_by.clone().unwrap_or_default(),
            source: source.into(),
            blocked_operations: blocked,
            allowed_operations: allowed,
        }
    }
}
