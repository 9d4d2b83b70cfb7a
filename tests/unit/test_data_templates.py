"""megamod.data.templates: rendered text, trained tokens and next-token labels for each template and tokenizer."""
import json
from pathlib import Path

import numpy as np
import pytest

from megamod.data.templates import IGNORE_INDEX, SampleError, Turn, encode, encode_prompt, get_template
from megamod.data.tokenizer import TokenizerError, load_tokenizer
from tests.data_fixtures.builders import build_all, build_tiktoken

TURNS = [Turn("<image>\nWhat color is the circle?", "Red."), Turn("How many squares?", "Two squares.")]
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
TEXT = {
    "llava_mod": SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT: Red.<|endoftext|>"
                          "USER: How many squares? ASSISTANT: Two squares.<|endoftext|>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\n"
              "Red.<|im_end|>\n<|im_start|>user\nHow many squares?<|im_end|>\n<|im_start|>assistant\n"
              "Two squares.<|im_end|>\n",
}
# The trained tokens, one by one, per template and tokenizer.
TRAINED = {
    ("llava_mod", "hf"): [" Red", ".", "<|endoftext|>", " Two", " squares", ".", "<|endoftext|>"],
    ("llava_mod", "sentencepiece"): [" ", "Red", ".", "<|endoftext|>", " T", "wo", " squares", ".",
                                     "<|endoftext|>"],
    ("chatml", "hf"): ["Red", ".", "<|im_end|>", "T", "wo", " squares", ".", "<|im_end|>"],
    ("chatml", "sentencepiece"): ["Red", ".", "<|im_end|>", "T", "wo", " squares", ".", "<|im_end|>"],
}
for _template in ("llava_mod", "chatml"):
    TRAINED[(_template, "tiktoken")] = TRAINED[(_template, "hf")]
