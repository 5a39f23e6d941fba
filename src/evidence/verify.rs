//! Verifying an evidence pack: its content hash, its signature, its chain of events, its
//! governance config and checkpoint, and (when given) that it matches this ledger.
//!
//! [`verify`] streams the file: it holds the pack's small members and a few hundred events at a
//! time, never the whole pack, and checks the events on every core. It handles every file whose
//! pack members sorted before `"events"` come before it (every pack brain-ops writes, and any
//! JSON tool that keeps member order), without duplicate members; for any other file it falls
//! back to [`verify_document`], which parses the whole file and gives the same verdict.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::ledger::record::{GENESIS_HASH, Record, RecordProblem};
use crate::ledger::store::Storage;

/// A pack's verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub hash_valid: bool,
    pub chain_valid: bool,
    pub signature_valid: bool,
    pub matches_log: bool,
    pub computed_hash: String,
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn valid(&self) -> bool {
        self.hash_valid && self.chain_valid && self.signature_valid && self.matches_log
    }

    /// Valid as far as can be told without the ledger.
    pub fn valid_offline(&self) -> bool {
        self.hash_valid && self.chain_valid && self.signature_valid
    }
}

/// Verifies a pack file against the given public keys (`key_id` → raw key) and, when given, this
/// ledger, streaming it (see the module documentation). A file that is not a pack at all is an
/// error; anything wrong inside is a problem.
pub fn verify<R: Read + Seek + Send>(
    mut input: R,
    keys: &BTreeMap<String, [u8; 32]>,
    log: Option<&dyn Storage>,
) -> Result<Verdict, String> {
    match streamed(&mut input, keys, log) {
        Ok(verdict) => Ok(verdict),
        Err(Stop::Refused(message)) => Err(message),
        Err(Stop::Irregular) => {
            let mut file = String::new();
            input
                .seek(SeekFrom::Start(0))
                .and_then(|_| input.read_to_string(&mut file))
                .map_err(|e| format!("pack_json could not be read: {e}"))?;
            verify_document(&file, keys, log)
        }
    }
}

/// [`verify`] with the whole file parsed in memory first: the reference the streaming verifier
/// is checked against, and its fallback for files in an unusual member order.
pub fn verify_document(
    file: &str,
    keys: &BTreeMap<String, [u8; 32]>,
    log: Option<&dyn Storage>,
) -> Result<Verdict, String> {
    let document: Value =
        serde_json::from_str(file).map_err(|e| format!("pack_json is not JSON: {e}"))?;
    let pack =
        document.get("pack").filter(|p| p.is_object()).ok_or("pack_json has no \"pack\" object")?;
    let canonical = serde_json_canonicalizer::to_string(pack).map_err(|e| e.to_string())?;
    let computed_hash = format!("sha256:{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let mut events = Events::new(pack, log);
    for event in pack["events"].as_array().into_iter().flatten() {
        let canonical = jcs(event);
        let decoded = Record::decode_verified(&canonical);
        events.check(&canonical, &event["seq"], decoded.as_ref());
    }
    Ok(conclude(&document, pack, computed_hash, events, keys, log))
}

/// The checks that need the whole pack, in the order their problems are reported.
fn conclude(
    document: &Value,
    pack: &Value,
    computed_hash: String,
    events: Events,
    keys: &BTreeMap<String, [u8; 32]>,
    log: Option<&dyn Storage>,
) -> Verdict {
    let mut v = Verdict { computed_hash, ..Verdict::default() };
    let claimed = document.get("content_hash").and_then(Value::as_str).unwrap_or("");
    v.hash_valid = claimed == v.computed_hash;
    if !v.hash_valid {
        v.problems.push(format!(
            "content_hash {claimed:?} does not match the computed {}",
            v.computed_hash
        ));
    }
    if document.get("pack_id").and_then(Value::as_str)
        != Some(&format!("ep-{}", claimed.get(7..23).unwrap_or("")))
    {
        v.problems.push("pack_id does not match the content hash".into());
        v.hash_valid = false;
    }
    v.signature_valid = check_signature(document, claimed, keys, &mut v.problems);
    let Events { chain_problems, hashes, log_problems, .. } = events.finish(pack);
    let chain_valid = chain_problems.is_empty();
    v.problems.extend(chain_problems);
    let consistent = check_governance(pack, &mut v.problems);
    let (checkpoint_signed, checkpoint_consistent) =
        check_checkpoint(pack, &hashes, keys, &mut v.problems);
    v.chain_valid = chain_valid && consistent && checkpoint_consistent;
    v.signature_valid &= checkpoint_signed;
    v.matches_log = match log {
        Some(store) => {
            let before = v.problems.len();
            check_anchors(pack, store, &mut v.problems);
            v.problems.extend(log_problems);
            v.problems.len() == before
        }
        None => {
            v.problems.push("not compared with a ledger".into());
            false
        }
    };
    v
}

/// The JCS form of a JSON value.
fn jcs(value: &Value) -> Vec<u8> {
    serde_json_canonicalizer::to_vec(value).unwrap_or_default()
}

/// The events' checks, fed one event at a time in pack order: each decodes and verifies on its
/// own, sits at its seq and links to the one before; with a ledger, each is byte for byte the
/// record stored there.
struct Events<'a> {
    log: Option<&'a dyn Storage>,
    prev: String,
    seq: u64,
    count: u64,
    /// The seqs the checkpoint names, whose hashes are kept for its check.
    wanted: [Option<u64>; 2],
    hashes: BTreeMap<u64, String>,
    chain_problems: Vec<String>,
    log_problems: Vec<String>,
}

