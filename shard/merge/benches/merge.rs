//! Merge benchmark: three TinyLlama-shaped rank-16 f32 adapters (all seven projections of 22
//! layers), every strategy, weights [2.0, 0.3, 0.7], density 0.2 where used. Prints a table of
//! min/median wall time and the peak extra heap memory of a merge (a counting global allocator:
//! peak live bytes during the merge minus live bytes before it) against the merged adapter's size.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p medley-merge --bench merge -- \
//!     --cache-dir /tmp/medley-merge-bench [--runs 5] [--svd-runs 1] [--skip-svd] \
//!     [--only ties,cat] [--layers N] [--write-outputs]
//! ```
//! Adapters are generated once into `--cache-dir` (PEFT format, also read by
//! `scripts/bench/peft_merge_bench.py`). `--write-outputs` saves each merge as a PEFT directory
//! under `<cache-dir>/out/<strategy>` for the accuracy comparison in that script.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use medley_merge::fixture::{AdapterFixture, LlamaShape};
use medley_merge::peft::{
    TargetModules, TensorDtype, WriteOptions, read_adapter_dir, write_merged_dir,
};
use medley_merge::{LoraAdapter, MergeSpec, MergedAdapter, Semantics, SignMethod, Strategy, merge};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Counts live heap bytes and their peak.
struct Counting;

fn grow(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counters
// are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Args {
    cache_dir: PathBuf,
    runs: usize,
    svd_runs: usize,
    skip_svd: bool,
    only: Option<Vec<String>>,
    write_outputs: bool,
    layers: Option<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        cache_dir: std::env::temp_dir().join("medley-merge-bench"),
        runs: 5,
        svd_runs: 1,
        skip_svd: false,
        only: None,
        write_outputs: false,
        layers: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cache-dir" => {
                args.cache_dir = it.next().map(PathBuf::from).unwrap_or(args.cache_dir)
            }
            "--runs" => args.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.runs),
            "--svd-runs" => {
                args.svd_runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(args.svd_runs)
            }
            "--skip-svd" => args.skip_svd = true,
            "--write-outputs" => args.write_outputs = true,
            "--only" => args.only = it.next().map(|v| v.split(',').map(String::from).collect()),
            "--layers" => args.layers = it.next().and_then(|v| v.parse().ok()),
            _ => {} // `cargo bench` passes `--bench`
        }
    }
    args
}

fn load_adapters(dir: &Path) -> Vec<LoraAdapter> {
    let shapes = LlamaShape::tinyllama().module_shapes();
    (1..=3u64)
        .map(|seed| {
            let d = dir.join(format!("tinyllama_r16_seed{seed}"));
            if !d.join("adapter_model.safetensors").exists() {
                let mut fx = AdapterFixture::new(16, seed);
                fx.base_model_name_or_path = Some("TinyLlama/TinyLlama-1.1B-Chat-v1.0".into());
                fx.write(&d, &shapes).expect("write fixture adapter");
                eprintln!("wrote {}", d.display());
            }
            let t = Instant::now();
            let a = read_adapter_dir(&d).expect("read adapter");
            eprintln!(
                "read {} in {:.0} ms",
                d.display(),
                t.elapsed().as_secs_f64() * 1e3
            );
            a.adapter
        })
        .collect()
}

/// CPU time of the whole process (all threads), in milliseconds.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

struct Row {
    label: String,
    times_ms: Vec<f64>,
    cpu_ms: Vec<f64>,
    out_bytes: usize,
    peak_extra: usize,
}

