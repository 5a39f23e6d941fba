//! Evidence packs: signed, deterministic, offline-verifiable exports of the ledger.
//! Built so far: the signing keys.

pub mod keys;
