//! Authentication and authorisation: bearer tokens map to principals by the SHA-256 digests in
//! the principals file; each principal has one role; each role may call a fixed set of RPCs
//! ([`MATRIX`], documented in docs/SECURITY.md). Without a principals file every caller is
//! `anonymous` with every role (loopback only, enforced by the configuration).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ledger::Ledger;
use crate::ledger::clock::Clock;
use crate::ledger::record::{Draft, Severity, format_time, truncate_utf8};
use crate::tally::PerSecondTally;

/// A role, as named in the principals file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Service,
    Operator,
    Auditor,
}

impl Role {
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "service" => Some(Role::Service),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// `None`: the anonymous caller of a service without a principals file, who has every role.
    pub role: Option<Role>,
}

impl Principal {
    pub fn anonymous() -> Principal {
        Principal { name: crate::grpc::ANONYMOUS.to_owned(), role: None }
    }
}

/// Which roles may call each RPC: (service, method, [service, operator, auditor]).
pub const MATRIX: [(&str, &str, [bool; 3]); 19] = [
    ("SafeModeService", "GetStatus", [true, true, true]),
    ("SafeModeService", "Enable", [true, true, false]),
    ("SafeModeService", "Disable", [false, true, false]),
    ("SafeModeService", "CheckOperation", [true, true, false]),
    ("SafeModeService", "Watch", [true, true, true]),
    ("AuditService", "Record", [true, true, false]),
    ("AuditService", "RecordBatch", [true, true, false]),
    ("AuditService", "List", [false, true, true]),
    ("AuditService", "VerifyChain", [false, true, true]),
    ("EvidenceService", "Export", [false, true, true]),
    ("EvidenceService", "ExportStream", [false, true, true]),
    ("EvidenceService", "Verify", [false, true, true]),
    ("EvidenceService", "VerifyStream", [false, true, true]),
    ("EvidenceService", "GetPublicKeys", [false, true, true]),
    ("MetricsService", "GetSummary", [true, true, true]),
    ("OverrideService", "Grant", [false, true, false]),
    ("OverrideService", "Consume", [true, true, false]),
    ("OverrideService", "Revoke", [false, true, false]),
    ("OverrideService", "List", [false, true, false]),
];

/// Refusals of these RPCs are CRITICAL: they are attempts to lift a freeze or grant an override.
const CRITICAL_RPCS: [&str; 2] = ["SafeModeService/Disable", "OverrideService/Grant"];

/// May `role` call the RPC at `path` (`/brain.ops.v1.<Service>/<Method>`)? Unknown RPCs are
/// refused.
pub fn permits(role: Option<Role>, path: &str) -> bool {
    let Some((service, method)) = rpc_of(path) else { return false };
    let Some((_, _, roles)) = MATRIX.iter().find(|(s, m, _)| *s == service && *m == method) else {
        return false;
    };
    match role {
        None => true,
        Some(Role::Service) => roles[0],
        Some(Role::Operator) => roles[1],
        Some(Role::Auditor) => roles[2],
    }
}

/// `(service, method)` of a brain-ops RPC path.
fn rpc_of(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/brain.ops.v1.")?;
    rest.split_once('/')
}

/// Paths that need no token: probes and tools must reach them.
pub fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// A principals file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PrincipalsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid TOML for a principals file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: principal[{index}].{field} {message}")]
    Invalid { path: PathBuf, index: usize, field: &'static str, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalsFile {
    #[serde(default)]
    principal: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    role: String,
    token_sha256: Option<String>,
    tls_identity: Option<String>,
}

/// The principals of one version of the file.
#[derive(Debug)]
pub struct Principals {
    tokens: Vec<([u8; 32], Arc<Principal>)>,
    tls_identities: Vec<(String, Arc<Principal>)>,
    /// SHA-256 of the file's bytes, for the audit trail of reloads.
    pub file_sha256: String,
}

impl Principals {
    /// Reads and validates a principals file.
    pub fn load(path: &Path) -> Result<Principals, PrincipalsError> {
        let bytes = std::fs::read(path)
            .map_err(|source| PrincipalsError::Read { path: path.to_owned(), source })?;
        Principals::parse(path, bytes)
    }

