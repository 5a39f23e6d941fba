//! TLS and mutual TLS for the gRPC port, with rustls.
//!
//! The server configuration is rebuilt from its files on SIGHUP and swapped atomically: new
//! connections use the new certificate (or client CA), connections already open keep theirs. A
//! set of files that does not load is refused and the configuration in force stays.
//!
//! Handshakes run in their own tasks, bounded in number and time, so a slow or hostile client
//! cannot hold up the accept loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::ConfigError;

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the TLS material comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to; `Some` turns on mutual TLS.
    pub client_ca: Option<PathBuf>,
}

/// TLS material that cannot be used names its setting, like any other configuration error.
pub type TlsError = ConfigError;

fn error(setting: &'static str, message: impl Into<String>) -> TlsError {
    ConfigError { setting, message: message.into() }
}

const CERT: &str = "--tls-cert / BRAIN_TLS_CERT";
const KEY: &str = "--tls-key / BRAIN_TLS_KEY";
const CLIENT_CA: &str = "--tls-client-ca / BRAIN_TLS_CLIENT_CA";

/// The server's TLS configuration in force.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Loads and checks the files.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let (config, _) = server_config(&files)?;
        Ok(Tls { files, config: ArcSwap::from_pointee(config) })
    }

    /// Reads the files again; on any error the configuration in force stays. Returns the
    /// SHA-256 over the bytes of the files now in force, for the audit trail.
    pub fn reload(&self) -> Result<String, TlsError> {
        let (config, digest) = server_config(&self.files)?;
        self.config.store(Arc::new(config));
        Ok(digest)
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Accepts TCP connections on `listener` and yields those whose handshake succeeds, for
    /// tonic's `serve_with_incoming`. Ends when the consumer is dropped.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = handshakes.clone().acquire_owned().await else { return };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = tx.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = TlsAcceptor::from(self.config.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| error(setting, format!("cannot read {}: {e}", path.display())))
}

fn certificates(
    setting: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(setting, format!("is not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(error(setting, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The rustls configuration from the files, and the digest of their bytes.
fn server_config(files: &TlsFiles) -> Result<(ServerConfig, String), TlsError> {
    let cert_pem = read(CERT, &files.cert)?;
    let key_pem = read(KEY, &files.key)?;
    let certs = certificates(CERT, &cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| error(KEY, format!("is not a PEM private key: {e}")))?;
    let mut digest = Sha256::new();
    digest.update(&cert_pem);
    digest.update(&key_pem);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(CERT, e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_pem = read(CLIENT_CA, path)?;
            digest.update(&ca_pem);
            let mut roots = RootCertStore::empty();
            for ca in certificates(CLIENT_CA, &ca_pem)? {
                roots
                    .add(ca)
                    .map_err(|e| error(CLIENT_CA, format!("holds an unusable CA: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| error(CLIENT_CA, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| error(KEY, format!("does not go with the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, hex::encode(digest.finalize())))
}

/// The identities a client certificate (DER) carries, in the order they are matched against
/// `tls_identity` in the principals file: URI SANs (SPIFFE IDs), DNS SANs, then the subject's
/// common names.
pub fn identities(certificate: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(certificate) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                found.push((*uri).to_owned());
            }
        }
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                found.push((*dns).to_owned());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            found.push(cn.to_owned());
        }
    }
    found
}
