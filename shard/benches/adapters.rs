//! Cost of serving many LoRA adapters in one batch: decode steps (and one prefill) of 16
//! sequences over 8 distinct rank-16 adapters against the same 16 sequences on the base model,
//! with the `medley_kernels` path and the candle-ops path of the adapter store, plus the LoRA
//! application alone per projection.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p medley-shard --bench adapters -- \
//!     --cache-dir /tmp/medley-bench --layers 4 --decode-steps 16
//! ```
//!
//! The model is TinyLlama-1.1B's shape cut to `--layers` layers (random weights from
//! `medley_shard::fixture::write_model`, cached under `--cache-dir`); the adapters are
//! `medley_merge::fixture` adapters on all seven projections, built in memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use medley_merge::fixture::AdapterFixture;
use medley_shard::adapters::{AdapterStore, BaseModules, LoraBackend, SlotWeights};
use medley_shard::fixture::{
    CachedModel, FixtureDType, ModelFixture, adapter_shape, tinyllama_config,
};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{
    ForwardBatch, LlamaModel, LoadOptions, LoraDelta, RowSlots, SeqChunk, TargetModule,
};
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Multi-adapter LoRA cost in prefill and decode steps")]
struct Args {
    /// Decoder layers of the TinyLlama-shaped model.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Where the generated model is kept between runs (a temp dir otherwise).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Distinct adapters (sequence `i` uses adapter `i % adapters`).
    #[arg(long, default_value_t = 8)]
    adapters: usize,
    /// LoRA rank of every adapter.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Decode steps per round (the median over all rounds is reported).
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Rounds of one prefill and the decode steps, per configuration.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Configurations to run (`base`, `kernels`, `candle`); e.g. one of them under a profiler.
    #[arg(long, value_delimiter = ',', default_value = "base,kernels,candle")]
    configs: Vec<String>,
    /// Skip the per-projection `apply` table.
    #[arg(long)]
    no_apply_table: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn model_dir(args: &Args) -> anyhow::Result<CachedModel> {
    let mut fx = ModelFixture::tiny(FixtureDType::F32);
    fx.config = tinyllama_config();
    fx.config.num_hidden_layers = args.layers;
    let name = format!("tinyllama-{}l-float32", args.layers);
    Ok(fx.cached(args.cache_dir.as_deref(), &name)?)
}

/// A store with `n` rank-`rank` adapters in slots `1..=n`.
fn store(
    model: &LlamaModel,
    n: usize,
    rank: usize,
    backend: LoraBackend,
) -> anyhow::Result<AdapterStore> {
    let cfg = model.config();
    let base = BaseModules::from_config(cfg);
    let shape = adapter_shape(cfg).module_shapes();
    let mut st = AdapterStore::new(n as u32, u64::MAX, backend);
    for slot in 1..=n {
        let adapter = AdapterFixture::new(rank, 1000 + slot as u64).adapter(&shape)?;
        let w = SlotWeights::from_adapter(&adapter, &base)?;
        st.install(slot as u32, w.to_device(&base, model.device())?)?;
    }
    Ok(st)
}

/// One configuration under test: the slots of its sequences and their KV cache.
struct Session<'a> {
    name: String,
    lora: &'a AdapterStore,
    slots: Vec<u32>,
    kv: KvCache,
    pos: usize,
    prefill_ms: Vec<f64>,
    step_ms: Vec<f64>,
}

impl<'a> Session<'a> {
    fn new(
        name: String,
        model: &LlamaModel,
        lora: &'a AdapterStore,
        slots: Vec<u32>,
        args: &Args,
    ) -> anyhow::Result<Self> {
        let kv = KvCache::new(
            model.config(),
            model.dtype(),
            model.device(),
            KvCacheConfig::tokens(slots.len() * (args.prompt_len + args.decode_steps + 2) + 64),
        )?;
        Ok(Self {
            name,
            lora,
            slots,
            kv,
            pos: 0,
            prefill_ms: Vec::new(),
            step_ms: Vec::new(),
        })
    }

    fn batch(&self, tokens: &mut dyn FnMut() -> Vec<u32>) -> ForwardBatch {
        ForwardBatch {
            chunks: self
                .slots
                .iter()
                .enumerate()
                .map(|(s, &slot)| SeqChunk {
                    seq_id: s as u64,
                    tokens: tokens(),
                    start_pos: self.pos,
                    adapter_slot: slot,
                    all_logits: false,
                })
                .collect(),
        }
    }

    /// Restarts every sequence with a random prompt; records the prefill time.
    fn prefill(
        &mut self,
        model: &LlamaModel,
        args: &Args,
        tok: &mut dyn FnMut() -> u32,
    ) -> anyhow::Result<()> {
        for s in 0..self.slots.len() as u64 {
            self.kv.free(s);
            self.kv
                .allocate(s, args.prompt_len + args.decode_steps + 2)?;
        }
        self.pos = 0;
        let batch = self.batch(&mut || (0..args.prompt_len).map(|_| tok()).collect());
        let t = Instant::now();
        model.forward(&batch, &mut self.kv, self.lora)?;
        self.prefill_ms.push(t.elapsed().as_secs_f64() * 1e3);
        self.pos = args.prompt_len;
        Ok(())
    }

