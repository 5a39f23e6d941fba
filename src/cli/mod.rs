//! The `brain-ops` command line: `serve`, and client commands in the style of kubectl and
//! etcdctl. Every client command takes `--server` / `BRAIN_SERVER`, `--token` / `BRAIN_TOKEN`,
//! `-o human|json` and `--timeout-seconds`, and exits with one of the codes in [`exit`].

mod audit;
mod drill;
mod evidence;
mod keygen;
mod metrics;
mod overrides;
mod safe_mode;
mod token;

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::ServeArgs;

/// Exit codes of every command.
pub mod exit {
    /// The command did what was asked and the answer is positive.
    pub const OK: u8 = 0;
    /// The command ran, and the answer is negative (for example: the chain is broken).
    pub const NEGATIVE: u8 = 1;
    /// The command line is wrong.
    pub const USAGE: u8 = 2;
    /// The server could not be reached or is unavailable (retrying may help).
    pub const UNAVAILABLE: u8 = 3;
    /// The server refused the request (bad input, no permission, a failed precondition).
    pub const REFUSED: u8 = 4;
    /// `serve`: the configuration cannot be used.
    pub const CONFIG: u8 = 64;
    /// `serve`: the service failed while running.
    pub const SOFTWARE: u8 = 70;
}

/// brain-ops: safe mode, audit ledger, evidence packs and metrics for BRAiN.
#[derive(Debug, Parser)]
#[command(name = "brain-ops", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(Box<ServeArgs>),
    /// Record, read and verify the audit ledger.
    Audit {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Export and verify signed evidence packs.
    Evidence {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: evidence::EvidenceCommand,
    },
    /// Read the operational picture.
    Metrics {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: metrics::MetricsCommand,
    },
    /// Grant, consume, revoke and list emergency overrides.
    Override {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: overrides::OverrideCommand,
    },
    /// Run incident drills against a deployment, or against a scratch server (--local).
    Drill {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: drill::DrillCommand,
    },
    /// Make an Ed25519 key pair for signing evidence packs (offline).
    Keygen(keygen::KeygenArgs),
    /// Make bearer tokens for the principals file (offline).
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Freeze and thaw the platform, check operations, watch the kill switch.
    SafeMode {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: safe_mode::SafeModeCommand,
    },
    /// Print a shell completion script, e.g. `brain-ops completion bash > /etc/bash_completion.d/brain-ops`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// How a client command reaches the server and prints its answer.
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// Server address, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "BRAIN_SERVER", default_value = "http://127.0.0.1:50051", global = true)]
    pub server: String,
    /// Bearer token.
    #[arg(long, env = "BRAIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "human", global = true)]
    pub output: Output,
    /// Deadline for each call.
    #[arg(long, default_value = "10", global = true)]
    pub timeout_seconds: u64,
    /// CA certificate (PEM) that the server's certificate must chain to; turns on TLS.
    #[arg(long, env = "BRAIN_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --key.
    #[arg(long, env = "BRAIN_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "BRAIN_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

/// A failed client command: the message to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Failure {
        use tonic::Code;
        let code = match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                exit::UNAVAILABLE
            }
            _ => exit::REFUSED,
        };
        Failure { code, message: format!("{:?}: {}", status.code(), status.message()) }
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Debug)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// The header for `token`; `None` when the token holds characters a header cannot carry.
    pub fn new(token: Option<&str>) -> Option<Bearer> {
        match token {
            None => Some(Bearer(None)),
            Some(token) => format!("Bearer {token}").parse().ok().map(|v| Bearer(Some(v))),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ClientArgs {
    /// Connects to the server; every call has the `--timeout-seconds` deadline.
    pub async fn connect(&self) -> Result<(Channel, Bearer), Failure> {
        self.connect_with(false).await
    }

    /// Connects to the server; a streaming connection has no per-call deadline.
    pub async fn connect_with(&self, streaming: bool) -> Result<(Channel, Bearer), Failure> {
        let tls = self.ca.is_some() || self.cert.is_some();
        let server = match self.server.split_once("://") {
            // With TLS material the scheme follows it: an http:// address gets https.
            Some(("http", rest)) if tls => format!("https://{rest}"),
            Some(_) => self.server.clone(),
            None if tls => format!("https://{}", self.server),
            None => format!("http://{}", self.server),
        };
        let usage = |message: String| Failure { code: exit::USAGE, message };
        let timeout = Duration::from_secs(self.timeout_seconds.max(1));
        let mut endpoint = Endpoint::from_shared(server.clone())
            .map_err(|e| usage(format!("--server / BRAIN_SERVER {server:?}: {e}")))?
            .connect_timeout(timeout);
        if server.starts_with("https://") {
            endpoint = endpoint
                .tls_config(self.tls_config()?)
                .map_err(|e| usage(format!("the TLS settings cannot be used: {e}")))?;
        }
        if !streaming {
            endpoint = endpoint.timeout(timeout);
        }
        let channel = endpoint.connect().await.map_err(|e| Failure {
            code: exit::UNAVAILABLE,
            message: format!("cannot reach {server}: {e}"),
        })?;
        let bearer = Bearer::new(self.token.as_deref())
            .ok_or_else(|| usage("--token / BRAIN_TOKEN holds invalid characters".into()))?;
        Ok((channel, bearer))
    }
}

impl ClientArgs {
    /// TLS for the connection: the CA that vouches for the server and, for mutual TLS, this
    /// client's certificate.
    fn tls_config(&self) -> Result<ClientTlsConfig, Failure> {
        let read = |setting: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| Failure {
                code: exit::USAGE,
                message: format!("{setting}: cannot read {}: {e}", path.display()),
            })
        };
        let ca = self.ca.as_ref().ok_or_else(|| Failure {
            code: exit::USAGE,
            message: "an https:// server needs --ca / BRAIN_CA, the CA certificate that signed it"
                .into(),
        })?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config =
                config.identity(Identity::from_pem(read("--cert", cert)?, read("--key", key)?));
        }
        Ok(config)
    }
}

