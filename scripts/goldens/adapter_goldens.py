#!/usr/bin/env python3
"""Goldens for serving LoRA adapters on the shard: logits and greedy tokens of the tiny model with
single PEFT adapters active and with merges computed by PEFT's own `add_weighted_adapter`.

Setup (outside the repository; CI never runs this, it only reads the committed outputs):
    python 3.11 with torch 2.15 (CPU), transformers 4.57.6, peft 0.21.2, safetensors, numpy
    (here: /work/oracle/venv/bin/python). Run from anywhere:

    /work/oracle/venv/bin/python scripts/goldens/adapter_goldens.py
        # writes the adapters (with the Rust fixture writer, built with cargo) and the goldens
    /work/oracle/venv/bin/python scripts/goldens/adapter_goldens.py --skip-adapters
        # goldens only, from the committed adapters

Inputs:
    tests/fixtures/tiny-llama/    the tiny LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2 heads).
Outputs (committed):
    tests/fixtures/adapters/strong_*/   three random rank-8 adapters written by
        `medley-merge-dev fixture` (medley_merge::fixture: A uniform in ±1/sqrt(in), B uniform in
        ±0.05) with large alphas, so each one changes the greedy continuation of the base model:
        strong_a_r8           all seven projections, alpha 32 (scale 4)
        strong_b_r8_attn      q/k/v/o only, alpha 64 (scale 8)
        strong_c_r8_rslora    v/gate/up/down, rsLoRA, alpha 16 (scale 16/sqrt(8))
    tests/fixtures/goldens/adapter_goldens.safetensors, per case <c> and prompt <i>:
        <c>.p<i>.logits   [n, vocab] f32   logits at every prompt position (one full forward)
        <c>.p<i>.greedy   [20] int64       greedy continuation (argmax, recomputed from scratch)
      and base.p<i>.greedy, plus p<i>.ids (int64 prompt ids).
    tests/fixtures/goldens/adapter_goldens.json   the cases (adapters, weights, strategy, density)
        and the smallest top-1/top-2 logit gap met on each greedy path.

Cases: each adapter alone (PeftModel with that adapter active); `ties` (density 0.5, total sign
election), `linear` and `cat` merges of all three by `add_weighted_adapter`. The script refuses
pruning cases with tied magnitudes at the top-k boundary or TIES sums within rounding of zero,
greedy paths whose top-1/top-2 gap is below 1e-3 (not a well-defined golden), and adapters or
merges whose greedy tokens equal the base model's.
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = os.path.join(ROOT, "tests", "fixtures", "tiny-llama")
ADAPTERS = os.path.join(ROOT, "tests", "fixtures", "adapters")
GOLDENS = os.path.join(ROOT, "tests", "fixtures", "goldens")
PREFIX = "base_model.model."
GREEDY_STEPS = 20
MIN_GAP = 1e-3

# name -> medley-merge-dev fixture arguments
ADAPTER_SPECS = {
    "strong_a_r8": ["--rank", "8", "--alpha", "32", "--seed", "101"],
    "strong_b_r8_attn": ["--rank", "8", "--alpha", "64", "--seed", "102",
                         "--targets", "q_proj,k_proj,v_proj,o_proj"],
    "strong_c_r8_rslora": ["--rank", "8", "--alpha", "16", "--seed", "103", "--rslora",
                           "--targets", "v_proj,gate_proj,up_proj,down_proj"],
}
NAMES = list(ADAPTER_SPECS)

# Prompts: the first tokens of two prompts of the forward goldens (BOS = 1).
PROMPTS = [
    [1, 42, 361, 78, 81],
    [1, 282, 223, 313, 75, 69, 77, 271],
]

# name, adapters, weights, combination_type, kwargs
MERGES = [
    ("ties", NAMES, [1.0, 0.6, -0.3], "ties", dict(density=0.5, majority_sign_method="total")),
    ("linear", NAMES, [0.7, 0.5, 0.4], "linear", {}),
    ("cat", NAMES, [1.0, -0.5, 0.8], "cat", {}),
]


def make_adapters():
    subprocess.run(["cargo", "build", "-q", "-p", "medley-merge", "--features", "testing", "--bin", "medley-merge-dev"], cwd=ROOT, check=True)
    tool = os.path.join(ROOT, "target", "debug", "medley-merge-dev")
    for name, args in ADAPTER_SPECS.items():
        out = os.path.join(ADAPTERS, name)
        subprocess.run([tool, "fixture", "--preset", "tiny", "--out", out, *args], check=True, capture_output=True)


def load_base():
    return LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager").eval()


def lora_layers(model):
    for key, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and key.startswith(PREFIX):
            yield key[len(PREFIX):], module


def check_unambiguous(model, adapters, kw, sign_margin=1e-5):
    """Refuse TIES cases with a tie at the top-k boundary or a 'total' sign sum near zero
    (within `sign_margin` of the largest factor; smollm2_goldens.py shares this check)."""
    density = kw.get("density")
    for path, layer in lora_layers(model):
        present = [a for a in adapters if a in layer.lora_A]
        for side in ("lora_A", "lora_B"):
            pruned = []
            for a in present:
                t = getattr(layer, side)[a].weight.detach().flatten()
                k = int(density * t.numel())
                v = torch.sort(t.abs(), descending=True).values
                if 0 < k < t.numel() and v[k - 1] == v[k]:
                    raise SystemExit(f"tie at the top-k boundary in {path} {side} of {a}")
                mask = torch.zeros_like(t)
                mask[torch.topk(t.abs(), k).indices] = 1
                pruned.append(t * mask)
            if len(pruned) > 1:
                stacked = torch.stack(pruned)
                sigma = stacked.sum(0)
                nz = sigma[sigma != 0].abs()
                if nz.numel() and nz.min() < sign_margin * stacked.abs().max():
                    raise SystemExit(f"a 'total' sign sum is within rounding of 0 in {path} {side}")


def greedy(model, ids):
    """Greedy tokens, each step a full forward of the whole sequence; also the smallest gap
    between the best and second-best logit on the path."""
    out, gap = [], float("inf")
    cur = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(GREEDY_STEPS):
            logits = model(cur).logits[0, -1]
            top = torch.topk(logits, 2).values
            gap = min(gap, float(top[0] - top[1]))
            t = int(logits.argmax())
            out.append(t)
            cur = torch.cat([cur, torch.tensor([[t]])], 1)
    return out, gap


def record(model, case, tensors, meta, base_greedy):
    gaps = []
    differs = False
    for i, ids in enumerate(PROMPTS):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        tokens, gap = greedy(model, ids)
        if gap < MIN_GAP:
            raise SystemExit(f"{case} prompt {i}: greedy top-1/top-2 gap {gap:.2e} < {MIN_GAP}")
        tensors[f"{case}.p{i}.logits"] = logits.float().contiguous()
        tensors[f"{case}.p{i}.greedy"] = torch.tensor(tokens, dtype=torch.int64)
        gaps.append(gap)
        if base_greedy is not None and tokens != base_greedy[i]:
            differs = True
    if base_greedy is not None and not differs:
        raise SystemExit(f"{case}: greedy tokens equal the base model's; make the adapter stronger")
    meta["min_greedy_gap"] = min(gaps)
    print(f"{case}: min greedy gap {min(gaps):.3e}", file=sys.stderr)


def make_goldens():
    tensors, cases = {}, []
    base = load_base()
    base_greedy = []
    for i, ids in enumerate(PROMPTS):
        tokens, gap = greedy(base, ids)
        if gap < MIN_GAP:
            raise SystemExit(f"base prompt {i}: greedy gap {gap:.2e}")
        base_greedy.append(tokens)
        tensors[f"p{i}.ids"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"base.p{i}.greedy"] = torch.tensor(tokens, dtype=torch.int64)
    model = PeftModel.from_pretrained(load_base(), os.path.join(ADAPTERS, NAMES[0]), adapter_name=NAMES[0])
    for n in NAMES[1:]:
        model.load_adapter(os.path.join(ADAPTERS, n), adapter_name=n)
    model.eval()
    for n in NAMES:
        model.set_adapter(n)
        meta = dict(name=n, adapters=[n], weights=None, strategy=None, density=None)
        record(model, n, tensors, meta, base_greedy)
        cases.append(meta)
    for case, adapters, weights, combo, kw in MERGES:
        if combo == "ties":
            check_unambiguous(model, adapters, kw)
        model.add_weighted_adapter(adapters, weights, case, combination_type=combo, **kw)
        cfg = model.peft_config[case]
        assert not cfg.use_rslora, "merged scale must be 1 (adapter 0 is not rsLoRA)"
        model.set_adapter(case)
        # The merged adapter's layers are new modules in training mode: its LoRA dropout (the
        # first adapter's lora_dropout) must not be active.
        model.eval()
        meta = dict(name=case, adapters=adapters, weights=weights, strategy=combo,
                    density=kw.get("density"), majority_sign_method=kw.get("majority_sign_method", "total"))
        record(model, case, tensors, meta, base_greedy)
        cases.append(meta)
    os.makedirs(GOLDENS, exist_ok=True)
    path = os.path.join(GOLDENS, "adapter_goldens.safetensors")
    save_file(tensors, path, metadata={"generator": "scripts/goldens/adapter_goldens.py"})
    info = dict(peft=__import__("peft").__version__, torch=torch.__version__,
                transformers=__import__("transformers").__version__,
                prompts=PROMPTS, greedy_steps=GREEDY_STEPS, base_greedy=base_greedy, cases=cases)
    with open(os.path.join(GOLDENS, "adapter_goldens.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-adapters", action="store_true", help="keep the committed adapters")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if not args.skip_adapters:
        make_adapters()
    make_goldens()


if __name__ == "__main__":
    main()
