"""One small tokenizer interface over the three formats VLM checkpoints ship: HF `tokenizer.json` (Qwen1.5/Qwen2),
sentencepiece `.model` (Llama/Vicuna-style) and tiktoken BPE files (Qwen-1 `qwen.tiktoken`).

`encode(text)` returns the ids of `text` exactly as given: special tokens written in the text (`<image>`,
`<|endoftext|>`, ...) become single ids, and nothing is added (no BOS/EOS). `encode_with_offsets` also returns each
token's (start, end) character span in `text`; the templates use it to put the loss on answer characters only.

`load_tokenizer(path)` picks the backend from what it finds (in this order): `tokenizer.json`, a `*.tiktoken` file,
a sentencepiece `*.model`. A tokenizer that lacks `<image>` stays so: `add_special_tokens(tok, ["<image>"])` returns a
new tokenizer, logs the new vocabulary size (the model's embeddings must grow to match) and `save(dir)` persists it.

Two tokenizers are one when they give every id they share the same token (`vocabulary()`, compared by
`check_same_tokenizer`, hashed by `vocabulary_fingerprint`), whatever their files or the models' padded rows.
"""
from __future__ import annotations

import base64
import bisect
import json
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# End-of-text candidates, most specific first: Qwen's document end (the LLaVA-MoD template's sep2), Llama's eos, ...
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
# Qwen-1's pre-tokenizer regex (also Qwen2's); tiktoken files carry no pattern of their own.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
TIKTOKEN_CONFIG = "tiktoken_config.json"


