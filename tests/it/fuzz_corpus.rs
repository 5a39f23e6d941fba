//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same target bodies
//! that cargo-fuzz runs, on stable Rust: every input that was ever interesting stays a test.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus is committed") {
        let path = entry.expect("an entry").path();
        let data = std::fs::read(&path).expect("readable");
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "{target}: {} broke an invariant", path.display());
        inputs += 1;
    }
    assert!(inputs >= 3, "{target}: the corpus has {inputs} inputs");
}

#[test]
fn the_record_corpus_replays() {
    replay("record", brain_ops::fuzzing::record);
}

#[test]
fn the_pack_corpus_replays() {
    replay("pack", brain_ops::fuzzing::pack);
}

#[test]
fn the_principals_corpus_replays() {
    replay("principals", brain_ops::fuzzing::principals);
}

#[test]
fn the_governance_corpus_replays() {
    replay("governance", brain_ops::fuzzing::governance);
}
