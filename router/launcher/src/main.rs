//! `medley`: the user-facing executable.
//!
//! `medley serve [--model ID|DIR] ...` resolves the model, starts the `medley-shard` processes
//! and serves the LoRAX-compatible HTTP API and the `medley.v1` gRPC API. See
//! the `medley` library crate for the flags, the model resolution order and the exit codes.

use std::process::ExitCode;

use clap::Parser;
use medley::{Cli, Command};
use medley_router::logging;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let exporter = match logging::init_router(&args.router) {
                Ok(exporter) => exporter,
                Err(e) => {
                    eprintln!("medley: cannot set up logging: {e}");
                    return ExitCode::from(2);
                }
            };
            let code = run(medley::serve(*args));
            // The router's last spans (the runtime is gone: nothing adds more).
            if let Some(exporter) = exporter {
                exporter.shutdown();
            }
            code
        }
        Command::Merge(args) => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("medley merge: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let out = args.out.clone();
            match runtime.block_on(medley::merge::run(*args)) {
                Ok(r) => {
                    println!(
                        "wrote {} (rank {}, {} modules, {:.1} MB): read {:.0} ms, merge {:.0} ms, write {:.0} ms",
                        out.display(),
                        r.rank,
                        r.modules,
                        r.bytes as f64 / 1e6,
                        r.read.as_secs_f64() * 1e3,
                        r.merge.as_secs_f64() * 1e3,
                        r.write.as_secs_f64() * 1e3,
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("medley merge: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Eval(args) => {
            medley_eval::init_logging();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("medley eval: cannot start the async runtime: {e}");
                    return ExitCode::from(4);
                }
            };
            match runtime.block_on(medley_eval::run(*args)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("medley eval: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Shard(args) => {
            // SAFETY: the shard subcommand runs on the main thread before any other starts.
            unsafe { medley_shard::cli::configure_threads(args.threads) };
            let exporter = match medley_shard::cli::init_tracing(&args) {
                Ok(exporter) => exporter,
                Err(e) => {
                    eprintln!("Error: cannot set up logging: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let code = match medley_shard::cli::run(*args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("Error: {e:#}");
                    ExitCode::FAILURE
                }
            };
            if let Some(exporter) = exporter {
                exporter.shutdown();
            }
            code
        }
    }
}

/// Runs `future` on a multi-threaded Tokio runtime and turns its result into the exit code.
fn run(future: impl std::future::Future<Output = Result<(), medley::LauncherError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("medley: cannot start the async runtime: {e}");
            return ExitCode::from(6);
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
