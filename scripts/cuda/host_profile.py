#!/usr/bin/env python3
"""Per-step host costs of a CUDA build of Medley serving on the fake GPU (scripts/cuda/fake-gpu.sh):
drives the server at each stream count, reads the fake's log (one line per point where the host
waits for the device) and the router's step histograms, and prints a markdown table.

    host_profile.py --url URL --log FAKE_LOG --vocab N [--streams 1,8,32] [--new-tokens 64]
                    [--configs base,1 adapter,8 merges]

No kernel runs on the fake, so the times are the host's alone: issuing the step's calls (without
the driver's own cost per call), reading the logits back, sampling, and the router. stdlib only.

First it checks that requests the table does not send get through the same CUDA paths: a `cat`
merge of adapters `a0` (rank 16) and `wide` (rank 144, q_proj only: scripts/cuda/host-profile.sh
makes it), whose q_proj rank of 160 passes the LoRA kernels' 128 and takes two launch passes,
served together with a request on one adapter and one on the base model.
"""

import argparse
import concurrent.futures
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gpu_check"))
from check import (SPEED_MERGES, SPEED_PROMPT, case_params, decode_step_totals,  # noqa: E402
                   generate, ints, step_columns)

# What each row's requests ask for (the GPU check's speed configurations): stream i's parameters.
CONFIGS = {
    "base": lambda i: {},
    "1 adapter": lambda i: case_params("adapter"),
    "8 merges": lambda i: {"adapter_source": "local", "merged_adapters": {
        "ids": SPEED_MERGES[i % 8]["ids"], "weights": SPEED_MERGES[i % 8]["weights"],
        "merge_strategy": "linear"}},
}

COLUMNS = ["launch", "gemm", "alloc", "htod", "dtoh", "get_function", "graph_launch"]


def log_lines(path):
    with open(path) as f:
        return [line.split() for line in f if not line.startswith(" ")]


def step_counts(lines, read_back):
    """Median host microseconds and calls of the steps whose read-back has one of the sizes
    `read_back` (decode steps of the whole batch: its logits, or the greedy choices made on the
    device; prefill steps read other sizes)."""
    steps = []
    for words in lines:
        fields = dict(zip(words[2::2], words[3::2]))
        if int(fields.get("dtoh_bytes", -1)) in read_back:
            steps.append(fields)
    if not steps:
        return None
    med = lambda key: statistics.median(float(s[key]) for s in steps)
    return dict(steps=len(steps), host_us=med("host_us"), **{c: med(c) for c in COLUMNS})


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--streams", type=ints, default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--configs", default="base",
                    help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = ap.parse_args()
    check_rank_passes(args.url)
    heads = ["adapters", "streams", "wall ms/step", "step as the router sees it", "shard's step",
             "forward ms/step", "of it queueing", "sampling", "host µs between read-backs",
             "decode steps"] + [f"{c}/step" for c in COLUMNS]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---:|" * len(heads))
    for config in args.configs.split(","):
        params = CONFIGS[config]
        for i in range(8):  # warm-up: loads the adapters and computes the merges once
            generate(args.url, SPEED_PROMPT, params(i), 2)
        for streams in args.streams:
            print(row(args, config, params, streams), flush=True)


def check_rank_passes(url, new_tokens=16):
    """The `cat` merge over the kernels' rank at once with a request on one adapter and one on
    the base model, so that they share decode steps: each must succeed (`generate` exits on an
    HTTP error)."""
    wide = {"adapter_source": "local", "merged_adapters": {
        "ids": ["a0", "wide"], "weights": [1.0, 0.5], "merge_strategy": "cat"}}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(generate, url, SPEED_PROMPT, p, new_tokens)
                for p in (wide, case_params("adapter"), {})]
        for run in runs:
            if len(run.result()) != new_tokens:
                raise SystemExit(f"{url}: a request of the rank check ended early")


def row(args, config, params, streams):
    """One table row: `streams` requests of `config` at once."""
    seen = len(log_lines(args.log))
    before = decode_step_totals(args.url)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda i: generate(args.url, SPEED_PROMPT, params(i), args.new_tokens),
                      range(streams)))
    wall = (time.monotonic() - t0) * 1e3 / args.new_tokens
    cols = step_columns(before, decode_step_totals(args.url))
    read_back = (4 * streams * args.vocab, 8 * streams)
    counts = step_counts(log_lines(args.log)[seen:], read_back) or {}
    cells = [config, streams, f"{wall:.2f}", cols.get("step_ms_per_step", "-"),
             cols.get("shard_ms_per_step", "-"), cols.get("forward_ms_per_step", "-"),
             cols.get("launch_ms_per_step", "-"), cols.get("sample_ms_per_step", "-"),
             f"{counts.get('host_us', float('nan')):.0f}", counts.get("steps", 0)]
    cells += [f"{counts.get(c, float('nan')):.0f}" for c in COLUMNS]
    return "| " + " | ".join(str(x) for x in cells) + " |"


if __name__ == "__main__":
    main()
