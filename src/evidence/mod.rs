//! Evidence packs: signed, deterministic, offline-verifiable exports of the ledger.
//! Built so far: signing keys, unary export and verification.

pub mod keys;
pub mod pack;
pub mod verify;