impl<'a> Events<'a> {
    /// Starts from the pack's `chain` and `checkpoint` members.
    fn new(pack: &Value, log: Option<&'a dyn Storage>) -> Events<'a> {
        let chain = &pack["chain"];
        let checkpoint = serde_json::from_value::<Checkpoint>(pack["checkpoint"].clone()).ok();
        Events {
            log,
            prev: chain["prev_hash"].as_str().unwrap_or("").to_owned(),
            seq: chain["first_seq"].as_u64().unwrap_or(0),
            count: 0,
            wanted: checkpoint.map_or([None, None], |c| [Some(c.seq), Some(c.head_seq)]),
            hashes: BTreeMap::new(),
            chain_problems: Vec::new(),
            log_problems: Vec::new(),
        }
    }

    /// One event: its JCS bytes, its `seq` member as written, and those bytes decoded.
    fn check(&mut self, canonical: &[u8], seq: &Value, decoded: Result<&Record, &RecordProblem>) {
        match decoded {
            Err(e) => self.chain_problems.push(format!("event seq {seq}: {e}")),
            Ok(record) => {
                if record.seq != self.seq {
                    let wrong = format!("event seq {} where seq {} belongs", record.seq, self.seq);
                    self.chain_problems.push(wrong);
                }
                if record.prev_hash != self.prev {
                    self.chain_problems
                        .push(format!("event seq {} does not link to the one before", record.seq));
                }
                if self.wanted.contains(&Some(record.seq)) {
                    self.hashes.insert(record.seq, record.hash.clone());
                }
                self.prev.clone_from(&record.hash);
            }
        }
        self.seq = self.seq.saturating_add(1);
        self.count += 1;
        if let Some(store) = self.log {
            let seq = seq.as_u64().unwrap_or(0);
            if store.get(seq).ok().flatten().as_deref() != Some(canonical) {
                self.log_problems.push(format!("event seq {seq} differs from this ledger"));
            }
        }
    }

    /// The checks against the members after the events.
    fn finish(mut self, pack: &Value) -> Events<'a> {
        if pack["events_included"].as_u64() != Some(self.count) {
            self.chain_problems.insert(0, "events_included does not match the events".into());
        }
        let chain = &pack["chain"];
        let covers_range =
            chain["last_seq"].as_u64().is_some_and(|last| last.checked_add(1) == Some(self.seq));
        if covers_range && chain["last_hash"].as_str() != Some(self.prev.as_str()) {
            self.chain_problems.push("chain.last_hash does not match the last event".into());
        }
        self
    }
}

