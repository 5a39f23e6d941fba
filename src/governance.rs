//! The governance configuration: the platform's bundle, network and audit policy, read from the
//! TOML file `BRAIN_GOVERNANCE_CONFIG` and recorded whole in the ledger
//! (`system.governance_config_loaded`) whenever its digest changes, so that an evidence pack shows
//! the configuration in force at its `as_of`. The siblings enforce the bundle and network settings;
//! brain-ops validates, records and publishes them. It also lists retired signing keys, which
//! `GetPublicKeys` publishes so that packs signed before a key rotation still verify.
//!
//! The schema is documented in `docs/GOVERNANCE.md`; validation is strict (unknown keys, wrong
//! types and missing sections are errors naming the field).

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::evidence::keys::key_id_of;
use crate::ledger::record::{Draft, Record, Severity};
use crate::state::events;

/// Largest governance config file.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
/// Largest config once JSON-escaped into its ledger event.
const MAX_RECORDED_BYTES: usize = 72 * 1024;
/// Most allowed domains and retired keys.
const MAX_LIST: usize = 1000;
/// Metadata keys of `system.governance_config_loaded`.
pub const SHA256_KEY: &str = "sha256";
pub const TOML_KEY: &str = "config_toml";

/// The governance configuration, schema version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Schema version; must be 1.
    pub version: u32,
    pub bundles: Bundles,
    pub network: Network,
    pub audit: Audit,
    #[serde(default)]
    pub signing: Signing,
}

/// How bundles are validated and what happens when they fail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundles {
    /// Every bundle is fully validated (hash, manifest, signature) before it loads.
    pub strict_validation: bool,
    /// Bundles without a signature may load.
    pub allow_unsigned: bool,
    /// A bundle that fails validation is quarantined.
    pub quarantine_on_failure: bool,
    /// The bundle loaded when the active one is quarantined; none when absent.
    #[serde(default)]
    pub fallback_bundle: Option<String>,
}

/// Outbound network policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Network guards (the IPv6 gate and the domain allow-list) are enforced.
    pub guards_enabled: bool,
    /// Domains that may be reached; `*.` allows every subdomain.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
}

/// What the siblings report to the ledger. brain-ops itself never drops an event it is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    pub record_mode_changes: bool,
    pub record_bundle_events: bool,
    pub record_executor_events: bool,
    pub record_override_usage: bool,
}

/// Signing keys no longer in use whose packs must still verify.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signing {
    #[serde(default)]
    pub retired_keys: Vec<RetiredKey>,
}

/// A retired Ed25519 public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredKey {
    /// First 16 hex digits of SHA-256 of the raw public key.
    pub key_id: String,
    /// The raw 32-byte public key, base64.
    pub public_key: String,
    /// RFC 3339 time of the retirement, for the record.
    #[serde(default)]
    pub retired_at: Option<String>,
}

impl RetiredKey {
    /// The raw key (validated when the config was read).
    pub fn raw(&self) -> Option<[u8; 32]> {
        BASE64.decode(&self.public_key).ok().and_then(|k| k.try_into().ok())
    }
}

/// Why a governance config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A governance config as read from its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub config: GovernanceConfig,
    /// The file's text, recorded whole.
    pub text: String,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
}

impl Loaded {
    /// Reads and validates the file.
    pub fn from_file(path: &Path) -> Result<Loaded, GovernanceError> {
        let invalid = |message: String| GovernanceError::Invalid { path: path.to_owned(), message };
        let size = std::fs::metadata(path)
            .map_err(|source| GovernanceError::Read { path: path.to_owned(), source })?
            .len();
        if size > MAX_FILE_BYTES as u64 {
            return Err(invalid(format!("is {size} bytes; at most {MAX_FILE_BYTES}")));
        }
        let bytes = std::fs::read(path)
            .map_err(|source| GovernanceError::Read { path: path.to_owned(), source })?;
        let text = String::from_utf8(bytes).map_err(|_| invalid("is not UTF-8".into()))?;
        Loaded::parse(text).map_err(invalid)
    }

