//! `brain-ops evidence export|verify|public-keys`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use base64::Engine;
use clap::{Subcommand, ValueEnum};
use ed25519_dalek::pkcs8::DecodePublicKey;
use serde_json::json;
use tokio_stream::StreamExt;

use super::{ClientArgs, Failure, Output, exit, print_json};
use crate::evidence::keys::key_id_of;
use crate::grpc::convert::micros_to_pb;
use crate::ledger::record::parse_time;
use crate::pb;
use crate::pb::evidence_service_client::EvidenceServiceClient;

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Export a signed pack (streamed, any size) to a file.
    ///
    /// RPC: EvidenceService.ExportStream; with --unary, EvidenceService.Export
    Export {
        #[arg(long, value_enum)]
        scope: ScopeArg,
        /// Start of the range, inclusive (RFC 3339).
        #[arg(long)]
        from: String,
        /// End of the range, exclusive (RFC 3339).
        #[arg(long)]
        to: String,
        /// Export the ledger as of this seq (default: the head), for a repeatable pack.
        #[arg(long, default_value = "0")]
        as_of: u64,
        #[arg(long)]
        exclude_executor_summary: bool,
        /// Where to write the pack.
        #[arg(long)]
        out: PathBuf,
        /// Take the pack in one message (Export) rather than streamed; packs larger than the
        /// server's message limit are refused this way.
        #[arg(long)]
        unary: bool,
    },
    /// Verify a pack: offline with --public-key, else by the server (which also compares it
    /// with its ledger). Exits 0 when valid, 1 when not, with the problems listed.
    ///
    /// RPC: EvidenceService.VerifyStream; with --unary, EvidenceService.Verify; none offline
    Verify {
        /// The pack file.
        pack: PathBuf,
        /// The signer's public key: the `.pub` file of `brain-ops keygen` (SPKI PEM), or the
        /// base64 raw key that `evidence public-keys` prints.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Send the pack in one message (Verify) rather than streamed.
        #[arg(long, conflicts_with = "public_key")]
        unary: bool,
    },
    /// The public keys that verify this server's packs (the signing key and retired ones). Save
    /// one's base64 key to a file to verify offline with `verify --public-key`.
    ///
    /// RPC: EvidenceService.GetPublicKeys
    PublicKeys,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScopeArg {
    Audit,
    Investor,
    Internal,
}

