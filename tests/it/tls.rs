//! TLS and mutual TLS with certificates made here: the client certificate's identity becomes
//! the principal, a client without one is refused, health stays probe-able in plaintext, and
//! certificates reload on SIGHUP.

use std::path::{Path, PathBuf};

use brain_ops::pb;
use brain_ops::pb::audit_service_client::AuditServiceClient;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use brain_ops::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::helpers::{BIN, TestApp, record_of, serve_process, spawn_app_in};

/// A certificate authority that signs server and client certificates into files.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("self-signed").pem();
        Ca { issuer: Issuer::new(params, key), pem }
    }

    /// Writes `<stem>.pem` and `<stem>.key` into `dir`; returns their paths.
    fn sign(
        &self,
        dir: &Path,
        stem: &str,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        let (cert_path, key_path) =
            (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("writes");
        std::fs::write(&key_path, key.serialize_pem()).expect("writes");
        (cert_path, key_path)
    }

    fn server(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let sans = vec![
            SanType::DnsName("localhost".try_into().expect("dns")),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        self.sign(dir, stem, "brain-ops", sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, dir: &Path, stem: &str, uri: &str) -> (PathBuf, PathBuf) {
        let sans = vec![SanType::URI(uri.try_into().expect("uri"))];
        self.sign(dir, stem, stem, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, &self.pem).expect("writes");
        path
    }
}

/// A TLS channel to `addr` trusting `ca`, with an optional client certificate.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        let identity = Identity::from_pem(
            std::fs::read(cert).expect("cert"),
            std::fs::read(key).expect("key"),
        );
        tls = tls.identity(identity);
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
}

async fn status(channel: Channel) -> Result<pb::SafeModeStatus, tonic::Status> {
    SafeModeServiceClient::new(channel)
        .get_status(pb::GetStatusRequest {})
        .await
        .map(|r| r.into_inner().status.expect("status"))
}

#[tokio::test]
async fn tls_serves_grpc_while_health_stays_probeable_in_plaintext() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let ca = Ca::new("test CA");
    let ca_path = ca.write(dir.path(), "ca");
    let (cert, key) = ca.server(dir.path(), "server");
    let app = spawn_app_in(&dir.path().join("data"), |config| {
        config.tls = Some(TlsFiles { cert, key, client_ca: None });
        config.health_addr = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;

    let channel = tls_channel(app.grpc_addr, &ca_path, None).await.expect("a TLS connection");
    assert!(!status(channel).await.expect("GetStatus over TLS").enabled);

    let plaintext =
        Channel::from_shared(format!("http://{}", app.grpc_addr)).expect("uri").connect().await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => status(channel).await.is_err(),
    };
    assert!(refused, "plaintext gRPC must not be served on a TLS port");

    let other_ca = Ca::new("another CA");
    let other = other_ca.write(dir.path(), "other-ca");
    let untrusted = match tls_channel(app.grpc_addr, &other, None).await {
        Err(_) => true,
        Ok(channel) => status(channel).await.is_err(),
    };
    assert!(untrusted, "a client that does not trust the server's CA cannot talk to it");

    let health_addr = app.health_addr.expect("a health port");
    let health = Channel::from_shared(format!("http://{health_addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("plaintext health port");
    let answer = tonic_health::pb::health_client::HealthClient::new(health.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers")
        .into_inner();
    assert_eq!(answer.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    let other_rpc = status(health).await.expect_err("only health on the plaintext port");
    assert_eq!(other_rpc.code(), Code::Unimplemented);
    let (code, _) = crate::helpers::http_get(app.metrics_addr, "/readyz").await;
    assert_eq!(code, 200);
}

/// A service with mutual TLS whose principals file names one client certificate identity.
async fn mutual_app(dir: &Path) -> (TestApp, PathBuf, Ca) {
    let ca = Ca::new("test CA");
    let ca_path = ca.write(dir, "ca");
    let (cert, key) = ca.server(dir, "server");
    let principals = dir.join("principals.toml");
    std::fs::write(
        &principals,
        "[[principal]]\nname = \"factory-executor\"\nrole = \"service\"\n\
         tls_identity = \"spiffe://brain/factory-executor\"\n",
    )
    .expect("writes");
    let client_ca = Some(ca_path.clone());
    let app = spawn_app_in(&dir.join("data"), |config| {
        config.tls = Some(TlsFiles { cert, key, client_ca });
        config.auth_file = Some(principals);
    })
    .await;
    (app, ca_path, ca)
}

#[tokio::test]
async fn mutual_tls_maps_the_certificate_to_its_principal_and_refuses_clients_without_one() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, ca_path, ca) = mutual_app(dir.path()).await;

    let anonymous = match tls_channel(app.grpc_addr, &ca_path, None).await {
        Err(_) => true,
        Ok(channel) => status(channel).await.is_err(),
    };
    assert!(anonymous, "under mutual TLS a client without a certificate is refused");

    let stranger_ca = Ca::new("stranger CA");
    let stranger = stranger_ca.client(dir.path(), "stranger", "spiffe://brain/factory-executor");
    let refused = match tls_channel(app.grpc_addr, &ca_path, Some(&stranger)).await {
        Err(_) => true,
        Ok(channel) => status(channel).await.is_err(),
    };
    assert!(refused, "a certificate from another CA is refused, whatever it claims");

    let executor = ca.client(dir.path(), "executor", "spiffe://brain/factory-executor");
    let channel = tls_channel(app.grpc_addr, &ca_path, Some(&executor)).await.expect("mTLS");
    let recorded = AuditServiceClient::new(channel.clone())
        .record(pb::RecordRequest {
            event: Some(crate::helpers::event("factory.step_completed", "over mTLS")),
            idempotency_key: String::new(),
        })
        .await
        .expect("a service may record")
        .into_inner();
    let denied = SafeModeServiceClient::new(channel)
        .disable(pb::DisableRequest { reason: "let me run".into() })
        .await
        .expect_err("a service may not thaw");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("factory-executor"), "{}", denied.message());

    let nobody = ca.client(dir.path(), "nobody", "spiffe://brain/nobody");
    let channel = tls_channel(app.grpc_addr, &ca_path, Some(&nobody)).await.expect("handshake");
    let unknown = status(channel).await.expect_err("no principal names this certificate");
    assert_eq!(unknown.code(), Code::Unauthenticated);

    let events = app.ledger.store().expect("store");
    let bytes = events.get(recorded.seq).expect("reads").expect("stored");
    let record: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(record["source"], "factory-executor", "the certificate's principal is the source");
}

#[tokio::test]
async fn the_cli_speaks_mutual_tls() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, ca_path, ca) = mutual_app(dir.path()).await;
    let (cert, key) = ca.client(dir.path(), "executor", "spiffe://brain/factory-executor");
    let run = |with_cert: bool| {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["safe-mode", "status", "-o", "json"])
            .env_clear()
            .env("BRAIN_SERVER", format!("https://{}", app.grpc_addr))
            .arg("--ca")
            .arg(&ca_path);
        if with_cert {
            command.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
        command.output()
    };
    let output = run(true).await.expect("runs");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(shown["enabled"], false);
    let output = run(false).await.expect("runs");
    assert_eq!(output.status.code(), Some(3), "no certificate: the server cannot be reached");
}