    /// Validates a config text.
    pub fn parse(text: String) -> Result<Loaded, String> {
        if text.len() > MAX_FILE_BYTES {
            return Err(format!("is {} bytes; at most {MAX_FILE_BYTES}", text.len()));
        }
        let config: GovernanceConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        config.validate()?;
        let escaped = serde_json::to_string(&text).map_err(|e| e.to_string())?.len();
        if escaped > MAX_RECORDED_BYTES {
            return Err(format!(
                "is {escaped} bytes once escaped for the ledger; at most {MAX_RECORDED_BYTES}"
            ));
        }
        let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(Loaded { config, text, sha256 })
    }

    /// The event that records this config.
    pub fn draft(&self, source: &str) -> Draft {
        Draft::new(events::GOVERNANCE_CONFIG_LOADED, source)
            .reason("governance configuration loaded")
            .meta(SHA256_KEY, self.sha256.clone())
            .meta(TOML_KEY, self.text.clone())
    }
}

impl GovernanceConfig {
    fn validate(&self) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!(
                "version {} is not supported; this brain-ops reads 1",
                self.version
            ));
        }
        if let Some(bundle) = &self.bundles.fallback_bundle
            && (bundle.is_empty() || bundle.chars().count() > 256)
        {
            return Err("bundles.fallback_bundle must be 1 to 256 characters".into());
        }
        if self.network.allowed_domains.len() > MAX_LIST {
            return Err(format!("network.allowed_domains has more than {MAX_LIST} entries"));
        }
        for (i, domain) in self.network.allowed_domains.iter().enumerate() {
            if !is_domain_pattern(domain) {
                return Err(format!(
                    "network.allowed_domains[{i}] {domain:?} is not a lowercase domain name \
                     (optionally starting with \"*.\")"
                ));
            }
        }
        if self.signing.retired_keys.len() > MAX_LIST {
            return Err(format!("signing.retired_keys has more than {MAX_LIST} entries"));
        }
        for (i, key) in self.signing.retired_keys.iter().enumerate() {
            let field = format!("signing.retired_keys[{i}]");
            let raw = key.raw().ok_or_else(|| {
                format!("{field}.public_key is not a base64 raw 32-byte Ed25519 public key")
            })?;
            if ed25519_dalek::VerifyingKey::from_bytes(&raw).is_err() {
                return Err(format!("{field}.public_key is not a valid Ed25519 point"));
            }
            let id = key_id_of(&raw);
            if key.key_id != id {
                return Err(format!(
                    "{field}.key_id {:?} does not match its public key (whose key_id is {id})",
                    key.key_id
                ));
            }
            if let Some(at) = &key.retired_at
                && chrono::DateTime::parse_from_rfc3339(at).is_err()
            {
                return Err(format!("{field}.retired_at {at:?} is not an RFC 3339 time"));
            }
        }
        Ok(())
    }
}

/// `example.org`, `*.example.org`: lowercase labels of letters, digits and inner hyphens.
fn is_domain_pattern(pattern: &str) -> bool {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    name.len() <= 253 && name.contains('.') && name.split('.').all(label_ok)
}

/// The config in force, as the ledger recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InForce {
    /// Seq and time of the `system.governance_config_loaded` event.
    pub seq: u64,
    pub time: String,
    pub sha256: String,
    pub text: String,
    /// `None` if the recorded text no longer parses (recorded by another version).
    pub config: Option<GovernanceConfig>,
}

impl InForce {
    /// The config a `system.governance_config_loaded` record carries.
    pub fn from_record(record: &Record) -> InForce {
        let text = record.metadata.get(TOML_KEY).cloned().unwrap_or_default();
        InForce {
            seq: record.seq,
            time: record.time.clone(),
            sha256: record.metadata.get(SHA256_KEY).cloned().unwrap_or_default(),
            config: toml::from_str(&text).ok(),
            text,
        }
    }

