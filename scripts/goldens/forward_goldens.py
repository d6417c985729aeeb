#!/usr/bin/env python3
"""Forward-pass goldens for Medley's Llama implementation, computed with Hugging Face transformers.

Setup (outside the repository; CI never runs this, it only reads the committed outputs):
    python -m venv venv && venv/bin/pip install torch transformers safetensors numpy
    (validated with torch 2.15 CPU, transformers 4.57.6, safetensors, numpy)

Run from the repository root, after generating the fixtures with `medley-fixture`:
    /work/oracle/venv/bin/python scripts/goldens/forward_goldens.py

For each fixture (tests/fixtures/tiny-llama in float32, tests/fixtures/tiny-llama-bf16 in bfloat16)
it loads `LlamaForCausalLM` with eager attention, tokenizes the prompts below with the fixture's
tokenizer (BOS added by the tokenizer's post-processor), and writes
tests/fixtures/goldens/forward_<name>.safetensors with, for prompt i:
    p{i}.ids            int64 [n]          prompt token ids
    p{i}.logits         [n, vocab]         logits at every prompt position (one full forward)
    p{i}.greedy         int64 [20]         greedy continuation (generate, do_sample=False, no EOS stop)
    p{i}.greedy_logits  [20, vocab]        raw logits of each greedy step (step 0 = last prompt row)
plus a JSON sidecar forward_<name>.json with the prompts and versions, for humans.

forward_mistral_sw.safetensors checks Mistral's sliding window: the f32 fixture's weights loaded
as `MistralForCausalLM` with `sliding_window = 5` (config edited in a temp dir), prompt 1 only
(19 tokens, longer than the window), its prompt logits and 8 greedy tokens (no step logits, to
keep the committed files small).

Logits of the float32 model are stored as float32; those of the bfloat16 model are stored as
bfloat16, which is lossless there (the bf16 lm_head output is already bf16) and halves the size.
"""

import json
import os
import shutil
import sys
import tempfile

import safetensors.torch
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "goldens")
GREEDY_STEPS = 20

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over",
    "Once upon a time, in a small village by the sea, there lived",
]

MODELS = [
    # (golden name, fixture dir, torch dtype)
    ("f32", "tiny-llama", torch.float32),
    ("bf16", "tiny-llama-bf16", torch.bfloat16),
]


def run(name: str, fixture: str, dtype: torch.dtype) -> None:
    path = os.path.join(FIXTURES, fixture)
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.eval()
    store_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    tensors = {}
    meta = {"fixture": fixture, "dtype": str(dtype), "prompts": [], "greedy_steps": GREEDY_STEPS}
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id, "BOS must be added by the tokenizer"
        with torch.no_grad():
            logits = model(ids).logits[0]
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=GREEDY_STEPS,
                min_new_tokens=0,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        greedy = gen.sequences[0, ids.shape[1]:]
        assert greedy.shape[0] == GREEDY_STEPS, f"generation stopped early: {greedy.tolist()}"
        step_logits = torch.stack([l[0] for l in gen.logits])
        # Sanity: generate's first step sees the same context as the full forward's last row.
        if dtype == torch.float32:
            assert (step_logits[0] - logits[-1]).abs().max().item() < 1e-5
        tensors[f"p{i}.ids"] = ids[0].to(torch.int64).contiguous()
        tensors[f"p{i}.logits"] = logits.to(store_dtype).contiguous()
        tensors[f"p{i}.greedy"] = greedy.to(torch.int64).contiguous()
        tensors[f"p{i}.greedy_logits"] = step_logits.to(store_dtype).contiguous()
        meta["prompts"].append({"text": prompt, "ids": ids[0].tolist(), "greedy": greedy.tolist()})
    meta["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    os.makedirs(OUT, exist_ok=True)
    safetensors.torch.save_file(tensors, os.path.join(OUT, f"forward_{name}.safetensors"),
                                metadata={"generator": "scripts/goldens/forward_goldens.py"})
    with open(os.path.join(OUT, f"forward_{name}.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"{name}: {[len(p['ids']) for p in meta['prompts']]} prompt tokens", file=sys.stderr)


SLIDING_WINDOW = 5
MISTRAL_GREEDY_STEPS = 8


def run_mistral_sliding_window() -> None:
    src = os.path.join(FIXTURES, "tiny-llama")
    with tempfile.TemporaryDirectory() as tmp:
        for f in os.listdir(src):
            if f != "config.json":
                shutil.copy(os.path.join(src, f), tmp)
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"],
                   sliding_window=SLIDING_WINDOW)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        tok = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                     attn_implementation="eager")
        assert type(model).__name__ == "MistralForCausalLM"
        ids = tok(PROMPTS[1], return_tensors="pt").input_ids
        assert ids.shape[1] > SLIDING_WINDOW
        with torch.no_grad():
            logits = model(ids).logits[0]
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=MISTRAL_GREEDY_STEPS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        greedy = gen[0, ids.shape[1]:]
        assert greedy.shape[0] == MISTRAL_GREEDY_STEPS
    tensors = {
        "p0.ids": ids[0].to(torch.int64).contiguous(),
        "p0.logits": logits.contiguous(),
        "p0.greedy": greedy.to(torch.int64).contiguous(),
    }
    safetensors.torch.save_file(tensors, os.path.join(OUT, "forward_mistral_sw.safetensors"),
                                metadata={"generator": "scripts/goldens/forward_goldens.py",
                                          "sliding_window": str(SLIDING_WINDOW)})
    print(f"mistral_sw: {ids.shape[1]} prompt tokens, greedy {greedy.tolist()}", file=sys.stderr)


def main() -> None:
    torch.manual_seed(0)
    for name, fixture, dtype in MODELS:
        run(name, fixture, dtype)
    run_mistral_sliding_window()


if __name__ == "__main__":
    main()
