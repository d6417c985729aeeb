#!/usr/bin/env python3
"""The Python half of scripts/gpu-check.sh: the oracle (transformers + PEFT), Medley's HTTP
client, the comparisons and the report. Each subcommand writes one JSON file, so the shell
driver can run the steps under time limits and a partial run still reports what finished.

    check.py medley-tokens --url URL --out F [--at-once]  greedy tokens of every case from a server
    check.py hf-tokens --model DIR --adapters DIR --dtype D --device DEV --out F
    check.py compare --name N --reference F --candidate F [--require K] --out F
    check.py medley-speed --url URL --streams 1,8,32 --new-tokens N [--configs base,...] --out F
    check.py hf-speed --model DIR --dtype D --device DEV --batches 1,32 --new-tokens N --out F
    check.py report --dir DIR --title T --command C > report.md

Cases: the base model, one adapter (a0) and a TIES merge of a0, a1, a2 (weights 1.0/0.6/-0.3,
density 0.5, total sign election), on two prompts, 32 greedy tokens each (EOS ignored). A comparison requires the first K tokens
of every case to be equal (all 32 by default) and reports where any later divergence starts. The
oracle recomputes every greedy step from the whole sequence (no KV cache), with eager attention,
so it shares nothing with Medley but the checkpoint files.

stdlib only, except hf-* (torch, transformers, peft, tokenizers).
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time
import urllib.error
import urllib.request

from common import CASES, MERGE, PROMPTS, STEPS, read, write
from report import report

# Speed: 8 distinct merges (each of two adapters with its own weights), one per stream mod 8.
SPEED_MERGES = [dict(ids=[f"a{i}", f"a{(i + 1) % 8}"], weights=[1.0, 0.25 + 0.1 * i]) for i in range(8)]
SPEED_PROMPT = "Once upon a time in a land far away there lived a"


# ---------------------------------------------------------------- Medley over HTTP

def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}")


def case_params(case):
    if case == "base":
        return {}
    if case == "adapter":
        return {"adapter_id": "a0", "adapter_source": "local"}
    return {"adapter_source": "local", "merged_adapters": {
        "ids": MERGE["ids"], "weights": MERGE["weights"], "merge_strategy": MERGE["strategy"],
        "density": MERGE["density"], "majority_sign_method": "total"}}


def generate(url, prompt, params, new_tokens):
    p = {"max_new_tokens": new_tokens, "details": True, "ignore_eos_token": True, **params}
    reply = post(f"{url}/generate", {"inputs": prompt, "parameters": p})
    return [t["id"] for t in reply["details"]["tokens"]]


def stream_decode_rate(url, prompt, params, new_tokens):
    """One streamed request (`/generate_stream`): tokens per second between the first and the
    last token event, i.e. decode only (prefill and connection set-up excluded), as llama.cpp's
    anchor measures it; everything else on the serving path (router, batching, sampling, SSE) is
    inside."""
    p = {"max_new_tokens": new_tokens, "ignore_eos_token": True, **params}
    req = urllib.request.Request(f"{url}/generate_stream",
                                 data=json.dumps({"inputs": prompt, "parameters": p}).encode(),
                                 headers={"Content-Type": "application/json"})
    stamps = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise SystemExit(f"{url}/generate_stream: {event['error']}")
                stamps.append(time.perf_counter())
    if len(stamps) < 2:
        return None
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def medley_tokens(args):
    """Greedy tokens of every (case, prompt), one request at a time or, with `--at-once`, all
    together: one batch of base, adapter and merge rows (with CUDA graphs, padded to a graph's
    size and with a row table per replay)."""
    out = {"prompts": [], "cases": {case: [] for case in CASES}}
    for prompt in PROMPTS:
        out["prompts"].append([t["id"] for t in post(f"{args.url}/tokenize", {"inputs": prompt})])
    jobs = [(case, prompt) for case in CASES for prompt in PROMPTS]
    run = lambda job: generate(args.url, job[1], case_params(job[0]), STEPS)
    if args.at_once:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(run, jobs))
    else:
        got = [run(job) for job in jobs]
    for (case, _), tokens in zip(jobs, got):
        out["cases"][case].append(tokens)
    write(args.out, out)


def decode_step_totals(url):
    """Sums and counts of the router's decode-step histograms (the whole step as the router
    waits for it, the shard's step, its forward pass, its part in tensor-parallel collectives,
    its sampling), from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("medley_batch_inference_duration", "medley_batch_forward_duration",
                     "medley_batch_comm_duration", "medley_batch_launch_duration",
                     "medley_batch_shard_duration", "medley_batch_decode_duration"):
            for part in ("sum", "count"):
                key = f'{name}_{part}{{method="decode"}}'
                if line.startswith(key + " "):
                    out[(name, part)] = float(line.split()[-1])
    return out


