//! Parses the command line, sets up logging, runs the service or a client command, and maps the
//! outcome to an exit code (64 for configuration that cannot be used).

use std::process::ExitCode;

use brain_ops::cli::{self, Cli, Command, exit};
use brain_ops::config::Config;
use brain_ops::startup::App;
use brain_ops::telemetry;
use clap::Parser;
use clap::error::ErrorKind;

/// mimalloc rather than the system allocator: the ledger's start-up decoding and the writer
/// allocate on one thread and free on another, where glibc's malloc spends a third of the time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let serving = std::env::args().nth(1).as_deref() == Some("serve");
            return ExitCode::from(match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => exit::OK,
                _ if serving => exit::CONFIG,
                _ => exit::USAGE,
            });
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    ExitCode::from(match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        client => runtime.block_on(cli::run_client(client)),
    })
}

async fn serve(args: brain_ops::config::ServeArgs) -> u8 {
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::CONFIG;
        }
    };
    telemetry::init(config.log_format);
    let stop = shutdown_signal();
    let app = match App::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "brain-ops cannot start");
            eprintln!("error: {e}");
            return if e.is_config() { exit::CONFIG } else { exit::SOFTWARE };
        }
    };
    match app.run_until_stopped(stop).await {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!(error = %e, "brain-ops failed");
            exit::SOFTWARE
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, before the
/// ledger is verified, so a stop asked for during a long start-up is honoured as soon as the
/// service runs (and is not lost: as PID 1 in a container, a signal without a handler is dropped).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
