//! Emergency overrides: single-use, time-bound, audited permissions for a sibling to force one
//! action its own gate refused. They never lift safe mode.
//!
//! An override lives in the ledger only: `override.granted` (its id, scope, time to live from
//! the event's time, and the SHA-256 of its token, never the token), then at most one of `override.consumed`,
//! `override.revoked` or `override.expired`. Every presentation of a token that can no longer be
//! used is refused and recorded as `override.reuse_denied`. Decisions run in the ledger writer,
//! so two callers racing to consume one token cannot both win.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::ledger::clock::Clock;
use crate::ledger::record::{
    Draft, InvalidField, MAX_NAME_CHARS, MAX_TEXT_BYTES, Record, Severity, check_bytes,
    check_chars, format_time,
};
use crate::ledger::{AppendError, Decision, Ledger};
use crate::state::State;

pub const GRANTED: &str = "override.granted";
pub const CONSUMED: &str = "override.consumed";
pub const REVOKED: &str = "override.revoked";
pub const EXPIRED: &str = "override.expired";
pub const REUSE_DENIED: &str = "override.reuse_denied";

/// Shortest grant reason, in characters.
pub const MIN_REASON_CHARS: usize = 10;
/// Shortest and longest time to live.
pub const TTL_SECONDS: std::ops::RangeInclusive<u32> = 60..=86_400;
/// How often expiry is checked.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// One override, as the ledger tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub id: String,
    pub reason: String,
    pub scope: String,
    pub granted_by: String,
    pub granted_at: i64,
    pub expires_at: i64,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// How it ended, once it has.
    pub end: Option<End>,
}

/// How an override stopped being usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Consumed { by: String, at: i64, purpose: String },
    Revoked { by: String, at: i64, reason: String },
    Expired { at: i64 },
}

/// Where an override stands at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Active,
    Consumed,
    Revoked,
    /// Past its expiry, recorded or not.
    Expired,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Active => "active",
            Standing::Consumed => "consumed",
            Standing::Revoked => "revoked",
            Standing::Expired => "expired",
        }
    }
}

impl Override {
    /// Its standing at `now` (microseconds): expiry counts from the moment it passes, before
    /// `override.expired` is on record.
    pub fn standing(&self, now: i64) -> Standing {
        match &self.end {
            Some(End::Consumed { .. }) => Standing::Consumed,
            Some(End::Revoked { .. }) => Standing::Revoked,
            Some(End::Expired { .. }) => Standing::Expired,
            None if now >= self.expires_at => Standing::Expired,
            None => Standing::Active,
        }
    }

    /// Folds an `override.granted` record.
    pub fn from_record(record: &Record) -> Option<Override> {
        let meta = |key: &str| record.metadata.get(key).cloned();
        let granted_at = record.time_micros()?;
        let ttl: i64 = meta("ttl_seconds")?.parse().ok()?;
        Some(Override {
            id: meta("override_id")?,
            reason: record.reason.clone().unwrap_or_default(),
            scope: meta("scope").unwrap_or_default(),
            granted_by: record.source.clone(),
            granted_at,
            expires_at: granted_at.saturating_add(ttl.saturating_mul(1_000_000)),
            token_sha256: meta("token_sha256")?,
            end: None,
        })
    }

    /// Folds a record that ends an override (consumed, revoked, expired); other records and
    /// overrides that already ended are left alone.
    pub fn end_with(&mut self, record: &Record) {
        if self.end.is_some() {
            return;
        }
        let at = record.time_micros().unwrap_or(self.expires_at);
        let meta = |key: &str| record.metadata.get(key).cloned().unwrap_or_default();
        self.end = match record.event_type.as_str() {
            CONSUMED => {
                Some(End::Consumed { by: record.source.clone(), at, purpose: meta("purpose") })
            }
            REVOKED => Some(End::Revoked {
                by: record.source.clone(),
                at,
                reason: record.reason.clone().unwrap_or_default(),
            }),
            EXPIRED => Some(End::Expired { at }),
            _ => None,
        };
    }
}

/// True while any override can still be consumed at `now`.
pub fn any_active(state: &State, now: i64) -> bool {
    state.overrides.values().any(|o| o.standing(now) == Standing::Active)
}

/// Why an override call failed.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("{0}")]
    NotFound(String),
    /// The override exists but can no longer be used (or revoked); the attempt is on record.
    #[error("{0}")]
    Refused(String),
    #[error("the ledger cannot record this right now: {0}")]
    Unavailable(String),
}

