#!/usr/bin/env python3
"""Goldens for SentencePiece (`tokenizer.ggml.model = llama`) tokenizers read from GGUF files:
token ids and decoded strings from transformers' own GGUF tokenizer conversion
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, the `GGUFLlamaConverter`), which
`medley_hub::gguf::tokenizer_json` must reproduce (`cargo test -p medley-hub --test gguf_spm`).

Setup (outside the repository; CI never runs this, it only reads the committed outputs):
    python 3.11 with transformers 4.57.6, tokenizers 0.22.2 and gguf 0.17.1 (the PyPI package:
    transformers' GGUF reader and llama.cpp's own writer), here
    /work/main/target/medley-oracle-env/bin/python, plus sentencepiece 0.2.3 to train the
    vocabulary, e.g. in a venv of its own put on the path:
        python3 -m venv /tmp/spmenv && /tmp/spmenv/bin/pip install sentencepiece==0.2.3
    Run from anywhere (a few seconds; training is deterministic, the outputs come out
    byte-identical):
        PYTHONPATH=/tmp/spmenv/lib/python3.11/site-packages \\
            target/medley-oracle-env/bin/python scripts/goldens/gguf_spm_goldens.py
        cargo test -p medley-hub --test gguf_spm

What it does:
    1. Trains a small SentencePiece BPE model (640 pieces, byte_fallback on, digits split,
       whitespace-only pieces allowed, identity normalisation, dummy prefix: Llama 2's trainer
       settings) on CORPUS, with <unk> <s> </s> <pad> at ids 0-3, two control symbols
       (<|im_start|>, <|im_end|>) and one user-defined symbol (<|tool|>).
    2. Writes it into a GGUF file as llama.cpp's `convert_hf_to_gguf.py` does
       (`_create_vocab_sentencepiece`: pieces, scores and token types NORMAL / UNKNOWN / CONTROL /
       BYTE; the added symbols re-typed CONTROL / USER_DEFINED with score -1000 as its
       `added_tokens_decoder` pass does; padded with `[PAD<id>]` UNUSED tokens to 648 =
       `llama.vocab_size`), with gguf's GGUFWriter, plus a tiny Llama configuration, the BOS /
       EOS / unknown / padding ids, add_bos_token = true, add_eos_token = false and a chat
       template, and no tensors: shard/hub/tests/fixtures/spm/tiny-spm.gguf (committed, 14 KB).
    3. For each of VARIANTS (metadata overrides of that file, recorded in the JSON so that the
       Rust test applies the same ones to the committed file), writes the variant file into a
       temporary directory, loads it with AutoTokenizer and records, for every string of TEXTS,
       the ids with and without special tokens and the decoded strings keeping and skipping
       special tokens, plus the vocabulary size and the added tokens (and, for the file itself,
       the generated merges and the pieces): shard/hub/tests/fixtures/spm/spm_goldens.json
       (committed, ~85 KB), with the versions that made it and the file's SHA-256.

transformers 4.57 does not read `tokenizer.ggml.add_bos_token` / `add_eos_token` from the file
(LlamaTokenizerFast's defaults, BOS on and EOS off, always apply), and its GGUF converter hands
the BOS token over as `eos_token` (`eos_token = proto.tokens[proto.bos_token_id]`). The script
passes the file's flags as `add_bos_token` / `add_eos_token` and sets the file's EOS token as
the special `eos_token` before encoding, so the goldens are transformers' tokenizer configured
as the file says (recorded under "tokenizer_kwargs"); Medley follows the file the same way.
"""Goldens for SentencePiece (`tokenizer.ggml.model = llama`) tokenizers read from GGUF files:
token ids and decoded strings from transformers' own GGUF tokenizer conversion
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, the `GGUFLlamaConverter`), which
`medley_hub::gguf::tokenizer_json` must reproduce.

Setup (outside the repository; CI never runs this, it only reads the committed outputs):
    python 3.11 with transformers 4.57.6, tokenizers 0.22.2 and gguf 0.17.1 (the PyPI package:
    transformers' GGUF reader and llama.cpp's own writer), here
    /work/main/target/medley-oracle-env/bin/python, plus `sentencepiece` (0.2.3) to train the
    vocabulary, e.g. in a venv of its own put on the path:
        python3 -m venv /tmp/spmenv && /tmp/spmenv/bin/pip install sentencepiece==0.2.3
    Run from the repository root:
        PYTHONPATH=/tmp/spmenv/lib/python3.11/site-packages \\
            target/medley-oracle-env/bin/python scripts/goldens/gguf_spm_goldens.py
        cargo test -p medley-hub --test gguf_spm

