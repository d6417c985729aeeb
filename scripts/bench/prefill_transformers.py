#!/usr/bin/env python3
"""transformers' side of the prefill benchmark (shard/benches/prefill.rs).

Loads a Llama checkpoint with ``LlamaForCausalLM`` in float32 with SDPA attention on the CPU and
times one full forward pass of each prompt in ``--ids`` (a JSON file
``{"lengths": [n, ...], "ids": {"n": [token ids]}}`` written by the Rust bench, so both sides see
the same tokens). Per length: the best of ``--repeats`` runs of ``model(input_ids,
use_cache=False)`` under ``torch.inference_mode()``, after one warm-up forward at the smallest
length. Like any plain ``model(input_ids)`` call, this computes the logits of every position;
``--last-logits`` passes ``logits_to_keep=1`` instead (the last position only, as Medley's prefill
does).

Prints one JSON line per length on stdout: ``{"tokens": n, "seconds": s}``; anything else goes to
stderr.

    python scripts/bench/prefill_transformers.py --model-dir DIR --ids IDS.json --threads 2
"""

import argparse
import json
import os
import sys
import time

import torch
import transformers
from transformers import LlamaForCausalLM


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--ids", required=True, help="JSON file with the prompts' token ids")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("RAYON_NUM_THREADS", "2") or 2),
        help="torch intra-op threads (default: $RAYON_NUM_THREADS, else 2)",
    )
    p.add_argument("--repeats", type=int, default=2, help="runs per length; the best is kept")
    p.add_argument(
        "--last-logits",
        action="store_true",
        help="compute the last position's logits only (logits_to_keep=1)",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    with open(args.ids) as f:
        spec = json.load(f)
    lengths = [int(n) for n in spec["lengths"]]
    ids = {int(n): v for n, v in spec["ids"].items()}

    # transformers >= 4.56 renamed `torch_dtype` to `dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    t = time.perf_counter()
    model, info = LlamaForCausalLM.from_pretrained(
        args.model_dir,
        attn_implementation="sdpa",
        output_loading_info=True,
        **{dtype_kw: torch.float32},
    )
    model.eval()
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    if missing or info.get("unexpected_keys"):
        log(f"warning: loading info {info}")
    log(
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, attn {model.config._attn_implementation}, "
        f"load {time.perf_counter() - t:.2f}s"
    )

    extra = {"use_cache": False}
    if args.last_logits:
        extra["logits_to_keep"] = 1

    def forward(n):
        x = torch.tensor([ids[n]], dtype=torch.long)
        t = time.perf_counter()
        out = model(x, **extra)
        s = time.perf_counter() - t
        assert out.logits.shape[-1] == model.config.vocab_size
        return s

    with torch.inference_mode():
        forward(min(lengths))
        for n in lengths:
            best = min(forward(n) for _ in range(max(args.repeats, 1)))
            print(json.dumps({"tokens": n, "seconds": best}), flush=True)


if __name__ == "__main__":
    main()