    /// Validates the bytes of a principals file read from `path`.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Principals, PrincipalsError> {
        let text = String::from_utf8(bytes).map_err(|_| PrincipalsError::Parse {
            path: path.to_owned(),
            message: "it is not UTF-8".into(),
        })?;
        let file: PrincipalsFile = toml::from_str(&text).map_err(|e| PrincipalsError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        let invalid = |index, field, message: String| PrincipalsError::Invalid {
            path: path.to_owned(),
            index,
            field,
            message,
        };
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        let mut identities = HashSet::new();
        let mut principals = Principals {
            tokens: Vec::new(),
            tls_identities: Vec::new(),
            file_sha256: String::new(),
        };
        for (index, entry) in file.principal.into_iter().enumerate() {
            let name = entry.name.trim().to_owned();
            if name.is_empty() || name.chars().count() > 256 {
                return Err(invalid(index, "name", "must be 1 to 256 characters".into()));
            }
            if name == crate::grpc::ANONYMOUS || name == crate::safe_mode::SERVICE_PRINCIPAL {
                return Err(invalid(index, "name", format!("{name:?} is reserved")));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(index, "name", format!("{name:?} appears twice")));
            }
            let role = Role::parse(&entry.role).ok_or_else(|| {
                invalid(
                    index,
                    "role",
                    format!("{:?} is not one of service, operator, auditor", entry.role),
                )
            })?;
            let principal = Arc::new(Principal { name, role: Some(role) });
            if entry.token_sha256.is_none() && entry.tls_identity.is_none() {
                return Err(invalid(
                    index,
                    "token_sha256",
                    "is required unless tls_identity names the principal's client certificate"
                        .into(),
                ));
            }
            if let Some(digest) = &entry.token_sha256 {
                let digest = parse_digest(digest).ok_or_else(|| {
                    invalid(
                        index,
                        "token_sha256",
                        "must be 64 hex digits: the SHA-256 of the token".into(),
                    )
                })?;
                if !digests.insert(digest) {
                    return Err(invalid(
                        index,
                        "token_sha256",
                        "is used by another principal".into(),
                    ));
                }
                principals.tokens.push((digest, principal.clone()));
            }
            if let Some(identity) = entry.tls_identity {
                let identity = identity.trim().to_owned();
                if identity.is_empty() || identity.chars().count() > 1024 {
                    return Err(invalid(
                        index,
                        "tls_identity",
                        "must be 1 to 1024 characters".into(),
                    ));
                }
                if !identities.insert(identity.clone()) {
                    return Err(invalid(
                        index,
                        "tls_identity",
                        format!("{identity:?} is used by another principal"),
                    ));
                }
                principals.tls_identities.push((identity, principal));
            }
        }
        principals.file_sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(principals)
    }

    /// The principal holding `token`. Compares against every digest in constant time.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (candidate, principal) in &self.tokens {
            if bool::from(candidate.ct_eq(&digest)) {
                found = Some(principal.clone());
            }
        }
        found
    }

    /// The principal whose `tls_identity` is the first of `identities` (a verified client
    /// certificate's URI SANs, DNS SANs and common names) that names one.
    pub fn by_tls_identity(&self, identities: &[String]) -> Option<Arc<Principal>> {
        identities.iter().find_map(|id| {
            self.tls_identities.iter().find(|(known, _)| known == id).map(|(_, p)| p.clone())
        })
    }

    /// Principals in the file.
    pub fn len(&self) -> usize {
        let mut names: Vec<&str> = self.tokens.iter().map(|(_, p)| p.name.as_str()).collect();
        names.extend(self.tls_identities.iter().map(|(_, p)| p.name.as_str()));
        names.sort_unstable();
        names.dedup();
        names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

/// Why a call was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, a malformed header, or a token nobody holds.
    Unauthenticated,
    /// A known principal whose role does not allow the RPC.
    Forbidden(Arc<Principal>),
}

/// Checks callers against the current principals (swapped atomically on reload).
#[derive(Debug)]
pub struct Authenticator {
    file: Option<(PathBuf, ArcSwap<Principals>)>,
}

impl Authenticator {
    /// No principals file: everyone is `anonymous` with every role.
    pub fn off() -> Authenticator {
        Authenticator { file: None }
    }

    /// Loads the principals file.
    pub fn from_file(path: &Path) -> Result<Authenticator, PrincipalsError> {
        let principals = Principals::load(path)?;
        Ok(Authenticator { file: Some((path.to_owned(), ArcSwap::from_pointee(principals))) })
    }