pub(super) async fn run(client: &ClientArgs, command: EvidenceCommand) -> Result<u8, Failure> {
    let usage = |message: String| Failure { code: exit::USAGE, message };
    match command {
        EvidenceCommand::Export {
            scope,
            from,
            to,
            as_of,
            exclude_executor_summary,
            out,
            unary,
        } => {
            let time = |flag: &str, v: &str| {
                parse_time(v)
                    .map(micros_to_pb)
                    .ok_or_else(|| usage(format!("--{flag} {v:?} is not an RFC 3339 time")))
            };
            let scope = match scope {
                ScopeArg::Audit => pb::EvidenceScope::Audit,
                ScopeArg::Investor => pb::EvidenceScope::Investor,
                ScopeArg::Internal => pb::EvidenceScope::Internal,
            };
            let request = pb::ExportStreamRequest {
                from: Some(time("from", &from)?),
                to: Some(time("to", &to)?),
                scope: scope.into(),
                exclude_executor_summary,
                as_of_seq: as_of,
            };
            let (channel, bearer) = client.connect_with(true).await?;
            let mut evidence = EvidenceServiceClient::with_interceptor(channel, bearer);
            // The file is created once the server has accepted the export, and removed if the
            // export fails part way: a refused or broken export leaves nothing behind.
            let partial = out.with_extension("partial");
            let write_error = |e: std::io::Error| usage(format!("--out {}: {e}", out.display()));
            let create = || std::fs::File::create(&partial).map_err(write_error);
            let written = async {
                let mut bytes = 0;
                let file = if unary {
                    let request = pb::ExportRequest {
                        from: request.from,
                        to: request.to,
                        scope: request.scope,
                        exclude_executor_summary,
                        as_of_seq: as_of,
                    };
                    let pack = evidence.export(request).await?.into_inner().pack_json;
                    let mut file = create()?;
                    file.write_all(pack.as_bytes()).map_err(write_error)?;
                    bytes = pack.len();
                    file
                } else {
                    let mut stream = evidence.export_stream(request).await?.into_inner();
                    let mut file = create()?;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk?;
                        bytes += chunk.data.len();
                        file.write_all(&chunk.data).map_err(write_error)?;
                    }
                    file
                };
                file.sync_all().map_err(write_error)?;
                Ok::<usize, Failure>(bytes)
            }
            .await;
            let bytes = match written {
                Ok(bytes) => bytes,
                Err(failure) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(failure);
                }
            };
            std::fs::rename(&partial, &out).map_err(|e| usage(e.to_string()))?;
            let head = std::fs::read(&out).map_err(|e| usage(e.to_string()))?;
            let document: serde_json::Value = serde_json::from_slice(&head).unwrap_or_default();
            match client.output {
                Output::Json => print_json(&json!({
                    "file": out, "bytes": bytes,
                    "pack_id": document["pack_id"], "content_hash": document["content_hash"],
                })),
                Output::Human => println!(
                    "wrote {} ({bytes} bytes): {}",
                    out.display(),
                    document["pack_id"].as_str().unwrap_or("?")
                ),
            }
            Ok(exit::OK)
        }
        EvidenceCommand::PublicKeys => {
            let (channel, bearer) = client.connect().await?;
            let keys = EvidenceServiceClient::with_interceptor(channel, bearer)
                .get_public_keys(pb::GetPublicKeysRequest {})
                .await?
                .into_inner()
                .keys;
            match client.output {
                Output::Json => print_json(&serde_json::Value::Array(
                    keys.iter()
                        .map(|k| {
                            json!({
                                "key_id": k.key_id, "algorithm": k.algorithm,
                                "public_key": k.public_key, "retired": k.retired,
                            })
                        })
                        .collect(),
                )),
                Output::Human => {
                    println!("{:<16}  {:<8}  {:<7}  PUBLIC KEY (base64)", "KEY ID", "ALG", "STATE");
                    for k in &keys {
                        let state = if k.retired { "retired" } else { "signing" };
                        println!(
                            "{:<16}  {:<8}  {state:<7}  {}",
                            k.key_id, k.algorithm, k.public_key
                        );
                    }
                }
            }
            Ok(exit::OK)
        }
        EvidenceCommand::Verify { pack: path, public_key, unary } => {
            let opened = |path: &std::path::Path| {
                std::fs::File::open(path).map_err(|e| usage(format!("{}: {e}", path.display())))
            };
            let (valid, report) = match public_key {
                Some(key_file) => {
                    let key = read_public_key(&key_file).map_err(usage)?;
                    let keys: BTreeMap<String, [u8; 32]> = [(key_id_of(&key), key)].into();
                    let verdict = crate::evidence::verify::verify(opened(&path)?, &keys, None)
                        .map_err(|e| Failure { code: exit::NEGATIVE, message: e })?;
                    let problems: Vec<String> = verdict
                        .problems
                        .iter()
                        .filter(|p| *p != "not compared with a ledger")
                        .cloned()
                        .collect();
                    (
                        verdict.valid_offline(),
                        json!({
                            "valid": verdict.valid_offline(), "hash_valid": verdict.hash_valid,
                            "chain_valid": verdict.chain_valid, "signature_valid": verdict.signature_valid,
                            "matches_log": null, "computed_hash": verdict.computed_hash, "problems": problems,
                        }),
                    )
                }
                None => {
                    let mut file = Vec::new();
                    opened(&path)?
                        .read_to_end(&mut file)
                        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
                    let (channel, bearer) = client.connect_with(true).await?;
                    let mut evidence = EvidenceServiceClient::with_interceptor(channel, bearer);
                    let v = if unary {
                        let pack_json = String::from_utf8(file)
                            .map_err(|_| usage(format!("{}: not UTF-8", path.display())))?;
                        evidence.verify(pb::VerifyRequest { pack_json }).await?.into_inner().into()
                    } else {
                        let chunks: Vec<pb::VerifyStreamRequest> = file
                            .chunks(1 << 20)
                            .map(|c| pb::VerifyStreamRequest { data: c.to_vec() })
                            .collect();
                        evidence.verify_stream(tokio_stream::iter(chunks)).await?.into_inner()
                    };
                    (
                        v.valid,
                        json!({
                            "valid": v.valid, "hash_valid": v.hash_valid, "chain_valid": v.chain_valid,
                            "signature_valid": v.signature_valid, "matches_log": v.matches_log,
                            "computed_hash": v.computed_hash, "problems": v.problems,
                        }),
                    )
                }
            };
            match client.output {
                Output::Json => print_json(&report),
                Output::Human => {
                    println!("{}: {}", path.display(), if valid { "VALID" } else { "INVALID" });
                    for check in ["hash_valid", "chain_valid", "signature_valid", "matches_log"] {
                        let state = match &report[check] {
                            serde_json::Value::Bool(true) => "ok",
                            serde_json::Value::Bool(false) => "FAILED",
                            _ => "not checked (offline)",
                        };
                        println!("  {check}: {state}");
                    }
                    for problem in report["problems"].as_array().into_iter().flatten() {
                        println!("  problem: {}", problem.as_str().unwrap_or(""));
                    }
                }
            }
            Ok(if valid { exit::OK } else { exit::NEGATIVE })
        }
    }
}

/// A public key from a SPKI PEM file or a base64 raw key.
fn read_public_key(path: &PathBuf) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--public-key {}: {e}", path.display()))?;
    if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_pem(&text) {
        return Ok(key.to_bytes());
    }
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| {
            format!(
                "--public-key {}: neither a PEM public key nor a base64 Ed25519 key",
                path.display()
            )
        })
}
