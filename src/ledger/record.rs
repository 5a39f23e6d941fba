//! The event record: its fields, limits, redaction, canonical bytes and hash.
//!
//! The stored form of a record is its JCS (RFC 8785) serialisation. [`Record`] declares its
//! fields in lexicographic order and holds only strings, integers, booleans, nulls and a
//! string-to-string map whose keys are ASCII, so serde_json's output for it *is* the JCS form:
//! JCS sorts keys by UTF-16 code unit (equal to byte order for ASCII keys), escapes strings the way
//! serde_json does, and prints integers plainly. The test suite checks this claim against an
//! independent JCS implementation over an adversarial corpus.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the record format.
pub const RECORD_VERSION: u32 = 1;
/// `prev_hash` of seq 1.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How the hash member starts in stored bytes.
const HASH_MEMBER_START: &[u8] = b",\"hash\":\"";
/// Largest canonical record.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Largest canonical record of a system event carrying a governance config.
pub const MAX_CONFIG_RECORD_BYTES: usize = 80 * 1024;
/// Event type whose records may be as large as [`MAX_CONFIG_RECORD_BYTES`].
pub const GOVERNANCE_CONFIG_EVENT: &str = "system.governance_config_loaded";
/// Longest `reason`, `error` and metadata value, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Longest `triggered_by`, `bundle_id`, `operation` and `idempotency_key`, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Longest event type, in characters.
pub const MAX_EVENT_TYPE_CHARS: usize = 128;
/// Most metadata entries on one event.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key.
pub const MAX_METADATA_KEY_CHARS: usize = 64;
/// What a redacted metadata value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

const SECRET_KEY_PARTS: [&str; 11] = [
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "private_key",
    "authorization",
    "credential",
    "cookie",
    "session",
];

/// Severity of an event, stored as its lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    /// The severity of an event whose producer gave none: the DESIGN table for known types, else
    /// error when it failed, warning when its type says "failed" or "blocked", else info.
    pub fn derive(event_type: &str, success: bool) -> Severity {
        match event_type {
            "system.safe_mode_enabled"
            | "system.integrity_violation"
            | "system.safe_mode_violation"
            | "system.override_violation"
            | "override.reuse_denied"
            | "sovereign.ipv6_gate_failed" => Severity::Critical,
            "system.safe_mode_disabled"
            | "system.safe_mode_execution_blocked"
            | "system.permission_denied"
            | "override.granted"
            | "override.consumed"
            | "override.revoked"
            | "sovereign.bundle_quarantined"
            | "factory.rollback_started" => Severity::Warning,
            "factory.step_failed" | "factory.execution_failed" => Severity::Error,
            _ if !success => Severity::Error,
            _ if event_type.contains("failed") || event_type.contains("blocked") => {
                Severity::Warning
            }
            _ => Severity::Info,
        }
    }

    /// The lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

/// Operation mode of the sovereign-mode service, stored as its lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Online,
    Offline,
    Sovereign,
    Quarantine,
}

impl Mode {
    /// Every mode, in metric-value order.
    pub const ALL: [Mode; 4] = [Mode::Online, Mode::Offline, Mode::Sovereign, Mode::Quarantine];

    /// The value of `brain_mode_current` for this mode.
    pub fn metric_value(self) -> u8 {
        self as u8
    }

    /// The lowercase name, as stored and as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Online => "online",
            Mode::Offline => "offline",
            Mode::Sovereign => "sovereign",
            Mode::Quarantine => "quarantine",
        }
    }
}

/// An event as a producer (a sibling or the service itself) hands it to the ledger, before the
/// writer assigns its seq, time and chain link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub event_type: String,
    /// `None` derives the severity from the type and outcome.
    pub severity: Option<Severity>,
    /// The authenticated principal.
    pub source: String,
    pub triggered_by: Option<String>,
    pub reason: Option<String>,
    pub success: bool,
    pub error: Option<String>,
    pub mode_before: Option<Mode>,
    pub mode_after: Option<Mode>,
    pub bundle_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
}

