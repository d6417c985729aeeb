#!/usr/bin/env python3
"""Goldens for the router's chat templates: transformers' own `apply_chat_template` rendering of
the templates in router/tests/fixtures/chat_templates/, which the Rust test
`http::openai::tests::templates::renders_like_transformers` compares with minijinja, byte for byte.

Setup (outside the repository; CI never runs this, it only reads the committed output):
    python 3.11 with transformers (validated with 4.57.6) and jinja2 (3.1.6), e.g. the
    oracle venv: target/medley-oracle-env/bin/python. Run from anywhere:

    target/medley-oracle-env/bin/python scripts/chat_template_goldens.py

Inputs:
    router/tests/fixtures/chat_templates/<name>.json   tokenizer_config.json excerpts
        (`chat_template` as a string or a list of named templates, and the special tokens)
    tests/fixtures/tiny-llama/tokenizer.json           any tokenizer, to build a real
        PreTrainedTokenizerFast around each excerpt
Output (committed):
    router/tests/fixtures/chat_templates/goldens.json  a list of
        {"fixture", "conversation", "messages", "rendered"} or {..., "error"} when the template
        calls raise_exception (the message)
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import jinja2
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "router/tests/fixtures/chat_templates"
TOKENIZER = ROOT / "tests/fixtures/tiny-llama/tokenizer.json"

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Hi there  "},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4. "},
        {"role": "user", "content": "And 3+3?"},
    ],
    "unicode": [
        {"role": "user", "content": 'héllo wörld ✓ "quotes" <b>tags</b> & \\ back\nnew line\ttab'}
    ],
    "bad_order": [
        {"role": "assistant", "content": "I speak first."},
        {"role": "user", "content": "Hi"},
    ],
}


def tokenizer_for(config: dict, workdir: Path):
    """A real tokenizer loaded from a directory holding the excerpt as tokenizer_config.json."""
    shutil.copy(TOKENIZER, workdir / "tokenizer.json")
    full = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    full.pop("_comment", None)
    (workdir / "tokenizer_config.json").write_text(json.dumps(full))
    return AutoTokenizer.from_pretrained(workdir)


def main() -> None:
    goldens = []
    for path in sorted(FIXTURES.glob("*.json")):
        if path.name == "goldens.json":
            continue
        config = json.loads(path.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            tok = tokenizer_for(config, Path(tmp))
            for name, messages in CONVERSATIONS.items():
                case = {"fixture": path.stem, "conversation": name, "messages": messages}
                try:
                    case["rendered"] = tok.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True
                    )
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                goldens.append(case)
    out = FIXTURES / "goldens.json"
    out.write_text(
        json.dumps(
            {
                "generator": "scripts/chat_template_goldens.py",
                "transformers": transformers.__version__,
                "jinja2": jinja2.__version__,
                "cases": goldens,
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"wrote {len(goldens)} cases to {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
