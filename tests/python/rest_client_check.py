"""Drives a running Medley server with a real REST client library: the LoRAX Python client
(lorax-client 0.6.3) or the Hugging Face TGI client it descends from (text-generation 0.7.0).
Both speak the same wire format and have the same API; each checks what its models expose.

Usage: python rest_client_check.py lorax|tgi http://127.0.0.1:PORT
Prints "ALL OK" when every check passes; any failure raises.
"""

import sys

kind, url = sys.argv[1], sys.argv[2]
if kind == "lorax":
    from lorax import Client
    from lorax.errors import ValidationError
elif kind == "tgi":
    from text_generation import Client
    from text_generation.errors import ValidationError
else:
    raise SystemExit(f"unknown client {kind!r}: use lorax or tgi")

client = Client(url, timeout=60)

# generate: POST / with the client's full body, JSON array reply, details on by default.
resp = client.generate("The quick brown fox", max_new_tokens=8)
assert resp.details is not None, resp
assert resp.details.generated_tokens == 8, resp.details
assert resp.details.finish_reason.value == "length", resp.details.finish_reason
assert len(resp.details.tokens) == 8
greedy_ids = [t.id for t in resp.details.tokens]
print("generate:", repr(resp.generated_text))

# generate_stream: data: events, the same tokens, final one with generated_text and details.
tokens = []
final = None
for event in client.generate_stream("The quick brown fox", max_new_tokens=8):
    tokens.append(event.token.id)
    if event.generated_text is not None:
        final = event
assert tokens == greedy_ids, (tokens, greedy_ids)
assert final is not None and final.generated_text == resp.generated_text
assert final.details.generated_tokens == 8
print("generate_stream: ok")

# Sampling with a seed through the client is reproducible.
a = client.generate("Once upon a time", max_new_tokens=6, do_sample=True, seed=7, temperature=1.3)
b = client.generate("Once upon a time", max_new_tokens=6, do_sample=True, seed=7, temperature=1.3)
assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
assert a.details.seed == 7

# Stop sequences travel as parameters.stop.
r = client.generate("Once upon a time", max_new_tokens=20, stop_sequences=["zzzz-not-there"])
assert r.details.finish_reason.value == "length"

# decoder_input_details returns the prompt tokens (LoRAX's details also count them); TGI's
# top_n_tokens returns the alternatives as details.top_tokens.
if kind == "lorax":
    r = client.generate("Hello world", max_new_tokens=2, decoder_input_details=True)
    assert len(r.details.prefill) == r.details.prompt_tokens
else:
    r = client.generate("Hello world", max_new_tokens=3, decoder_input_details=True, top_n_tokens=2)
    assert len(r.details.prefill) > 0, r.details
    assert r.details.top_tokens is not None and len(r.details.top_tokens) == 3, r.details
    assert all(len(top) == 2 for top in r.details.top_tokens), r.details.top_tokens

# Server-side validation errors map to the client's ValidationError (422, error_type validation).
try:
    client.generate("hi", max_new_tokens=100000)
    raise AssertionError("expected a validation error")
except ValidationError as e:
    print("validation error:", e)

print("ALL OK")
