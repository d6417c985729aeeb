"""The GPU check's report: the markdown `check.py report` prints from a run's files (the
kernel tables, the token comparisons, the speed tables and issue 11's targets). stdlib only."""

import os
import re

from common import CASES, PROMPTS, STEPS, read

def report(args):
    d = args.dir
    lines = [f"# {args.title}", "", f"Command: `{args.command}`", ""]
    env = os.path.join(d, "versions.txt")
    if os.path.exists(env):
        lines += ["## Versions", "", "```", open(env).read().strip(), "```", ""]
    for name in LORA_TABLES:
        kernels = os.path.join(d, name)
        if os.path.exists(kernels):
            lines += [open(kernels).read().strip().replace("## ", "### "), ""]
    lines += [f"## Greedy tokens ({STEPS} per prompt, 2 prompts; base, adapter a0, TIES merge a0+a1+a2)", "",
              "| comparison | requirement | base | adapter | ties | result |", "|---|---|---|---|---|---|"]
    for f in sorted(x for x in os.listdir(d) if x.startswith("compare-")):
        c = read(os.path.join(d, f))
        cells = []
        for case in CASES:
            per = c["cases"].get(case, [])
            cells.append(", ".join("missing" if e.get("missing") else
                                   ("equal" if e["equal"] else f"differs at {e['first_divergence']}"
                                    + (f" (oracle gap {e['oracle_gap_at_divergence']:.2e})"
                                       if "oracle_gap_at_divergence" in e else ""))
                                   for e in per) or "missing")
        req = f"first {c['require']} equal" if c["require"] else "report only"
        lines.append(f"| {c['name']} | {req} | " + " | ".join(cells)
                     + f" | {'pass' if c['pass'] else 'FAIL'} |")
    lines.append("")
    # A case whose tokens equal the base model's would not test the adapter path.
    for f, model in (("tokens-hf-f32.json", "random model, transformers f32"),
                     ("tokens-hf-demo-bf16.json", "trained demo model, transformers bf16")):
        ref = os.path.join(d, f)
        if os.path.exists(ref):
            r = read(ref)["cases"]
            differ = {c: sum(a != b for a, b in zip(r.get(c, []), r["base"])) for c in CASES[1:]}
            lines += [f"Cases whose tokens differ from the base model's ({model}): "
                      + ", ".join(f"{c} {n}/{len(PROMPTS)} prompts" for c, n in differ.items()), ""]
    ms = os.path.join(d, "speed-medley.json")
    if os.path.exists(ms):
        s = read(ms)
        lines += speed_table(
            f"Medley decode speed (bf16, {s['new_tokens']} new tokens per stream, HTTP /generate; "
            "8 merges = linear merges of two adapters, stream i uses merge i mod 8; best of the "
            "runs; per decode step: the router's step = its wait for the shards' answer, the "
            "shard's step = from its engine starting the step to its answer (run ahead, it "
            "starts before the router asks), queueing = the forward's part until "
            "the model returned, on a GPU the host issuing the step's kernels; sampling = the "
            "shard's sampling, stopping criteria and detokenization)",
            [("adapters", "config"), ("streams", "streams")], s["rows"])
    for name, what in VARIANT_SERVERS:
        path = os.path.join(d, f"speed-medley-{name}.json")
        if os.path.exists(path):
            lines += speed_table(f"Medley decode speed {what}; otherwise as above)",
                                 [("adapters", "config"), ("streams", "streams")],
                                 read(path)["rows"])
    hs = os.path.join(d, "speed-hf.json")
    if os.path.exists(hs):
        s = read(hs)
        lines += speed_table(
            f"transformers `generate` ({s['dtype']}, {s['new_tokens']} new tokens, greedy)",
            [("attention", "attn"), ("batch", "batch")], s["rows"])
    lines += targets(d)
    lines += memory_table(d)
    lines += graph_table(d)
    steps = os.path.join(d, "steps.txt")
    if os.path.exists(steps):
        lines += ["## Steps", "", "```", open(steps).read().strip(), "```", ""]
    print("\n".join(lines))


# The report-only servers of gpu-check.sh's step 5: (name, how they differ, up to a closing
# parenthesis).
VARIANT_SERVERS = [
    ("graphs", "with decode steps replayed from CUDA graphs (--cuda-graphs on, CUDA_GRAPHS=on"),
    ("stacked-fused", "with q/k/v and gate/up as one matmul each and the fused BGMV kernel "
                      "(MEDLEY_STACK_PROJECTIONS=1 MEDLEY_LORA_BGMV=fused"),
    ("no-ahead", "without decode ahead: the shard waits for the router's call before each step "
                 "(MEDLEY_DECODE_AHEAD=false"),
    ("stacked", "with q/k/v and gate/up as one matmul each (MEDLEY_STACK_PROJECTIONS=1"),
    ("fused", "through the fused BGMV kernel, shrink and expand in one launch "
              "(MEDLEY_LORA_BGMV=fused"),
    ("fused-grouped", "through the fused grouped BGMV kernel, the grouped shrink and expand in "
                      "one launch (MEDLEY_LORA_BGMV=fused-grouped"),
    ("grouped", "through the grouped BGMV kernels (MEDLEY_LORA_BGMV=grouped"),
]