impl Draft {
    /// A successful event of `event_type` from `source` with every optional field absent.
    pub fn new(event_type: impl Into<String>, source: impl Into<String>) -> Draft {
        Draft {
            event_type: event_type.into(),
            severity: None,
            source: source.into(),
            triggered_by: None,
            reason: None,
            success: true,
            error: None,
            mode_before: None,
            mode_after: None,
            bundle_id: None,
            metadata: BTreeMap::new(),
            idempotency_key: None,
        }
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Draft {
        self.reason = Some(reason.into());
        self
    }

    /// Adds one metadata entry.
    pub fn meta(mut self, key: &str, value: impl Into<String>) -> Draft {
        self.metadata.insert(key.to_owned(), value.into());
        self
    }

    /// Sets an explicit severity.
    pub fn severity(mut self, severity: Severity) -> Draft {
        self.severity = Some(severity);
        self
    }

    /// Marks the event as a failure.
    pub fn failed(mut self) -> Draft {
        self.success = false;
        self
    }

    /// The severity the record will carry: the producer's, or the derived one.
    pub fn resolved_severity(&self) -> Severity {
        self.severity.unwrap_or_else(|| Severity::derive(&self.event_type, self.success))
    }

    /// Checks every field against the limits of the record format. The error names the field.
    pub fn validate(&self) -> Result<(), InvalidField> {
        validate_event_type(&self.event_type)?;
        check_bytes("reason", self.reason.as_deref(), MAX_TEXT_BYTES)?;
        check_bytes("error", self.error.as_deref(), MAX_TEXT_BYTES)?;
        check_chars("triggered_by", self.triggered_by.as_deref(), MAX_NAME_CHARS)?;
        check_chars("bundle_id", self.bundle_id.as_deref(), MAX_NAME_CHARS)?;
        check_chars("idempotency_key", self.idempotency_key.as_deref(), MAX_NAME_CHARS)?;
        check_chars("source", Some(&self.source), MAX_NAME_CHARS)?;
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(InvalidField::new(
                "metadata",
                format!(
                    "has {} entries; at most {MAX_METADATA_ENTRIES} are allowed",
                    self.metadata.len()
                ),
            ));
        }
        for (key, value) in &self.metadata {
            if !valid_metadata_key(key) {
                return Err(InvalidField::new(
                    "metadata",
                    format!("key {key:?} must match ^[a-z0-9_.-]{{1,{MAX_METADATA_KEY_CHARS}}}$"),
                ));
            }
            if value.len() > MAX_TEXT_BYTES {
                return Err(InvalidField::new(
                    format!("metadata.{key}"),
                    format!("is {} bytes; at most {MAX_TEXT_BYTES} are allowed", value.len()),
                ));
            }
        }
        Ok(())
    }

    /// Replaces the values of secret-looking metadata keys with [`REDACTED`].
    pub fn redact(&mut self) {
        for (key, value) in &mut self.metadata {
            if is_secret_key(key) {
                REDACTED.clone_into(value);
            }
        }
    }
}

/// A field that breaks a limit of the record format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct InvalidField {
    /// The offending field, as named in the API.
    pub field: String,
    /// What is wrong with it, phrased to follow the field name.
    pub message: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> InvalidField {
        InvalidField { field: field.into(), message: message.into() }
    }
}

/// Checks an event type against `^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$` and its length limit.
pub fn validate_event_type(event_type: &str) -> Result<(), InvalidField> {
    if event_type.is_empty() {
        return Err(InvalidField::new("event_type", "is required"));
    }
    if event_type.chars().count() > MAX_EVENT_TYPE_CHARS {
        return Err(InvalidField::new(
            "event_type",
            format!("is longer than {MAX_EVENT_TYPE_CHARS} characters"),
        ));
    }
    let mut parts = 0;
    let well_formed = event_type.split('.').all(|part| {
        parts += 1;
        let mut bytes = part.bytes();
        matches!(bytes.next(), Some(b'a'..=b'z'))
            && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
    });
    if !well_formed || parts < 2 {
        return Err(InvalidField::new(
            "event_type",
            format!(
                "{event_type:?} must be dotted lower-case words, like \"factory.step_failed\" \
                 (^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)+$)"
            ),
        ));
    }
    Ok(())
}

/// True for event types only the service itself may write.
pub fn is_reserved_event_type(event_type: &str) -> bool {
    event_type.starts_with("system.") || event_type.starts_with("override.")
}

fn valid_metadata_key(key: &str) -> bool {
    (1..=MAX_METADATA_KEY_CHARS).contains(&key.len())
        && key.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|part| key.contains(part))
}

/// Checks an optional text field against a limit in bytes.
pub fn check_bytes(field: &str, value: Option<&str>, limit: usize) -> Result<(), InvalidField> {
    match value {
        Some(v) if v.len() > limit => Err(InvalidField::new(
            field,
            format!("is {} bytes; at most {limit} are allowed", v.len()),
        )),
        _ => Ok(()),
    }
}

/// Checks an optional name field against a limit in characters.
pub fn check_chars(field: &str, value: Option<&str>, limit: usize) -> Result<(), InvalidField> {
    match value {
        Some(v) if v.chars().count() > limit => {
            Err(InvalidField::new(field, format!("is longer than {limit} characters")))
        }
        _ => Ok(()),
    }
}

