"""megamod.data.tokenizer: the three backends, format detection, specials, explicit token addition."""
import logging
import os
import shutil

import pytest

from megamod.data.tokenizer import (TokenizerError, add_special_tokens, check_same_tokenizer, load_tokenizer,
                                    vocabulary_difference, vocabulary_fingerprint)
from tests.data_fixtures.builders import build_all
from tests.helpers import swap_token_ids

TEXT = "USER: <image>\nWhat color is the circle? ASSISTANT: Red.<|endoftext|>"
# What each tokenizer makes of TEXT, token by token (each word was trained into one token; sentencepiece keeps the
# space before "Red" apart because its BPE saw " Red" too rarely).
PIECES = {
    "hf": ["USER", ":", " ", "<image>", "\n", "What", " color", " is", " the", " circle", "?", " ASSISTANT", ":",
           " Red", ".", "<|endoftext|>"],
    "sentencepiece": ["USER", ":", " ", "<image>", "\n", "What", " color", " is", " the", " circle", "?",
                      " ASSISTANT", ":", " ", "Red", ".", "<|endoftext|>"],
}
PIECES["tiktoken"] = PIECES["hf"]
# Special ids: the BPE trainer puts specials first; sentencepiece after <unk> <s> </s>; tiktoken after the ranks.
SPECIAL_IDS = {"hf": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<image>": 3},
               "sentencepiece": {"<|endoftext|>": 3, "<|im_start|>": 4, "<|im_end|>": 5, "<image>": 6},
               "tiktoken": {"<|endoftext|>": 403, "<|im_start|>": 404, "<|im_end|>": 405, "<image>": 406}}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_all(str(tmp_path_factory.mktemp("tokenizers")))


@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "tiktoken"])
def test_encode_pieces_specials_and_offsets(dirs, kind):
    tok = load_tokenizer(dirs[kind])
    assert tok.kind == kind
    ids, offsets = tok.encode_with_offsets(TEXT)
    assert [tok.decode([i]) for i in ids] == PIECES[kind]
    assert tok.decode(ids) == TEXT
    assert [TEXT[s:e] for s, e in offsets] == PIECES[kind]
    assert SPECIAL_IDS[kind].items() <= tok.special_tokens.items()
    for token, token_id in SPECIAL_IDS[kind].items():
        assert tok.token_to_id(token) == token_id
    assert ids[3] == tok.image_id == SPECIAL_IDS[kind]["<image>"]
    assert ids[-1] == tok.eod_id == SPECIAL_IDS[kind]["<|endoftext|>"]
    assert tok.eod_token == "<|endoftext|>"
    assert tok.vocab_size == {"hf": 408, "sentencepiece": 400, "tiktoken": 407}[kind]


def test_pad_ids(dirs):
    assert load_tokenizer(dirs["hf"]).pad_id == 4  # <|pad|>, named in tokenizer_config.json
    assert load_tokenizer(dirs["sentencepiece"]).pad_id == 3  # no pad piece: end of text, as Qwen does
    assert load_tokenizer(dirs["tiktoken"]).pad_id == 403


def test_offsets_of_non_ascii_text(dirs):
    text = "Red é circle ü.<image>"
    for kind in dirs:
        tok = load_tokenizer(dirs[kind])
        ids, offsets = tok.encode_with_offsets(text)
        assert tok.decode(ids) == text
        covered = sorted({c for s, e in offsets for c in range(s, e)})
        assert covered == list(range(len(text))), kind
        assert offsets[-1] == (len(text) - len("<image>"), len(text))


def test_hf_ids_equal_transformers_autotokenizer(dirs):
    from transformers import AutoTokenizer

    ours = load_tokenizer(dirs["hf"])
    theirs = AutoTokenizer.from_pretrained(dirs["hf"])
    for text in (TEXT, "<|im_start|>user\nHow many squares?<|im_end|>\n", "  odd   spacing\n\n and é ü 12345 !?"):
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.pad_id == theirs.pad_token_id and ours.eod_id == theirs.eos_token_id