    /// The retired keys it lists.
    pub fn retired_keys(&self) -> &[RetiredKey] {
        self.config.as_ref().map_or(&[], |c| &c.signing.retired_keys)
    }
}

/// What to record, given the config in force and the config file (if any): the file's config
/// when its digest differs, a removal when no file is configured any more, else nothing.
pub fn change(in_force: Option<&InForce>, configured: Option<&Loaded>, source: &str) -> Vec<Draft> {
    match (in_force, configured) {
        (Some(now), Some(new)) if now.sha256 == new.sha256 => vec![],
        (_, Some(new)) => vec![new.draft(source)],
        (Some(_), None) => vec![
            Draft::new(events::GOVERNANCE_CONFIG_REMOVED, source)
                .severity(Severity::Warning)
                .reason("no governance configuration is configured any more"),
        ],
        (None, None) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../deploy/governance.toml");

    #[test]
    fn the_shipped_example_is_valid() {
        let loaded = Loaded::parse(EXAMPLE.to_owned()).expect("the example is valid");
        assert!(loaded.config.bundles.strict_validation);
        assert_eq!(loaded.sha256.len(), 64);
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_refused_by_name() {
        let cases = [
            (EXAMPLE.replace("version = 1", "version = 2"), "version 2"),
            (
                EXAMPLE.replace("allow_unsigned = false", "allow_unsigned = \"no\""),
                "allow_unsigned",
            ),
            (EXAMPLE.replace("[audit]", "[audit]\nrecord_everything = true"), "record_everything"),
            (EXAMPLE.replace("\"api.brain.internal\"", "\"API.example\""), "allowed_domains[0]"),
            (EXAMPLE.replace("[network]", "[networks]"), "networks"),
        ];
        for (text, named) in cases {
            let error = Loaded::parse(text).expect_err("invalid");
            assert!(error.contains(named), "{named}: {error}");
        }
        let big = format!("{EXAMPLE}\n#{}\n", "x".repeat(MAX_FILE_BYTES));
        assert!(Loaded::parse(big).expect_err("too large").contains("at most"));
    }

    #[test]
    fn a_retired_key_must_carry_its_own_key_id() {
        let signer = crate::evidence::keys::Signer::generate().expect("random");
        let entry = |id: &str| {
            format!(
                "{EXAMPLE}\n[[signing.retired_keys]]\nkey_id = \"{id}\"\npublic_key = \"{}\"\n",
                signer.public_key_base64()
            )
        };
        let loaded = Loaded::parse(entry(signer.key_id())).expect("valid");
        assert_eq!(loaded.config.signing.retired_keys.len(), 1);
        let error = Loaded::parse(entry("0000000000000000")).expect_err("wrong id");
        assert!(error.contains("signing.retired_keys[0].key_id"), "{error}");
    }

    #[test]
    fn only_a_changed_digest_is_recorded() {
        let loaded = Loaded::parse(EXAMPLE.to_owned()).expect("valid");
        let same = InForce {
            seq: 3,
            time: String::new(),
            sha256: loaded.sha256.clone(),
            text: loaded.text.clone(),
            config: Some(loaded.config.clone()),
        };
        assert!(change(Some(&same), Some(&loaded), "brain-ops").is_empty());
        assert_eq!(change(None, Some(&loaded), "brain-ops").len(), 1);
        let other = InForce { sha256: "0".repeat(64), ..same.clone() };
        assert_eq!(change(Some(&other), Some(&loaded), "brain-ops").len(), 1);
        let removed = change(Some(&same), None, "brain-ops");
        assert_eq!(removed[0].event_type, events::GOVERNANCE_CONFIG_REMOVED);
        assert!(change(None, None, "brain-ops").is_empty());
    }
}
