//! Chain verification: every record decodes, is canonical, matches its hash, sits at its seq,
//! links to the record before it and is not earlier than it. Used at start over the whole ledger and by `VerifyChain`.

use sha2::{Digest, Sha256};

use super::record::{Record, RecordProblem};

/// Most damaged seqs remembered individually; more are counted.
pub const MAX_LISTED_DAMAGE: usize = 64;

/// One seq that failed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub seq: u64,
    /// What is wrong, for operators.
    pub problem: String,
    /// First 16 hex digits of SHA-256 of the stored bytes ("missing" for a gap), so that a known
    /// damaged record that changes again counts as new damage.
    pub digest: String,
}

impl Damage {
    /// The `<seq>:<digest>` form used in integrity events.
    pub fn tag(&self) -> String {
        format!("{}:{}", self.seq, self.digest)
    }
}

/// Walks records in seq order and checks each one and its link to the previous.
#[derive(Debug)]
pub struct ChainVerifier {
    next_seq: u64,
    /// Hash the next record must link to; `None` when it cannot be known (after damage, or when
    /// a range starts past a damaged record).
    prev_hash: Option<String>,
    /// Time of the record before, when it decoded: times never decrease along seqs.
    prev_time: Option<i64>,
    checked: u64,
    damage: Vec<Damage>,
    damage_total: u64,
    last_hash: Option<String>,
}

impl ChainVerifier {
    /// Starts at `from_seq`, whose record must link to `prev_hash`.
    pub fn new(from_seq: u64, prev_hash: Option<String>) -> ChainVerifier {
        ChainVerifier {
            next_seq: from_seq,
            prev_hash,
            prev_time: None,
            checked: 0,
            damage: Vec::new(),
            damage_total: 0,
            last_hash: None,
        }
    }

    /// Checks the record stored at `seq`; returns it when it decodes and verifies on its own
    /// (even if its link is broken, since its content is intact).
    pub fn check(&mut self, seq: u64, bytes: &[u8]) -> Option<Record> {
        let decoded = Record::decode_verified(bytes).map_err(|problem| (problem, bytes));
        self.check_decoded(seq, decoded, &|| bytes.to_vec())
    }

    /// [`check`](Self::check) with the record already decoded and verified on its own (which
    /// does not depend on the records before it, so it can be done in parallel): the record, or
    /// the problem and the stored bytes. `stored` gives the stored bytes of a record that decoded,
    /// should its link be broken.
    pub fn check_decoded(
        &mut self,
        seq: u64,
        decoded: Result<Record, (RecordProblem, &[u8])>,
        stored: &dyn Fn() -> Vec<u8>,
    ) -> Option<Record> {
        self.missing_until(seq);
        self.next_seq = seq + 1;
        self.checked += 1;
        match decoded {
            Err((problem, bytes)) => {
                self.damaged(seq, problem.to_string(), digest(bytes));
                self.prev_hash = None;
                self.prev_time = None;
                self.last_hash = Some(hex::encode(Sha256::digest(bytes)));
                None
            }
            Ok(record) => {
                let time = record.time_micros();
                let digest = || digest(&stored());
                if record.seq != seq {
                    let problem = format!("the record stored at seq {seq} says seq {}", record.seq);
                    self.damaged(seq, problem, digest());
                } else if let Some(prev) = &self.prev_hash
                    && *prev != record.prev_hash
                {
                    let problem = format!(
                        "prev_hash {} does not link to the hash {prev} of seq {}",
                        record.prev_hash,
                        seq.saturating_sub(1)
                    );
                    self.damaged(seq, problem, digest());
                } else if let (Some(time), Some(previous)) = (time, self.prev_time)
                    && time < previous
                {
                    let problem = format!(
                        "time {} is earlier than the time of seq {}",
                        record.time,
                        seq.saturating_sub(1)
                    );
                    self.damaged(seq, problem, digest());
                }
                self.prev_time = time;
                for kept in [&mut self.prev_hash, &mut self.last_hash] {
                    match kept {
                        Some(hash) => hash.clone_from(&record.hash),
                        None => *kept = Some(record.hash.clone()),
                    }
                }
                Some(record)
            }
        }
    }

    /// Ends the walk; every seq up to `to_seq` must have been seen.
    pub fn finish(mut self, to_seq: u64) -> Verification {
        self.missing_until(to_seq.saturating_add(1));
        Verification {
            checked: self.checked,
            damage: self.damage,
            damage_total: self.damage_total,
            last_hash: self.last_hash,
        }
    }

    fn missing_until(&mut self, seq: u64) {
        while self.next_seq < seq {
            let missing = self.next_seq;
            self.damaged(missing, format!("seq {missing} is missing"), "missing".to_owned());
            self.prev_hash = None;
            self.next_seq += 1;
        }
    }

    fn damaged(&mut self, seq: u64, problem: String, digest: String) {
        self.damage_total += 1;
        if self.damage.len() < MAX_LISTED_DAMAGE {
            self.damage.push(Damage { seq, problem, digest });
        }
    }
}

/// What a walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Records examined (missing seqs are not counted).
    pub checked: u64,
    /// The first [`MAX_LISTED_DAMAGE`] damaged seqs, in order.
    pub damage: Vec<Damage>,
    pub damage_total: u64,
    /// Hash of the last record seen: its stored hash, or the digest of its bytes when it does
    /// not decode (so later records still chain to something fixed).
    pub last_hash: Option<String>,
}

impl Verification {
    /// The first damaged seq, if any.
    pub fn first_bad(&self) -> Option<&Damage> {
        self.damage.first()
    }
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}
