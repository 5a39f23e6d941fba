//! The in-memory projection of the ledger. Every field is derived from records alone, so the
//! state after a restart equals the state before it. The writer applies records to a pending copy
//! as it stages them and publishes the copy once they are durable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::governance::InForce;
use crate::overrides::{self, End, Override};

use crate::ledger::record::{Mode, Record, parse_time};

/// Event types that drive the projection.
pub mod events {
    pub const SAFE_MODE_ENABLED: &str = "system.safe_mode_enabled";
    pub const SAFE_MODE_DISABLED: &str = "system.safe_mode_disabled";
    pub const INTEGRITY_VIOLATION: &str = "system.integrity_violation";
    pub const INTEGRITY_ACKNOWLEDGED: &str = "system.integrity_acknowledged";
    pub const CLOCK_REGRESSION: &str = "system.clock_regression";
    pub const EXECUTION_BLOCKED: &str = "system.safe_mode_execution_blocked";
    pub const SAFE_MODE_VIOLATION: &str = "system.safe_mode_violation";
    pub const OVERRIDE_VIOLATION: &str = "system.override_violation";
    pub const PERMISSION_DENIED: &str = "system.permission_denied";
    pub const MODE_CHANGED: &str = "sovereign.mode_changed";
    pub const BUNDLE_QUARANTINED: &str = "sovereign.bundle_quarantined";
    pub const BUNDLE_RELEASED: &str = "sovereign.bundle_released";
    pub const STEP_FAILED: &str = "factory.step_failed";
    pub const EXECUTION_FAILED: &str = "factory.execution_failed";
    pub const STEP_COMPLETED: &str = "factory.step_completed";
    pub const EXECUTION_COMPLETED: &str = "factory.execution_completed";
    pub const GOVERNANCE_CONFIG_LOADED: &str = crate::ledger::record::GOVERNANCE_CONFIG_EVENT;
    pub const GOVERNANCE_CONFIG_REMOVED: &str = "system.governance_config_removed";
    pub const CHECKPOINT: &str = "system.checkpoint";
}

/// The kinds of operation safe mode blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OperationKind {
    Execution = 0,
    Deployment = 1,
    BundleLoad = 2,
}

impl OperationKind {
    pub const ALL: [OperationKind; 3] =
        [OperationKind::Execution, OperationKind::Deployment, OperationKind::BundleLoad];

    /// The lowercase name stored in metadata `kind` and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Execution => "execution",
            OperationKind::Deployment => "deployment",
            OperationKind::BundleLoad => "bundle_load",
        }
    }

    /// How operators name the kind.
    pub fn label(self) -> &'static str {
        match self {
            OperationKind::Execution => "Factory execution",
            OperationKind::Deployment => "Deployment",
            OperationKind::BundleLoad => "Bundle load",
        }
    }

    pub fn parse(name: &str) -> Option<OperationKind> {
        OperationKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Why safe mode is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SafeModeSource {
    Api,
    Env,
    Integrity,
    Storage,
}

impl SafeModeSource {
    /// The lowercase name stored in metadata `source`.
    pub fn as_str(self) -> &'static str {
        match self {
            SafeModeSource::Api => "api",
            SafeModeSource::Env => "env",
            SafeModeSource::Integrity => "integrity",
            SafeModeSource::Storage => "storage",
        }
    }

    pub fn parse(name: &str) -> Option<SafeModeSource> {
        Some(match name {
            "api" => SafeModeSource::Api,
            "env" => SafeModeSource::Env,
            "integrity" => SafeModeSource::Integrity,
            "storage" => SafeModeSource::Storage,
            _ => return None,
        })
    }
}

/// The kill switch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SafeMode {
    pub enabled: bool,
    /// Seq of the event that last changed safe mode; 0 if it never changed.
    pub revision: u64,
    /// Microseconds since the epoch; set while enabled.
    pub enabled_at: Option<i64>,
    pub reason: Option<String>,
    /// The principal that enabled it.
    pub enabled_by: Option<String>,
    pub source: Option<SafeModeSource>,
}

/// Integrity damage reported and acknowledged in the ledger, as `<seq>:<digest>` tags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntegrityRecord {
    pub reported: BTreeSet<String>,
    pub acknowledged: BTreeSet<String>,
}

/// The newest durable record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    /// Event time of the head in microseconds; later events never get an earlier time.
    pub time_micros: i64,
}

impl Default for Head {
    fn default() -> Head {
        Head { seq: 0, hash: crate::ledger::record::GENESIS_HASH.to_owned(), time_micros: i64::MIN }
    }
}

/// Everything the service knows, derived from the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub head: Head,
    pub safe_mode: SafeMode,
    pub integrity: IntegrityRecord,
    pub clock_regressions: u64,
    /// Blocked `CheckOperation` calls by kind (execution, deployment, bundle load).
    pub blocked: [u64; 3],
    /// The operational picture reported by the siblings.
    pub operations: Operations,
    /// Refusals and violations on record.
    pub violations: Violations,
    /// Emergency overrides by id, from `override.*` events.
    pub overrides: BTreeMap<String, Override>,
    /// The governance configuration in force (`None` until one is recorded).
    pub governance: Option<Arc<InForce>>,
    /// The newest signed checkpoint.
    pub checkpoint: Option<Checkpoint>,
}

