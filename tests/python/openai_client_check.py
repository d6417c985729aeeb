"""Drives a running Medley server's /v1 routes with the official OpenAI Python client.

Usage: python openai_client_check.py HTTP MODEL_ID PLAIN_HTTP
  HTTP        a server of the tiny model with the Mistral chat template
              (router/tests/fixtures/chat_templates/mistral.json) and
              --adapter-root tests/fixtures/adapters; MODEL_ID is its served model id
  PLAIN_HTTP  a server of the tiny model without a chat template
Every OpenAI answer is compared with what the server's own /generate and /tokenize return.
Prints "ALL OK" when every check passes; any failure raises.
"""

import json
import sys
import urllib.request

import openai

url, model_id, plain_url = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", timeout=120, max_retries=0)
plain = openai.OpenAI(base_url=f"{plain_url}/v1", api_key="EMPTY", timeout=120, max_retries=0)

PROMPT = "Once upon a time"
# A strong fixture adapter (the weak `a_r4` leaves this prompt's greedy text unchanged) and the
# TIES merge of tests/fixtures/goldens/adapter_goldens.json.
ADAPTER = "strong_a_r8"
MERGE = {
    "ids": ["strong_a_r8", "strong_b_r8_attn", "strong_c_r8_rslora"],
    "weights": [1.0, 0.6, -0.3],
    "merge_strategy": "ties",
    "density": 0.5,
    "majority_sign_method": "total",
}


def post(path, body):
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def generate(prompt, max_new_tokens=8, **parameters):
    """Greedy /generate with details."""
    parameters.update(max_new_tokens=max_new_tokens, details=True)
    return post("/generate", {"inputs": prompt, "parameters": parameters})


def token_count(text, add_special_tokens):
    return len(post("/tokenize", {"inputs": text, "add_special_tokens": add_special_tokens}))


def expect_error(kind, call):
    try:
        result = call()
        if isinstance(result, openai.Stream):
            list(result)
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}")


# 1. /v1/models lists the served model.
ids = [m.id for m in client.models.list().data]
assert model_id in ids, (model_id, ids)
assert client.models.retrieve(model_id).id == model_id
print("models: ok", ids)

# 2. A greedy completion is /generate's greedy text, with the same token counts.
ref = generate(PROMPT)
ref_text = ref["generated_text"]
assert ref["details"]["finish_reason"] == "length", ref["details"]
r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, temperature=0)
assert r.object == "text_completion" and r.model == model_id, r
assert len(r.choices) == 1 and r.choices[0].index == 0, r
assert r.choices[0].text == ref_text, (r.choices[0].text, ref_text)
assert r.choices[0].finish_reason == "length", r.choices[0]
assert r.usage.prompt_tokens == ref["details"]["prompt_tokens"], (r.usage, ref["details"])
assert r.usage.completion_tokens == ref["details"]["generated_tokens"] == 8, r.usage
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
print("completion:", repr(ref_text))

