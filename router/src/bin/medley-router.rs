//! `medley-router`: the router alone, for deployments that run shards separately (several routers
//! behind one Service, shards managed elsewhere). `medley serve` runs the same router in-process.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use medley_router::config::RouterArgs;
use medley_router::logging;
use medley_router::signals::ShutdownSignals;

/// Flags (each also read from an environment variable).
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Medley router: HTTP + gRPC fronts over running shards"
)]
struct Args {
    /// Model name reported by `/info`.
    #[arg(long, env = "MODEL_ID")]
    model_id: String,
    /// Path of the model's tokenizer.json.
    #[arg(long, env = "TOKENIZER_PATH")]
    tokenizer: PathBuf,
    /// Unix socket of each shard, rank 0 first (repeat the flag or separate with commas).
    #[arg(
        long = "shard-uds-path",
        env = "SHARD_UDS_PATHS",
        value_delimiter = ',',
        required = true
    )]
    shard_uds_paths: Vec<PathBuf>,
    #[command(flatten)]
    router: RouterArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let exporter = match logging::init_router(&args.router) {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("medley-router: cannot set up logging: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("medley-router: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    };
    // Spans still open in tasks end with the runtime; then the last ones are exported.
    drop(runtime);
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    code
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = args
        .router
        .into_config(args.model_id, args.tokenizer, args.shard_uds_paths)?;
    let mut signals = ShutdownSignals::install()?;
    let (config, backend) = medley_router::backend::connect(config).await?;
    medley_router::server::run(config, backend, async move {
        let sig = signals.recv().await;
        tracing::info!("{sig} received, shutting down");
    })
    .await?;
    Ok(())
}