    pub fn is_on(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the file again; on any error the current principals stay in force.
    pub fn reload(&self) -> Result<Arc<Principals>, PrincipalsError> {
        let Some((path, current)) = &self.file else {
            return Err(PrincipalsError::Parse {
                path: PathBuf::new(),
                message: "no principals file is configured".into(),
            });
        };
        let principals = Arc::new(Principals::load(path)?);
        current.store(principals.clone());
        Ok(principals)
    }

    /// The principal behind an `authorization` header value or, without one, behind the
    /// identities of a verified client certificate, if it may call `path`. A header that is
    /// present must hold a valid token: it is never silently passed over for the certificate.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        tls_identities: &[String],
        path: &str,
    ) -> Result<Arc<Principal>, Refusal> {
        let principal = match &self.file {
            None => Arc::new(Principal::anonymous()),
            Some((_, principals)) => match authorization {
                Some(header) => {
                    let token = std::str::from_utf8(header)
                        .ok()
                        .and_then(|v| {
                            v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))
                        })
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .ok_or(Refusal::Unauthenticated)?;
                    principals.load().authenticate(token).ok_or(Refusal::Unauthenticated)?
                }
                None => principals
                    .load()
                    .by_tls_identity(tls_identities)
                    .ok_or(Refusal::Unauthenticated)?,
            },
        };
        if permits(principal.role, path) {
            Ok(principal)
        } else {
            Err(Refusal::Forbidden(principal))
        }
    }
}

/// Aggregation key of refusals: (peer, principal or "unauthenticated", RPC).
type DenialKey = (String, String, String);

/// Records refusals: the first per peer each second at once, the rest as aggregates with exact
/// counts, so that a flood cannot fill the ledger.
#[derive(Debug)]
pub struct DenialRecorder {
    ledger: Ledger,
    clock: Arc<dyn Clock>,
    tally: Mutex<PerSecondTally<IpAddr, DenialKey>>,
}

const UNAUTHENTICATED: &str = "unauthenticated";

impl DenialRecorder {
    pub fn new(ledger: Ledger, clock: Arc<dyn Clock>) -> DenialRecorder {
        let fold = |mut key: DenialKey| {
            "(other)".clone_into(&mut key.2);
            key
        };
        DenialRecorder { ledger, clock, tally: Mutex::new(PerSecondTally::new(1000, 10_000, fold)) }
    }

    /// Records one refusal of `path` from `peer`.
    pub async fn record(&self, refusal: &Refusal, path: &str, peer: Option<std::net::SocketAddr>) {
        let rpc = rpc_of(path).map_or_else(|| path.to_owned(), |(s, m)| format!("{s}/{m}"));
        let principal = match refusal {
            Refusal::Unauthenticated => UNAUTHENTICATED.to_owned(),
            Refusal::Forbidden(p) => p.name.clone(),
        };
        let peer_ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        let second = self.clock.now_micros().div_euclid(1_000_000);
        let key = (peer_ip.to_string(), principal, rpc);
        let first = self.lock().first_in_second(peer_ip, second);
        if first {
            let draft = denial_draft(&key, 1);
            if self.ledger.append(vec![draft]).await.is_ok() {
                return;
            }
        }
        self.lock().count(key, second, 1);
    }