/// What the siblings report, folded into the numbers dashboards use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operations {
    /// The current operation mode (`None` until a sibling reports one; shown as online).
    pub mode: Option<Mode>,
    /// `sovereign.mode_changed` events whose mode really changed.
    pub mode_switches: u64,
    /// Quarantines, not counting a bundle again while it is still quarantined.
    pub quarantines: u64,
    /// Bundles quarantined and not released since.
    pub quarantined_bundles: BTreeSet<String>,
    /// `factory.step_failed` + `factory.execution_failed`.
    pub executor_failures: u64,
    /// Microseconds of the last successful execution or step; `None` if there was none.
    pub last_success_micros: Option<i64>,
}

/// Counts of what went wrong, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Violations {
    pub safe_mode: u64,
    pub override_use: u64,
    /// Refused calls (sum of the counts of `system.permission_denied`).
    pub permission_denied: u64,
    /// `system.integrity_violation` events.
    pub integrity: u64,
}

/// Metadata key listing damage tags in integrity events, comma-separated.
pub const DAMAGE_KEY: &str = "damaged";

impl State {
    /// Folds one record into the state.
    pub fn apply(&mut self, record: &Record) {
        // Field by field, reusing the hash's allocation: start-up folds a million records.
        self.head.seq = record.seq;
        self.head.hash.clone_from(&record.hash);
        self.head.time_micros =
            parse_time(&record.time).unwrap_or(self.head.time_micros).max(self.head.time_micros);
        match record.event_type.as_str() {
            events::SAFE_MODE_ENABLED => {
                self.safe_mode = SafeMode {
                    enabled: true,
                    revision: record.seq,
                    enabled_at: parse_time(&record.time),
                    reason: record.reason.clone(),
                    enabled_by: Some(record.source.clone()),
                    source: record.metadata.get("source").and_then(|s| SafeModeSource::parse(s)),
                };
            }
            events::SAFE_MODE_DISABLED => {
                self.safe_mode = SafeMode { revision: record.seq, ..SafeMode::default() };
            }
            events::INTEGRITY_VIOLATION => {
                self.integrity.reported.extend(damage_tags(record));
                self.violations.integrity += 1;
            }
            events::SAFE_MODE_VIOLATION => self.violations.safe_mode += 1,
            overrides::GRANTED => {
                if let Some(granted) = Override::from_record(record) {
                    self.overrides.insert(granted.id.clone(), granted);
                }
            }
            overrides::CONSUMED | overrides::REVOKED | overrides::EXPIRED => {
                let id = record.metadata.get("override_id");
                if let Some(found) = id.and_then(|id| self.overrides.get_mut(id)) {
                    found.end_with(record);
                }
            }
            events::OVERRIDE_VIOLATION => self.violations.override_use += 1,
            events::PERMISSION_DENIED => self.violations.permission_denied += count(record),
            events::MODE_CHANGED => {
                if record.mode_after.is_some() && record.mode_before != record.mode_after {
                    self.operations.mode_switches += 1;
                }
                if let Some(mode) = record.mode_after {
                    self.operations.mode = Some(mode);
                }
            }
            events::BUNDLE_QUARANTINED => {
                let bundle = record.bundle_id.clone().unwrap_or_default();
                if self.operations.quarantined_bundles.insert(bundle) {
                    self.operations.quarantines += 1;
                }
            }
            events::BUNDLE_RELEASED => {
                let bundle = record.bundle_id.clone().unwrap_or_default();
                self.operations.quarantined_bundles.remove(&bundle);
            }
            events::STEP_FAILED | events::EXECUTION_FAILED => {
                self.operations.executor_failures += 1;
            }
            events::STEP_COMPLETED | events::EXECUTION_COMPLETED if record.success => {
                self.operations.last_success_micros = parse_time(&record.time);
            }
            events::INTEGRITY_ACKNOWLEDGED => {
                self.integrity.acknowledged.extend(damage_tags(record));
            }
            events::CLOCK_REGRESSION => self.clock_regressions += 1,
            events::GOVERNANCE_CONFIG_LOADED => {
                self.governance = Some(Arc::new(InForce::from_record(record)));
            }
            events::GOVERNANCE_CONFIG_REMOVED => self.governance = None,
            events::CHECKPOINT => self.checkpoint = Checkpoint::from_record(record),
            events::EXECUTION_BLOCKED => {
                let kind = record.metadata.get("kind").and_then(|k| OperationKind::parse(k));
                if let Some(kind) = kind {
                    self.blocked[kind as usize] += count(record);
                }
            }
            _ => {}
        }
    }
}

impl State {
    /// True when `id` names an override that was consumed.
    pub fn override_consumed(&self, id: &str) -> bool {
        self.overrides.get(id).is_some_and(|o| matches!(o.end, Some(End::Consumed { .. })))
    }
}

/// The `count` metadata of an event that may stand for several occurrences (1 when absent).
fn count(record: &Record) -> u64 {
    record.metadata.get("count").and_then(|c| c.parse().ok()).unwrap_or(1)
}

fn damage_tags(record: &Record) -> impl Iterator<Item = String> + '_ {
    record
        .metadata
        .get(DAMAGE_KEY)
        .into_iter()
        .flat_map(|list| list.split(','))
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
}