# The shards' start-up lines memory_table reads, and the fields it shows of each.
KV_LINE = "KV cache sized from the GPU's memory"
BUDGET_LINE = "GPU memory after the warm-up step"
MEMORY_FIELDS = ["kv_cache_tokens", "kv_cache_mib", "budget_mib", "weights_mib", "step_peak_mib",
                 "adapter_budget_mib", "free_mib", "total_mib"]


def memory_table(d):
    """Each GPU server's KV cache as its shards sized it from the GPU's memory at the warm-up,
    and the memory left free after it (from the server logs)."""
    rows = []
    for f in sorted(x for x in os.listdir(d) if x.startswith("server-") and x.endswith(".log")):
        kv, after = {}, {}
        for line in open(os.path.join(d, f), errors="replace"):
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            rank = (re.findall(r"\brank=(\d+)", line) or ["0"])[0]
            fields = dict(re.findall(r"\b(\w+)=([0-9.]+)", line))
            if KV_LINE in line:
                kv[rank] = fields
            elif BUDGET_LINE in line:
                after[rank] = fields
        for rank in sorted(kv, key=int):
            rows.append([f[len("server-"):-len(".log")], rank]
                        + [kv[rank].get(k, "") for k in MEMORY_FIELDS]
                        + [after.get(rank, {}).get("free_mib", "")])
    if not rows:
        return []
    heads = ["server", "rank"] + MEMORY_FIELDS + ["free_mib after"]
    return (["## GPU memory at start-up (KV cache sized from the GPU's memory at the warm-up; "
             "MiB unless named tokens)", "", "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


# The shard's periodic CUDA-graph line (shard/src/model/graphs.rs) and the fields graph_table
# shows of the last one of each server.
GRAPHS_LINE = "decode steps replayed from CUDA graphs"
GRAPH_FIELDS = ["replayed", "recorded", "eager", "failed", "graphs"]
GRAPH_FAILED_LINE = "CUDA graph: it runs eagerly"  # a failed recording (or replay)


def graph_table(d):
    """Each CUDA-graph server's decode steps by how they ran (the last count its log gave, at a
    power-of-two number of replays) and its first failed recording, if any."""
    rows = []
    for f in sorted(x for x in os.listdir(d) if x.startswith("server-") and x.endswith(".log")):
        last, failed = None, ""
        for line in open(os.path.join(d, f), errors="replace"):
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if GRAPHS_LINE in line:
                last = dict(re.findall(r"\b(\w+)=([0-9.]+)", line))
            elif GRAPH_FAILED_LINE in line and not failed:
                failed = (re.findall(r"error=(.*?)(?: failures=|$)", line) or [line.strip()])[0]
        if last is not None or failed:
            last = last or {}
            rows.append([f[len("server-"):-len(".log")]] + [last.get(k, "") for k in GRAPH_FIELDS]
                        + [failed.replace("|", "/")[:160]])
    if not rows:
        return []
    heads = ["server"] + GRAPH_FIELDS + ["first failed recording"]
    return (["## CUDA graphs (--cuda-graphs on: decode steps by how they ran, at the log's last "
             "count)", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def speed_table(title, keys, rows):
    """A markdown table of speed rows: the `keys` columns (header, field), then tokens, seconds
    and tokens/s (and the decode step's parts when measured: see `step_columns`), or why the row
    was skipped."""
    extra = [(h, f) for h, f in (("router's step ms", "step_ms_per_step"),
                                 ("shard's step ms", "shard_ms_per_step"),
                                 ("forward ms/step", "forward_ms_per_step"),
                                 ("of it queueing ms/step", "launch_ms_per_step"),
                                 ("collectives ms/step", "comm_ms_per_step"),
                                 ("sampling ms/step", "sample_ms_per_step"),
                                 ("tokens/s of each run", "runs"))
             if any(f in r for r in rows)]
    heads = [h for h, _ in keys] + ["tokens", "seconds", "tokens/s"] + [h for h, _ in extra]
    lines = [f"## {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [str(r.get(f, "")) for _, f in keys]
        if "skipped" in r:
            cells += [f"skipped ({r['skipped']})", "", ""] + [""] * len(extra)
        else:
            cells += [str(r["tokens"]), str(r["seconds"]), str(r["tokens_per_s"])]
            cells += [", ".join(map(str, r[f])) if isinstance(r.get(f), list) else str(r.get(f, ""))
                      for _, f in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


# medley-lora-check's reports: the established kernels (and attention, fused, greedy), then the
# fused BGMV kernels in a run of their own (gpu-check.sh step 1b).
LORA_TABLES = ["lora-kernels.md", "lora-kernels-fused.md"]


def lora_bandwidth_rows(path):
    """The header and rows (lists of cells) of medley-lora-check's bandwidth table."""
    rows, head = [], None
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "adapters × rank" in cells:
            head = cells
        elif head and line.startswith("|") and len(cells) == len(head):
            if not set(line.strip()) <= set("|-: "):
                rows.append(cells)
        elif head and rows:
            break
    return head or [], rows


def targets(d):
    """Issue 11's speed targets, computed from this run's files (best runs on both sides)."""
    def pct(text):
        try:
            return float(text.rstrip("%"))
        except ValueError:
            return None

    out, seen = [], set()
    for name in LORA_TABLES:
        kernels = os.path.join(d, name)
        if not os.path.exists(kernels):
            continue
        head, rows = lora_bandwidth_rows(kernels)
        share_cols = [i for i, h in enumerate(head) if h == "of copy"]  # host-paced, then GPU
        # One line per kernel set (the `kernels` column; older tables have none).
        kcol = head.index("kernels") if "kernels" in head else None
        sets = list(dict.fromkeys(r[kcol] for r in rows)) if kcol is not None else [None]
        for kset in sets:
            # A set measured by both runs (the CPU's one set) counts once.
            if kset in seen:
                continue
            seen.add(kset)
            at32 = [r for r in rows if r[head.index("rows")] == "32"
                    and (kcol is None or r[kcol] == kset)]
            for label, col in zip(("host-paced", "GPU time"), share_cols):
                shares = [x for x in (pct(r[col]) for r in at32) if x is not None]
                if shares:
                    name = f"LoRA kernels{f' ({kset})' if kset else ''} at batch 32, {label}"
                    out.append((f"{name}: share of the copy bandwidth (worst … best of "
                                f"{len(shares)} shapes)", "≥ 50%",
                                f"{min(shares):.0f}% … {max(shares):.0f}%", min(shares) >= 50))
    ms, hs = os.path.join(d, "speed-medley.json"), os.path.join(d, "speed-hf.json")
    medley = {(r["config"], r["streams"]): r["tokens_per_s"]
              for r in (read(ms)["rows"] if os.path.exists(ms) else []) if "tokens_per_s" in r}
    hf = {}
    for r in (read(hs)["rows"] if os.path.exists(hs) else []):
        if "tokens_per_s" in r:
            hf[r["batch"]] = max(hf.get(r["batch"], 0), r["tokens_per_s"])
    one, merges = medley.get(("1 adapter", 32)), medley.get(("8 merges", 32))
    if one and merges:
        out.append(("8 distinct merges / 1 adapter, 32 streams", "≥ 80%",
                    f"{100 * merges / one:.0f}%", merges >= 0.8 * one))
    # The target compares the base model (transformers' generate has no adapter); the merges'
    # ratio is shown beside it, as information.
    for config in ("base", "8 merges"):
        for streams, need in ((1, 1.0), (32, 3.0)):
            m, t = medley.get((config, streams)), hf.get(streams)
            if m and t:
                out.append((f"Medley {config} / transformers (faster attention) at {streams} "
                            f"stream{'s' if streams > 1 else ''}",
                            f"≥ {need:g}×" if config == "base" else "report only",
                            f"{m / t:.2f}× ({m:.0f} / {t:.0f} tok/s)",
                            m >= need * t if config == "base" else None))
    # The report-only servers against the default one, row by row at 32 streams (what decides
    # the opt-ins' defaults).
    for name, _ in VARIANT_SERVERS:
        path = os.path.join(d, f"speed-medley-{name}.json")
        rows = read(path)["rows"] if os.path.exists(path) else []
        for r in rows:
            base = medley.get((r.get("config"), r.get("streams")))
            if r.get("streams") == 32 and base and r.get("tokens_per_s"):
                out.append((f"{name} server / default server, {r['config']}, 32 streams",
                            "report only", f"{r['tokens_per_s'] / base:.2f}× "
                            f"({r['tokens_per_s']:.0f} / {base:.0f} tok/s)", None))
            # The base model's target as this server would meet it (what its default decides).
            t = hf.get(r.get("streams"))
            if r.get("config") == "base" and r.get("streams") in (1, 32) and t \
                    and r.get("tokens_per_s"):
                need = 3.0 if r["streams"] == 32 else 1.0
                m = r["tokens_per_s"]
                out.append((f"{name} server: Medley base / transformers at {r['streams']} "
                            f"stream{'s' if r['streams'] > 1 else ''} (≥ {need:g}× if it were "
                            f"the default)", "report only",
                            f"{m / t:.2f}× ({m:.0f} / {t:.0f} tok/s)", None))
    if not out:
        return []
    verdict = {True: "met", False: "**not met**", None: ""}
    lines = ["## Speed targets (issue 11)", "",
             "Judged on a GPU run; the CPU dry run's table only shows that the computation works.", "",
             "| target | required | measured | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {verdict[ok]} |" for a, b, c, ok in out]
    return lines + [""]