fn check_signature(
    document: &Value,
    content_hash: &str,
    keys: &BTreeMap<String, [u8; 32]>,
    problems: &mut Vec<String>,
) -> bool {
    let signature = &document["signature"];
    let key_id = signature["key_id"].as_str().unwrap_or("");
    if signature["alg"] != "ed25519" {
        problems.push("signature.alg is not ed25519".into());
        return false;
    }
    let Some(key) = keys.get(key_id).and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(k).ok())
    else {
        problems.push(format!("signature key_id {key_id:?} is not a known key"));
        return false;
    };
    let value = signature["value"].as_str().and_then(|s| BASE64.decode(s).ok());
    let Some(sig) = value.and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok()) else {
        problems.push("signature.value is not a base64 Ed25519 signature".into());
        return false;
    };
    let ok = key.verify_strict(content_hash.as_bytes(), &sig).is_ok();
    if !ok {
        problems.push(format!("the signature does not verify with key {key_id}"));
    }
    ok
}

/// The governance config's text, when the pack carries it, must have the stated digest.
fn check_governance(pack: &Value, problems: &mut Vec<String>) -> bool {
    let config = &pack["governance_config"];
    let Some(text) = config["toml"].as_str() else { return true };
    let digest = hex::encode(Sha256::digest(text.as_bytes()));
    if config["sha256"].as_str() == Some(digest.as_str()) {
        return true;
    }
    problems.push(format!("governance_config.toml has SHA-256 {digest}, not its stated sha256"));
    false
}

/// The checkpoint, when the pack carries one: (signed by a known key, consistent with `as_of` and
/// the included events, whose hashes are given by seq).
fn check_checkpoint(
    pack: &Value,
    hashes: &BTreeMap<u64, String>,
    keys: &BTreeMap<String, [u8; 32]>,
    problems: &mut Vec<String>,
) -> (bool, bool) {
    if pack["checkpoint"].is_null() {
        return (true, true);
    }
    let Ok(c) = serde_json::from_value::<Checkpoint>(pack["checkpoint"].clone()) else {
        problems.push("checkpoint is not a checkpoint object".into());
        return (false, false);
    };
    let signed = keys.get(&c.key_id).is_some_and(|key| c.signature_verifies(key));
    if !signed {
        problems.push(format!(
            "the checkpoint of seq {} is not signed by a known key ({})",
            c.head_seq, c.key_id
        ));
    }
    let before = problems.len();
    if c.head_seq.checked_add(1) != Some(c.seq) {
        problems.push("checkpoint.head_seq is not the seq just before the checkpoint".into());
    }
    if pack["as_of"]["seq"].as_u64().is_none_or(|as_of| c.seq > as_of) {
        problems.push("the checkpoint is newer than as_of".into());
    }
    for (what, seq, hash) in
        [("checkpoint", c.seq, &c.hash), ("checkpoint head", c.head_seq, &c.head_hash)]
    {
        if hashes.get(&seq).is_some_and(|h| h != hash) {
            problems.push(format!("{what} hash differs from event seq {seq} in the pack"));
        }
    }
    (signed, problems.len() == before)
}

/// The pack's anchors (as_of, checkpoint, the records either side of its events) must be the
/// records this ledger holds at those seqs.
fn check_anchors(pack: &Value, store: &dyn Storage, problems: &mut Vec<String>) {
    let stored_hash = |seq: u64| -> Option<String> {
        if seq == 0 {
            return Some(GENESIS_HASH.to_owned());
        }
        store
            .get(seq)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["hash"].as_str().map(str::to_owned))
    };
    let mut anchor = |what: &str, seq: Option<u64>, hash: Option<&str>| {
        if let (Some(seq), Some(hash)) = (seq, hash)
            && stored_hash(seq).as_deref() != Some(hash)
        {
            problems.push(format!("{what} (seq {seq}) differs from this ledger"));
        }
    };
    anchor("as_of", pack["as_of"]["seq"].as_u64(), pack["as_of"]["hash"].as_str());
    anchor("checkpoint", pack["checkpoint"]["seq"].as_u64(), pack["checkpoint"]["hash"].as_str());
    let first = pack["chain"]["first_seq"].as_u64();
    anchor(
        "chain.prev_hash",
        first.and_then(|f| f.checked_sub(1)),
        pack["chain"]["prev_hash"].as_str(),
    );
    anchor(
        "chain.last_hash",
        pack["chain"]["last_seq"].as_u64(),
        pack["chain"]["last_hash"].as_str(),
    );
}

