"""Tiny tokenizers of the three kinds and small data files, built locally for the data tests.

All three tokenizers are trained on the same few sentences, repeated so that most words become one token: the
tests can then write the expected tokens down by hand.
"""
from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
from PIL import Image

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: What color is the circle? ASSISTANT: Red.",
    "USER: How many squares? ASSISTANT: Two squares.",
    "system\nYou are a helpful assistant.\nuser\nWhat color is the circle?\nassistant\nRed.\n",
    "A red circle and two blue squares.\n",
]


def build_hf(directory: str) -> str:
    from megamod.data.synthetic_writer import train_tokenizer

    train_tokenizer(CORPUS * 50, directory, vocab_size=2000)
    return directory


def build_sentencepiece(directory: str) -> str:
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 50), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=SPECIALS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return directory


def build_tiktoken(directory: str, hf_dir: str) -> str:
    """Ranks from the HF tokenizer's byte-level BPE (bytes first, then merges in order), specials in a config."""
    from tokenizers import Tokenizer

    tok = json.loads(Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json")).to_str())
    byte_of = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in tok["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(byte_of[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tiny.tiktoken"), "wb") as f:
        for token, rank in ranks.items():
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    with open(os.path.join(directory, "tiktoken_config.json"), "w") as f:
        json.dump({"special_tokens": {t: len(ranks) + i for i, t in enumerate(SPECIALS)}}, f)
    return directory


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_image(path: str, size=(24, 16), color=(200, 30, 30)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(sum(color) + size[0])
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = color
    Image.fromarray(pixels).save(path)
    return path


def write_jsonl(path: str, rows) -> str:
    """rows: dicts, or strings written as they are (for malformed lines)."""
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_json(path: str, rows) -> str:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return path


def build_all(root: str) -> dict[str, str]:
    """{"hf": dir, "sentencepiece": dir, "tiktoken": dir} under root."""
    hf = build_hf(os.path.join(root, "hf"))
    return {"hf": hf, "sentencepiece": build_sentencepiece(os.path.join(root, "sp")),
            "tiktoken": build_tiktoken(os.path.join(root, "tiktoken"), hf)}