#[tokio::test]
async fn certificates_reload_on_sighup_and_a_bad_set_keeps_the_one_in_force() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let first = Ca::new("first CA");
    let first_path = first.write(dir.path(), "first-ca");
    let (cert, key) = first.server(dir.path(), "server");
    let cert_env = cert.to_str().expect("utf8").to_owned();
    let key_env = key.to_str().expect("utf8").to_owned();
    let data = dir.path().join("data");
    let server =
        serve_process(&data, &[("BRAIN_TLS_CERT", &cert_env), ("BRAIN_TLS_KEY", &key_env)]);
    let channel = tls_channel(server.grpc_addr, &first_path, None).await.expect("first cert");
    status(channel.clone()).await.expect("served with the first certificate");

    // Rotate: a certificate from a new CA, written over the same files.
    let second = Ca::new("second CA");
    let second_path = second.write(dir.path(), "second-ca");
    second.server(dir.path(), "server");
    server.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(channel) = tls_channel(server.grpc_addr, &second_path, None).await
            && status(channel).await.is_ok()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let old = match tls_channel(server.grpc_addr, &first_path, None).await {
        Err(_) => true,
        Ok(channel) => status(channel).await.is_err(),
    };
    assert!(old, "new connections get the new certificate");

    // A broken key is refused and the certificate in force stays.
    std::fs::write(&key, "not a key").expect("writes");
    server.signal("HUP");
    let channel = tls_channel(server.grpc_addr, &second_path, None).await.expect("still served");
    let mut events = Vec::new();
    for _ in 0..100 {
        events = crate::helpers::list_all(
            &mut AuditServiceClient::new(channel.clone()),
            pb::AuditServiceListRequest {
                event_type_prefix: "system.tls_".into(),
                ..pb::AuditServiceListRequest::default()
            },
        )
        .await;
        if events.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let types: Vec<String> = events.iter().map(|e| e.event_type.clone()).collect();
    assert_eq!(types, ["system.tls_reloaded", "system.tls_reload_failed"]);
    assert!(
        record_of(&events[1])["metadata"]["error"]
            .as_str()
            .expect("error")
            .contains("BRAIN_TLS_KEY")
    );
    status(channel).await.expect("still serving with the second certificate");
}

#[test]
fn tls_settings_that_cannot_be_used_exit_64_naming_the_setting() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let missing = dir.path().join("missing.pem");
    for (env, setting) in [
        (vec![("BRAIN_TLS_CERT", missing.as_path())], "BRAIN_TLS_KEY"),
        (vec![("BRAIN_TLS_CLIENT_CA", missing.as_path())], "BRAIN_TLS_CLIENT_CA"),
        (
            vec![("BRAIN_TLS_CERT", missing.as_path()), ("BRAIN_TLS_KEY", missing.as_path())],
            "BRAIN_TLS_CERT",
        ),
    ] {
        let output = crate::helpers::serve_once(&dir.path().join("data"), &env);
        assert_eq!(output.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(setting), "{setting}: {stderr}");
    }
}
