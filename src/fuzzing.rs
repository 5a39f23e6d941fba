//! The bodies of the fuzz targets in `fuzz/`, kept in the library so that `cargo test` replays
//! their corpora on stable Rust (`tests/it/fuzz_corpus.rs`). Each takes arbitrary bytes and
//! panics only when an invariant is broken.

use std::collections::BTreeMap;
use std::path::Path;

use crate::ledger::record::{Draft, GENESIS_HASH, Record};

/// Stored bytes that decode and verify are canonical: re-encoding gives them back, byte for byte.
/// Text read as a draft that passes validation seals into a record that decodes to itself.
pub fn record(data: &[u8]) {
    if let Ok(record) = Record::decode_verified(data) {
        assert_eq!(record.canonical_bytes(), data, "a verified record is canonical");
        assert_eq!(record.compute_hash(), record.hash);
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Fields separated by newlines: type, reason, then key=value metadata lines.
    let mut lines = text.split('\n');
    let mut draft = Draft::new(lines.next().unwrap_or_default(), "fuzz");
    if let Some(reason) = lines.next() {
        draft = draft.reason(reason);
    }
    for line in lines {
        if let Some((key, value)) = line.split_once('=') {
            draft = draft.meta(key, value);
        }
    }
    if draft.validate().is_err() {
        return;
    }
    draft.redact();
    let Ok(sealed) = Record::seal(draft, 1, 1_700_000_000_000_000, GENESIS_HASH) else { return };
    let decoded = Record::decode_verified(&sealed.bytes).expect("a sealed record verifies");
    assert_eq!(decoded, sealed.record);
    assert_eq!(decoded.canonical_bytes(), sealed.bytes);
}

/// The pack verifier never panics, never calls a pack valid without a key, and streaming the
/// file gives exactly the verdict (or the refusal) of parsing it whole.
pub fn pack(data: &[u8]) {
    use crate::evidence::verify::{verify, verify_document};
    let keys = BTreeMap::new();
    let streamed = verify(std::io::Cursor::new(data), &keys, None);
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(streamed.is_err(), "a file that is not UTF-8 is refused");
        return;
    };
    let whole = verify_document(text, &keys, None);
    match (&streamed, &whole) {
        (Ok(streamed), Ok(whole)) => assert_eq!(streamed, whole, "the same verdict"),
        (Err(_), Err(_)) => {}
        _ => panic!("streamed {streamed:?}, whole {whole:?}"),
    }
    if let Ok(verdict) = whole {
        assert!(!verdict.signature_valid, "no key, no valid signature");
    }
}

/// The principals parser never panics.
pub fn principals(data: &[u8]) {
    let _ = crate::auth::Principals::parse(Path::new("fuzz.toml"), data.to_vec());
}

/// The governance config parser never panics; what it accepts records and reads back the same.
pub fn governance(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(loaded) = crate::governance::Loaded::parse(text.to_owned()) {
        let draft = loaded.draft("fuzz");
        let sealed = Record::seal(draft, 1, 1_700_000_000_000_000, GENESIS_HASH)
            .expect("an accepted config fits its record");
        let in_force = crate::governance::InForce::from_record(&sealed.record);
        assert_eq!(in_force.config.as_ref(), Some(&loaded.config));
        assert_eq!(in_force.sha256, loaded.sha256);
    }
}
