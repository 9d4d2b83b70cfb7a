"""megamod.eval: readers, POPE metrics, first-token choices on the tiny teacher, circular MMBench, `megamod eval`."""
import base64
import csv
import io
import json
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from megamod.cli import main
from megamod.eval import formats, metrics, prompts, scoring


def _png(size=(8, 6), color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _tok(p):
    from megamod.data.tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(p["teacher"], "tokenizer"))


# ---- metrics and choice logic -----------------------------------------------------------------------------------
def test_pope_metrics_match_hand_computed_values():
    pred = [True, True, False, False, True, False]
    label = [True, False, False, True, True, False]  # tp 2, fp 1, tn 2, fn 1
    m = metrics.pope_metrics(pred, label)
    assert m == pytest.approx({"count": 6, "accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                               "yes_ratio": 0.5, "tp": 2, "fp": 1, "tn": 2, "fn": 1})
    m = metrics.pope_metrics([True, True, True, False], [True, False, False, False])  # tp 1, fp 2, tn 1
    assert m == pytest.approx({"count": 4, "accuracy": 0.5, "precision": 1 / 3, "recall": 1.0, "f1": 0.5,
                               "yes_ratio": 0.75, "tp": 1, "fp": 2, "tn": 1, "fn": 0})
    m = metrics.pope_metrics([False] * 4, [True, False, True, False])  # never yes: 0/0 precision counts as 0
    assert m == pytest.approx({"count": 4, "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                               "yes_ratio": 0.0, "tp": 0, "fp": 0, "tn": 2, "fn": 2})


def test_rotation_and_circular_accuracy():
    item = formats.ChoiceItem(7, "Which?", None, ["a", "b", "c", "d"], 2, None, None, "f:1")
    assert [(r.options, r.answer) for r in (formats.rotate(item, k) for k in (1, 2, 3))] == [
        (["b", "c", "d", "a"], 1), (["c", "d", "a", "b"], 0), (["d", "a", "b", "c"], 3)]
    assert metrics.circular_accuracy([[True, True, True], [True, False, True], [False]]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("oracle", [True, False])
def test_circular_evaluation_on_fake_choices(engine_setup, monkeypatch, oracle):
    """An oracle that finds the right option text in the prompt passes every rotation; always answering A passes a
    question only in the rotation that puts its answer first."""
    from megamod.eval import runner

    tok = _tok(engine_setup)
    items = formats.read_mcq(os.path.join(engine_setup["data"], "eval", "mmbench.jsonl"), limit=6)

    def fake_choose(loaded, tokenizer, rows, **kw):
        chosen = {}
        for key, prompt, _, ids in rows:
            assert len(ids) == 4 and prompt[-1] != tok.image_id
            text = tokenizer.decode(prompt)
            item = items[key[0]]
            options = [line[3:] for line in text.split("\n") if line[:3] in ("A. ", "B. ", "C. ", "D. ")]
            pick = options.index(item.options[item.answer]) if oracle else 0
            chosen[key] = [float(k == pick) for k in range(4)]
        return chosen

    monkeypatch.setattr(runner, "choose", fake_choose)
    loaded = SimpleNamespace(kind="llava", family=SimpleNamespace(takes_images=True), image_token_id=tok.image_id,
                             language=SimpleNamespace(vocab_size=tok.vocab_size))
    result = scoring.evaluate_model(loaded, tok, "mcq", items, circular=True)
    first_a = sum(it.answer == 0 for it in items) / len(items)
    assert result["count"] == 6
    assert result["accuracy"] == pytest.approx(1.0 if oracle else first_a)
    assert result["circular_accuracy"] == pytest.approx(1.0 if oracle else 0.0)


def test_answer_tokens_on_the_synthetic_tokenizer(engine_setup):
    from megamod.data.templates import get_template

    tok, template = _tok(engine_setup), get_template("llava_mod")
    prefix, ids = scoring.answer_tokens(template, tok, [scoring.YES, scoring.NO])
    assert tok.encode(" Yes") == prefix + ids[0] and tok.encode(" No") == prefix + ids[1]  # " " then the word
    with pytest.raises(ValueError, match="cannot tell 'Yes' from 'Yesterday'"):
        scoring.answer_tokens(template, tok, [("Yes",), ("Yesterday",)])


def test_yes_no_choice_equals_an_independent_forward(engine_setup, world1):
    """The batched, right-padded choice equals reading forward_logits of each prompt alone, written by hand."""
    from megamod.data.templates import VICUNA_SYSTEM
    from megamod.eval.runner import last_logits
    from megamod.inference import forward_logits
    from megamod.models.llava import expand_image_tokens
    from megamod.loading.models import load

    p, tok = engine_setup, _tok(engine_setup)
    items = formats.read_pope(os.path.join(p["data"], "eval", "pope_adversarial.jsonl"), limit=6)
    items = [replace(it, question=it.question + " Look closely." * k) for k, it in enumerate(items)]  # lengths vary
    loaded = load(p["teacher"], torch.float32)
    result = scoring.evaluate_model(loaded, tok, "pope", items, batch_size=4)
    yes = [i for i in (tok.token_to_id("Yes"), tok.token_to_id("yes")) if i is not None]
    no = [i for i in (tok.token_to_id("No"), tok.token_to_id("no")) if i is not None]
    from megamod.data.images import ImageProcessor

    vision = loaded.cfg.vision
    processor = ImageProcessor(size=vision.image_size, mean=vision.image_mean, std=vision.image_std)
    rows, images, singles = [], [], []
    for item, pred in zip(items, result["predictions"]):
        ids = tok.encode(f"{VICUNA_SYSTEM} USER: <image>\n{item.question} ASSISTANT: ")
        ids = expand_image_tokens(ids, tok.image_id, vision.num_image_tokens)
        image_1CHW = processor.load(item.image).unsqueeze(0)
        logits_V = forward_logits(loaded.model, torch.tensor([ids]), loaded.language.vocab_size, image_1CHW)[0, -1]
        expected = "yes" if logits_V[yes].max() > logits_V[no].max() else "no"
        assert pred["pred"] == expected and pred["label"] == ("yes" if item.label else "no")
        rows.append(ids)
        images.append(image_1CHW)
        singles.append(logits_V)
    assert len({len(r) for r in rows}) > 1  # the batch below really pads
    S = max(len(r) for r in rows)
    tokens_BS = torch.tensor([r + [tok.pad_id] * (S - len(r)) for r in rows])
    batched_BV = last_logits(loaded.model, tokens_BS, torch.tensor([len(r) - 1 for r in rows]),
                             loaded.language.vocab_size, torch.cat(images))
    torch.testing.assert_close(batched_BV, torch.stack(singles), rtol=1e-4, atol=1e-4)


def test_eval_reads_the_tokenizers_ids_not_the_models_rows(engine_setup, world1, monkeypatch, tmp_path):
    """A given tokenizer whose ids mean other tokens than the checkpoint's own is refused, naming both; generation
    chooses among the tokenizer's ids (a model's rows past them are padding); a tokenizer wider than the model is
    refused."""
    from megamod.data.tokenizer import TokenizerError
    from megamod.eval import generate
    from tests.helpers import swap_token_ids

    p, tok = engine_setup, _tok(engine_setup)
    other = swap_token_ids(os.path.join(p["teacher"], "tokenizer"), str(tmp_path / "other"))
    with pytest.raises(TokenizerError, match=rf"given tokenizer {other} .* {p['teacher']}'s tokenizer .* id 100"):
        scoring.evaluate(p["teacher"], "pope", os.path.join(p["data"], "eval", "pope_random.jsonl"), limit=2,
                         tokenizer=other)
    seen = {}

    def fake_generate(loaded, rows, **kw):
        seen.update(kw)
        return {key: [] for key, _, _ in rows}

    monkeypatch.setattr(generate, "greedy_generate", fake_generate)
    items = formats.read_open(os.path.join(p["data"], "eval", "captions.jsonl"), limit=2)

    def model(rows):
        return SimpleNamespace(kind="llava", family=SimpleNamespace(takes_images=True), image_token_id=tok.image_id,
                               language=SimpleNamespace(vocab_size=rows))

    scoring.evaluate_model(model(tok.vocab_size + 32), tok, "caption", items)
    assert seen["vocab_size"] == tok.vocab_size
    with pytest.raises(ValueError, match=f"{tok.vocab_size} tokens, more than the model's {tok.vocab_size - 1}"):
        scoring.evaluate_model(model(tok.vocab_size - 1), tok, "caption", items)


# ---- readers ----------------------------------------------------------------------------------------------------
def test_reads_published_pope_jsonl(tmp_path):
    (tmp_path / "COCO_val2014_000000000042.jpg").write_bytes(_png())
    rows = [{"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a cat in the image?",
             "label": "No"}]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = formats.read_pope(str(path))
    assert [(i.id, i.question, i.label, i.location) for i in items] == [
        (1, "Is there a dog in the image?", True, f"{path}:1"), (2, "Is there a cat in the image?", False, f"{path}:2")]
    assert items[0].image == str(tmp_path / "COCO_val2014_000000000042.jpg")
    assert formats.open_image(items[0]).size == (8, 6)
    assert len(formats.read_pope(str(path), limit=1)) == 1
    moved = tmp_path / "sub" / "q.jsonl"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    with pytest.raises(formats.FormatError, match=f"{moved}:1: image not found"):
        formats.read_pope(str(moved), image_folder=str(tmp_path / "elsewhere"))
    assert formats.read_pope(str(moved), image_folder=str(tmp_path))[1].label is False


@pytest.mark.parametrize("line, error", [
    ("{not json", "not JSON"),
    ('{"question_id": 3, "image": "a.png", "text": "Is there a cat?", "label": "maybe"}', "'label' must be"),
    ('{"question_id": 3, "image": "a.png", "label": "no"}', "'text' must be a non-empty string"),
    ('{"question_id": 3, "image": "gone.png", "text": "Is there a cat?", "label": "no"}', "image not found"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_pope_lines_name_file_and_line(tmp_path, line, error):
    (tmp_path / "a.png").write_bytes(_png())
    good = json.dumps({"question_id": 1, "image": "a.png", "text": "Is there a dog?", "label": "yes"})
    path = tmp_path / "pope.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(formats.FormatError, match=f"{path}:3: .*{error}"):
        formats.read_pope(str(path))


def _write_tsv(path, rows, header=("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_reads_mmbench_tsv(tmp_path):
    png = _png(size=(5, 4))
    b64 = base64.b64encode(png).decode()
    path = _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        [0, "What color is it?", "The picture shows a thing.", "red", "green", "blue", "black", "B", "attribute", b64],
        [1, "Is it round?", "nan", "yes", "no", "", "", "A", "shape", b64],
        [2, "How many?\nCount them.", "", "1", "2", "3", "nan", "C", "count", "0"],  # image of row 0
    ])
    items = formats.read_mcq(path)
    assert [(i.id, i.hint, i.options, i.answer, i.category) for i in items] == [  # ids as pandas reads them
        (0, "The picture shows a thing.", ["red", "green", "blue", "black"], 1, "attribute"),
        (1, None, ["yes", "no"], 0, "shape"), (2, None, ["1", "2", "3"], 2, "count")]
    assert items[1].location == f"{path}:3" and items[2].question == "How many?\nCount them."
    assert all(i.image == png for i in items) and formats.open_image(items[2]).size == (5, 4)
    question = prompts.choice_question(items[0])
    assert question == ("<image>\nThe picture shows a thing.\nWhat color is it?\nA. red\nB. green\nC. blue\n"
                        "D. black\nAnswer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("row, error", [
    ([1, "Q?", "", "x", "y", "", "", "C", "c"], "answer must be one of the option letters \\['A', 'B'\\]"),
    ([1, "Q?", "", "x", "", "", "", "A", "c"], "needs at least options A and B"),
    ([1, "Q?", "", "x", "y", "", "", "A", "c", "!!notbase64!!"], "not base64"),
    ([1, "Q?", "", "x", "y", "", "", "A", "c", "99"], "refers to row index 99"),
])
def test_bad_mmbench_rows_name_file_and_line(tmp_path, row, error):
    b64 = base64.b64encode(_png()).decode()
    good = [0, "Q?", "", "x", "y", "", "", "A", "c", b64]
    path = _write_tsv(tmp_path / "bad.tsv", [good, row if len(row) == 10 else row + [b64]])
    with pytest.raises(formats.FormatError, match=f"{path}:3: .*{error}"):
        formats.read_mcq(path)


def test_reads_the_synthetic_eval_files(engine_setup):
    data = engine_setup["data"]
    pope = formats.read_pope(os.path.join(data, "eval", "pope_random.jsonl"))
    assert len(pope) >= 10 and {i.label for i in pope} == {True, False}
    assert all(os.path.isfile(i.image) for i in pope)  # relative to the data set root, found one level up
    mcq = formats.read_mcq(os.path.join(data, "eval", "mmbench.jsonl"))
    assert all(len(i.options) == 4 and os.path.isfile(i.image) for i in mcq)
    from megamod.data.synthetic import mcq_prompt

    item = mcq[0]
    assert prompts.choice_question(item) == "<image>\n" + mcq_prompt(
        {"question": item.question, "options": item.options})  # the prompt the model was trained on


# ---- the command and the Python entry point ---------------------------------------------------------------------
def test_eval_command_end_to_end(engine_setup, world1, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", "--ckpt", engine_setup["teacher"], "--task", "pope", "--data",
                 os.path.join(engine_setup["data"], "eval", "pope_random.jsonl"), "--limit", "8",
                 "--batch-size", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["count"] == 8 and len(result["predictions"]) == 8
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert 0.0 <= result[key] <= 1.0, key
    assert "yes_ratio" in capsys.readouterr().out


def test_evaluate_a_sparse_checkpoint_on_multiple_choice(engine_setup, world1):
    from megamod import distributed

    data = os.path.join(engine_setup["data"], "eval", "mmbench.jsonl")
    result = scoring.evaluate(engine_setup["sparse"], "mcq", data, limit=3, circular=True, batch_size=5)
    distributed.shutdown()
    assert result["count"] == 3 and 0.0 <= result["circular_accuracy"] <= result["accuracy"] <= 1.0
    assert set(result["categories"]) <= {"color", "count", "position", "shape"}