/// One stored event. Field order is lexicographic; see the module documentation for why that
/// makes serde_json's output canonical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub bundle_id: Option<String>,
    pub error: Option<String>,
    pub event_type: String,
    /// Empty only while the hash itself is being computed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hash: String,
    pub idempotency_key: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub mode_after: Option<Mode>,
    pub mode_before: Option<Mode>,
    pub prev_hash: String,
    pub reason: Option<String>,
    pub seq: u64,
    pub severity: Severity,
    pub source: String,
    pub success: bool,
    pub time: String,
    pub triggered_by: Option<String>,
    pub v: u32,
}

/// A record together with its stored bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub record: Record,
    pub bytes: Vec<u8>,
}

/// Why a draft could not be sealed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the canonical record is {size} bytes; at most {limit} are allowed")]
pub struct TooLarge {
    pub size: usize,
    pub limit: usize,
}

impl Record {
    /// Builds the record for `draft` at `seq`, `time_micros` after `prev_hash`, and computes its
    /// hash and stored bytes.
    pub fn seal(
        draft: Draft,
        seq: u64,
        time_micros: i64,
        prev_hash: &str,
    ) -> Result<Sealed, TooLarge> {
        let severity = draft.resolved_severity();
        let limit = size_limit(&draft.event_type);
        let mut record = Record {
            bundle_id: draft.bundle_id,
            error: draft.error,
            event_type: draft.event_type,
            hash: String::new(),
            idempotency_key: draft.idempotency_key,
            metadata: draft.metadata,
            mode_after: draft.mode_after,
            mode_before: draft.mode_before,
            prev_hash: prev_hash.to_owned(),
            reason: draft.reason,
            seq,
            severity,
            source: draft.source,
            success: draft.success,
            time: format_time(time_micros),
            triggered_by: draft.triggered_by,
            v: RECORD_VERSION,
        };
        record.hash = record.compute_hash();
        let bytes = record.canonical_bytes();
        if bytes.len() > limit {
            return Err(TooLarge { size: bytes.len(), limit });
        }
        Ok(Sealed { record, bytes })
    }

    /// `hex(sha256(JCS(record without "hash")))`.
    pub fn compute_hash(&self) -> String {
        let body = if self.hash.is_empty() {
            self.canonical_bytes()
        } else {
            let mut unhashed = self.clone();
            unhashed.hash.clear();
            unhashed.canonical_bytes()
        };
        hex::encode(Sha256::digest(&body))
    }

    /// The JCS serialisation of this record (without `hash` while it is empty).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings, integers, booleans and string maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses stored bytes and checks that they are canonical and that the hash matches.
    pub fn decode_verified(bytes: &[u8]) -> Result<Record, RecordProblem> {
        let record: Record =
            serde_json::from_slice(bytes).map_err(|e| RecordProblem::Undecodable(e.to_string()))?;
        if record.hash.is_empty() {
            return Err(RecordProblem::Undecodable("the hash field is empty".into()));
        }
        if !record.serialises_to(bytes) {
            return Err(RecordProblem::NotCanonical);
        }
        // Canonical bytes order the keys, so the hashed form is the stored one without its
        // `,"hash":"…"` member (`hash` is never the first or last key, and no string can hold an
        // unescaped quote). Hashing the two halves avoids serialising the record again.
        let hash = record.hash.as_bytes();
        let at = memchr::memmem::find(bytes, HASH_MEMBER_START);
        let end = at.map(|at| at + HASH_MEMBER_START.len() + hash.len());
        let mut digest = [0u8; 64];
        let computed = match (at, end) {
            (Some(at), Some(end))
                if bytes.get(at + HASH_MEMBER_START.len()..end) == Some(hash)
                    && bytes.get(end) == Some(&b'"') =>
            {
                let mut hasher = Sha256::new();
                hasher.update(&bytes[..at]);
                hasher.update(&bytes[end + 1..]);
                // Cannot fail: 64 hex digits for 32 bytes.
                let _ = hex::encode_to_slice(hasher.finalize(), &mut digest);
                &digest[..]
            }
            // A hash that JSON escapes (not hex at all): the slow way gives the same answer.
            _ => {
                let computed = record.compute_hash();
                if computed == record.hash {
                    return Ok(record);
                }
                return Err(RecordProblem::HashMismatch { stored: record.hash, computed });
            }
        };
        if computed != hash {
            let computed = String::from_utf8_lossy(computed).into_owned();
            return Err(RecordProblem::HashMismatch { stored: record.hash, computed });
        }
        Ok(record)
    }