// --- The streaming front end ---

/// Why streaming stopped.
enum Stop {
    /// The file is not a pack (or not JSON): the verifier's error, as is.
    Refused(String),
    /// The file is JSON the streaming path does not take (see the module documentation).
    Irregular,
}

/// Nesting serde_json allows (it refuses the 128th level); a member's own nesting is limited by
/// the levels above it, so the streamed verdict matches the whole-document one.
const MAX_NESTING: usize = 127;
/// Events per chunk handed to a checking thread.
const EVENT_CHUNK: usize = 256;

fn streamed<R: Read + Send>(
    input: R,
    keys: &BTreeMap<String, [u8; 32]>,
    log: Option<&dyn Storage>,
) -> Result<Verdict, Stop> {
    let mut src = Source::new(input);
    if src.peek()? != Some(b'{') {
        return Err(Stop::Irregular);
    }
    src.expect(b'{')?;
    let mut document = Map::new();
    let mut pack = None;
    src.members(|src, key| {
        if document.contains_key(&key) || (key == "pack" && pack.is_some()) {
            return Err(Stop::Irregular);
        }
        if key == "pack" {
            if src.peek()? != Some(b'{') {
                return Err(Stop::Irregular);
            }
            pack = Some(stream_pack(src, log)?);
        } else {
            document.insert(key, src.value(MAX_NESTING - 1)?);
        }
        Ok(())
    })?;
    if let Some(b) = src.peek()? {
        return Err(src.broken(format!("trailing characters ({:?})", b as char)));
    }
    let Some((members, computed_hash, events)) = pack else {
        return Err(Stop::Refused("pack_json has no \"pack\" object".into()));
    };
    let pack = Value::Object(members);
    Ok(conclude(&Value::Object(document), &pack, computed_hash, events, keys, log))
}

/// Streams the pack object: returns its members other than the events, the SHA-256 of its JCS
/// form, and the events' checks.
fn stream_pack<'a, R: Read + Send>(
    src: &mut Source<R>,
    log: Option<&'a dyn Storage>,
) -> Result<(Map<String, Value>, String, Events<'a>), Stop> {
    src.expect(b'{')?;
    let events_key: Vec<u16> = "events".encode_utf16().collect();
    let mut members = Map::new();
    // Members read but not yet hashed, by JCS order (UTF-16 code units).
    let mut pending: BTreeMap<Vec<u16>, String> = BTreeMap::new();
    let mut hash = JcsObject::default();
    let mut events: Option<Events<'a>> = None;
    src.members(|src, key| {
        let order: Vec<u16> = key.encode_utf16().collect();
        let streamed_events = events.is_some();
        if members.contains_key(&key) || (key == "events" && streamed_events) {
            return Err(Stop::Irregular);
        }
        if key == "events" && src.peek()? == Some(b'[') {
            // Everything sorted before the events is here (else the file is irregular).
            let after = pending.split_off(&events_key);
            for key in std::mem::replace(&mut pending, after).into_values() {
                hash.member(&key, &members[&key]);
            }
            hash.key("events");
            let mut check = Events::new(&Value::Object(members.clone()), log);
            stream_events(src, &mut hash.hasher, &mut check)?;
            events = Some(check);
            return Ok(());
        }
        if streamed_events && order < events_key {
            return Err(Stop::Irregular);
        }
        members.insert(key.clone(), src.value(MAX_NESTING - 2)?);
        pending.insert(order, key);
        Ok(())
    })?;
    for key in pending.into_values() {
        hash.member(&key, &members[&key]);
    }
    let computed_hash = hash.finish();
    let pack = Value::Object(members);
    let events = events.unwrap_or_else(|| Events::new(&pack, log));
    let Value::Object(members) = pack else { unreachable!("built as an object") };
    Ok((members, computed_hash, events))
}