impl From<AppendError> for OverrideError {
    fn from(e: AppendError) -> OverrideError {
        match e {
            AppendError::Closed => OverrideError::Unavailable("brain-ops is shutting down".into()),
            other => OverrideError::Unavailable(other.to_string()),
        }
    }
}

/// A granted override and its token, which is shown only here.
#[derive(Clone, Debug)]
pub struct Granted {
    pub granted: Override,
    pub token: String,
}

/// The override domain handle.
#[derive(Debug)]
pub struct Overrides {
    ledger: Ledger,
    clock: Arc<dyn Clock>,
}

impl Overrides {
    pub fn new(ledger: Ledger, clock: Arc<dyn Clock>) -> Overrides {
        Overrides { ledger, clock }
    }

    /// Grants an override valid for `ttl_seconds` from now.
    pub async fn grant(
        &self,
        principal: &str,
        reason: String,
        ttl_seconds: u32,
        scope: String,
    ) -> Result<Granted, OverrideError> {
        if reason.trim().chars().count() < MIN_REASON_CHARS {
            return Err(InvalidField::new(
                "reason",
                format!(
                    "must be at least {MIN_REASON_CHARS} characters: say why the override is needed"
                ),
            )
            .into());
        }
        check_bytes("reason", Some(&reason), MAX_TEXT_BYTES)?;
        if !TTL_SECONDS.contains(&ttl_seconds) {
            return Err(InvalidField::new(
                "ttl_seconds",
                format!(
                    "is {ttl_seconds}; it must be from {} to {} seconds",
                    TTL_SECONDS.start(),
                    TTL_SECONDS.end()
                ),
            )
            .into());
        }
        check_scope(&scope)?;
        let id = format!("ovr-{}", hex::encode(random::<8>()?));
        let token = format!("brainovr_{}", hex::encode(random::<32>()?));
        let draft = Draft::new(GRANTED, principal)
            .severity(Severity::Warning)
            .reason(reason)
            .meta("override_id", id.clone())
            .meta("scope", scope)
            .meta("ttl_seconds", ttl_seconds.to_string())
            .meta("token_sha256", digest(&token));
        self.ledger.append(vec![draft]).await?;
        let state = self.ledger.durable_state();
        let granted = state.overrides.get(&id).cloned().ok_or_else(|| {
            OverrideError::Unavailable("the granted override is not in the state".into())
        })?;
        Ok(Granted { granted, token })
    }

    /// Consumes the override `token` stands for, once. A token that was consumed, revoked or has
    /// expired is refused, and the attempt is recorded (CRITICAL).
    pub async fn consume(
        &self,
        principal: &str,
        token: &str,
        purpose: String,
    ) -> Result<Override, OverrideError> {
        check_bytes("purpose", Some(&purpose), MAX_TEXT_BYTES)?;
        if token.is_empty() {
            return Err(InvalidField::new("token", "is required").into());
        }
        let token_sha256 = digest(token);
        let now = self.clock.now_micros();
        let principal = principal.to_owned();
        let verdict = Arc::new(Mutex::new(None));
        let outcome = verdict.clone();
        let decided = self
            .ledger
            .decide(move |state| {
                let found = state.overrides.values().find(|o| o.token_sha256 == token_sha256);
                let Some(found) = found else { return Decision::default() };
                let standing = found.standing(now);
                *outcome.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((found.id.clone(), standing));
                let mut drafts = Vec::new();
                if standing == Standing::Active {
                    drafts.push(
                        Draft::new(CONSUMED, &principal)
                            .severity(Severity::Warning)
                            .reason(format!("override {} consumed", found.id))
                            .meta("override_id", found.id.clone())
                            .meta("scope", found.scope.clone())
                            .meta("purpose", purpose),
                    );
                } else {
                    if standing == Standing::Expired && found.end.is_none() {
                        drafts.push(expired_draft(found));
                    }
                    drafts.push(
                        Draft::new(REUSE_DENIED, &principal)
                            .severity(Severity::Critical)
                            .reason(format!(
                                "override {} presented by {principal} but it is {}",
                                found.id,
                                standing.as_str()
                            ))
                            .meta("override_id", found.id.clone())
                            .meta("state", standing.as_str())
                            .meta("purpose", purpose),
                    );
                }
                Decision { drafts, safe_direction: false }
            })
            .await?;
        let verdict = verdict.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((id, standing)) = verdict else {
            return Err(OverrideError::NotFound("no override has this token".into()));
        };
        let current = decided.state.overrides.get(&id).cloned();
        match (standing, current) {
            (Standing::Active, Some(consumed)) => Ok(consumed),
            (Standing::Active, None) => {
                Err(OverrideError::Unavailable("the override is not in the state".into()))
            }
            (standing, _) => Err(OverrideError::Refused(format!(
                "override {id} is {}; an override is single-use and time-bound. The attempt is recorded.",
                standing.as_str()
            ))),
        }
    }

