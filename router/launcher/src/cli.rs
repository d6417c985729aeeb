//! The `medley` command line: one subcommand per tool. Adding one (e.g. `medley merge`) is a new
//! [`Command`] variant with its own `clap::Args` struct plus a match arm in `bin/medley.rs`.

use super::args::ServeArgs;

/// `medley`: Medley's single user-facing executable.
#[derive(Debug, clap::Parser)]
#[command(name = "medley", version, about = "Multi-LoRA LLM inference server", long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `medley`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Resolve the model, start the shards and serve HTTP + gRPC until SIGINT/SIGTERM.
    ///
    /// Exit codes: 0 stopped by a signal, 1 router failure, 2 invalid arguments,
    /// 3 model resolution failed, 4 a shard failed to start, 5 a shard died while serving,
    /// 6 launcher I/O failure (signals, sockets).
    Serve(Box<ServeArgs>),
    /// Merge PEFT LoRA adapters into a new PEFT adapter directory (same strategies and numerics
    /// as per-request merges in the server).
    Merge(Box<crate::merge::MergeArgs>),
    /// Score task sets against a running server for the base model, single adapters and merges
    /// (incl. a strategy x density x weights sweep): how much of each adapter's skill a merge
    /// keeps.
    Eval(Box<medley_eval::EvalArgs>),
    /// Serve one shard (what `medley serve` starts for each rank; the same as `medley-shard`).
    #[command(hide = true)]
    Shard(Box<medley_shard::cli::ShardArgs>),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        // clap's own consistency checks (duplicate flags or env names, bad defaults...).
        Cli::command().debug_assert();
    }

    #[test]
    fn a_subcommand_is_required() {
        use clap::Parser;
        assert!(Cli::try_parse_from(["medley"]).is_err());
        assert!(Cli::try_parse_from(["medley", "serve"]).is_ok());
    }

    #[test]
    fn eval_is_a_subcommand() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["medley", "eval", "--tasks", "sql.jsonl", "--sweep"]);
        assert!(matches!(cli.map(|c| c.command), Ok(Command::Eval(_))));
        assert!(
            Cli::try_parse_from(["medley", "eval"]).is_ok(),
            "without --tasks: the demo's held-out sets"
        );
    }
}
