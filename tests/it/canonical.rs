//! The stored form is RFC 8785 JCS and the hash covers it, checked against an independent JCS
//! implementation (serde_jcs), never the code under test.

use std::collections::BTreeMap;

use brain_ops::ledger::record::{Draft, GENESIS_HASH, Record};
use brain_ops::pb;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::helpers::{record_of, spawn_app};

/// Checks one stored record against serde_jcs: its bytes are the JCS form of what they parse
/// to, and its hash is SHA-256 of the JCS form without "hash".
fn assert_canonical_and_hashed(stored: &str) {
    let value: Value = serde_json::from_str(stored).expect("stored bytes parse");
    let jcs = serde_jcs::to_string(&value).expect("serde_jcs serialises");
    assert_eq!(stored, jcs, "stored bytes are not the JCS form");
    let mut unhashed = value.clone();
    let hash = unhashed.as_object_mut().expect("an object").remove("hash").expect("has a hash");
    let digest = hex::encode(Sha256::digest(serde_jcs::to_vec(&unhashed).expect("serialises")));
    assert_eq!(hash, Value::String(digest), "hash is not sha256(JCS(record without hash))");
    let reparsed = Record::decode_verified(stored.as_bytes()).expect("re-parses and verifies");
    assert_eq!(serde_json::to_value(&reparsed).expect("serialises"), value);
}

fn corpus() -> Vec<String> {
    serde_json::from_str(include_str!("../corpus/canonical_strings.json")).expect("corpus parses")
}

#[tokio::test]
async fn every_stored_record_hashes_to_sha256_of_its_jcs_form() {
    let app = spawn_app().await;
    let mut audit = app.audit();
    let unusual = [
        "unicode: caf\u{e9} \u{65e5}\u{672c} \u{1F600}",
        "escapes: \" \\ \n \t \u{1} \u{7f} \u{2028}",
        "",
    ];
    for (i, text) in unusual.iter().enumerate() {
        let mut metadata: std::collections::HashMap<String, String> = Default::default();
        if i == 0 {
            metadata.insert("z.last".into(), (*text).into());
            metadata.insert("a-first".into(), "\u{1F600}".into());
            metadata.insert("m_9".into(), String::new());
        }
        let event = pb::Event {
            event_type: "test.canonical_form".into(),
            triggered_by: (*text).into(),
            reason: (*text).into(),
            error: (*text).into(),
            bundle_id: (*text).into(),
            success: Some(i % 2 == 0),
            mode_before: pb::OperationMode::Sovereign.into(),
            metadata,
            ..Default::default()
        };
        audit
            .record(pb::RecordRequest { event: Some(event), idempotency_key: String::new() })
            .await
            .expect("recorded");
    }
    let events = app.list_all().await;
    assert_eq!(events.len(), unusual.len());
    for event in &events {
        assert_canonical_and_hashed(&event.record_json);
        assert_eq!(record_of(event)["hash"], Value::String(event.hash.clone()));
    }
    let empty_metadata = record_of(&events[1]);
    assert_eq!(empty_metadata["metadata"], serde_json::json!({}));
    assert_eq!(empty_metadata["reason"], Value::String(unusual[1].into()));
    assert_eq!(record_of(&events[2])["reason"], Value::Null, "empty means absent");
}

#[test]
fn the_canonicalisation_corpus_matches_an_independent_jcs() {
    let corpus = corpus();
    assert!(corpus.len() >= 40, "the corpus is replayed whole");
    let mut prev = GENESIS_HASH.to_owned();
    for (i, text) in corpus.iter().enumerate() {
        let short: String = text.chars().take(200).collect();
        let mut metadata = BTreeMap::new();
        metadata.insert("value".to_owned(), text.clone());
        metadata.insert("k.-_9".to_owned(), short.clone());
        let draft = Draft {
            triggered_by: Some(short.clone()),
            reason: Some(text.clone()),
            error: Some(text.clone()),
            bundle_id: Some(short.clone()),
            idempotency_key: Some(short),
            metadata,
            ..Draft::new("test.corpus", "tester")
        };
        let seq = i as u64 + 1;
        let sealed = Record::seal(draft, seq, 1_700_000_000_000_000 + seq as i64, &prev)
            .expect("corpus records fit");
        let stored = String::from_utf8(sealed.bytes).expect("JCS output is UTF-8");
        assert_canonical_and_hashed(&stored);
        prev = sealed.record.hash;
    }
}

#[test]
fn a_hand_checked_vector_hashes_as_documented() {
    // Worked by hand from RFC 8785: keys sorted, no whitespace, "\u000f" lowercase-hex escaped.
    let draft = Draft { reason: Some("\u{f}é".into()), ..Draft::new("a.b", "anonymous") };
    let sealed = Record::seal(draft, 1, 0, GENESIS_HASH).expect("seals");
    let expected_body = concat!(
        r#"{"bundle_id":null,"error":null,"event_type":"a.b","idempotency_key":null,"#,
        r#""metadata":{},"mode_after":null,"mode_before":null,"#,
        r#""prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","#,
        r#""reason":"\u000fé","seq":1,"severity":"info","source":"anonymous","success":true,"#,
        r#""time":"1970-01-01T00:00:00.000000Z","triggered_by":null,"v":1}"#
    );
    assert_eq!(sealed.record.hash, hex::encode(Sha256::digest(expected_body.as_bytes())));
}