# 3. Streamed, the chunks join to the same text; the last chunk carries only usage.
chunks = list(
    client.completions.create(
        model=model_id,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
assert len(chunks) >= 2, chunks
last = chunks[-1]
assert last.choices == [] and last.usage is not None, last
assert last.usage.prompt_tokens == r.usage.prompt_tokens, last.usage
assert last.usage.completion_tokens == 8, last.usage
assert all(c.usage is None for c in chunks[:-1]), chunks
assert "".join(c.choices[0].text for c in chunks[:-1]) == ref_text, chunks
assert chunks[-2].choices[0].finish_reason == "length", chunks[-2]
assert len({c.id for c in chunks}) == 1, chunks
print("completion stream: ok")

# 4. Chat, JSON and streamed: the same greedy text; the prompt is the rendered Mistral template
# (tokenized without a second BOS: the template writes it).
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
]
rendered = "<s> [INST] You are terse.\n\nHello! [/INST]"
# The tiny model's 8th greedy token for this conversation is an incomplete UTF-8 sequence: the
# JSON answer ends with U+FFFD there, and the stream must end with it too (its last chunk carries
# the rest of the final decoded text).
CHAT_TOKENS = 8
rendered_tokens = token_count(rendered, add_special_tokens=False)
assert rendered_tokens > token_count("Hello!", add_special_tokens=True)
chat = client.chat.completions.create(
    model=model_id, messages=messages, max_tokens=CHAT_TOKENS, temperature=0
)
assert chat.object == "chat.completion", chat
message = chat.choices[0].message
assert message.role == "assistant" and message.content, message
assert chat.choices[0].finish_reason == "length", chat.choices[0]
assert chat.usage.prompt_tokens == rendered_tokens, (chat.usage, rendered_tokens)
assert chat.usage.completion_tokens == CHAT_TOKENS, chat.usage
# The rendered prompt through /generate (which adds BOS: drop the template's) is the same
# generation.
ref_chat = generate(rendered[len("<s>") :], CHAT_TOKENS)
assert ref_chat["details"]["prompt_tokens"] == rendered_tokens, ref_chat["details"]
assert message.content == ref_chat["generated_text"], (message.content, ref_chat)
chunks = list(
    client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=CHAT_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
assert chunks[0].object == "chat.completion.chunk", chunks[0]
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
assert chunks[-1].usage.prompt_tokens == rendered_tokens, chunks[-1].usage
streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
assert streamed == message.content, (streamed, message.content)
assert chunks[-2].choices[0].finish_reason == "length", chunks[-2]
print("chat:", repr(message.content), "prompt tokens:", rendered_tokens)


# 5. n choices with a seed: indexes 0 and 1, reproducible, each with its own seed.
def two_samples():
    r = client.completions.create(
        model=model_id, prompt=PROMPT, n=2, seed=1, temperature=0.8, max_tokens=8
    )
    assert [c.index for c in r.choices] == [0, 1], r.choices
    assert r.usage.prompt_tokens == ref["details"]["prompt_tokens"], r.usage
    assert r.usage.completion_tokens == 16, r.usage
    return [c.text for c in r.choices]


samples = two_samples()
assert two_samples() == samples, samples
assert samples[0] != samples[1], samples
print("n=2 seed=1:", samples)

# 6. Logprobs: chat's content/top_logprobs shape, and the legacy completion shape.
chat = client.chat.completions.create(
    model=model_id,
    messages=messages,
    max_tokens=8,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
)
content = chat.choices[0].logprobs.content
# One entry per generated token but the special ones (the tiny model generates a `<s>` here).
ref_chat8 = generate(rendered[len("<s>") :], 8)["details"]["tokens"]
plain_tokens = [t for t in ref_chat8 if not t["special"]]
assert len(plain_tokens) < len(ref_chat8) == chat.usage.completion_tokens, ref_chat8
assert len(content) == len(plain_tokens), (content, plain_tokens)
for entry in content:
    assert len(entry.top_logprobs) == 2, entry
    # Greedy: the chosen token is the most likely one.
    assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-4, entry
    assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob, entry
assert all(abs(e.logprob - t["logprob"]) < 1e-4 for e, t in zip(content, plain_tokens)), content
r = client.completions.create(
    model=model_id, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
)
lp = r.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8, lp
assert "".join(lp.tokens) == r.choices[0].text == ref_text, lp
ref_logprobs = [t["logprob"] for t in ref["details"]["tokens"]]
assert all(abs(a - b) < 1e-4 for a, b in zip(lp.token_logprobs, ref_logprobs)), lp
for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
    # Alternatives are keyed by text, so two that decode alike share one key.
    assert 1 <= len(top) <= 2, top
    assert all(v <= chosen + 1e-4 for v in top.values()), (chosen, top)
print("logprobs: ok")

# 7. A stop sequence cuts the text before it and finishes with "stop".
start = next(i for i in range(1, len(ref_text) - 2) if "\ufffd" not in ref_text[i : i + 3])
stop = ref_text[start : start + 3]
r = client.completions.create(
    model=model_id, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop]
)
assert r.choices[0].text == ref_text[: ref_text.find(stop)], (stop, r.choices[0].text)
assert r.choices[0].finish_reason == "stop", r.choices[0]
print("stop", repr(stop), "->", repr(r.choices[0].text))

# 8. An adapter as `model`, and a per-request merge over the base model, match /generate.
ref_adapter = generate(PROMPT, adapter_id=ADAPTER, adapter_source="local")["generated_text"]
r = client.completions.create(
    model=ADAPTER,
    prompt=PROMPT,
    max_tokens=8,
    temperature=0,
    extra_body={"adapter_source": "local"},
)
assert r.model == ADAPTER, r
assert r.choices[0].text == ref_adapter, (r.choices[0].text, ref_adapter)
assert ref_adapter != ref_text, ref_adapter
ref_merge = generate(PROMPT, merged_adapters=MERGE, adapter_source="local")["generated_text"]
r = client.completions.create(
    model=model_id,
    prompt=PROMPT,
    max_tokens=8,
    temperature=0,
    extra_body={"merged_adapters": MERGE, "adapter_source": "local"},
)
assert r.choices[0].text == ref_merge, (r.choices[0].text, ref_merge)
assert ref_merge != ref_text and ref_merge != ref_adapter, ref_merge
chat = client.chat.completions.create(
    model=ADAPTER,
    messages=messages,
    max_tokens=8,
    temperature=0,
    extra_body={"adapter_source": "local"},
)
ref_chat_adapter = generate(
    rendered[len("<s>") :], adapter_id=ADAPTER, adapter_source="local"
)["generated_text"]
assert chat.choices[0].message.content == ref_chat_adapter, (chat, ref_chat_adapter)
print("adapter:", repr(ref_adapter), "merge:", repr(ref_merge))

# 8b. A named merge as `model`: the same tokens as the equivalent inline merge on /generate, and
# one merge on the shards for both (the cache-miss counter moves once). The merge is a new one
# (other weights than MERGE), so neither request finds it cached.
NAMED = dict(MERGE, weights=[0.8, 0.6, -0.3])


def metric(name):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[0] == name
    )


