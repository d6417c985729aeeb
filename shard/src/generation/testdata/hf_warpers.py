"""Golden outputs of Hugging Face `transformers` logits processors for the shard's sampler tests.

Run with the oracle venv (torch + transformers; CI has neither, so the output is committed):
    /work/oracle/venv/bin/python shard/src/generation/testdata/hf_warpers.py > shard/src/generation/testdata/hf_warpers.json

Each case applies, in TGI's order, RepetitionPenaltyLogitsProcessor (if penalty != 1), then the
warpers Temperature -> TopK -> TopP -> Typical (each only when active, min_tokens_to_keep=1) and
records log_softmax of the processed scores (null where a warper removed the token).
"""
import json

import numpy as np
import torch
import transformers
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

rng = np.random.default_rng(20240611)
VOCAB = 40


def case(name, logits, history, rep=1.0, temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0):
    scores = torch.tensor([logits], dtype=torch.float32)
    ids = torch.tensor([history], dtype=torch.long)
    if rep != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(rep)(ids, scores)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if typical_p < 1.0:
        scores = TypicalLogitsWarper(typical_p)(ids, scores)
    logprobs = torch.log_softmax(scores, dim=-1)[0].tolist()
    return {
        "name": name,
        "logits": [float(x) for x in logits],
        "history": history,
        "repetition_penalty": rep,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "typical_p": typical_p,
        "logprobs": [None if x == float("-inf") else x for x in logprobs],
    }


def random_logits(scale=2.0):
    return (rng.standard_normal(VOCAB) * scale).astype(np.float32).tolist()


def rounded_logits():
    # Coarse values so that several tokens tie (top-k and typical keep whole tie groups).
    return (np.round(rng.standard_normal(VOCAB) * 2.0) / 2.0).astype(np.float32).tolist()


history = [int(x) for x in rng.integers(0, VOCAB, size=12)]
cases = [
    case("repetition_only", random_logits(), history, rep=1.3),
    case("temperature_only", random_logits(), history, temperature=0.7),
    case("top_k_5", random_logits(), history, top_k=5),
    case("top_p_0.9", random_logits(), history, top_p=0.9),
    case("top_p_0.3", random_logits(3.0), history, top_p=0.3),
    case("typical_0.5", random_logits(), history, typical_p=0.5),
    case("typical_0.95", random_logits(), history, typical_p=0.95),
    case("all_warpers", random_logits(), history, rep=1.2, temperature=0.8, top_k=20, top_p=0.85, typical_p=0.9),
    case("topk_then_topp", random_logits(), history, temperature=1.5, top_k=12, top_p=0.6),
    case("topp_then_typical", random_logits(), history, top_p=0.95, typical_p=0.6),
    case("top_k_ties", rounded_logits(), history, top_k=3),
    case("typical_ties", rounded_logits(), history, typical_p=0.4),
    case("penalty_hot_temperature", random_logits(), history, rep=0.8, temperature=2.5, top_k=30),
]
print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, separators=(",", ":")))