def step_columns(before, after):
    """Decode steps between two scrapes, and milliseconds per step: the step as the router waits
    for it (the call to the shards and their answer), the shard's step (from its engine starting
    it to its answer; a step run ahead starts before the router asks, so the router may wait
    less than the shard's step: what is left of it plus the call's way there and back), the
    forward pass, its part until the model returned (on a GPU the host queueing the kernels;
    the rest waits for the device), its part in collectives, and the shard's sampling
    (stopping criteria and detokenization included)."""
    delta = lambda name, part: after.get((name, part), 0.0) - before.get((name, part), 0.0)
    steps = delta("medley_batch_forward_duration", "count")
    if steps <= 0:
        return {}
    per_step = lambda name: round(1e3 * delta(name, "sum") / steps, 3)
    return dict(decode_steps=int(steps),
                step_ms_per_step=per_step("medley_batch_inference_duration"),
                shard_ms_per_step=per_step("medley_batch_shard_duration"),
                sample_ms_per_step=per_step("medley_batch_decode_duration"),
                forward_ms_per_step=per_step("medley_batch_forward_duration"),
                launch_ms_per_step=per_step("medley_batch_launch_duration"),
                comm_ms_per_step=per_step("medley_batch_comm_duration"))


def rate_row(tokens, seconds):
    """A speed measurement: tokens, seconds and their rate."""
    return dict(tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1))


def best_of(repeats, deadline, run):
    """The fastest of up to `repeats` calls of `run` (at least one; no new one after
    `deadline`), with every run's rate under `runs`: the machines are shared and noisy."""
    runs = []
    for _ in range(max(1, repeats)):
        if runs and time.monotonic() > deadline:
            break
        runs.append(run())
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return dict(best, runs=[r["tokens_per_s"] for r in runs])


def merge_params(i):
    """Stream i's request of the "8 merges" configuration: linear merge i mod 8."""
    return {"adapter_source": "local", "merged_adapters": {
        "ids": SPEED_MERGES[i % 8]["ids"], "weights": SPEED_MERGES[i % 8]["weights"],
        "merge_strategy": "linear"}}


def medley_speed(args):
    rows = []
    deadline = time.monotonic() + args.budget_s
    full = lambda i, streams: args.new_tokens
    # "8 merges staggered": stream i of n asks for (i + 1) / n of the tokens, so the batch
    # loses a request every few steps (a CUDA graph server pads to fewer rows as it shrinks).
    staggered = lambda i, streams: max(2, args.new_tokens * (i + 1) // streams)
    configs = [("base", lambda i: {}, full),
               ("1 adapter", lambda i: case_params("adapter"), full),
               ("8 merges", merge_params, full),
               ("8 merges staggered", merge_params, staggered)]
    configs = [c for c in configs if c[0] in args.configs.split(",")]
    for name, params, tokens in configs:
        # Warm-up: loads the adapters and computes the merges once, outside the timing.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: generate(args.url, SPEED_PROMPT, params(i), 2), range(8)))
        for streams in args.streams:
            if tokens is staggered and streams < 2:
                continue
            if time.monotonic() > deadline:
                rows.append(dict(config=name, streams=streams, skipped="time budget"))
                continue
            def run():
                before = decode_step_totals(args.url)
                t0 = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                    got = list(pool.map(
                        lambda i: generate(args.url, SPEED_PROMPT, params(i),
                                           tokens(i, streams)),
                        range(streams)))
                dt = time.monotonic() - t0
                n = sum(len(g) for g in got)
                return dict(rate_row(n, dt), **step_columns(before, decode_step_totals(args.url)))

            rows.append(dict(config=name, streams=streams, **best_of(args.repeats, deadline, run)))
            if streams == 1 and args.decode_reps > 0:
                # Decode only, best of --decode-reps (the machine is shared and noisy).
                rate = max(stream_decode_rate(args.url, SPEED_PROMPT, params(0), args.new_tokens) or 0
                           for _ in range(args.decode_reps))
                rows[-1]["decode_tokens_per_s"] = round(rate, 1)
            print(f"medley {name} x{streams}: {rows[-1]['tokens_per_s']:.1f} tok/s "
                  f"(runs {rows[-1]['runs']})", file=sys.stderr)
            write(args.out, {"rows": rows, "new_tokens": args.new_tokens})
    write(args.out, {"rows": rows, "new_tokens": args.new_tokens})


# ---------------------------------------------------------------- transformers + PEFT

def torch_dtype(name):
    import torch
    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]