/// Streams the events array: its JCS form into `hasher`, each event into `check`. Events are
/// decoded and verified on every core; the links, the hashing and the ledger comparison follow
/// in order on this thread.
fn stream_events<R: Read + Send>(
    src: &mut Source<R>,
    hasher: &mut Sha256,
    check: &mut Events<'_>,
) -> Result<(), Stop> {
    src.expect(b'[')?;
    hasher.update(b"[");
    let mut broken = None;
    let mut first = true;
    let read = crate::parallel::ordered_map(
        |emit| {
            let mut chunk = Chunk::default();
            src.elements(|src| {
                src.raw_value(&mut chunk.bytes, MAX_NESTING - 3)?;
                chunk.ends.push(chunk.bytes.len());
                if chunk.ends.len() == EVENT_CHUNK && !emit(std::mem::take(&mut chunk)) {
                    return Err(Stop::Refused("a checking thread stopped".into()));
                }
                Ok(())
            })?;
            if !chunk.ends.is_empty() {
                emit(chunk);
            }
            Ok(())
        },
        |chunk: Chunk| {
            let checked: Vec<Checked> = chunk.events().map(Checked::event).collect();
            (chunk, checked)
        },
        |(chunk, checked)| {
            for (raw, checked) in chunk.events().zip(checked) {
                if broken.is_some() {
                    return;
                }
                if !std::mem::take(&mut first) {
                    hasher.update(b",");
                }
                match checked {
                    Checked::Canonical(record) => {
                        hasher.update(raw);
                        check.check(raw, &Value::from(record.seq), Ok(&record));
                    }
                    Checked::Rewritten { canonical, seq, decoded } => {
                        hasher.update(&canonical);
                        check.check(&canonical, &seq, decoded.as_ref());
                    }
                    Checked::NotJson(e) => broken = Some(e),
                }
            }
        },
    );
    read?;
    hasher.update(b"]");
    match broken {
        Some(e) => Err(Stop::Refused(format!("pack_json is not JSON: {e} (in an event)"))),
        None => Ok(()),
    }
}

/// Raw events, back to back.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Chunk {
    fn events(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter()).map(|(start, &end)| &self.bytes[start..end])
    }
}

/// One event, checked on its own.
enum Checked {
    /// It verifies and its bytes are already its JCS form (every event brain-ops writes).
    Canonical(Record),
    /// Anything else: its JCS form and what decoding that gives, as the whole-document path does.
    Rewritten {
        canonical: Vec<u8>,
        seq: Value,
        decoded: Result<Record, RecordProblem>,
    },
    NotJson(String),
}

impl Checked {
    fn event(raw: &[u8]) -> Checked {
        if let Ok(record) = Record::decode_verified(raw)
            && record.serialises_as_jcs()
        {
            return Checked::Canonical(record);
        }
        match serde_json::from_slice::<Value>(raw) {
            Err(e) => Checked::NotJson(e.to_string()),
            Ok(event) => {
                let canonical = jcs(&event);
                let decoded = Record::decode_verified(&canonical);
                Checked::Rewritten { canonical, seq: event["seq"].clone(), decoded }
            }
        }
    }
}

/// SHA-256 of a JCS object written member by member, in order.
#[derive(Default)]
struct JcsObject {
    hasher: Sha256,
    members: usize,
}

impl JcsObject {
    fn key(&mut self, key: &str) {
        self.hasher.update(if self.members == 0 { b"{" } else { b"," });
        self.members += 1;
        self.hasher.update(jcs(&Value::String(key.to_owned())));
        self.hasher.update(b":");
    }

    fn member(&mut self, key: &str, value: &Value) {
        self.key(key);
        self.hasher.update(jcs(value));
    }

