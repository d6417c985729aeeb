#!/usr/bin/env python3
"""Goldens for Medley's LoRA merge engine, produced by PEFT's own `add_weighted_adapter`.

Setup (outside the repository; CI never runs this, it only reads the committed outputs):
    python 3.11 with torch 2.15 (CPU), transformers 4.57.6, peft 0.21.2, safetensors, numpy
    (here: /work/oracle/venv/bin/python). Run from the repository root:

    /work/oracle/venv/bin/python scripts/goldens/merge_goldens.py            # adapters + goldens
    /work/oracle/venv/bin/python scripts/goldens/merge_goldens.py --verify-writer
        # additionally: merge with the Rust `medley-merge-dev` binary (built with cargo) and check
        # that PEFT loads its output directory and gives the logits of add_weighted_adapter

Inputs:
    tests/fixtures/tiny-llama/   the tiny LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2 heads),
                                 written by `medley-fixture model --preset tiny --dtype f32`.
Outputs (committed):
    tests/fixtures/adapters/<name>/   small random LoRA adapters, created *by this script with
                                      PEFT* (get_peft_model + save_pretrained), so the Rust reader
                                      is tested on files PEFT itself wrote (f32 and bf16, rsLoRA,
                                      rank_pattern / alpha_pattern, different alphas and targets).
    tests/fixtures/goldens/merge_goldens.json          the cases (adapters, weights, strategy, ...)
    tests/fixtures/goldens/merge_goldens.safetensors   PEFT's merged lora_A / lora_B per case and
                                                       module, named "<case>/<module>/A|B".

Every pruning case is checked for ties at the top-k boundary (torch.topk's choice among equal
magnitudes is unspecified, so such a case would not be a well-defined golden) and for TIES
"total" sums within rounding distance of zero; the script refuses to write ambiguous goldens.
For SVD cases the gap between singular values R and R+1 is reported: the rank-R product is
well-defined only with a gap.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# Relative, so the adapters' recorded base_model_name_or_path is machine-independent (the
# script chdirs to the repository root).
BASE = os.path.join("tests", "fixtures", "tiny-llama")
ADAPTERS = os.path.join(ROOT, "tests", "fixtures", "adapters")
GOLDENS = os.path.join(ROOT, "tests", "fixtures", "goldens")
PREFIX = "base_model.model."

# name -> LoraConfig kwargs, storage dtype, seed
ADAPTER_SPECS = {
    "a_r4": dict(cfg=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), dtype="f32", seed=1),
    # different alpha; k_proj only here (module present in only some adapters)
    "b_r4_alpha16": dict(
        cfg=dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]), dtype="f32", seed=2
    ),
    # rsLoRA; up_proj only here
    "c_r4_rslora": dict(
        cfg=dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]), dtype="f32", seed=3
    ),
    # stored in bf16
    "d_r4_bf16": dict(cfg=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), dtype="bf16", seed=4),
    # rank 2 (mixed ranks for cat / svd)
    "e_r2": dict(cfg=dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), dtype="f32", seed=5),
    # rank_pattern and alpha_pattern
    "f_patterns": dict(
        cfg=dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"model.layers.1.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 2},
        ),
        dtype="f32",
        seed=6,
    ),
}

# name, adapters, weights, combination_type, extra kwargs, what to compare
CASES = [
    ("linear", ["a_r4", "b_r4_alpha16", "c_r4_rslora"], [2.0, 0.3, 0.7], "linear", {}, "factors"),
    ("linear_negative", ["a_r4", "b_r4_alpha16"], [1.0, -0.6], "linear", {}, "factors"),
    ("linear_bf16", ["d_r4_bf16", "a_r4"], [0.9, 0.4], "linear", {}, "factors"),
    ("linear_single", ["c_r4_rslora"], [0.5], "ties", dict(density=0.3), "factors"),
    ("ties_total", ["a_r4", "b_r4_alpha16", "c_r4_rslora"], [2.0, 0.3, 0.7], "ties",
     dict(density=0.5, majority_sign_method="total"), "factors"),
    # f32 only: bf16 magnitudes tie at the top-k boundary in practically every tensor, where
    # torch.topk's choice is unspecified (bf16 is covered by the linear and svd cases).
    ("ties_frequency", ["b_r4_alpha16", "c_r4_rslora", "a_r4"], [1.0, 0.5, -0.8], "ties",
     dict(density=0.3, majority_sign_method="frequency"), "factors"),
    ("ties_density_one", ["a_r4", "b_r4_alpha16"], [1.0, 0.7], "ties",
     dict(density=1.0, majority_sign_method="total"), "factors"),
    ("dare_ties_density_one", ["a_r4", "c_r4_rslora"], [0.6, 1.1], "dare_ties",
     dict(density=1.0, majority_sign_method="frequency"), "factors"),
    ("magnitude_prune", ["a_r4", "c_r4_rslora"], [0.7, 1.2], "magnitude_prune", dict(density=0.6), "factors"),
    ("cat_mixed", ["a_r4", "e_r2", "f_patterns"], [1.0, -0.5, 0.8], "cat", {}, "factors"),
    ("svd_mixed", ["a_r4", "e_r2"], [1.0, 0.5], "svd", {}, "product"),
    ("svd_rank6", ["a_r4", "b_r4_alpha16", "c_r4_rslora"], [2.0, 0.3, 0.7], "svd", dict(svd_rank=6), "product"),
    ("svd_patterns", ["f_patterns", "b_r4_alpha16"], [0.9, 0.6], "svd", {}, "product"),
    ("svd_bf16_negative", ["d_r4_bf16", "b_r4_alpha16"], [1.0, -0.5], "svd", {}, "product"),
    ("ties_svd", ["a_r4", "b_r4_alpha16"], [1.0, 0.7], "ties_svd",
     dict(density=0.5, majority_sign_method="total"), "product"),
    ("magnitude_prune_svd", ["a_r4", "c_r4_rslora"], [0.8, -1.1], "magnitude_prune_svd", dict(density=0.4), "product"),
    ("dare_linear_svd_density_one", ["a_r4", "e_r2"], [1.0, 0.5], "dare_linear_svd", dict(density=1.0), "product"),
    ("dare_ties_svd_density_one", ["a_r4", "b_r4_alpha16"], [1.0, -0.4], "dare_ties_svd",
     dict(density=1.0, majority_sign_method="frequency"), "product"),
]


def load_base():
    return LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def make_adapters():
    for name, spec in ADAPTER_SPECS.items():
        model = load_base()
        cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **spec["cfg"])
        peft_model = get_peft_model(model, cfg)
        gen = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if ".lora_A." in pname:
                    bound = 1.0 / p.shape[1] ** 0.5
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
                elif ".lora_B." in pname:
                    # Decaying column scales give each delta a decaying spectrum, like trained
                    # adapters, so truncated-SVD goldens have gaps between singular values.
                    decay = 0.5 ** torch.arange(p.shape[1], dtype=torch.float32)
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05 * decay)
            if spec["dtype"] == "bf16":
                for pname, p in peft_model.named_parameters():
                    if ".lora_" in pname:
                        p.data = p.data.to(torch.bfloat16)
        out = os.path.join(ADAPTERS, name)
        peft_model.save_pretrained(out, safe_serialization=True)
        readme = os.path.join(out, "README.md")
        if os.path.exists(readme):
            os.remove(readme)


def load_with_adapters(names):
    model = PeftModel.from_pretrained(load_base(), os.path.join(ADAPTERS, names[0]), adapter_name=names[0])
    for n in names[1:]:
        if n not in model.peft_config:
            model.load_adapter(os.path.join(ADAPTERS, n), adapter_name=n)
    return model.eval()


def lora_layers(model):
    for key, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and key.startswith(PREFIX):
            yield key[len(PREFIX):], module


def pruned_tensors(model, adapters, combo):
    """The tensors PEFT prunes for this case: factors (per side) or full deltas (svd family)."""
    out = []
    for path, layer in lora_layers(model):
        present = [a for a in dict.fromkeys(adapters) if a in layer.lora_A]
        if combo.endswith("svd"):
            out.append([(path, layer.get_delta_weight(a)) for a in present])
        else:
            out.append([(path, layer.lora_A[a].weight) for a in present])
            out.append([(path, layer.lora_B[a].weight) for a in present])
    return out


def check_unambiguous(model, adapters, combo, kw):
    """Refuse cases whose top-k boundary has tied magnitudes or whose TIES 'total' sums are
    within rounding distance of zero."""
    density = kw.get("density")
    if density is None or density >= 1 or combo in ("linear", "cat", "svd"):
        return
    for group in pruned_tensors(model, adapters, combo):
        pruned = []
        for path, t in group:
            flat = t.detach().abs().flatten()
            k = int(density * flat.numel())
            if 0 < k < flat.numel():
                v = torch.sort(flat, descending=True).values
                if v[k - 1] == v[k]:
                    raise SystemExit(f"{combo}: tie at the top-k boundary in {path} (k={k}); pick another density")
            top = torch.topk(flat, k).indices if k > 0 else torch.tensor([], dtype=torch.long)
            mask = torch.zeros_like(flat)
            mask[top] = 1
            pruned.append(t.detach().flatten() * mask)
        if "ties" in combo and kw.get("majority_sign_method", "total") == "total" and len(pruned) > 1:
            stacked = torch.stack(pruned)
            sigma = stacked.sum(0)
            scale = stacked.abs().max()
            nonzero = sigma[sigma != 0].abs()
            if nonzero.numel() and nonzero.min() < 1e-5 * scale:
                raise SystemExit(f"{combo}: a 'total' sign sum is within rounding of 0 in {group[0][0]}")


def svd_gaps(model, adapters, weights, combo, kw, rank):
    """Smallest ratio sigma_R / sigma_{R+1} over modules (inf when rank R+1 is absent)."""
    from peft.utils.merge_utils import magnitude_prune, task_arithmetic, ties

    worst = float("inf")
    for path, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        deltas = [layer.get_delta_weight(a) for a, _ in present]
        wt = torch.tensor([w for _, w in present])
        if combo in ("svd", "dare_linear_svd"):
            d = task_arithmetic(deltas, wt)
        elif combo in ("ties_svd", "dare_ties_svd"):  # dare_* only at density 1 here: no pruning
            d = ties(deltas, wt, kw["density"], kw.get("majority_sign_method", "total"))
        else:
            d = magnitude_prune(deltas, wt, kw["density"])
        s = torch.linalg.svdvals(d.double())
        if len(s) > rank and s[rank] > 1e-9 * s[0]:
            worst = min(worst, float(s[rank - 1] / s[rank]))
    return worst


def run_case(name, adapters, weights, combo, kw):
    model = load_with_adapters(adapters)
    check_unambiguous(model, adapters, combo, kw)
    model.add_weighted_adapter(adapters, weights, "merged", combination_type=combo, **kw)
    tensors = {}
    for path, layer in lora_layers(model):
        if "merged" in layer.lora_A:
            tensors[f"{name}/{path}/A"] = layer.lora_A["merged"].weight.detach().float().contiguous()
            tensors[f"{name}/{path}/B"] = layer.lora_B["merged"].weight.detach().float().contiguous()
    info = {}
    if combo.endswith("svd") and len(adapters) > 1:
        cfg = model.peft_config["merged"]
        info["svd_gap"] = svd_gaps(model, adapters, weights, combo, kw, cfg.r)
    return model, tensors, info


def make_goldens():
    all_tensors, cases = {}, []
    for name, adapters, weights, combo, kw, compare in CASES:
        _, tensors, info = run_case(name, adapters, weights, combo, kw)
        all_tensors.update(tensors)
        case = dict(name=name, adapters=adapters, weights=weights, strategy=combo, compare=compare,
                    density=kw.get("density"), majority_sign_method=kw.get("majority_sign_method", "total"),
                    svd_rank=kw.get("svd_rank"), modules=len(tensors) // 2, **info)
        cases.append(case)
        print(f"{name}: {len(tensors) // 2} modules {info}")
    os.makedirs(GOLDENS, exist_ok=True)
    save_file(all_tensors, os.path.join(GOLDENS, "merge_goldens.safetensors"), metadata={"format": "pt"})
    meta = dict(peft=__import__("peft").__version__, torch=torch.__version__, cases=cases)
    with open(os.path.join(GOLDENS, "merge_goldens.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def verify_writer():
    """Merge with the Rust tool, load its output with PEFT and compare logits with PEFT's merge."""
    subprocess.run(["cargo", "build", "-q", "-p", "medley-merge", "--features", "testing", "--bin", "medley-merge-dev"], cwd=ROOT, check=True)
    tool = os.path.join(ROOT, "target", "debug", "medley-merge-dev")
    ids = torch.tensor([[1, 17, 99, 254, 3, 77, 410, 5]])
    failures = 0
    for name, adapters, weights, combo, kw, _ in CASES:
        model, _, _ = run_case(name, adapters, weights, combo, kw)
        note = ""
        if model.peft_config["merged"].use_rslora:
            # PEFT 0.21.2 copies use_rslora from adapter 0 into the merged config, so its merged
            # adapter is applied with scale alpha/sqrt(r) = sqrt(r) instead of 1 although the
            # per-adapter scales are already folded into the factors (fixed upstream by forcing
            # use_rslora=False, PR #3449). Medley writes use_rslora: false; compare against the
            # intended scale 1. The factors themselves are covered by the goldens.
            for _, layer in lora_layers(model):
                if "merged" in layer.scaling:
                    layer.scaling["merged"] = 1.0
            note = " (PEFT's inherited use_rslora scale corrected to 1)"
        model.set_adapter("merged")
        with torch.no_grad():
            want = model(ids).logits
        with tempfile.TemporaryDirectory() as out:
            cmd = [tool, "merge", "--strategy", combo, "--weights", ",".join(str(w) for w in weights), "--out", out]
            for a in adapters:
                cmd += ["--adapter", os.path.join(ADAPTERS, a)]
            if kw.get("density") is not None:
                cmd += ["--density", str(kw["density"])]
            if kw.get("svd_rank") is not None:
                cmd += ["--svd-rank", str(kw["svd_rank"])]
            cmd += ["--sign-method", kw.get("majority_sign_method", "total")]
            subprocess.run(cmd, check=True, capture_output=True)
            loaded = PeftModel.from_pretrained(load_base(), out).eval()
            with torch.no_grad():
                got = loaded(ids).logits
        with torch.no_grad():
            base = load_base()(ids).logits
        # Relative to the size of the adapter's effect on the logits (the part that can differ).
        effect = (want - base).abs().max().item()
        err = (got - want).abs().max().item()
        ok = err <= 1e-4 * max(effect, 1e-6)
        failures += not ok
        print(f"writer {name}: max|logits diff| {err:.3e}, adapter effect {effect:.3e} -> {'ok' if ok else 'FAIL'}{note}")
    if failures:
        raise SystemExit(f"{failures} writer checks failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify-writer", action="store_true", help="also check Rust-written merges load in PEFT")
    ap.add_argument("--skip-goldens", action="store_true", help="do not rewrite adapters and goldens")
    args = ap.parse_args()
    os.chdir(ROOT)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if not os.path.exists(os.path.join(BASE, "config.json")):
        sys.exit(f"{BASE} is missing; run: cargo run -p medley-shard --features testing --bin medley-fixture -- model "
                 "--preset tiny --dtype f32 --out tests/fixtures/tiny-llama")
    if not args.skip_goldens:
        make_adapters()
        make_goldens()
    if args.verify_writer:
        verify_writer()


if __name__ == "__main__":
    main()
