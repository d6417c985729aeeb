//! `medley-shard`: serves one tensor-parallel rank of a model over a Unix socket.

use clap::Parser;
use medley_shard::cli::{ShardArgs, configure_threads, init_tracing, run};

/// Command line of the standalone shard binary.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Medley shard: one rank of a Llama-family model, served over gRPC"
)]
struct Cli {
    #[command(flatten)]
    args: ShardArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: nothing has started a thread yet.
    unsafe { configure_threads(cli.args.threads) };
    let exporter = init_tracing(&cli.args)?;
    let result = run(cli.args);
    // The last spans, once the engine and the server have stopped.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    result
}
