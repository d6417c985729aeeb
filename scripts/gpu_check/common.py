"""What the GPU check's Python parts share: the cases every token comparison runs, and the
JSON files its steps write and read (stdlib only)."""

import json
import os

STEPS = 32
PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "SELECT name, price FROM products WHERE price > 10 ORDER BY price",
]
MERGE = dict(ids=["a0", "a1", "a2"], weights=[1.0, 0.6, -0.3], strategy="ties", density=0.5)
CASES = ["base", "adapter", "ties"]


def read(path):
    with open(path) as f:
        return json.load(f)


def write(path, value):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)