fn bench_one(spec: &MergeSpec, comps: &[&LoraAdapter], runs: usize) -> (Row, MergedAdapter) {
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut peak_extra = 0;
    let mut last = None;
    for _ in 0..runs.max(1) {
        drop(last.take());
        let before = CURRENT.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let c = cpu_ms();
        let t = Instant::now();
        let merged = merge(spec, comps).expect("merge");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        cpu.push(cpu_ms() - c);
        peak_extra = peak_extra.max(PEAK.load(Ordering::Relaxed) - before);
        last = Some(merged);
    }
    let merged = last.expect("at least one run");
    let label = match (spec.density, spec.semantics) {
        (Some(d), Semantics::Peft) => format!("{} d={d}", spec.strategy),
        (Some(d), Semantics::Lorax) => format!("{} d={d} (lorax)", spec.strategy),
        (None, Semantics::Peft) => spec.strategy.to_string(),
        (None, Semantics::Lorax) => format!("{} (lorax)", spec.strategy),
    };
    let label = if spec.sign_method == SignMethod::Frequency {
        format!("{label} freq")
    } else {
        label
    };
    (
        Row {
            label,
            times_ms: times,
            cpu_ms: cpu,
            out_bytes: merged.byte_size(),
            peak_extra,
        },
        merged,
    )
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.cache_dir).expect("cache dir");
    let mut adapters = load_adapters(&args.cache_dir);
    if let Some(n) = args.layers {
        // Keep the first n layers only (quick runs).
        let keep = |path: &str| {
            path.split('.')
                .nth(2)
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| l < n)
        };
        adapters = adapters
            .into_iter()
            .map(|a| {
                let mods = a
                    .modules()
                    .iter()
                    .filter(|(p, _)| keep(p))
                    .map(|(p, m)| (p.clone(), m.clone()));
                LoraAdapter::new(a.config_rank(), a.config_scale(), mods.collect())
            })
            .collect();
    }
    let comps: Vec<&LoraAdapter> = adapters.iter().collect();
    let in_mb = adapters[0].byte_size() as f64 / 1e6;
    println!(
        "3 adapters, TinyLlama shape ({} modules), r=16 f32, {in_mb:.1} MB each; rayon threads: {}",
        adapters[0].modules().len(),
        rayon::current_num_threads()
    );
    let w = vec![2.0f32, 0.3, 0.7];
    let d = 0.2f32;
    let s = |st: Strategy| MergeSpec::new(st, w.clone());
    let mut specs = vec![
        s(Strategy::Linear),
        s(Strategy::Ties).with_density(d),
        s(Strategy::Ties)
            .with_density(d)
            .with_sign_method(SignMethod::Frequency),
        s(Strategy::DareLinear).with_density(d).with_seed(1),
        s(Strategy::DareTies).with_density(d).with_seed(1),
        s(Strategy::MagnitudePrune).with_density(d),
        s(Strategy::Cat),
        s(Strategy::Linear).with_semantics(Semantics::Lorax),
        s(Strategy::Ties)
            .with_density(d)
            .with_semantics(Semantics::Lorax),
        s(Strategy::Svd),
        s(Strategy::TiesSvd).with_density(d),
        s(Strategy::DareLinearSvd).with_density(d).with_seed(1),
        s(Strategy::DareTiesSvd).with_density(d).with_seed(1),
        s(Strategy::MagnitudePruneSvd).with_density(d),
    ];
    specs.retain(|sp| {
        let svd_ok = !(args.skip_svd && sp.strategy.is_svd());
        let only_ok = args
            .only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == sp.strategy.name()));
        svd_ok && only_ok
    });
    println!(
        "| {:<28} | {:>9} | {:>9} | {:>10} | {:>4} | {:>8} | {:>11} | {:>5} |",
        "strategy", "min ms", "median ms", "min cpu ms", "runs", "out MB", "peak+ MB", "ratio"
    );
    println!(
        "|{:-<30}|{:->11}|{:->11}|{:->12}|{:->6}|{:->10}|{:->13}|{:->7}|",
        "", "", "", "", "", "", "", ""
    );
    for spec in &specs {
        let runs = if spec.strategy.is_svd() {
            args.svd_runs
        } else {
            args.runs
        };
        let (mut row, merged) = bench_one(spec, &comps, runs);
        row.times_ms.sort_by(f64::total_cmp);
        row.cpu_ms.sort_by(f64::total_cmp);
        let median = row.times_ms[row.times_ms.len() / 2];
        println!(
            "| {:<28} | {:>9.1} | {:>9.1} | {:>10.1} | {:>4} | {:>8.1} | {:>11.1} | {:>5.2} |",
            row.label,
            row.times_ms[0],
            median,
            row.cpu_ms[0],
            row.times_ms.len(),
            row.out_bytes as f64 / 1e6,
            row.peak_extra as f64 / 1e6,
            row.peak_extra as f64 / row.out_bytes as f64
        );
        if args.write_outputs && spec.semantics == Semantics::Peft {
            let name = match spec.sign_method {
                SignMethod::Frequency => format!("{}_frequency", spec.strategy),
                SignMethod::Total => spec.strategy.to_string(),
            };
            let opts = WriteOptions {
                target_modules: TargetModules::List(AdapterFixture::new(16, 0).targets),
                base_model_name_or_path: None,
                dtype: TensorDtype::F32,
            };
            write_merged_dir(&args.cache_dir.join("out").join(name), &merged, &opts)
                .expect("write output");
        }
    }
}
