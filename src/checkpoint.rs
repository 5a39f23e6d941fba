//! Signed checkpoints: a `system.checkpoint` event states "the head was seq N with hash H",
//! signed with the evidence key, appended periodically while events arrive and at shutdown. The
//! newest one is also kept outside the ledger in `checkpoint.json` in the data directory, so that
//! a ledger whose tail was cut off (or replaced) is caught at the next start, and its head goes out
//! as metrics, so that Prometheus holds a record from outside the machine as well.
//!
//! Signed message: the ASCII bytes of
//! `JCS({"format":"brain-checkpoint/1","head_hash":H,"head_seq":N,"key_id":K})`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::evidence::keys::{self, Signer};
use crate::ledger::record::{Draft, Record};
use crate::ledger::store::Storage;
use crate::ledger::verify::Damage;
use crate::ledger::{Appended, Decision};
use crate::safe_mode::SERVICE_PRINCIPAL;
use crate::state::{State, events};

/// Format of the signed message.
pub const FORMAT: &str = "brain-checkpoint/1";
/// The newest checkpoint, outside the ledger, in the data directory.
pub const FILE: &str = "checkpoint.json";

/// A checkpoint as recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Seq and hash of the `system.checkpoint` event itself.
    pub seq: u64,
    pub hash: String,
    /// The head it vouches for (the event just before it).
    pub head_seq: u64,
    pub head_hash: String,
    pub key_id: String,
    /// Ed25519 over [`message`], base64.
    pub signature: String,
}

impl Checkpoint {
    /// The checkpoint a `system.checkpoint` record carries.
    pub fn from_record(record: &Record) -> Option<Checkpoint> {
        let meta = |key: &str| record.metadata.get(key).cloned();
        Some(Checkpoint {
            seq: record.seq,
            hash: record.hash.clone(),
            head_seq: meta("head_seq")?.parse().ok()?,
            head_hash: meta("head_hash")?,
            key_id: meta("key_id")?,
            signature: meta("signature")?,
        })
    }

    /// Checks the signature against a raw Ed25519 public key (strict).
    pub fn signature_verifies(&self, public_key: &[u8; 32]) -> bool {
        let message = message(self.head_seq, &self.head_hash, &self.key_id);
        keys::verifies(public_key, message.as_bytes(), &self.signature)
    }
}

/// The signed message of a checkpoint.
pub fn message(head_seq: u64, head_hash: &str, key_id: &str) -> String {
    let value = serde_json::json!({
        "format": FORMAT, "head_hash": head_hash, "head_seq": head_seq, "key_id": key_id,
    });
    serde_json_canonicalizer::to_string(&value).unwrap_or_default()
}

/// Appends a checkpoint of the pending head unless the newest event already is one (or the ledger
/// is empty): nothing new, nothing to vouch for.
pub fn decision(signer: Arc<Signer>) -> impl FnOnce(&State) -> Decision + Send + 'static {
    move |state| {
        let head = &state.head;
        let current = state.checkpoint.as_ref().is_some_and(|c| c.seq == head.seq);
        if head.seq == 0 || current {
            return Decision::default();
        }
        let key_id = signer.key_id();
        let signature = signer.sign_base64(message(head.seq, &head.hash, key_id).as_bytes());
        let draft = Draft::new(events::CHECKPOINT, SERVICE_PRINCIPAL)
            .reason(format!("checkpoint of seq {}", head.seq))
            .meta("head_seq", head.seq.to_string())
            .meta("head_hash", head.hash.clone())
            .meta("key_id", key_id)
            .meta("signature", signature);
        Decision { drafts: vec![draft], safe_direction: false }
    }
}

/// Appends a checkpoint when one is due and keeps the newest outside the ledger. Errors are
/// logged: a checkpoint that cannot be written leaves the ledger as it was.
pub async fn take(ledger: &crate::ledger::Ledger, signer: Arc<Signer>, dir: &Path) {
    match ledger.decide(decision(signer)).await {
        Ok(decided) if decided.changed => {
            let Some(Appended { seq, .. }) = decided.appended.first() else { return };
            let Some(checkpoint) = decided.state.checkpoint.clone().filter(|c| c.seq == *seq)
            else {
                return;
            };
            let dir = dir.to_owned();
            let written = tokio::task::spawn_blocking(move || {
                write_file(&dir, &checkpoint).map(|()| checkpoint)
            })
            .await;
            match written {
                Ok(Ok(c)) => tracing::info!(seq = c.seq, head_seq = c.head_seq, "checkpoint"),
                Ok(Err(error)) => {
                    tracing::error!(%error, "checkpoint recorded but {FILE} could not be written")
                }
                Err(error) => tracing::error!(%error, "checkpoint file task failed"),
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "no checkpoint could be appended"),
    }
}

/// Replaces `checkpoint.json` atomically and durably.
pub fn write_file(dir: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    let path = dir.join(FILE);
    let temporary = dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    let mut text = serde_json::to_vec_pretty(checkpoint).map_err(std::io::Error::other)?;
    text.push(b'\n');
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads `checkpoint.json`; `None` when there is none.
pub fn read_file(dir: &Path) -> Result<Option<Checkpoint>, String> {
    let path: PathBuf = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not a checkpoint: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Compares the ledger with the checkpoint kept outside it: the head must not be behind it, and
/// the event it names must be the same one. A mismatch is damage to report at start.
pub fn check(checkpoint: &Checkpoint, store: &dyn Storage, head_seq: u64) -> Option<Damage> {
    if head_seq < checkpoint.seq {
        let first_missing = head_seq + 1;
        return Some(Damage {
            seq: first_missing,
            problem: format!(
                "the ledger ends at seq {head_seq}, behind checkpoint seq {} in {FILE}: \
                 its tail was cut off",
                checkpoint.seq
            ),
            digest: format!("cut-{}", checkpoint.seq),
        });
    }
    // A record that does not decode is reported by the chain verification already.
    let stored = store.get(checkpoint.seq).ok().flatten();
    let record = stored.as_deref().and_then(|b| Record::decode_verified(b).ok())?;
    if record.hash == checkpoint.hash {
        return None;
    }
    Some(Damage {
        seq: checkpoint.seq,
        problem: format!(
            "seq {} has hash {}, not the checkpointed {} in {FILE}: the ledger was replaced",
            checkpoint.seq, record.hash, checkpoint.hash
        ),
        digest: format!("cp-{}", checkpoint.hash.chars().take(16).collect::<String>()),
    })
}
