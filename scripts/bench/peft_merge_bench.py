#!/usr/bin/env python3
"""PEFT's `add_weighted_adapter` on the benchmark adapters of `cargo bench -p medley-merge --bench merge`.

Setup: python 3.11 with torch 2.15 (CPU), transformers 4.57.6, peft 0.21.2, safetensors (here
/work/oracle/venv/bin/python). First run the Rust benchmark, which writes the three TinyLlama-shaped
rank-16 f32 adapters into its cache directory (and, with --write-outputs, its merges):

    RAYON_NUM_THREADS=2 cargo bench -p medley-merge --bench merge -- --cache-dir /tmp/mmb --write-outputs
    /work/oracle/venv/bin/python scripts/bench/peft_merge_bench.py --cache-dir /tmp/mmb

The base model is a TinyLlama-shaped LlamaForCausalLM (hidden 2048, intermediate 5632, 22 layers,
32/4 heads) built on the meta device and materialized with uninitialized storage (its values do not
matter for merging). Every strategy runs with weights [2.0, 0.3, 0.7] and density 0.2 where used,
torch limited to 2 threads. The SVD family (an exact f32 SVD per module in PEFT, ~20 s per layer
here) is timed on a model with --svd-layers layers and extrapolated to 22 layers linearly.

With Medley's merges present under <cache-dir>/out/<strategy>, the deterministic SVD strategies
are also checked for accuracy on every module of the timed layers: the relative error of B @ A
(max-norm and Frobenius, worst module) of Medley and of PEFT against two references, both an exact
float64 SVD truncated to rank 16: (1) of the merged delta exactly as PEFT forms it (float32 deltas
and masks), which isolates the error of the SVD step; (2) of the same merge done entirely in
float64 (pruning masks can differ from float32 ones at the top-k boundary). DARE strategies are
skipped (their masks differ by design).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.utils.merge_utils import magnitude_prune, task_arithmetic, ties  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

WEIGHTS = [2.0, 0.3, 0.7]
DENSITY = 0.2
FACTOR = ["linear", "ties", "ties_frequency", "dare_linear", "dare_ties", "magnitude_prune", "cat"]
SVD = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
PREFIX = "base_model.model."


def base_model(layers):
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.to_empty(device="cpu").eval()


def with_adapters(layers, cache):
    dirs = [os.path.join(cache, f"tinyllama_r16_seed{s}") for s in (1, 2, 3)]
    model = PeftModel.from_pretrained(base_model(layers), dirs[0], adapter_name="a1")
    model.load_adapter(dirs[1], adapter_name="a2")
    model.load_adapter(dirs[2], adapter_name="a3")
    return model


def kwargs(strategy):
    combo, kw = strategy, {}
    if strategy == "ties_frequency":
        combo, kw = "ties", dict(majority_sign_method="frequency")
    if combo not in ("linear", "cat", "svd"):
        kw["density"] = DENSITY
    return combo, kw


def time_strategy(model, strategy, runs):
    combo, kw = kwargs(strategy)
    times = []
    for i in range(runs):
        name = f"m_{strategy}_{i}"
        t = time.perf_counter()
        model.add_weighted_adapter(["a1", "a2", "a3"], WEIGHTS, name, combination_type=combo, **kw)
        times.append(time.perf_counter() - t)
        if i + 1 < runs:
            model.delete_adapter(name)
    return times, f"m_{strategy}_{runs - 1}"


def merged_products(model, name):
    out = {}
    for key, layer in model.named_modules():
        if key.startswith(PREFIX) and hasattr(layer, "lora_A") and name in layer.lora_A:
            a = layer.lora_A[name].weight.detach().double()
            b = layer.lora_B[name].weight.detach().double()
            out[key[len(PREFIX):]] = (layer, b @ a)
    return out


def reference(layer, strategy, rank, dtype):
    """PEFT's merge of the deltas in `dtype`, then an exact float64 SVD truncated to `rank`."""
    deltas = [
        layer.lora_B[a].weight.detach().to(dtype) @ layer.lora_A[a].weight.detach().to(dtype) * layer.scaling[a]
        for a in ("a1", "a2", "a3")
    ]
    w = torch.tensor(WEIGHTS, dtype=dtype)
    if strategy == "svd":
        d = task_arithmetic(deltas, w)
    elif strategy == "ties_svd":
        d = ties(deltas, w, DENSITY, "total")
    else:
        d = magnitude_prune(deltas, w, DENSITY)
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def rel(got, want):
    return (got - want).abs().max().item() / want.abs().max().item(), (
        torch.linalg.norm(got - want) / torch.linalg.norm(want)
    ).item()


def compare(model, name, strategy, medley_dir):
    tensors = load_file(os.path.join(medley_dir, "adapter_model.safetensors"))
    worst = {}
    for path, (layer, peft_ba) in merged_products(model, name).items():
        a = tensors[f"{PREFIX}{path}.lora_A.weight"].double()
        b = tensors[f"{PREFIX}{path}.lora_B.weight"].double()
        for ref_name, dtype in (("f32 delta", torch.float32), ("f64 pipeline", torch.float64)):
            ref = reference(layer, strategy, a.shape[0], dtype)
            for who, got in (("Medley", b @ a), ("PEFT", peft_ba)):
                mx, fro = rel(got, ref)
                old = worst.get((ref_name, who), (0.0, 0.0))
                worst[(ref_name, who)] = (max(old[0], mx), max(old[1], fro))
    return worst


def row(label, times, note=""):
    ms = [t * 1e3 for t in times]
    print(f"| {label:<28} | {min(ms):>10.1f} | {statistics.median(ms):>10.1f} | {len(ms):>4} | {note}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="/tmp/medley-merge-bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--svd-layers", type=int, default=2)
    ap.add_argument("--skip-svd", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated strategies")
    args = ap.parse_args()
    torch.set_num_threads(2)
    only = set(args.only.split(",")) if args.only else None
    print(f"peft {__import__('peft').__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"| {'strategy':<28} | {'min ms':>10} | {'median ms':>10} | runs | note")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|------|------")
    factor = [s for s in FACTOR if only is None or s in only]
    if factor:
        model = with_adapters(22, args.cache_dir)
        for s in factor:
            times, _ = time_strategy(model, s, args.runs)
            row(f"{s} d={DENSITY}" if s not in ("linear", "cat") else s, times)
        del model
    svd = [s for s in SVD if (only is None or s in only) and not args.skip_svd]
    if svd:
        model = with_adapters(args.svd_layers, args.cache_dir)
        scale = 22 / args.svd_layers
        for s in svd:
            times, name = time_strategy(model, s, 1)
            note = f"measured on {args.svd_layers} layers: {times[0]:.1f} s; x{scale:g} extrapolated"
            medley = os.path.join(args.cache_dir, "out", s)
            if not s.startswith("dare") and os.path.exists(medley):
                w = compare(model, name, s, medley)
                note += "; B@A rel. error max-norm/Frobenius" + "".join(
                    f"; {who} vs {ref}: {mx:.1e}/{fro:.1e}" for (ref, who), (mx, fro) in sorted(w.items())
                )
            row(s if s == "svd" else f"{s} d={DENSITY}", [t * scale for t in times], note)


if __name__ == "__main__":
    main()