    /// One decode step, recorded unless it is the warm-up step.
    fn step(
        &mut self,
        model: &LlamaModel,
        tok: &mut dyn FnMut() -> u32,
        record: bool,
    ) -> anyhow::Result<()> {
        let batch = self.batch(&mut || vec![tok()]);
        let t = Instant::now();
        model.forward(&batch, &mut self.kv, self.lora)?;
        if record {
            self.step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        self.pos += 1;
        Ok(())
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median time of `apply` alone for one projection of layer 0 (µs).
fn apply_us(
    st: &AdapterStore,
    module: TargetModule,
    rows: &RowSlots,
    model: &LlamaModel,
) -> anyhow::Result<f64> {
    let base = BaseModules::from_config(model.config());
    let (out, inp) = base.shape(module);
    let n = rows.len();
    let x = Tensor::randn(0f32, 1.0, (n, inp), &Device::Cpu)?;
    let y = Tensor::zeros((n, out), DType::F32, &Device::Cpu)?;
    let mut times = Vec::new();
    for i in 0..21 {
        let t = Instant::now();
        let r = st.apply(0, module, &x, y.clone(), rows)?;
        std::hint::black_box(r);
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(median(&mut times))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.adapters > 0 && args.decode_steps > 0 && args.rounds > 0,
        "batch, adapters, decode steps and rounds must be positive"
    );
    let model_dir = model_dir(&args)?;
    let dir = &model_dir.dir;
    let model = LlamaModel::load(dir, &LoadOptions::default())
        .with_context(|| format!("loading {}", dir.display()))?;
    let kernels = store(&model, args.adapters, args.rank, LoraBackend::Kernels)?;
    let candle = store(&model, args.adapters, args.rank, LoraBackend::Candle)?;
    let cfg = model.config();
    println!(
        "model: TinyLlama shape, {} layers (hidden {}, intermediate {}, vocab {}), f32, {} threads",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        rayon::current_num_threads()
    );
    println!(
        "{} sequences over {} rank-{} adapters ({} MiB of adapter weights), prompt {} tokens; medians over {} rounds of 1 prefill + {} decode steps\n",
        args.batch,
        args.adapters,
        args.rank,
        kernels.used_bytes() >> 20,
        args.prompt_len,
        args.rounds,
        args.decode_steps
    );
    // Sequence i uses adapter i % n + 1: rows of one adapter are not adjacent.
    let lora_slots: Vec<u32> = (0..args.batch)
        .map(|i| (i % args.adapters) as u32 + 1)
        .collect();
    let all = [
        Session::new(
            "base model only".into(),
            &model,
            &kernels,
            vec![0; args.batch],
            &args,
        )?,
        Session::new(
            format!("{} adapters, medley_kernels SGMV/BGMV", args.adapters),
            &model,
            &kernels,
            lora_slots.clone(),
            &args,
        )?,
        Session::new(
            format!(
                "{} adapters, candle ops (index_select/matmul/index_add)",
                args.adapters
            ),
            &model,
            &candle,
            lora_slots.clone(),
            &args,
        )?,
    ];
    let mut sessions: Vec<Session> = all
        .into_iter()
        .zip(["base", "kernels", "candle"])
        .filter(|(_, key)| args.configs.iter().any(|c| c == key))
        .map(|(s, _)| s)
        .collect();
    anyhow::ensure!(
        !sessions.is_empty(),
        "--configs names none of base, kernels, candle"
    );
    // The configurations take turns (each prefills, then each decodes one step at a time), so a
    // change of the machine's background load affects all of them alike.
    let vocab = cfg.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut tok = move || rng.random_range(3..vocab);
    for round in 0..args.rounds {
        for s in sessions.iter_mut() {
            s.prefill(&model, &args, &mut tok)?;
        }
        for step in 0..=args.decode_steps {
            for s in sessions.iter_mut() {
                s.step(&model, &mut tok, step > 0)?;
            }
        }
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }
    let base_step = median(&mut sessions[0].step_ms.clone());
    let base_name = sessions[0].name.clone();
    println!("| configuration | prefill ms | decode ms / step | decode vs {base_name} |");
    println!("|---|---:|---:|---:|");
    for s in sessions.iter_mut() {
        let step = median(&mut s.step_ms);
        println!(
            "| {} | {:.1} | {:.2} | {:.3} |",
            s.name,
            median(&mut s.prefill_ms),
            step,
            step / base_step
        );
    }
    if args.no_apply_table {
        return Ok(());
    }
    println!(
        "\nLoRA `apply` alone, layer 0, median µs (decode: {} rows; prefill: {} rows)\n",
        args.batch,
        args.batch * args.prompt_len
    );
    println!("| projection | decode kernels | decode candle | prefill kernels | prefill candle |");
    println!("|---|---:|---:|---:|---:|");
    let decode_rows = RowSlots::new(lora_slots.clone());
    let prefill_rows = RowSlots::new(
        lora_slots
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, args.prompt_len))
            .collect(),
    );
    for module in TargetModule::ALL {
        let mut cells = Vec::new();
        for rows in [&decode_rows, &prefill_rows] {
            for st in [&kernels, &candle] {
                cells.push(apply_us(st, module, rows, &model)?);
            }
        }
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            module.name(),
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        );
    }
    Ok(())
}
