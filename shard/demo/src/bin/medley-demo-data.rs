//! `medley-demo-data`: writes the demo's data files.
//!
//! * `tasks --out DIR --seed S [--n 100]`: the held-out sets `sql.jsonl`, `ad.jsonl`,
//!   `instruct.jsonl` in `medley eval`'s JSONL form.
//! * `tokenizer --out DIR [--seed S]`: the demo tokenizer's `tokenizer.json` and
//!   `tokenizer_config.json`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use medley_demo::heldout::{HELDOUT_N, HELDOUT_SEED, HeldoutOptions, write_heldout};
use medley_demo::tokenizer::{TokenizerOptions, tokenizer, write_tokenizer};

/// Writes the demo's data files.
#[derive(Debug, Parser)]
#[command(name = "medley-demo-data", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes the held-out task sets (sql.jsonl, ad.jsonl, instruct.jsonl).
    Tasks {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Generator seed (the committed sets use 0).
        #[arg(long, default_value_t = HELDOUT_SEED)]
        seed: u64,
        /// Examples per task.
        #[arg(long, default_value_t = HELDOUT_N)]
        n: usize,
    },
    /// Trains the demo tokenizer and writes tokenizer.json and tokenizer_config.json.
    Tokenizer {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the corpus and training splits it is trained on.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn run(cli: Cli) -> Result<(), medley_demo::DemoError> {
    match cli.command {
        Command::Tasks { out, seed, n } => {
            for path in write_heldout(&out, &HeldoutOptions { seed, n })? {
                println!("{}", path.display());
            }
        }
        Command::Tokenizer { out, seed } => {
            let tok = tokenizer(&TokenizerOptions {
                seed,
                ..TokenizerOptions::default()
            })?;
            write_tokenizer(&tok, &out)?;
            println!("{} (vocab {})", out.display(), tok.get_vocab_size(true));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("medley-demo-data: {e}");
            ExitCode::FAILURE
        }
    }
}
