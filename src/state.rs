//! The in-memory projection of the ledger. Every field is derived from records alone, so the
//! state after a restart equals the state before it. The writer applies records to a pending copy
//! as it stages them and publishes the copy once they are durable.

use std::collections::BTreeSet;

use crate::ledger::record::{Record, parse_time};

/// Event types that drive the projection.
pub mod events {
    pub const SAFE_MODE_ENABLED: &str = "system.safe_mode_enabled";
    pub const SAFE_MODE_DISABLED: &str = "system.safe_mode_disabled";
    pub const INTEGRITY_VIOLATION: &str = "system.integrity_violation";
    pub const INTEGRITY_ACKNOWLEDGED: &str = "system.integrity_acknowledged";
    pub const CLOCK_REGRESSION: &str = "system.clock_regression";
    pub const EXECUTION_BLOCKED: &str = "system.safe_mode_execution_blocked";
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
}

/// Metadata key listing damage tags in integrity events, comma-separated.
pub const DAMAGE_KEY: &str = "damaged";

impl State {
    /// Folds one record into the state.
    pub fn apply(&mut self, record: &Record) {
        self.head = Head {
            seq: record.seq,
            hash: record.hash.clone(),
            time_micros: parse_time(&record.time)
                .unwrap_or(self.head.time_micros)
                .max(self.head.time_micros),
        };
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
            }
            events::INTEGRITY_ACKNOWLEDGED => {
                self.integrity.acknowledged.extend(damage_tags(record));
            }
            events::CLOCK_REGRESSION => self.clock_regressions += 1,
            events::EXECUTION_BLOCKED => {
                let count = record.metadata.get("count").and_then(|c| c.parse::<u64>().ok());
                let kind = record.metadata.get("kind").and_then(|k| OperationKind::parse(k));
                if let Some(kind) = kind {
                    self.blocked[kind as usize] += count.unwrap_or(1);
                }
            }
            _ => {}
        }
    }
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