What it does:
    1. Trains a small SentencePiece BPE model (vocabulary 640, byte_fallback on, digits split,
       whitespace-only pieces allowed, identity normalisation: Llama 2's trainer settings) on the
       CORPUS below, with a pad piece, two control symbols and one user-defined symbol.
    2. Writes it into a GGUF file the way llama.cpp's `convert_hf_to_gguf.py` does
       (`_create_vocab_sentencepiece`: pieces, scores, token types NORMAL / UNKNOWN / CONTROL /
       USER_DEFINED / BYTE, padded with `[PAD<id>]` UNUSED tokens up to `llama.vocab_size`), with
       gguf's `GGUFWriter`, plus a tiny Llama configuration and a chat template and no tensors:
       tests/fixtures/spm/tiny-spm.gguf (committed, a few tens of KB).
    3. For each VARIANT (metadata overrides applied to that file, recorded in the JSON so the
       Rust test applies the same ones), writes the variant file into a temporary directory, loads
       it with AutoTokenizer and records, for every string of TEXTS, the ids with and without
       special tokens and the decoded strings with and without skipping special tokens:
       tests/fixtures/spm/spm_goldens.json (committed).

transformers 4.57 does not read `tokenizer.ggml.add_bos_token` / `add_eos_token` from the file
(the LlamaTokenizerFast defaults, BOS on and EOS off, always apply), nor does it apply the EOS
token it is given (its GGUF converter passes the BOS token as `eos_token`). The script passes
the file's flags as `add_bos_token` / `add_eos_token` and resets `eos_token` to the file's EOS
token before encoding, so the goldens are transformers' tokenizer configured as the file says;
the JSON records this under "tokenizer_kwargs".
"""

import argparse
import hashlib
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "shard/hub/tests/fixtures/spm"
GGUF_NAME = "tiny-spm.gguf"

VOCAB_SIZE = 640
# Rows of the (absent) embedding: the token list is padded to it with UNUSED tokens.
PADDED_VOCAB = 648
CONTROL = ["<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<|tool|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The training text: English prose, code, numbers and a few accented letters. Characters that are
# not here (CJK, most symbols, emoji, ß...) are not in the vocabulary and fall back to bytes.
CORPUS = """\
Medley is an inference server for large language models with many low rank adapters.
A request names a base model, one adapter, or a merge of several adapters with weights.
The router validates every request, tokenizes the prompt and batches requests together.
Each shard holds a slice of the model, its key value cache and the adapter weights.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the warm sun.
Once upon a time there was a small model that wanted to write poems about the sea.
It learned the words of sailors and the songs of whales, and it wrote every night.
She said: "Hello, world!" and he answered: "Hello there; how are you today?"
In 2024 the team shipped version 3.14 with 128 new tests and 42 fixes (about 7% faster).
Prices: $19.99, $5 and 1,000,000 tokens per second on 8 GPUs, 256 GiB of memory.
def main(argv):
    for i in range(10):
        print(f"step {i}: loss={loss:.4f}")
    return 0
if (x > 0 && y < 10) { return x * y + 1; } else { return -1; }
The café served crème brûlée and a naïve résumé was read aloud in the garden.
Über alles: schön, grün, müde. Señor García visitó la ciudad en el año 1998.
Tokenizers split text into pieces; byte fallback handles characters it has never seen.
Spaces  matter:   double spaces, tabs\tand new lines
are all part of the text, and so are trailing spaces at the end of a line.   
The model reads the prompt, then writes one token at a time until it stops.
Adapters are small matrices added to the weights of attention and feed forward layers.
A merge combines adapters: linear, ties, dare and svd are the strategies it knows.
Questions? Answers! Lists: one, two, three; four - five - six. Done...
Email me at someone@example.com or visit https://example.com/path?query=1&x=2.
"""
# The corpus is repeated so that every merge the trainer wants has enough counts.
CORPUS_REPEAT = 20

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "  two leading spaces",
    "double  space and triple   space",
    "trailing space ",
    "trailing spaces   ",
    " ",
    "   ",
    "new\nline",
    "two\n\nnew lines\n",
    "tabs\tand\t\ttabs",
    "\n leading newline",
    "digits 1234567890 and 3.14159",
    "In 2024, $19.99 (7%)",
    "punctuation!?.,;:'\"()[]{}<>/\\|-_+=*&^%$#@~`",
    "The café served crème brûlée.",
    "Straße, 東京, Москва",
    "emoji: 🙂👍🏽 and ✓",
    "unseen letters: ßøåæ ŁŃ",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "<s> text between </s> special tokens",
    "text<s>glued</s>to specials",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "the <|tool|> user-defined symbol",
    "▁ the metaspace character itself ▁▁",
    "<0x41> written as text",
    "[PAD640] written as text",
    "The quick brown fox jumps over the lazy dog.",
    "def main(argv):\n    return 0\n",
]

# Metadata overrides per variant (key -> [gguf value type, value], or None to leave the key out);
# "base" is the file as written.
VARIANTS = {
    "base": {},
    "bos_off_eos_on": {
        "tokenizer.ggml.add_bos_token": ["bool", False],
        "tokenizer.ggml.add_eos_token": ["bool", True],
    },
    "bos_and_eos": {
        "tokenizer.ggml.add_eos_token": ["bool", True],
    },
    "no_space_prefix": {
        "tokenizer.ggml.add_space_prefix": ["bool", False],
    },
    # Without token types only the unknown, BOS and EOS tokens are special.
    "no_token_types": {
        "tokenizer.ggml.token_type": None,
    },
}


def train(work: Path):
    """Trains the SentencePiece model; returns the loaded processor."""
    import sentencepiece as spm

    lines = [line for line in CORPUS.splitlines() if line] * CORPUS_REPEAT
    prefix = work / "tiny-spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=CONTROL,
        user_defined_symbols=USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    proc = spm.SentencePieceProcessor()
    proc.Load(str(prefix) + ".model")
    return proc


def vocabulary(proc):
    """Tokens, scores and token types as llama.cpp's `_create_vocab_sentencepiece` writes them:
    the SentencePiece pieces with their types, the added control / user-defined symbols re-typed
    (score -1000) as its `added_tokens_decoder` pass does, padded with UNUSED `[PAD<id>]`."""
    from gguf import TokenType

    tokens = [f"[PAD{i}]" for i in range(PADDED_VOCAB)]
    scores = [-10000.0] * PADDED_VOCAB
    types = [int(TokenType.UNUSED)] * PADDED_VOCAB
    for i in range(proc.vocab_size()):
        ty = TokenType.NORMAL
        if proc.IsUnknown(i):
            ty = TokenType.UNKNOWN
        elif proc.IsControl(i):
            ty = TokenType.CONTROL
        elif proc.IsUnused(i):
            ty = TokenType.UNUSED
        elif proc.IsByte(i):
            ty = TokenType.BYTE
        tokens[i] = proc.IdToPiece(i)
        scores[i] = proc.GetScore(i)
        types[i] = int(ty)
    for text, ty in [(t, TokenType.CONTROL) for t in CONTROL] + [
        (t, TokenType.USER_DEFINED) for t in USER_DEFINED
    ]:
        i = proc.PieceToId(text)
        assert tokens[i] == text, (i, text)
        types[i] = int(ty)
        scores[i] = -1000.0
    return tokens, scores, types


def metadata(proc):
    """The file's metadata: (key, GGUFValueType name, value), in writing order."""
    tokens, scores, types = vocabulary(proc)
    return [
        ("general.name", "STRING", "tiny-spm"),
        ("llama.context_length", "UINT32", 1024),
        ("llama.embedding_length", "UINT32", 64),
        ("llama.feed_forward_length", "UINT32", 176),
        ("llama.block_count", "UINT32", 2),
        ("llama.attention.head_count", "UINT32", 4),
        ("llama.attention.head_count_kv", "UINT32", 2),
        ("llama.attention.key_length", "UINT32", 16),
        ("llama.attention.value_length", "UINT32", 16),
        ("llama.rope.dimension_count", "UINT32", 16),
        ("llama.attention.layer_norm_rms_epsilon", "FLOAT32", 1e-5),
        ("llama.rope.freq_base", "FLOAT32", 10000.0),
        ("llama.vocab_size", "UINT32", PADDED_VOCAB),
        ("tokenizer.ggml.model", "STRING", "llama"),
        ("tokenizer.ggml.tokens", "ARRAY", tokens),
        ("tokenizer.ggml.scores", "ARRAY", scores),
        ("tokenizer.ggml.token_type", "ARRAY", types),
        ("tokenizer.ggml.bos_token_id", "UINT32", proc.bos_id()),
        ("tokenizer.ggml.eos_token_id", "UINT32", proc.eos_id()),
        ("tokenizer.ggml.unknown_token_id", "UINT32", proc.unk_id()),
        ("tokenizer.ggml.padding_token_id", "UINT32", proc.pad_id()),
        ("tokenizer.ggml.add_bos_token", "BOOL", True),
        ("tokenizer.ggml.add_eos_token", "BOOL", False),
        ("tokenizer.chat_template", "STRING", CHAT_TEMPLATE),
    ]


def write_gguf(path: Path, meta, overrides):
    """Writes `meta` with `overrides` (key -> [type name, value] or None) into a tensor-less
    GGUF."""
    import gguf

    over = {k: v and (v[0].upper(), v[1]) for k, v in overrides.items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, ty, value in meta:
        if key in over:
            replaced = over.pop(key)
            if replaced is None:
                continue
            ty, value = replaced
        writer.add_key_value(key, value, gguf.GGUFValueType[ty])
    for key, replaced in over.items():
        if replaced is not None:
            writer.add_key_value(key, replaced[1], gguf.GGUFValueType[replaced[0]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def file_flags(meta, overrides):
    """add_bos / add_eos and the BOS / EOS token texts the (variant) file declares."""
    values = {k: v for k, _, v in meta}
    values.update({k: v[1] for k, v in overrides.items() if v is not None})
    tokens = values["tokenizer.ggml.tokens"]
    return {
        "add_bos_token": values.get("tokenizer.ggml.add_bos_token", True),
        "add_eos_token": values.get("tokenizer.ggml.add_eos_token", False),
        "bos_token": tokens[values["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[values["tokenizer.ggml.eos_token_id"]],
    }


def load_tokenizer(directory: Path, name: str, flags):
    """transformers' tokenizer for the GGUF file `directory/name`, configured as the file says
    (see the module docstring: the flags and the EOS token are set explicitly)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(directory),
        gguf_file=name,
        add_bos_token=flags["add_bos_token"],
        add_eos_token=flags["add_eos_token"],
    )
    assert tok.bos_token == flags["bos_token"], (tok.bos_token, flags)
    # transformers' GGUF converter hands the BOS token over as `eos_token`: set the file's (a
    # special token, as the converter means it to be).
    tok.add_special_tokens({"eos_token": flags["eos_token"]})
    tok.update_post_processor()
    assert tok.eos_token == flags["eos_token"]
    assert tok.add_bos_token == flags["add_bos_token"]
    assert tok.add_eos_token == flags["add_eos_token"]
    assert tok.clean_up_tokenization_spaces is False
    return tok


def encodings(tok, with_pieces):
    cases = []
    for text in TEXTS:
        case = {"text": text}
        for key, special in [("with_special", True), ("without_special", False)]:
            ids = tok(text, add_special_tokens=special)["input_ids"]
            case[key] = {
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
            if with_pieces and not special:
                # The pieces, to read the goldens by (the ids are what the test compares).
                case[key]["tokens"] = tok.convert_ids_to_tokens(ids)
        cases.append(case)
    return cases


def dump(value, indent=0):
    """JSON with one key per line, but every list of scalars or of pairs on a single line."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {dump(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = [pad + dump(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    import gguf
    import sentencepiece
    import tokenizers
    import transformers

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc = train(work)
        meta = metadata(proc)
        fixture = args.out_dir / GGUF_NAME
        write_gguf(fixture, meta, {})
        digest = hashlib.sha256(fixture.read_bytes()).hexdigest()

        variants = {}
        for name, overrides in VARIANTS.items():
            directory = work / name
            directory.mkdir()
            write_gguf(directory / GGUF_NAME, meta, overrides)
            flags = file_flags(meta, overrides)
            tok = load_tokenizer(directory, GGUF_NAME, flags)
            backend = json.loads(tok.backend_tokenizer.to_str())
            variant = {
                "overrides": overrides,
                "tokenizer_kwargs": flags,
                "vocab_size": tok.backend_tokenizer.get_vocab_size(with_added_tokens=True),
                "added_tokens": [
                    [t["id"], t["content"], t["special"]] for t in backend["added_tokens"]
                ],
                "cases": encodings(tok, with_pieces=name == "base"),
            }
            if name == "base":
                variant["merges"] = backend["model"]["merges"]
            variants[name] = variant

    goldens = {
        "generator": "scripts/goldens/gguf_spm_goldens.py",
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "sentencepiece": sentencepiece.__version__,
        },
        "gguf": {"file": GGUF_NAME, "sha256": digest, "bytes": fixture.stat().st_size},
        "variants": variants,
    }
    out = args.out_dir / "spm_goldens.json"
    out.write_text(dump(goldens) + "\n", encoding="utf-8")
    print(f"wrote {fixture} ({fixture.stat().st_size} bytes, sha256 {digest}) and {out}")


if __name__ == "__main__":
    main()