    /// Revokes an active override.
    pub async fn revoke(
        &self,
        principal: &str,
        id: String,
        reason: String,
    ) -> Result<Override, OverrideError> {
        if id.is_empty() {
            return Err(InvalidField::new("id", "is required").into());
        }
        check_chars("id", Some(&id), MAX_NAME_CHARS)?;
        if reason.trim().is_empty() {
            return Err(InvalidField::new("reason", "is required").into());
        }
        check_bytes("reason", Some(&reason), MAX_TEXT_BYTES)?;
        let now = self.clock.now_micros();
        let principal = principal.to_owned();
        let key = id.clone();
        let decided = self
            .ledger
            .decide(move |state| match state.overrides.get(&key) {
                Some(found) if found.standing(now) == Standing::Active => Decision {
                    drafts: vec![
                        Draft::new(REVOKED, &principal)
                            .severity(Severity::Warning)
                            .reason(reason)
                            .meta("override_id", key.clone()),
                    ],
                    safe_direction: false,
                },
                _ => Decision::default(),
            })
            .await?;
        let current = decided.state.overrides.get(&id).cloned();
        match current {
            None => Err(OverrideError::NotFound(format!("no override has id {id:?}"))),
            Some(o) if decided.changed => Ok(o),
            Some(o) => Err(OverrideError::Refused(format!(
                "override {id} is {} and cannot be revoked",
                o.standing(now).as_str()
            ))),
        }
    }

    /// Overrides, newest first; only those that can still be consumed unless `include_inactive`.
    pub fn list(&self, include_inactive: bool) -> Vec<(Override, Standing)> {
        let now = self.clock.now_micros();
        let state = self.ledger.state();
        let mut all: Vec<(Override, Standing)> = state
            .overrides
            .values()
            .map(|o| (o.clone(), o.standing(now)))
            .filter(|(_, standing)| include_inactive || *standing == Standing::Active)
            .collect();
        all.sort_by(|a, b| b.0.granted_at.cmp(&a.0.granted_at).then(b.0.id.cmp(&a.0.id)));
        all
    }

    /// The standing of an override at this moment.
    pub fn standing(&self, o: &Override) -> Standing {
        o.standing(self.clock.now_micros())
    }

    /// Records `override.expired` for every override past its expiry, once.
    pub async fn expire_due(&self) {
        let now = self.clock.now_micros();
        let due = |state: &State| {
            state.overrides.values().any(|o| o.end.is_none() && o.expires_at <= now)
        };
        if !due(&self.ledger.state()) {
            return;
        }
        let decided = self
            .ledger
            .decide(move |state| Decision {
                drafts: state
                    .overrides
                    .values()
                    .filter(|o| o.end.is_none() && o.expires_at <= now)
                    .map(expired_draft)
                    .collect(),
                safe_direction: false,
            })
            .await;
        if let Err(error) = decided {
            tracing::warn!(%error, "could not record an override expiry; retrying");
        }
    }

    /// Records expiries as they fall due, until the task is dropped.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.expire_due().await;
        }
    }
}

fn expired_draft(o: &Override) -> Draft {
    Draft::new(EXPIRED, crate::safe_mode::SERVICE_PRINCIPAL)
        .reason(format!("override {} expired unused at {}", o.id, format_time(o.expires_at)))
        .meta("override_id", o.id.clone())
        .meta("scope", o.scope.clone())
}

/// A scope names the action an override allows: like an event type, lowercase letters, digits,
/// `.`, `_` and `-`.
fn check_scope(scope: &str) -> Result<(), InvalidField> {
    if scope.is_empty() {
        return Err(InvalidField::new(
            "scope",
            "is required: name the action the override allows, e.g. sovereign.mode_change",
        ));
    }
    check_chars("scope", Some(scope), MAX_NAME_CHARS)?;
    if !scope.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)) {
        return Err(InvalidField::new(
            "scope",
            "may hold only lowercase letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

/// Hex SHA-256 of a token's UTF-8 bytes: what the ledger keeps instead of the token.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random<const N: usize>() -> Result<[u8; N], OverrideError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| {
        OverrideError::Unavailable(format!("the OS random number generator failed: {e}"))
    })?;
    Ok(bytes)
}
