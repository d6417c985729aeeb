//! Prefill throughput of one request, Medley's `LlamaModel` against transformers, from 128 to
//! 4,096 prompt tokens (f32, CPU).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p medley-shard --bench prefill -- \
//!     --python ../target/medley-oracle-env/bin/python
//! cargo bench -p medley-shard --bench prefill -- --preset tiny --lengths 128,512 --repeats 1
//! ```
//!
//! For each length `n`: a fresh KV cache, one sequence of `n` random tokens (the same for both
//! sides), prefilled in forward steps of at most `--chunk` tokens (512 by default, what `medley
//! serve` does with a lone prompt; 0: one step of the whole prompt; `all_logits: false`: the
//! last token's logits), best of `--repeats` in each of `--rounds` rounds (each round times Medley,
//! then transformers), after one warm-up at the smallest length. A second table gives the ratios
//! within each round and their median (with two rounds or more). Steps of
//! 512 keep the activations of a step (the MLP's intermediate is `n × intermediate × 4` bytes)
//! in the caches, where one 4,096-token step streams ~100 MB through memory per elementwise op. With `--python` (a Python
//! with torch and transformers), `scripts/bench/prefill_transformers.py` times
//! `LlamaForCausalLM` (SDPA, f32, `use_cache=False`) on the same checkpoint and token ids in the
//! same run, with as many torch threads as Medley has; it computes the logits of every position
//! unless `--transformers-last-logits`. The table's last columns are Medley's tok/s relative to
//! its own at 512 tokens, and the ceiling of that ratio: what it would be if every FLOP of the
//! forward (projections, MLP, causal attention, the last row's `lm_head`) ran at one rate. As the
//! prompt grows, attention's share of the work grows with it (a model with a small hidden size
//! and many heads, like SmolLM2-135M, reaches a ratio well below 1 even at a constant FLOP
//! rate); the `GFLOP/s` column shows the rate Medley reached.
//!
//! Random models come from `medley_shard::fixture::write_model` (SmolLM2-135M's shape by default,
//! tied embeddings), written once under `--cache-dir`. `RAYON_NUM_THREADS` sets the CPU threads
//! of both sides. `cargo bench` runs the binary in `shard/`, so relative paths start there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, ValueEnum};
use medley_shard::fixture::{
    FixtureDType, ModelFixture, smollm2_135m_config, tiny_config, tinyllama_config,
};
use medley_shard::kv_cache::{DEFAULT_BLOCK_TOKENS, KvCache, KvCacheConfig};
use medley_shard::model::{ForwardBatch, LlamaModel, LoadOptions, NoLora, SeqChunk};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// SmolLM2-135M's shape.
    Smollm2,
    /// TinyLlama-1.1B's shape.
    Tinyllama,
    /// The 2-layer test fixture shape.
    Tiny,
}

#[derive(Parser, Debug)]
#[command(about = "Prefill throughput of one request, Medley vs transformers")]
struct Args {
    /// An existing Hugging Face checkpoint (overrides --preset).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Shape of the random model to generate.
    #[arg(long, value_enum, default_value = "smollm2")]
    preset: Preset,
    /// Keep only the first N decoder layers of the preset.
    #[arg(long)]
    layers: Option<usize>,
    /// Where generated models (and the prompts given to transformers) are kept between runs.
    #[arg(long, default_value = "/tmp/medley-prefill-bench")]
    cache_dir: PathBuf,
    /// Comma-separated prompt lengths.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,256,512,1024,2048,4096"
    )]
    lengths: Vec<usize>,
    /// Timed runs per length and round; the fastest counts.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Rounds of Medley's runs then transformers' (each side's best over all rounds counts):
    /// on a shared machine whose speed drifts over minutes, both sides then sample the same
    /// stretches of time rather than Medley's runs one stretch and transformers' the next.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// A Python with torch and transformers: also time transformers' forward.
    #[arg(long)]
    python: Option<PathBuf>,
    /// transformers computes the last position's logits only (`logits_to_keep=1`), like Medley.
    #[arg(long)]
    transformers_last_logits: bool,
    /// Medley prefills the prompt in forward steps of at most this many tokens, as `medley
    /// serve` does with a lone prompt (its default `--max-idle-prefill-tokens`, 512); 0: the
    /// whole prompt in one step.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The checkpoint to benchmark, generated (f32) under the cache dir unless `--model-dir`.
fn model_dir(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.model_dir {
        return Ok(dir.clone());
    }
    let mut fx = ModelFixture::tiny(FixtureDType::F32);
    fx.config = match args.preset {
        Preset::Smollm2 => smollm2_135m_config(),
        Preset::Tinyllama => tinyllama_config(),
        Preset::Tiny => tiny_config(),
    };
    if let Some(l) = args.layers {
        fx.config.num_hidden_layers = l;
    }
    let name = format!("{:?}-{}l-float32", args.preset, fx.config.num_hidden_layers).to_lowercase();
    Ok(fx.cached(Some(&args.cache_dir), &name)?.dir)
}