class TokenizerError(ValueError):
    pass


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _char_offsets(text: str, byte_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """UTF-8 byte spans -> character spans (a token holding part of a multi-byte character covers that character)."""
    encoded = text.encode("utf-8")
    if len(encoded) == len(text):
        return byte_spans
    char_starts = []  # byte offset at which each character starts
    pos = 0
    for ch in text:
        char_starts.append(pos)
        pos += len(ch.encode("utf-8"))
    return [(bisect.bisect_right(char_starts, b) - 1 if b < len(encoded) else len(text),
             bisect.bisect_left(char_starts, e) if e < len(encoded) else len(text)) for b, e in byte_spans]


class Tokenizer(ABC):
    """Base class: backends implement encode_with_offsets, decode, vocab_size, special_tokens, token_to_id, save."""

    kind: str

    def __init__(self, path: str, config: dict | None = None):
        self.path = path
        self.config = config or {}  # tokenizer_config.json when present (pad/eos choices)

    @abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in `text`."""

    @abstractmethod
    def decode(self, ids) -> str:
        """Text of `ids`, special tokens written out."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (largest id + 1), added special tokens included."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special tokens recognised in text, token -> id."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a single token (special or ordinary), None when the vocabulary has no such token."""

    @abstractmethod
    def vocabulary(self) -> dict[int, str]:
        """id -> token, added tokens included: what an id means, the content two tokenizers are compared by."""

    @abstractmethod
    def _with_added(self, tokens: list[str]) -> "Tokenizer":
        """A new tokenizer with `tokens` (all missing) added as special tokens at the next free ids."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write the tokenizer so that load_tokenizer(directory) gives it back."""

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def _config_token(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def _first_present(self, candidates) -> str | None:
        return next((t for t in candidates if t and self.token_to_id(t) is not None), None)

    @property
    def image_id(self) -> int:
        token_id = self.token_to_id(IMAGE_TOKEN)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.path} has no {IMAGE_TOKEN} token; add it explicitly with "
                                 f"megamod.data.tokenizer.add_special_tokens(tok, ['{IMAGE_TOKEN}']); the model's "
                                 f"embeddings need at least the new vocab_size rows")
        return token_id

    @property
    def eod_token(self) -> str:
        token = self._first_present(EOD_CANDIDATES + (self._config_token("eos_token"),))
        if token is None:
            raise TokenizerError(f"tokenizer {self.path} has no end-of-text token (looked for {EOD_CANDIDATES})")
        return token

    @property
    def eod_id(self) -> int:
        return self.token_to_id(self.eod_token)

    @property
    def pad_id(self) -> int:
        """The configured pad token, else a pad-named token, else end-of-text (Qwen's convention)."""
        token = self._first_present((self._config_token("pad_token"),) + PAD_CANDIDATES)
        return self.token_to_id(token) if token else self.eod_id

    def require(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.path} has no {token} token")
        return token_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library: the same ids as transformers' fast tokenizer on the file."""

    kind = "hf"

    def __init__(self, path: str, tokenizer, config: dict | None = None):
        super().__init__(path, config)
        self.tok = tokenizer
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def load(cls, directory: str) -> "HFTokenizer":
        from tokenizers import Tokenizer as RawTokenizer

        config_path = os.path.join(directory, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.exists(config_path) else {}
        return cls(directory, RawTokenizer.from_file(os.path.join(directory, "tokenizer.json")), config)

    def encode_with_offsets(self, text):
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self):
        return self._vocab_size

    @property
    def special_tokens(self):
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def vocabulary(self):
        return {i: t for t, i in self.tok.get_vocab(with_added_tokens=True).items()}

    def _with_added(self, tokens):
        from tokenizers import AddedToken, Tokenizer as RawTokenizer

        new = RawTokenizer.from_str(self.tok.to_str())
        new.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return HFTokenizer(self.path, new, self.config)

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            src = os.path.join(self.path, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(directory, name)):
                shutil.copyfile(src, os.path.join(directory, name))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. User-defined pieces (e.g. `<image>`) are matched by sentencepiece itself; control pieces
    (`<s>`, `</s>`) are split out here so that text naming them gives their id, as transformers' LlamaTokenizer does.
    Each chunk between control pieces gets sentencepiece's own dummy-prefix rule."""

    kind = "sentencepiece"

    def __init__(self, path: str, model_proto: bytes):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb2

        super().__init__(path)
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        proto = pb2.ModelProto.FromString(model_proto)
        piece_type = pb2.ModelProto.SentencePiece
        self._specials = {p.piece: i for i, p in enumerate(proto.pieces)
                          if p.type in (piece_type.CONTROL, piece_type.USER_DEFINED)}
        control = sorted((p for p, i in self._specials.items() if self.sp.is_control(i)), key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, control))) if control else None

    @classmethod
    def load(cls, model_file: str) -> "SentencePieceTokenizer":
        with open(model_file, "rb") as f:
            return cls(model_file, f.read())

    def _chunks(self, text):
        """(start, end, control id or None) pieces of text split at control-piece strings."""
        start = 0
        if self._control_re is not None:
            for m in self._control_re.finditer(text):
                if m.start() > start:
                    yield start, m.start(), None
                yield m.start(), m.end(), self._specials[m.group()]
                start = m.end()
        if start < len(text):
            yield start, len(text), None

    def encode_with_offsets(self, text):
        ids, offsets = [], []
        for start, end, control_id in self._chunks(text):
            if control_id is not None:
                ids.append(control_id)
                offsets.append((start, end))
                continue
            chunk = text[start:end]
            pieces = self.sp.encode(chunk, return_type="proto").pieces
            spans = _char_offsets(chunk, [(p.begin, p.end) for p in pieces])
            ids.extend(p.id for p in pieces)
            offsets.extend((start + b, start + e) for b, e in spans)
        return ids, offsets

    def decode(self, ids):
        out, run = [], []
        for i in (int(i) for i in ids):
            if self.sp.is_control(i):
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    @property
    def special_tokens(self):
        return dict(self._specials)

    def token_to_id(self, token):
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def vocabulary(self):
        return {i: self.sp.id_to_piece(i) for i in range(self.vocab_size)}

    def _with_added(self, tokens):
        from sentencepiece import sentencepiece_model_pb2 as pb2

        proto = pb2.ModelProto.FromString(self.model_proto)
        for t in tokens:  # user-defined pieces are matched as a whole by sentencepiece, anywhere in the text
            proto.pieces.add(piece=t, score=0.0, type=pb2.ModelProto.SentencePiece.USER_DEFINED)
        return SentencePieceTokenizer(self.path, proto.SerializeToString())

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(self.model_proto)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE file (one `base64(token) rank` per line). The special-token table and the pre-tokenizer regex
    come from `tiktoken_config.json` beside it ({"pattern": ..., "special_tokens": {token: id}}) when present, else
    Qwen-1's layout: <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|>..<|extra_204|> right after the ranks."""

    kind = "tiktoken"

    def __init__(self, path: str, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str):
        import tiktoken

        super().__init__(path)
        self.ranks, self.pattern = ranks, pattern
        self.enc = tiktoken.Encoding(os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special_tokens)
        self._specials = dict(special_tokens)
        self._by_token = {**{t.decode("utf-8", "replace"): i for t, i in ranks.items()}, **special_tokens}

    @classmethod
    def load(cls, bpe_file: str) -> "TiktokenTokenizer":
        ranks = {}
        with open(bpe_file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as e:
                    raise TokenizerError(f"{bpe_file}:{lineno}: not a `base64-token rank` line ({e})") from None
        config_path = os.path.join(os.path.dirname(bpe_file), TIKTOKEN_CONFIG)
        if os.path.exists(config_path):
            config = _read_json(config_path)
            return cls(bpe_file, ranks, config["special_tokens"], config.get("pattern", QWEN_PATTERN))
        names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
        return cls(bpe_file, ranks, {t: len(ranks) + i for i, t in enumerate(names)}, QWEN_PATTERN)

    def encode_with_offsets(self, text):
        ids = self.enc.encode(text, allowed_special="all", disallowed_special=())
        byte_spans, pos = [], 0
        for i in ids:
            n = len(self.enc.decode_single_token_bytes(i))
            byte_spans.append((pos, pos + n))
            pos += n
        return ids, _char_offsets(text, byte_spans)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids], errors="replace")

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    @property
    def special_tokens(self):
        return dict(self._specials)

    def token_to_id(self, token):
        return self._by_token.get(token)

    def vocabulary(self):
        # latin-1 maps bytes to text one to one: two different byte strings never compare equal
        return {**{i: t.decode("latin-1") for t, i in self.ranks.items()}, **{i: t for t, i in self._specials.items()}}

    def _with_added(self, tokens):
        specials = dict(self._specials)
        for t in tokens:
            specials[t] = max(self.vocab_size, max(specials.values(), default=-1) + 1)
        return TiktokenTokenizer(self.path, self.ranks, specials, self.pattern)

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, os.path.basename(self.path))
        with open(target, "wb") as f:
            for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        with open(os.path.join(directory, TIKTOKEN_CONFIG), "w") as f:
            json.dump({"pattern": self.pattern, "special_tokens": self._specials}, f, indent=1)


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a directory (or a file): tokenizer.json, else *.tiktoken, else a sentencepiece *.model."""
    if os.path.isfile(path):
        if path.endswith(".json"):
            if os.path.basename(path) != "tokenizer.json":
                raise TokenizerError(f"{path}: expected a file named tokenizer.json")
            return HFTokenizer.load(os.path.dirname(path) or ".")
        if path.endswith(".tiktoken"):
            return TiktokenTokenizer.load(path)
        if path.endswith(".model"):
            return SentencePieceTokenizer.load(path)
        raise TokenizerError(f"{path}: not a tokenizer file (tokenizer.json, *.tiktoken or sentencepiece *.model)")
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer path {path} does not exist")
    names = sorted(os.listdir(path))
    if "tokenizer.json" in names:
        return HFTokenizer.load(path)
    for suffix, backend in ((".tiktoken", TiktokenTokenizer), (".model", SentencePieceTokenizer)):
        found = [n for n in names if n.endswith(suffix)]
        if len(found) > 1 and suffix == ".model" and "tokenizer.model" in found:
            found = ["tokenizer.model"]
        if len(found) > 1:
            raise TokenizerError(f"{path} holds several {suffix} files {found}; pass the file itself")
        if found:
            return backend.load(os.path.join(path, found[0]))
    raise TokenizerError(f"{path} holds no tokenizer: looked for tokenizer.json, *.tiktoken, a sentencepiece *.model")


def add_special_tokens(tokenizer: Tokenizer, tokens: list[str]) -> Tokenizer:
    """A new tokenizer with the missing `tokens` added as special tokens at the next free ids. The vocabulary grows
    (logged): the model's embedding and output layers need at least the new `vocab_size` rows (Qwen2 checkpoints pad
    theirs to 151936, so `<image>` at 151665 fits without a resize)."""
    missing = [t for t in dict.fromkeys(tokens) if tokenizer.token_to_id(t) is None]
    if not missing:
        log.info("tokenizer %s already has %s; unchanged", tokenizer.path, tokens)
        return tokenizer
    new = tokenizer._with_added(missing)
    log.info("added %s to tokenizer %s: vocab size %d -> %d (the model's embedding and output layers need at least "
             "that many rows)", missing, tokenizer.path, tokenizer.vocab_size, new.vocab_size)
    return new


def vocabulary_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the id -> token table: equal for the same tokenizer in any file, whatever rows a model pads to."""
    import hashlib

    table = sorted(tokenizer.vocabulary().items())
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode("utf-8")).hexdigest()


def vocabulary_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """The first id below both sizes that the two tokenizers give different tokens, described; None when they agree
    on all of them. One may extend the other with tokens at new ids (as add_special_tokens does): a model that has
    rows for those ids reads the extended one the same way."""
    va, vb = a.vocabulary(), b.vocabulary()
    for i in range(min(a.vocab_size, b.vocab_size)):
        if va.get(i) != vb.get(i):
            return f"id {i} is {va.get(i)!r} in {a.path} and {vb.get(i)!r} in {b.path}"
    return None


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, what_a: str, what_b: str) -> None:
    """TokenizerError naming both (`what_a`, `what_b`: whose they are) when `a` and `b` give an id different tokens:
    a model that learnt one cannot read ids from the other (models may pad their rows differently; ids may not)."""
    diff = vocabulary_difference(a, b)
    if diff is not None:
        raise TokenizerError(f"{what_a} tokenizer {a.path} ({a.vocab_size} ids) and {what_b} tokenizer {b.path} "
                             f"({b.vocab_size} ids) are different tokenizers: {diff}; one tokenizer must serve both")