def load_hf(model_dir, dtype, device, attn="eager"):
    import transformers
    from transformers import LlamaForCausalLM
    kw = {"attn_implementation": attn}
    # transformers 4.56 renamed `torch_dtype` to `dtype` (5.x drops the old name).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype(dtype)
    return LlamaForCausalLM.from_pretrained(model_dir, **kw).to(device).eval()


def greedy(model, ids, device):
    """Greedy tokens, each step a full forward of the whole sequence; and the smallest gap
    between the best and second-best logit at each step."""
    import torch
    out, gaps = [], []
    cur = torch.tensor([ids], device=device)
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(cur).logits[0, -1].float()
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            t = int(logits.argmax())
            out.append(t)
            cur = torch.cat([cur, torch.tensor([[t]], device=device)], 1)
    return out, gaps


def hf_tokens(args):
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    torch.manual_seed(0)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in PROMPTS]
    out = {"prompts": prompts, "cases": {}, "gaps": {}}

    def record(case, model):
        res = [greedy(model, ids, args.device) for ids in prompts]
        out["cases"][case] = [r[0] for r in res]
        out["gaps"][case] = [r[1] for r in res]

    base = load_hf(args.model, args.dtype, args.device, args.attn)
    record("base", base)
    model = PeftModel.from_pretrained(base, os.path.join(args.adapters, "a0"), adapter_name="a0")
    for name in MERGE["ids"][1:]:
        model.load_adapter(os.path.join(args.adapters, name), adapter_name=name)
    model.eval()
    model.set_adapter("a0")
    record("adapter", model)
    model.add_weighted_adapter(MERGE["ids"], MERGE["weights"], "ties", combination_type="ties",
                               density=MERGE["density"], majority_sign_method="total")
    model.set_adapter("ties")
    # The merged adapter's layers are new modules, created in training mode: without this its
    # LoRA dropout (the first adapter's lora_dropout) would be active.
    model.eval()
    record("ties", model)
    out["versions"] = versions()
    write(args.out, out)


def hf_speed(args):
    import torch
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    ids = tok.encode(SPEED_PROMPT).ids
    rows = []
    deadline = time.monotonic() + args.budget_s

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    out = lambda: {"rows": rows, "new_tokens": args.new_tokens, "dtype": args.dtype}
    for attn in args.attn.split(","):
        model = load_hf(args.model, args.dtype, args.device, attn)
        for batch in args.batches:
            if time.monotonic() > deadline:
                rows.append(dict(attn=attn, batch=batch, skipped="time budget"))
                continue
            x = torch.tensor([ids] * batch, device=args.device)
            mask = torch.ones_like(x)
            kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None,
                      min_new_tokens=args.new_tokens)

            def run():
                sync()
                t0 = time.monotonic()
                y = model.generate(x, max_new_tokens=args.new_tokens, **kw)
                sync()
                return rate_row((y.shape[1] - x.shape[1]) * batch, time.monotonic() - t0)

            with torch.no_grad():
                model.generate(x, max_new_tokens=2, **{**kw, "min_new_tokens": 2})  # warm-up
                rows.append(dict(attn=attn, batch=batch, **best_of(args.repeats, deadline, run)))
            print(f"transformers {attn} batch {batch}: {rows[-1]['tokens_per_s']:.1f} tok/s "
                  f"(runs {rows[-1]['runs']})", file=sys.stderr)
            write(args.out, out())
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    write(args.out, out())