/// Seconds of the prefill of `tokens` with a fresh cache, in forward steps of at most `chunk`
/// tokens (0: one step).
fn prefill(model: &LlamaModel, tokens: &[u32], chunk: usize) -> anyhow::Result<f64> {
    let n = tokens.len();
    let mut kv = KvCache::new(
        model.config(),
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(n.next_multiple_of(DEFAULT_BLOCK_TOKENS)),
    )?;
    kv.allocate(0, n)?;
    let step = if chunk == 0 { n } else { chunk };
    let t = Instant::now();
    for start in (0..n).step_by(step) {
        let batch = ForwardBatch {
            chunks: vec![SeqChunk {
                seq_id: 0,
                tokens: tokens[start..(start + step).min(n)].to_vec(),
                start_pos: start,
                adapter_slot: 0,
                all_logits: false,
            }],
        };
        let logits = model.forward(&batch, &mut kv, &NoLora)?;
        anyhow::ensure!(logits.dims() == [1, model.config().vocab_size]);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Floating-point operations of one prefill of `n` tokens (multiply-adds count 2): every
/// projection and MLP matmul for each token, `Q·Kᵀ` and `P·V` over the causal triangle, and
/// `lm_head` for the last row.
fn prefill_flops(cfg: &medley_shard::model::ModelConfig, n: usize) -> f64 {
    let (h, d) = (cfg.hidden_size as f64, cfg.head_dim as f64);
    let (heads, kv) = (
        cfg.num_attention_heads as f64,
        cfg.num_key_value_heads as f64,
    );
    let per_layer_params =
        2.0 * h * heads * d + 2.0 * h * kv * d + 3.0 * h * cfg.intermediate_size as f64;
    let n = n as f64;
    let layers = cfg.num_hidden_layers as f64;
    let linear = 2.0 * n * per_layer_params * layers;
    // Query i sees i + 1 keys: two products of `d` multiply-adds per (query, key, head).
    let attention = 2.0 * 2.0 * d * heads * (n * (n + 1.0) / 2.0) * layers;
    linear + attention + 2.0 * h * cfg.vocab_size as f64
}

/// transformers' best seconds per length, from `scripts/bench/prefill_transformers.py`.
fn transformers_times(
    args: &Args,
    python: &Path,
    dir: &Path,
    prompts: &BTreeMap<usize, Vec<u32>>,
    threads: usize,
) -> anyhow::Result<BTreeMap<usize, f64>> {
    let ids_path = args.cache_dir.join("prefill-ids.json");
    let ids: BTreeMap<String, &Vec<u32>> =
        prompts.iter().map(|(n, v)| (n.to_string(), v)).collect();
    std::fs::create_dir_all(&args.cache_dir)?;
    std::fs::write(
        &ids_path,
        serde_json::to_string(&serde_json::json!({ "lengths": args.lengths, "ids": ids }))?,
    )?;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/prefill_transformers.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg("--model-dir")
        .arg(dir)
        .arg("--ids")
        .arg(&ids_path)
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--repeats")
        .arg(args.repeats.to_string());
    if args.transformers_last_logits {
        cmd.arg("--last-logits");
    }
    eprintln!("running {}", script.display());
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        out.status
    );
    let mut times = BTreeMap::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(n), Some(s)) = (v["tokens"].as_u64(), v["seconds"].as_f64()) {
            times.insert(n as usize, s);
        }
    }
    Ok(times)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.lengths.is_empty()
            && args.lengths.iter().all(|&n| n > 0)
            && args.repeats > 0
            && args.rounds > 0,
        "need positive lengths, repeats and rounds"
    );
    // As `medley serve`'s shards do, before loading.
    medley_shard::engine::keep_freed_memory();
    let dir = model_dir(&args)?;
    let t = Instant::now();
    let model = LlamaModel::load(
        &dir,
        &LoadOptions {
            dtype: Some(candle_core::DType::F32),
            device: Device::Cpu,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading {}", dir.display()))?;
    let cfg = model.config().clone();
    // candle's CPU pool follows RAYON_NUM_THREADS, as rayon's does.
    let threads = candle_core::utils::get_num_threads();
    println!(
        "model {} | layers {} hidden {} heads {}/{} vocab {} tied {} | f32 CPU | {} threads | load {:.2}s",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
        cfg.tie_word_embeddings,
        threads,
        t.elapsed().as_secs_f64()
    );

    let vocab = cfg.vocab_size as u32;
    let prompts: BTreeMap<usize, Vec<u32>> = args
        .lengths
        .iter()
        .map(|&n| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
            (n, (0..n).map(|_| rng.random_range(3..vocab)).collect())
        })
        .collect();

    let smallest = prompts.values().next().context("no lengths")?;
    prefill(&model, smallest, args.chunk)?;
    // Each round's bests: each side's best over the rounds makes the first table, the ratios
    // within each round the second.
    let mut per_round: Vec<Round> = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        let mut this = Round::default();
        for &n in &args.lengths {
            let mut best = f64::INFINITY;
            for _ in 0..args.repeats {
                best = best.min(prefill(&model, &prompts[&n], args.chunk)?);
            }
            eprintln!("round {round}: medley {n} tokens: {best:.3}s");
            this.medley.insert(n, best);
        }
        if let Some(python) = &args.python {
            for (n, s) in transformers_times(&args, python, &dir, &prompts, threads)? {
                eprintln!("round {round}: transformers {n} tokens: {s:.3}s");
                this.hf.insert(n, s);
            }
        }
        per_round.push(this);
    }
    let best = |side: fn(&Round) -> &BTreeMap<usize, f64>| -> BTreeMap<usize, f64> {
        let mut best = BTreeMap::new();
        for (&n, &s) in per_round.iter().flat_map(side) {
            let e = best.entry(n).or_insert(f64::INFINITY);
            *e = e.min(s);
        }
        best
    };
    let (medley, hf) = (best(|r| &r.medley), best(|r| &r.hf));
    drop(model);

    let rate = |n: usize, s: f64| n as f64 / s;
    let at_512 = medley.get(&512).map(|&s| rate(512, s));
    let logits = if args.transformers_last_logits {
        "last position"
    } else {
        "every position"
    };
    let steps = match args.chunk {
        0 => "one forward step".to_string(),
        c => format!("forward steps of at most {c} tokens"),
    };
    println!(
        "\nbest of {} x {} rounds | medley: {steps} | transformers: SDPA, use_cache=False, logits of {logits}\n",
        args.repeats, args.rounds
    );
    println!(
        "| tokens | medley s | medley tok/s | medley GFLOP/s | transformers s | transformers tok/s | medley/transformers | tok/s vs 512 | ceiling vs 512 |"
    );
    println!(
        "|-------:|---------:|-------------:|---------------:|---------------:|-------------------:|--------------------:|-------------:|---------------:|"
    );
    // tok/s vs 512 if every FLOP ran at one rate.
    let ceiling =
        |n: usize| (prefill_flops(&cfg, 512) / 512.0) / (prefill_flops(&cfg, n) / n as f64);
    let dash = || "-".to_string();
    for &n in &args.lengths {
        let m = medley[&n];
        let h = hf.get(&n).copied();
        println!(
            "| {n:>6} | {m:>8.3} | {:>12.1} | {:>14.1} | {:>14} | {:>18} | {:>19} | {:>12} | {:>13.0}% |",
            rate(n, m),
            prefill_flops(&cfg, n) / m / 1e9,
            h.map_or_else(dash, |s| format!("{s:.3}")),
            h.map_or_else(dash, |s| format!("{:.1}", rate(n, s))),
            h.map_or_else(dash, |s| format!("{:.2}", s / m)),
            at_512.map_or_else(dash, |r| format!("{:.0}%", 100.0 * rate(n, m) / r)),
            100.0 * ceiling(n),
        );
    }
    print_per_round(&args.lengths, &per_round);
    Ok(())
}

