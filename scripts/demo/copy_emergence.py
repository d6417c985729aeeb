"""How many steps a demo-sized Llama needs before it copies from its context, in PyTorch.

An independent check of the claim behind `medley-train`'s copy stage (`DemoConfig::copy_stage_steps`):
the same architecture (read from a demo base's `config.json`), trained from scratch by transformers
on list copies alone ("v1, v2, v3. Again: v1, v2, v3."), batch 16 x 65 tokens, AdamW with warmup +
cosine like `medley-train`. It prints `step loss copy_accuracy` every 100 steps, where the accuracy is
teacher-forced on the copied half of 128 held-out lists (punctuation included, so ~0.43 means no
copying at all).

    python scripts/demo/copy_emergence.py /tmp/demo/base 4000 3e-3

Measured 2026-12-05 (2 cores, torch 2.15): nothing by step 800 (0.45 at lr 3e-3 and at 1e-2),
0.60 at 1200, 0.69 at 1600, 0.78 at 4000.
Needs torch, transformers and tokenizers (scripts/gpu_check/requirements.txt).
"""

import math
import random
import sys

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

VALUES = (
    "Alice Bruno Chen Dana Elif Farid Greta Hugo Ines Jonas Kira Leo Maya Nils Olga Pablo Paris "
    "Berlin Madrid Rome Oslo Lisbon Vienna Prague Dublin apple bird cloud desk eagle forest grape "
    "house island jacket kite lemon moon nest ocean pencil queen river stone tiger red blue green "
    "black white falcon comet breeze ranger math history art music"
).split() + [str(i) for i in range(100)] + ["trail shoes", "wool hat", "cedar lamp", "glass mug"]
BATCH, WINDOW, WARMUP = 16, 65, 50


def list_copy():
    values = ", ".join(random.choice(VALUES) for _ in range(random.randint(3, 8)))
    return f"{values}. Again:", f" {values}."


def main():
    base, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(2)
    tok = Tokenizer.from_file(f"{base}/tokenizer.json")
    eot = tok.token_to_id("<|endoftext|>")

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids

    stream = []
    while len(stream) < WINDOW * BATCH * steps + WINDOW:
        prefix, copy = list_copy()
        stream += enc(prefix) + enc(copy) + [eot]
    windows = [stream[i : i + WINDOW] for i in range(0, len(stream) - WINDOW, WINDOW)]
    random.shuffle(windows)
    probe = [tuple(map(enc, list_copy())) for _ in range(128)]

    model = LlamaForCausalLM(LlamaConfig.from_pretrained(base))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step):
        if step < WARMUP:
            return lr * (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, steps - WARMUP)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def copy_accuracy():
        model.eval()
        hits = total = 0
        with torch.no_grad():
            for prefix, copy in probe:
                logits = model(torch.tensor([prefix + copy])).logits[0]
                predicted = logits[len(prefix) - 1 : len(prefix) + len(copy) - 1].argmax(-1)
                hits += (predicted == torch.tensor(copy)).sum().item()
                total += len(copy)
        model.train()
        return hits / total

    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = torch.tensor(windows[step * BATCH : (step + 1) * BATCH])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % 100 == 0:
            print(step + 1, round(loss.item(), 3), round(copy_accuracy(), 3), flush=True)


if __name__ == "__main__":
    main()
