//! The Ed25519 key that signs evidence packs and checkpoints. Private key: PKCS#8 PEM. Public
//! key: the raw 32 bytes, base64 in JSON. `key_id` = first 16 hex digits of SHA-256 of the raw
//! public key. With no key configured the service generates one in its data directory on first
//! start and keeps it, so packs are always signed.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey};
use sha2::{Digest, Sha256};

/// Name of the generated key in the data directory.
pub const GENERATED_KEY_FILE: &str = "signing-key.pem";

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not an Ed25519 private key in PKCS#8 PEM: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// The signing key in use.
pub struct Signer {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Where the key came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    Configured(PathBuf),
    Generated(PathBuf),
    Existing(PathBuf),
    /// The data directory is unusable: a key for this process only (nothing can be exported
    /// without a ledger anyway).
    Ephemeral,
}

/// Strict Ed25519 verification of a base64 signature over `message` with a raw public key.
pub fn verifies(public_key: &[u8; 32], message: &[u8], signature_base64: &str) -> bool {
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(public_key) else { return false };
    let signature = BASE64.decode(signature_base64).ok();
    signature
        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
        .is_some_and(|s| key.verify_strict(message, &s).is_ok())
}

/// `key_id` of a raw public key.
pub fn key_id_of(public_key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

impl Signer {
    fn new(key: SigningKey) -> Signer {
        let key_id = key_id_of(key.verifying_key().as_bytes());
        Signer { key, key_id }
    }

    /// The configured key, else the one in `data_dir`, else a new one written there.
    pub fn load_or_generate(
        configured: Option<&Path>,
        data_dir: &Path,
    ) -> Result<(Signer, KeyOrigin), KeyError> {
        if let Some(path) = configured {
            return Ok((Signer::load(path)?, KeyOrigin::Configured(path.to_owned())));
        }
        let path = data_dir.join(GENERATED_KEY_FILE);
        if path.exists() {
            return Ok((Signer::load(&path)?, KeyOrigin::Existing(path)));
        }
        let signer = Signer::generate()?;
        match signer.write_private(&path) {
            Ok(()) => Ok((signer, KeyOrigin::Generated(path))),
            Err(error) => {
                tracing::error!(%error, "cannot keep a signing key in the data directory");
                Ok((signer, KeyOrigin::Ephemeral))
            }
        }
    }

    /// Reads a PKCS#8 PEM private key.
    pub fn load(path: &Path) -> Result<Signer, KeyError> {
        let pem = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| KeyError::Parse { path: path.to_owned(), message: e.to_string() })?;
        Ok(Signer::new(key))
    }

    /// A new random key.
    pub fn generate() -> Result<Signer, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Signer::new(SigningKey::from_bytes(&seed)))
    }

    /// Writes the private key as PKCS#8 PEM to a new file readable by its owner only, durably.
    pub fn write_private(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self
            .key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Parse { path: path.to_owned(), message: e.to_string() })?;
        write_new(path, pem.as_bytes(), 0o600)
    }

    /// Writes the public key as SPKI PEM.
    pub fn write_public(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self
            .key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Parse { path: path.to_owned(), message: e.to_string() })?;
        write_new(path, pem.as_bytes(), 0o644)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw public key, base64.
    pub fn public_key_base64(&self) -> String {
        BASE64.encode(self.key.verifying_key().as_bytes())
    }

    /// Signs `message`; the signature in base64.
    pub fn sign_base64(&self, message: &[u8]) -> String {
        BASE64.encode(self.key.sign(message).to_bytes())
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let error = |source| KeyError::Write { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_key_loads_back_with_the_same_id_and_signatures_verify() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let signer = Signer::generate().expect("random");
        let path = dir.path().join("k.pem");
        signer.write_private(&path).expect("writes");
        let loaded = Signer::load(&path).expect("loads");
        assert_eq!(loaded.key_id(), signer.key_id());
        assert_eq!(loaded.key_id().len(), 16);
        let signature = BASE64.decode(loaded.sign_base64(b"sha256:abc")).expect("base64");
        let public: [u8; 32] =
            BASE64.decode(signer.public_key_base64()).expect("base64").try_into().expect("32");
        let verifying = ed25519_dalek::VerifyingKey::from_bytes(&public).expect("a key");
        let signature = ed25519_dalek::Signature::from_slice(&signature).expect("64 bytes");
        assert!(verifying.verify_strict(b"sha256:abc", &signature).is_ok());
        assert!(signer.write_private(&path).is_err(), "an existing key is never overwritten");
    }
}