KINDS = ["hf", "sentencepiece", "tiktoken"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {k: load_tokenizer(d) for k, d in build_all(str(tmp_path_factory.mktemp("tok"))).items()}


def _pieces(tok, ids):
    return [tok.decode([int(i)]) for i in ids]


def _check_shift(enc):
    labels, mask = enc.labels(), enc.loss_mask()
    for t in range(len(enc.tokens) - 1):
        assert labels[t] == (enc.tokens[t + 1] if enc.targets[t + 1] else IGNORE_INDEX)
    assert labels[-1] == IGNORE_INDEX
    np.testing.assert_array_equal(mask, (labels != IGNORE_INDEX).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", ["llava_mod", "chatml"])
def test_conversation_tokens_and_masks(toks, template, kind):
    tok = toks[kind]
    enc = encode(get_template(template), tok, TURNS)
    assert tok.decode(enc.tokens) == TEXT[template]
    assert _pieces(tok, enc.tokens[enc.targets]) == TRAINED[(template, kind)]
    assert list(enc.tokens).count(tok.image_id) == 1
    _check_shift(enc)
    first = int(np.flatnonzero(enc.targets)[0])
    labels = enc.labels()
    assert labels[first - 1] == enc.tokens[first] and labels[first - 2] == IGNORE_INDEX
    end = tok.token_to_id("<|endoftext|>" if template == "llava_mod" else "<|im_end|>")
    closing = np.flatnonzero(enc.tokens == end)
    closing = closing[enc.targets[closing]]
    assert len(closing) == 2  # each answer's closing token is trained ...
    assert labels[closing[0] - 1] == end and labels[closing[0]] == IGNORE_INDEX  # ... what follows it is not
    assert enc.loss_mask().sum() == len(TRAINED[(template, kind)])


@pytest.mark.parametrize("kind", KINDS)
def test_plain_template(toks, kind):
    tok = toks[kind]
    enc = encode(get_template("plain"), tok, [Turn("Describe the image.\n<image>", "A red circle.")])
    assert tok.decode(enc.tokens) == "<image>A red circle.\n"
    assert enc.tokens[0] == tok.image_id and not enc.targets[0] and enc.targets[1:].all()
    assert tok.decode(enc.tokens[enc.targets]) == "A red circle.\n"
    assert enc.labels()[0] == enc.tokens[1]  # the image position predicts the caption's first token
    _check_shift(enc)
    with pytest.raises(SampleError, match="one question/answer turn"):
        encode(get_template("plain"), tok, TURNS)
    with pytest.raises(SampleError, match="needs an image"):
        encode(get_template("plain"), tok, [Turn("Describe.", "A red circle.")])


def test_segments_tokenize_as_whole_string(toks):
    """The prompt alone tokenizes to the prefix of the full conversation (what the model sees at inference)."""
    for tok in toks.values():
        enc = encode(get_template("llava_mod"), tok, TURNS[:1])
        prompt = SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT:"
        first = int(np.flatnonzero(enc.targets)[0])
        assert list(enc.tokens[:first]) == tok.encode(prompt)


@pytest.mark.parametrize("template", ["llava_mod", "chatml", "plain"])
def test_prompt_is_the_training_prefix(toks, template):
    for tok in toks.values():
        turns = TURNS if template != "plain" else TURNS[:1]
        full = encode(get_template(template), tok, turns)
        prompt = encode_prompt(get_template(template), tok, turns[:-1], turns[-1].question)
        last_answer = int(np.flatnonzero(full.targets & ~np.roll(full.targets, 1))[-1])
        np.testing.assert_array_equal(prompt, full.tokens[:last_answer])
    assert tok.decode(prompt).endswith({"llava_mod": "ASSISTANT:", "chatml": "<|im_start|>assistant\n",
                                        "plain": "<image>"}[template])


def test_train_on_last(toks):
    tok = toks["hf"]
    enc = encode(get_template("llava_mod"), tok, TURNS, train_on="last")
    assert _pieces(tok, enc.tokens[enc.targets]) == [" Two", " squares", ".", "<|endoftext|>"]


def test_max_length_error_and_truncation(toks):
    tok, template = toks["hf"], get_template("llava_mod")
    full = encode(template, tok, TURNS)
    n = len(full.tokens)  # 56 text tokens, one image
    assert len(encode(template, tok, TURNS, max_length=n).tokens) == n
    with pytest.raises(SampleError, match=f"{n} tokens .* exceed max length {n - 1}"):
        encode(template, tok, TURNS, max_length=n - 1)
    with pytest.raises(SampleError, match=f"{n + 575} tokens \\(text {n}, 1 image\\(s\\) x 576\\) exceed"):
        encode(template, tok, TURNS, max_length=n + 574, num_image_tokens=576)
    # Cut inside the second answer: keep up to " Two", drop the rest.
    cut = encode(template, tok, TURNS, max_length=n - 3, truncate_answer=True)
    assert cut.truncated and len(cut.tokens) == n - 3 and cut.targets[-1]
    assert _pieces(tok, cut.tokens[cut.targets]) == [" Red", ".", "<|endoftext|>", " Two"]
    # A limit that falls inside the second question goes back to the end of the first answer.
    second_q = int(np.flatnonzero(full.tokens == tok.eod_id)[0]) + 3
    back = encode(template, tok, TURNS, max_length=second_q, truncate_answer=True)
    assert tok.decode(back.tokens).endswith("ASSISTANT: Red.<|endoftext|>")
    # Same with images counted as 576 positions each.
    back576 = encode(template, tok, TURNS, max_length=second_q + 575, num_image_tokens=576, truncate_answer=True)
    np.testing.assert_array_equal(back576.tokens, back.tokens)
    first = int(np.flatnonzero(full.targets)[0])
    with pytest.raises(SampleError, match="no answer token fits"):
        encode(template, tok, TURNS, max_length=first, truncate_answer=True)
    image_at = int(np.flatnonzero(full.tokens == tok.image_id)[0])
    with pytest.raises(SampleError, match="would cut an <image>"):
        encode(template, tok, TURNS, max_length=image_at, truncate_answer=True)


def test_chatml_needs_its_tokens(toks, tmp_path):
    config_file = Path(build_tiktoken(str(tmp_path / "t"), toks["hf"].path)) / "tiktoken_config.json"
    config = json.loads(config_file.read_text())
    del config["special_tokens"]["<|im_start|>"]
    config_file.write_text(json.dumps(config))
    d = str(config_file.parent)
    with pytest.raises(TokenizerError, match="has no <\\|im_start\\|> token"):
        encode(get_template("chatml"), load_tokenizer(d), TURNS)


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        get_template("vicuna")