/// Runs a client command and returns the exit code.
pub async fn run_client(command: Command) -> u8 {
    let result = match command {
        Command::Serve(_) => unreachable!("serve is not a client command"),
        Command::Audit { client, command } => audit::run(&client, command).await,
        Command::SafeMode { client, command } => safe_mode::run(&client, command).await,
        Command::Token { command } => token::run(command),
        Command::Keygen(args) => keygen::run(args),
        Command::Evidence { client, command } => evidence::run(&client, command).await,
        Command::Metrics { client, command } => metrics::run(&client, command).await,
        Command::Override { client, command } => overrides::run(&client, command).await,
        Command::Drill { client, command } => drill::run(&client, command).await,
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "brain-ops", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
                // The reader stopped early (`| head`): nothing to report.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure {
                    code: exit::NEGATIVE,
                    message: format!("cannot write the completion script: {e}"),
                }),
                _ => Ok(exit::OK),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            failure.code
        }
    }
}

/// The command-line reference (docs/CLI.md): every command's `--help`, rendered by clap from
/// the definitions above, so the document cannot drift from the binary.
pub fn reference() -> String {
    let mut root = Cli::command();
    root.build();
    let mut out = String::from(
        "# brain-ops command-line reference\n\n\
         Generated from the command definitions (`src/cli/`) by the test `cli::reference_is_current`;\n\
         regenerate with `UPDATE_DOCS=1 cargo test --test it reference_is_current`.\n\
         Each command that calls an RPC names it (`RPC:`); `drill` calls several.\n",
    );
    fn walk(command: &mut clap::Command, depth: usize, out: &mut String) {
        let name = command.get_bin_name().unwrap_or(command.get_name()).to_owned();
        // The values in the environment that renders it are not part of the reference.
        let ids: Vec<_> = command.get_arguments().map(|a| a.get_id().clone()).collect();
        for id in ids {
            *command = std::mem::take(command).mut_arg(id, |a| a.hide_env_values(true));
        }
        let help = command.render_long_help().to_string();
        let help: Vec<&str> = help.trim_end().lines().map(str::trim_end).collect();
        let heading = "#".repeat(depth + 1);
        out.push_str(&format!("\n{heading} `{name}`\n\n```text\n{}\n```\n", help.join("\n")));
        for sub in command.get_subcommands_mut() {
            if sub.get_name() != "help" && !sub.is_hide_set() {
                walk(sub, depth + 1, out);
            }
        }
    }
    walk(&mut root, 1, &mut out);
    out
}

/// Prints a value as pretty JSON.
fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}