def test_load_picks_backend_and_errors_clearly(dirs, tmp_path):
    assert load_tokenizer(os.path.join(dirs["hf"], "tokenizer.json")).kind == "hf"
    assert load_tokenizer(os.path.join(dirs["sentencepiece"], "tokenizer.model")).kind == "sentencepiece"
    assert load_tokenizer(os.path.join(dirs["tiktoken"], "tiny.tiktoken")).kind == "tiktoken"
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tiktoken").write_text("not-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"x.tiktoken:1: not a `base64-token rank` line"):
        load_tokenizer(str(bad))


def test_tiktoken_defaults_to_qwen1_specials(dirs, tmp_path):
    shutil.copy(os.path.join(dirs["tiktoken"], "tiny.tiktoken"), tmp_path / "qwen.tiktoken")
    tok = load_tokenizer(str(tmp_path))
    n = 403  # ranks in the file
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>")] == \
        [n, n + 1, n + 2, n + 3]
    assert tok.vocab_size == n + 3 + 205
    assert tok.token_to_id("<image>") is None
    with pytest.raises(TokenizerError, match="has no <image> token; add it explicitly"):
        tok.image_id


@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "tiktoken"])
def test_add_image_token_is_explicit_and_persists(dirs, kind, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="megamod.data.tokenizer")
    tok = load_tokenizer(dirs[kind])
    new = add_special_tokens(tok, ["<video>"])
    assert tok.token_to_id("<video>") is None and tok.encode("<video>") != [new.token_to_id("<video>")]
    assert new.vocab_size == tok.vocab_size + 1
    assert new.token_to_id("<video>") == tok.vocab_size
    assert "vocab size" in caplog.text and str(new.vocab_size) in caplog.text
    text = "USER: <video>\nWhat color is the circle?"
    ids = new.encode(text)
    assert ids.count(new.token_to_id("<video>")) == 1 and new.decode(ids) == text
    assert add_special_tokens(new, ["<video>"]) is new
    new.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.encode(text) == ids and again.vocab_size == new.vocab_size


def test_added_token_seen_by_transformers(dirs, tmp_path):
    from transformers import AutoTokenizer

    new = add_special_tokens(load_tokenizer(dirs["hf"]), ["<video>"])
    new.save(str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs("a <video> b", add_special_tokens=False)["input_ids"] == new.encode("a <video> b")


def test_tokenizers_pickle(dirs):
    import pickle

    for kind in dirs:
        tok = load_tokenizer(dirs[kind])
        assert pickle.loads(pickle.dumps(tok)).encode(TEXT) == tok.encode(TEXT)


@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "tiktoken"])
def test_tokenizers_compare_by_their_id_table(dirs, kind, tmp_path):
    """One tokenizer: the same table re-saved, or extended at new ids (as <image> at a padding row); another: ids
    that mean other tokens, refused naming both files and the first such id."""
    tok = load_tokenizer(dirs[kind])
    table = tok.vocabulary()
    assert len(table) == tok.vocab_size and table[tok.image_id] == "<image>"
    tok.save(str(tmp_path / "copy"))
    copy = load_tokenizer(str(tmp_path / "copy"))
    assert vocabulary_difference(tok, copy) is None and vocabulary_fingerprint(copy) == vocabulary_fingerprint(tok)
    extended = add_special_tokens(tok, ["<video>"])
    assert vocabulary_difference(extended, tok) is None
    assert vocabulary_fingerprint(extended) != vocabulary_fingerprint(tok)
    check_same_tokenizer(extended, tok, "a", "b")
    if kind == "hf":
        other = load_tokenizer(swap_token_ids(dirs[kind], str(tmp_path / "other")))
        assert other.vocab_size == tok.vocab_size and vocabulary_fingerprint(other) != vocabulary_fingerprint(tok)
        with pytest.raises(TokenizerError, match=rf"teacher tokenizer {other.path} \({tok.vocab_size} ids\) and "
                                                 rf"student tokenizer {dirs[kind]} .* different tokenizers: id 100 is"):
            check_same_tokenizer(other, tok, "teacher", "student")
    other_kind = {"hf": "sentencepiece", "sentencepiece": "tiktoken", "tiktoken": "hf"}[kind]
    assert vocabulary_difference(tok, load_tokenizer(dirs[other_kind])) is not None