    /// Writes the aggregates of finished seconds (of all when `all`); keeps what fails.
    pub async fn flush(&self, all: bool) {
        let now = self.clock.now_micros().div_euclid(1_000_000);
        let taken = self.lock().take(if all { None } else { Some(now) });
        if taken.is_empty() {
            return;
        }
        // One aggregate per peer and second, whatever mix of principals and RPCs it refused.
        let mut by_peer: BTreeMap<(i64, &str), Vec<(&DenialKey, u64)>> = BTreeMap::new();
        for ((second, key), n) in &taken {
            by_peer.entry((*second, key.0.as_str())).or_default().push((key, *n));
        }
        let drafts = by_peer
            .into_iter()
            .map(|((second, _), refusals)| aggregate_draft(second, &refusals))
            .collect();
        if self.ledger.append(drafts).await.is_err() {
            let mut tally = self.lock();
            for ((second, key), n) in taken {
                tally.count(key, second, n);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PerSecondTally<IpAddr, DenialKey>> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The aggregate of one peer's refusals in one second, after the first.
fn aggregate_draft(second: i64, refusals: &[(&DenialKey, u64)]) -> Draft {
    let total: u64 = refusals.iter().map(|(_, n)| n).sum();
    let principals: BTreeSet<&str> = refusals.iter().map(|(k, _)| k.1.as_str()).collect();
    let rpcs: BTreeSet<&str> = refusals.iter().map(|(k, _)| k.2.as_str()).collect();
    let (peer, principal, rpc) = refusals[0].0;
    let mut draft = if principals.len() == 1 && rpcs.len() == 1 {
        denial_draft(&(peer.clone(), principal.clone(), rpc.clone()), total)
    } else {
        // Several principals or RPCs: the service reports the mix.
        let critical = rpcs.iter().any(|r| CRITICAL_RPCS.contains(r));
        let breakdown: Vec<String> =
            refusals.iter().map(|((_, p, r), n)| format!("{p} {r} x{n}")).collect();
        Draft::new("system.permission_denied", crate::safe_mode::SERVICE_PRINCIPAL)
            .severity(if critical { Severity::Critical } else { Severity::Warning })
            .failed()
            .reason(format!("{total} calls from {peer} refused"))
            .meta("peer", peer.as_str())
            .meta("count", total.to_string())
            .meta("refusals", truncate_utf8(breakdown.join(", "), 1000))
    };
    draft = draft.meta("aggregated", "true").meta("window_start", format_time(second * 1_000_000));
    draft
}

fn denial_draft((peer, principal, rpc): &DenialKey, count: u64) -> Draft {
    let severity =
        if CRITICAL_RPCS.contains(&rpc.as_str()) { Severity::Critical } else { Severity::Warning };
    let why = if principal == UNAUTHENTICATED {
        "no valid bearer token"
    } else {
        "the principal's role does not allow this RPC"
    };
    Draft::new("system.permission_denied", principal.as_str())
        .severity(severity)
        .failed()
        .reason(format!("{rpc} refused: {why}"))
        .meta("rpc", rpc.as_str())
        .meta("peer", peer.as_str())
        .meta("principal", principal.as_str())
        .meta("count", count.to_string())
}

/// A fresh random token, shown once, and the digest to put in the principals file.
pub fn new_token() -> Result<(String, String), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let token = format!("brainops_{}", hex::encode(bytes));
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    Ok((token, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_is_read_by_role_and_unknown_rpcs_are_refused() {
        assert!(permits(Some(Role::Service), "/brain.ops.v1.SafeModeService/Enable"));
        assert!(!permits(Some(Role::Service), "/brain.ops.v1.SafeModeService/Disable"));
        assert!(permits(Some(Role::Operator), "/brain.ops.v1.SafeModeService/Disable"));
        assert!(!permits(Some(Role::Auditor), "/brain.ops.v1.AuditService/Record"));
        assert!(permits(Some(Role::Auditor), "/brain.ops.v1.EvidenceService/Export"));
        assert!(!permits(Some(Role::Operator), "/brain.ops.v1.AuditService/Delete"));
        assert!(permits(None, "/brain.ops.v1.SafeModeService/Disable"), "anonymous has every role");
    }

    #[test]
    fn one_aggregate_covers_a_peer_whatever_it_tried() {
        let key = |p: &str, r: &str| ("10.0.0.9".to_owned(), p.to_owned(), r.to_owned());
        let (a, b) =
            (key("svc", "SafeModeService/Disable"), key(UNAUTHENTICATED, "AuditService/List"));
        let mixed = aggregate_draft(7, &[(&a, 3), (&b, 4)]);
        assert_eq!(mixed.metadata["count"], "7");
        assert_eq!(mixed.source, crate::safe_mode::SERVICE_PRINCIPAL);
        assert_eq!(mixed.severity, Some(Severity::Critical), "a refused Disable is in the mix");
        assert!(mixed.metadata["refusals"].contains("svc SafeModeService/Disable x3"));
        let single = aggregate_draft(7, &[(&b, 4)]);
        assert_eq!(
            (single.source.as_str(), single.metadata["count"].as_str()),
            (UNAUTHENTICATED, "4")
        );
        assert_eq!(single.severity, Some(Severity::Warning));
    }
}
