//! The safe-mode domain: the kill switch's status and the events that set it at start.

use crate::ledger::StartReport;
use crate::ledger::record::{Draft, MAX_TEXT_BYTES, Severity};
use crate::ledger::verify::Damage;
use crate::state::{DAMAGE_KEY, SafeModeSource, State, events};

/// What safe mode blocks, in the words operators know.
pub const BLOCKED_OPERATIONS: [&str; 3] = ["Factory executions", "Deployments", "Bundle loads"];
/// What keeps working in safe mode.
pub const ALLOWED_OPERATIONS: [&str; 4] =
    ["Read-only APIs", "Monitoring", "Audit log access", "Metrics"];

/// The principal the service itself writes events as.
pub const SERVICE_PRINCIPAL: &str = "brain-ops";

/// The events to append at start, in order: an integrity violation for damage not yet
/// acknowledged (with the freeze it causes), and the freeze `BRAIN_SAFE_MODE` asks for.
pub fn startup_drafts(state: &State, report: &StartReport, safe_mode_env: bool) -> Vec<Draft> {
    let mut drafts = Vec::new();
    let mut enabled = state.safe_mode.enabled;
    let unacknowledged: Vec<_> = report
        .verification
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
                .meta("damaged_total", report.verification.damage_total.to_string())
                .meta(DAMAGE_KEY, tags),
        );
    }
    if let Some(first) = unacknowledged.first()
        && !enabled
    {
        drafts.push(enable_draft(SafeModeSource::Integrity, integrity_reason(first)));
        enabled = true;
    }
    if safe_mode_env && !enabled {
        drafts.push(enable_draft(SafeModeSource::Env, "BRAIN_SAFE_MODE is set".into()));
    }
    drafts
}

fn integrity_reason(damage: &Damage) -> String {
    truncate(
        format!("ledger verification failed at seq {}: {}", damage.seq, damage.problem),
        MAX_TEXT_BYTES,
    )
}

fn enable_draft(source: SafeModeSource, reason: String) -> Draft {
    Draft::new(events::SAFE_MODE_ENABLED, SERVICE_PRINCIPAL)
        .severity(Severity::Critical)
        .reason(reason)
        .meta("source", source.as_str())
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}