    /// Whether serde_json's output for this record is its JCS form: true for every record
    /// brain-ops seals (see the module documentation); false only for a hand-made one whose seq
    /// is beyond 2^53 (JCS writes numbers as doubles) or whose metadata keys are not ASCII (JCS
    /// sorts them by UTF-16 code unit, serde_json by byte).
    pub fn serialises_as_jcs(&self) -> bool {
        self.seq <= 1 << 53 && self.metadata.keys().all(|k| k.is_ascii())
    }

    /// Whether serialising this record gives exactly `expected`.
    fn serialises_to(&self, expected: &[u8]) -> bool {
        thread_local! {
            /// Kept between calls: start-up checks a million records on each thread.
            static WRITTEN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        WRITTEN.with_borrow_mut(|written| {
            written.clear();
            serde_json::to_writer(&mut *written, self).is_ok() && written == expected
        })
    }

    /// Event time in microseconds since the Unix epoch.
    pub fn time_micros(&self) -> Option<i64> {
        parse_time(&self.time)
    }
}

/// What is wrong with one stored record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    #[error("the stored record does not decode: {0}")]
    Undecodable(String),
    #[error("the stored bytes are not the canonical form of the record")]
    NotCanonical,
    #[error("the stored hash {stored} does not match the content hash {computed}")]
    HashMismatch { stored: String, computed: String },
}

/// The largest canonical record allowed for an event type.
pub fn size_limit(event_type: &str) -> usize {
    if event_type == GOVERNANCE_CONFIG_EVENT { MAX_CONFIG_RECORD_BYTES } else { MAX_RECORD_BYTES }
}

/// Cuts `text` to at most `limit` bytes, at a character boundary.
pub fn truncate_utf8(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Formats microseconds since the epoch as RFC 3339 UTC with six fractional digits and `Z`.
pub fn format_time(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses an RFC 3339 time into microseconds since the epoch.
pub fn parse_time(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_has_six_fractional_digits_and_z() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_time(1_700_000_000_123_456), "2023-11-14T22:13:20.123456Z");
        assert_eq!(parse_time("2023-11-14T22:13:20.123456Z"), Some(1_700_000_000_123_456));
    }

    #[test]
    fn event_types_follow_the_dotted_pattern() {
        for ok in ["factory.step_failed", "a.b", "sovereign.ipv6_gate_failed", "x1.y_2.z"] {
            assert_eq!(validate_event_type(ok), Ok(()), "{ok}");
        }
        for bad in ["", "factory", "Factory.step", "factory.", ".step", "a..b", "1a.b", "a.b-c"] {
            assert!(validate_event_type(bad).is_err(), "{bad}");
        }
        assert!(validate_event_type(&format!("a.{}", "b".repeat(127))).is_err());
    }

    #[test]
    fn severity_defaults_follow_the_table_then_the_rules() {
        assert_eq!(Severity::derive("system.safe_mode_enabled", true), Severity::Critical);
        assert_eq!(Severity::derive("factory.step_failed", true), Severity::Error);
        assert_eq!(Severity::derive("sovereign.bundle_quarantined", true), Severity::Warning);
        assert_eq!(Severity::derive("x.anything", false), Severity::Error);
        assert_eq!(Severity::derive("x.gate_check_failed", true), Severity::Warning);
        assert_eq!(Severity::derive("x.call_blocked", true), Severity::Warning);
        assert_eq!(Severity::derive("factory.step_completed", true), Severity::Info);
    }

    #[test]
    fn secret_looking_metadata_is_redacted() {
        let mut draft = Draft::new("a.b", "me")
            .meta("db_password", "hunter2")
            .meta("session_id", "s")
            .meta("bundle", "keep");
        draft.redact();
        assert_eq!(draft.metadata["db_password"], REDACTED);
        assert_eq!(draft.metadata["session_id"], REDACTED);
        assert_eq!(draft.metadata["bundle"], "keep");
    }

    #[test]
    fn sealed_records_decode_and_verify() {
        let draft = Draft::new("a.b", "me").reason("why \u{2028} \"quoted\" \u{1}");
        let sealed = Record::seal(draft, 1, 5, GENESIS_HASH).expect("small record");
        let decoded = Record::decode_verified(&sealed.bytes).expect("verifies");
        assert_eq!(decoded, sealed.record);
    }

    #[test]
    fn any_edit_to_the_stored_bytes_is_detected() {
        let sealed = Record::seal(Draft::new("a.b", "me"), 1, 5, GENESIS_HASH).expect("seal");
        let edited = String::from_utf8(sealed.bytes).expect("utf8").replace("\"me\"", "\"you\"");
        assert!(matches!(
            Record::decode_verified(edited.as_bytes()),
            Err(RecordProblem::HashMismatch { .. })
        ));
    }
}