/// One round's best times (seconds) per length: Medley's, then transformers'.
#[derive(Default)]
struct Round {
    medley: BTreeMap<usize, f64>,
    hf: BTreeMap<usize, f64>,
}

/// The ratios within each round (runs minutes apart, where the table above pairs each side's
/// best over the whole run): on a machine whose speed drifts by more than the differences
/// measured, one lucky run at one length moves the table's ratios, the median of the rounds'
/// much less.
fn print_per_round(lengths: &[usize], rounds: &[Round]) {
    if rounds.len() < 2 {
        return;
    }
    let median = |mut v: Vec<f64>| -> Option<f64> {
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let show = |v: &[f64], f: &dyn Fn(f64) -> String| -> String {
        let Some(mid) = median(v.to_vec()) else {
            return "-".to_string();
        };
        let all: Vec<String> = v.iter().map(|&x| f(x)).collect();
        format!("{} ({})", f(mid), all.join(", "))
    };
    println!("\nper round, median (each round's value):\n");
    println!("| tokens | medley/transformers | tok/s vs 512 |");
    println!("|-------:|--------------------:|-------------:|");
    for &n in lengths {
        let vs_hf: Vec<f64> = rounds
            .iter()
            .filter_map(|r| Some(r.hf.get(&n)? / r.medley.get(&n)?))
            .collect();
        let vs_512: Vec<f64> = rounds
            .iter()
            .filter_map(|r| Some(r.medley.get(&512)? * n as f64 / (512.0 * r.medley.get(&n)?)))
            .collect();
        println!(
            "| {n:>6} | {} | {} |",
            show(&vs_hf, &|x| format!("{x:.2}")),
            show(&vs_512, &|x| format!("{:.0}%", 100.0 * x)),
        );
    }
}
