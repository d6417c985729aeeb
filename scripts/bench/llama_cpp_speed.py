#!/usr/bin/env python3
"""llama.cpp's decode speed on a GGUF file, one stream: the anchor of scripts/bench/quant_speed.sh.

    llama_cpp_speed.py FILE [--threads 2] [--prompt 32] [--new-tokens 32] [--reps 3]

Needs `llama-cpp-python` (`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.16`
builds llama.cpp from source in about 8 minutes on 2 cores). Token ids are fed directly (no
tokenizer): a prompt of `--prompt` ids, then `--new-tokens` single-token steps, each computing the
logits of the whole vocabulary, as a Medley decode step does. Prints one JSON line: the best of
`--reps` repetitions (the machine is shared and noisy) of the decode rate (decode_tokens_per_s)
and of the rate with the prompt's evaluation included (request_tokens_per_s), and the output of a
capital-of-France chat if the file carries a chat template.
"""

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chat", action="store_true", help="also ask the capital of France")
    args = ap.parse_args()
    import llama_cpp
    from llama_cpp import Llama

    m = Llama(model_path=args.file, n_threads=args.threads, n_threads_batch=args.threads,
              n_ctx=max(256, args.prompt + args.new_tokens + 8), verbose=False, seed=0)
    vocab = m.n_vocab()
    prompt = [(17 * i + 100) % vocab for i in range(args.prompt)]
    best, best_request = 0.0, 0.0
    for _ in range(args.reps):
        m.reset()
        t_request = time.perf_counter()
        m.eval(prompt)
        t0 = time.perf_counter()
        for i in range(args.new_tokens):
            m.eval([(31 * i + 200) % vocab])
        t1 = time.perf_counter()
        best = max(best, args.new_tokens / (t1 - t0))
        # Prompt included, as Medley's one-stream /generate rate counts it.
        best_request = max(best_request, args.new_tokens / (t1 - t_request))
    out = {"file": args.file, "threads": args.threads, "decode_tokens_per_s": round(best, 1),
           "request_tokens_per_s": round(best_request, 1),
           "llama_cpp_python": llama_cpp.__version__}
    if args.chat:
        r = m.create_chat_completion(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        out["capital_answer"] = r["choices"][0]["message"]["content"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