created = post(
    "/v1/merges",
    {"name": "story/ties", "adapter_source": "local", "merged_adapters": NAMED},
)
assert created["name"] == "story/ties" and len(created["key"]) == 12, created
assert "story/ties" in [m.id for m in client.models.list().data]
misses = metric("medley_adapter_cache_misses")
r = client.completions.create(model="story/ties", prompt=PROMPT, max_tokens=8, temperature=0)
ref_named = generate(PROMPT, merged_adapters=NAMED, adapter_source="local")
assert r.choices[0].text == ref_named["generated_text"], (r.choices[0].text, ref_named)
assert r.usage.completion_tokens == len(ref_named["details"]["tokens"]), r.usage
assert metric("medley_adapter_cache_misses") == misses + 1
assert ref_named["generated_text"] != ref_text
print("named merge:", repr(ref_named["generated_text"]))

# 9. Errors in OpenAI's shape, mapped to the client's exception types.
for stream in (False, True):
    e = expect_error(
        openai.NotFoundError,
        lambda: client.completions.create(
            model="does/not-exist", prompt=PROMPT, max_tokens=2, stream=stream
        ),
    )
    assert e.status_code == 404 and e.code == "model_not_found", (e.status_code, e.body)
    assert e.body["code"] == "model_not_found" and e.body["param"] == "model", e.body
    e = expect_error(
        openai.NotFoundError,
        lambda: client.chat.completions.create(
            model="does/not-exist", messages=messages, max_tokens=2, stream=stream
        ),
    )
    assert e.code == "model_not_found", e.body
e = expect_error(openai.NotFoundError, lambda: client.models.retrieve("does/not-exist"))
assert e.code == "model_not_found", e.body
e = expect_error(
    openai.BadRequestError,
    lambda: client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=2, temperature=-1
    ),
)
assert "temperature" in e.message, e.body
assert e.body["param"] == "temperature", e.body
# The OpenAI parameter is named (LoRAX's is max_new_tokens).
e = expect_error(
    openai.BadRequestError,
    lambda: client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10**6),
)
assert e.body["param"] == "max_tokens" and "`max_tokens`" in e.message, e.body
# Unsupported features and too many alternatives name their parameter too.
e = expect_error(
    openai.BadRequestError,
    lambda: client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=2, response_format={"type": "json_object"}
    ),
)
assert e.body["param"] == "response_format", e.body
e = expect_error(
    openai.BadRequestError,
    lambda: client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=2, logprobs=True, top_logprobs=20
    ),
)
assert e.body["param"] == "top_logprobs" and "`top_logprobs` must be <=" in e.message, e.body
plain_id = plain.models.list().data[0].id
assert plain.completions.create(model=plain_id, prompt=PROMPT, max_tokens=2).usage
e = expect_error(
    openai.BadRequestError,
    lambda: plain.chat.completions.create(model=plain_id, messages=messages, max_tokens=2),
)
assert "chat template" in e.message, e.body
print("errors: ok")

print("ALL OK")