def versions():
    v = {}
    for m in ("torch", "transformers", "peft", "tokenizers"):
        try:
            v[m] = __import__(m).__version__
        except Exception as e:  # noqa: BLE001 - a missing module is reported, not fatal
            v[m] = f"unavailable ({e})"
    try:
        import torch
        v["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            v["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return v


# ---------------------------------------------------------------- comparison and report

def compare(args):
    ref, cand = read(args.reference), read(args.candidate)
    need = STEPS if args.require is None else args.require
    result = {"name": args.name, "require": need, "cases": {}, "pass": True}
    if ref.get("prompts") != cand.get("prompts"):
        result["pass"] = False
        result["prompt_ids"] = {"reference": ref.get("prompts"), "candidate": cand.get("prompts")}
    for case in CASES:
        per = []
        for i, (r, c) in enumerate(zip(ref["cases"].get(case, []), cand["cases"].get(case, []))):
            first = next((j for j, (a, b) in enumerate(zip(r, c)) if a != b), None)
            if first is None and len(r) != len(c):
                first = min(len(r), len(c))
            entry = {"prompt": i, "equal": first is None, "first_divergence": first}
            gaps = ref.get("gaps", {}).get(case)
            if first is not None and gaps:
                entry["oracle_gap_at_divergence"] = gaps[i][first]
            per.append(entry)
            if first is not None and first < need:
                result["pass"] = False
        if len(per) != len(PROMPTS):
            result["pass"] = False
            per.append({"missing": True})
        result["cases"][case] = per
    write(args.out, result)
    print(f"{args.name}: {'pass' if result['pass'] else 'FAIL'}", file=sys.stderr)
    return 0 if result["pass"] else 1


# ---------------------------------------------------------------- plumbing

def ints(text):
    return [int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    merge_help = "adapters of the TIES merge: the first N of a0, a1, a2 (PEFT needs equal ranks)"
    p = sub.add_parser("medley-tokens")
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--merge-adapters", type=int, default=3, choices=[2, 3], help=merge_help)
    p.add_argument("--at-once", action="store_true",
                   help="send every request together (one batch) instead of one at a time")
    p = sub.add_parser("hf-tokens")
    for a in ("--model", "--adapters", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--dtype", default="f32")
    p.add_argument("--device", default="cuda")
    p.add_argument("--merge-adapters", type=int, default=3, choices=[2, 3], help=merge_help)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                   help="transformers' attention: eager (the reference) or sdpa (its fused "
                        "kernels, to show how far the oracle itself moves in half precision)")
    p = sub.add_parser("compare")
    for a in ("--name", "--reference", "--candidate", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--require", type=int, default=None,
                   help=f"leading tokens that must be equal (default all {STEPS})")
    p = sub.add_parser("medley-speed")
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--streams", type=ints, default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=120)
    p.add_argument("--decode-reps", type=int, default=0,
                   help="at 1 stream, also measure decode-only tok/s over this many streamed requests (best)")
    p.add_argument("--configs", default="base,1 adapter,8 merges,8 merges staggered",
                   help="comma-separated subset of: base, 1 adapter, 8 merges, 8 merges staggered")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported")
    p = sub.add_parser("hf-speed")
    for a in ("--model", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=ints, default=[1, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=60)
    p.add_argument("--attn", default="eager,sdpa",
                   help="comma-separated attention implementations to time (eager, sdpa)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported")
    p = sub.add_parser("report")
    for a in ("--dir", "--title", "--command"):
        p.add_argument(a, required=True)
    args = ap.parse_args()
    n = getattr(args, "merge_adapters", 3)
    MERGE["ids"], MERGE["weights"] = MERGE["ids"][:n], MERGE["weights"][:n]
    fn = {"medley-tokens": medley_tokens, "hf-tokens": hf_tokens, "compare": compare,
          "medley-speed": medley_speed, "hf-speed": hf_speed, "report": report}[args.cmd]
    sys.exit(fn(args) or 0)


if __name__ == "__main__":
    main()
