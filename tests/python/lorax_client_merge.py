"""The LoRAX Python client's `MergedAdapters` and `adapter_id` against a running Medley server.

Usage: python lorax_client_merge.py http://127.0.0.1:PORT '<json spec>'
The spec names the prompt, the merge (ids, weights, density) and the greedy token ids PEFT
produces for it; prints "ALL OK" when the client's requests reproduce them.
"""

import json
import sys

from lorax import Client, MergedAdapters
from lorax.errors import NotFoundError

url, spec = sys.argv[1], json.loads(sys.argv[2])
client = Client(url, timeout=120)

merged = MergedAdapters(
    ids=spec["ids"],
    weights=spec["weights"],
    merge_strategy="ties",
    density=spec["density"],
    majority_sign_method="total",
)
resp = client.generate(
    spec["prompt"],
    merged_adapters=merged,
    adapter_source="local",
    max_new_tokens=len(spec["expected"]),
    ignore_eos_token=True,
)
ids = [t.id for t in resp.details.tokens]
assert ids == spec["expected"], (ids, spec["expected"])
print("merged_adapters (ties): ok")

single = spec["single"]
resp = client.generate(
    spec["prompt"],
    adapter_id=single["id"],
    adapter_source="local",
    max_new_tokens=len(single["expected"]),
    ignore_eos_token=True,
)
assert [t.id for t in resp.details.tokens] == single["expected"]
print("adapter_id: ok")

streamed = [
    e.token.id
    for e in client.generate_stream(
        spec["prompt"],
        merged_adapters=merged,
        adapter_source="local",
        max_new_tokens=len(spec["expected"]),
        ignore_eos_token=True,
    )
]
assert streamed == spec["expected"], streamed
print("generate_stream with merged_adapters: ok")

try:
    client.generate(spec["prompt"], adapter_id="does_not_exist", adapter_source="local", max_new_tokens=2)
    raise AssertionError("expected NotFoundError")
except NotFoundError as e:
    print("unknown adapter:", e)

print("ALL OK")