    fn finish(mut self) -> String {
        self.hasher.update(if self.members == 0 { b"{}" as &[u8] } else { b"}" });
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

/// A JSON reader over any byte source that hands out whole values, holding one buffer.
struct Source<R> {
    reader: R,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Bytes before `buf[0]`, for error positions.
    before: u64,
}

impl<R: Read> Source<R> {
    fn new(reader: R) -> Source<R> {
        Source { reader, buf: vec![0; 1 << 20].into_boxed_slice(), pos: 0, len: 0, before: 0 }
    }

    fn broken(&self, what: String) -> Stop {
        let at = self.before + self.pos as u64;
        Stop::Refused(format!("pack_json is not JSON: {what} at byte {at}"))
    }

    /// Reads more; false at the end of the input.
    fn fill(&mut self) -> Result<bool, Stop> {
        self.before += self.len as u64;
        (self.pos, self.len) = (0, 0);
        loop {
            match self.reader.read(&mut self.buf) {
                Ok(n) => {
                    self.len = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Stop::Refused(format!("pack_json could not be read: {e}"))),
            }
        }
    }

    /// The next byte that is not whitespace, left unread; `None` at the end.
    fn peek(&mut self) -> Result<Option<u8>, Stop> {
        loop {
            while self.pos < self.len {
                match self.buf[self.pos] {
                    b' ' | b'\t' | b'\n' | b'\r' => self.pos += 1,
                    b => return Ok(Some(b)),
                }
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn expect(&mut self, want: u8) -> Result<(), Stop> {
        match self.peek()? {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            Some(b) => {
                Err(self.broken(format!("expected {:?}, found {:?}", want as char, b as char)))
            }
            None => Err(self.broken(format!("expected {:?}, found the end", want as char))),
        }
    }

    /// After `[`: calls `each` at every element, which `each` must read; consumes the separators
    /// and the closing bracket.
    fn elements(
        &mut self,
        mut each: impl FnMut(&mut Self) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        if self.peek()? == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            each(self)?;
            match self.peek()? {
                Some(b',') => self.pos += 1,
                _ => return self.expect(b']'),
            }
        }
    }

    /// After `{`: calls `each` with every member's key, positioned at its value, which `each`
    /// must read; consumes the separators and the closing brace.
    fn members(
        &mut self,
        mut each: impl FnMut(&mut Self, String) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        if self.peek()? == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            if self.peek()? != Some(b'"') {
                return Err(self.broken("expected a member name".into()));
            }
            let mut raw = Vec::new();
            self.raw_value(&mut raw, 0)?;
            let key: String =
                serde_json::from_slice(&raw).map_err(|e| self.broken(e.to_string()))?;
            self.expect(b':')?;
            each(self, key)?;
            match self.peek()? {
                Some(b',') => self.pos += 1,
                _ => return self.expect(b'}'),
            }
        }
    }

    /// The next value, parsed; its own nesting at most `nesting`.
    fn value(&mut self, nesting: usize) -> Result<Value, Stop> {
        let mut raw = Vec::new();
        self.raw_value(&mut raw, nesting)?;
        serde_json::from_slice(&raw).map_err(|e| self.broken(e.to_string()))
    }

    /// Appends the next value's bytes to `out`, unparsed: only its extent is found here (strings,
    /// escapes and bracket depth), so whoever parses it validates it. Fails when it nests deeper
    /// than `nesting`.
    fn raw_value(&mut self, out: &mut Vec<u8>, nesting: usize) -> Result<(), Stop> {
        let Some(first) = self.peek()? else {
            return Err(self.broken("the input ends where a value belongs".into()));
        };
        let mut scan = Extent { scalar: !matches!(first, b'{' | b'[' | b'"'), ..Extent::default() };
        loop {
            let available = &self.buf[self.pos..self.len];
            if let Some(n) = scan.feed(available) {
                out.extend_from_slice(&available[..n]);
                self.pos += n;
                break;
            }
            out.extend_from_slice(available);
            self.pos = self.len;
            if !self.fill()? {
                if scan.scalar {
                    break;
                }
                return Err(self.broken("the input ends inside a value".into()));
            }
        }
        if scan.deepest > nesting {
            return Err(self.broken("recursion limit exceeded".into()));
        }
        Ok(())
    }
}

/// Finds where a JSON value ends, fed its bytes piece by piece.
#[derive(Default)]
struct Extent {
    scalar: bool,
    in_string: bool,
    escaped: bool,
    depth: usize,
    deepest: usize,
}

impl Extent {
    /// How many of these bytes complete the value, if they do.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if self.scalar {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    return Some(i);
                }
            } else if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => {
                        self.depth += 1;
                        self.deepest = self.deepest.max(self.depth);
                    }
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::ledger::record::Draft;

    /// A pack-shaped file (unsigned) over `n` sealed events, seq `first` on.
    fn pack_file(n: u64) -> String {
        pack_of(1, n, |draft| draft)
    }

    fn pack_of(first: u64, n: u64, edit: impl Fn(Draft) -> Draft) -> String {
        let mut prev = GENESIS_HASH.to_owned();
        let mut events = Vec::new();
        for seq in first..first + n {
            let draft =
                Draft::new("factory.step_completed", "tests").reason("why \"not\" \u{2028}");
            let sealed = Record::seal(edit(draft), seq, 1_700_000_000_000_000 + seq as i64, &prev)
                .expect("small record");
            prev.clone_from(&sealed.record.hash);
            events.push(String::from_utf8(sealed.bytes).expect("UTF-8"));
        }
        let last = first + n - 1;
        format!(
            r#"{{"pack":{{"as_of":{{"hash":"{prev}","seq":{last}}},"chain":{{"first_seq":{first},"last_hash":"{prev}","last_seq":{last},"prev_hash":"{GENESIS_HASH}"}},"checkpoint":null,"events":[{}],"events_included":{n},"format":"brain-evidence-pack/1"}},"content_hash":"sha256:00","pack_id":"ep-00","signature":null}}"#,
            events.join(",")
        )
    }

    fn both(file: &str) -> (Result<Verdict, String>, Result<Verdict, String>) {
        let keys = BTreeMap::new();
        (verify(Cursor::new(file), &keys, None), verify_document(file, &keys, None))
    }

    #[test]
    fn streaming_gives_the_whole_document_verdict() {
        let file = pack_file(700);
        let (streamed, whole) = both(&file);
        let whole = whole.expect("a pack");
        assert_eq!(streamed.as_ref(), Ok(&whole));
        assert!(whole.chain_valid, "{:?}", whole.problems);
        // Tampered, pretty-printed, reordered (falls back) and cut short: still the same answer.
        let tampered = file.replacen("why", "who", 1);
        let pretty =
            serde_json::to_string_pretty(&serde_json::from_str::<Value>(&file).expect("JSON"))
                .expect("prints");
        let reordered = file.replacen(r#""checkpoint":null,"#, "", 1).replacen(
            r#""format""#,
            r#""checkpoint":null,"format""#,
            1,
        );
        let moved = file.replacen(r#""as_of":"#, r#""zz":1,"as_of":"#, 1);
        for variant in [&tampered, &pretty, &reordered, &moved] {
            let (streamed, whole) = both(variant);
            assert_eq!(streamed, whole);
        }
        assert!(!both(&tampered).1.expect("a pack").chain_valid);
        let (streamed, whole) = both(&file[..file.len() / 2]);
        assert!(streamed.is_err() && whole.is_err());
    }

    #[test]
    fn nesting_is_refused_exactly_where_the_whole_document_parse_refuses_it() {
        let nested = |depth: usize| "[".repeat(depth) + &"]".repeat(depth);
        for depth in 120..=128 {
            for file in [
                format!(r#"{{"pack":{{"events":[]}},"x":{}}}"#, nested(depth)),
                format!(r#"{{"pack":{{"a":{},"events":[]}}}}"#, nested(depth)),
                format!(r#"{{"pack":{{"events":[{}]}}}}"#, nested(depth)),
            ] {
                let (streamed, whole) = both(&file);
                assert_eq!(streamed.is_err(), whole.is_err(), "depth {depth}: {file}");
                if let (Ok(streamed), Ok(whole)) = (streamed, whole) {
                    assert_eq!(streamed, whole);
                }
            }
        }
    }

    #[test]
    fn an_event_json_would_write_differently_is_hashed_in_its_jcs_form() {
        let file = pack_file(2);
        let seq = r#""seq":2,"#;
        assert!(file.contains(seq));
        for variant in [
            file.replacen(seq, r#""seq":2.0,"#, 1),
            file.replacen(seq, r#""seq":9007199254740993,"#, 1),
            // Sealed as serde_json writes them, which is not their JCS form.
            pack_of(1 << 60, 2, |draft| draft),
            pack_of(1, 2, |draft| draft.meta("\u{1f600}", "1").meta("\u{ff5a}", "2")),
        ] {
            let (streamed, whole) = both(&variant);
            assert_eq!(streamed, whole, "{variant}");
        }
    }
}
