"""Greedy generation with a KV cache (against recomputing every step, and against transformers' generate on the HF
export), the caption task, and MME: reader and scores."""
import json
import os

import pytest
import torch
from PIL import Image

from megamod.cli import main
from megamod.eval import captions, formats, mme


def _rows(p, tok):
    """Prompts of three lengths, with and without an image (so batches group by length)."""
    from megamod.data.templates import encode_prompt, get_template

    tmpl = get_template("llava_mod")
    items = formats.read_open(os.path.join(p["data"], "eval", "captions.jsonl"), limit=3)
    rows = []
    for i, item in enumerate(items):
        question = ["<image>\nDescribe the image.", "<image>\nWhat color is the circle?", "How many sides does a "
                    "square have?"][i]
        rows.append((i, encode_prompt(tmpl, tok, [], question).tolist(), item if "<image>" in question else None))
    rows.append((3, rows[0][1], items[1]))  # the same length as row 0: one batch of two
    return rows


def _recompute(loaded, rows, steps):
    """Greedy tokens by a full forward over the whole sequence at every step (no cache)."""
    from megamod.data.images import ImageProcessor
    from megamod.eval.formats import open_image
    from megamod.inference import forward_logits
    from megamod.models.llava import expand_image_tokens

    v = loaded.cfg.vision
    processor = ImageProcessor(size=v.image_size, mode="pad", mean=v.image_mean, std=v.image_std)
    out = {}
    for key, ids, src in rows:
        seq = expand_image_tokens(ids, loaded.image_token_id, v.num_image_tokens)
        images = processor(open_image(src)).unsqueeze(0) if src else None
        new = []
        for _ in range(steps):
            logits_SV = forward_logits(loaded.model, torch.tensor([seq]), loaded.language.vocab_size, images)[0]
            last_V = logits_SV[-1].clone()
            last_V[loaded.image_token_id] = float("-inf")
            new.append(int(last_V.argmax()))
            seq.append(new[-1])
        out[key] = new
    return out


@pytest.mark.parametrize("name", ["teacher", "sparse"])
def test_kv_cache_generation_equals_recomputing_every_step(engine_setup, world1, name):
    from megamod import checkpoint
    from megamod.data.tokenizer import load_tokenizer
    from megamod.eval.generate import greedy_generate
    from megamod.loading.models import load

    loaded = load(engine_setup[name], checkpoint.resolve_dtype("float32"))
    tok = load_tokenizer(os.path.join(engine_setup[name], "tokenizer"))
    rows = _rows(engine_setup, tok)
    reference = _recompute(loaded, rows, steps=6)
    got = greedy_generate(loaded, rows, max_new_tokens=6, stop_ids=[], batch_size=4)
    assert got == reference
    # Stopping: a row ends before its first stop token; the others run on to the limit.
    stop = reference[0][2]
    got = greedy_generate(loaded, rows, max_new_tokens=6, stop_ids=[stop], batch_size=4)
    for key, ref in reference.items():
        assert got[key] == (ref[:ref.index(stop)] if stop in ref else ref)


def test_generation_refuses_sequence_parallel_models():
    from types import SimpleNamespace

    from megamod.eval.generate import greedy_generate

    loaded = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(sequence_parallel=True)))
    with pytest.raises(ValueError, match="tp=1"):
        greedy_generate(loaded, [], max_new_tokens=4, stop_ids=[])


def test_generation_equals_transformers_generate_on_the_export(engine_setup, world1, tmp_path):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from megamod.convert.checkpoint import megamod_to_hf
    from megamod.data.tokenizer import load_tokenizer
    from megamod.eval.hf import hf_generate
    from megamod.eval.scoring import evaluate

    data = os.path.join(engine_setup["data"], "eval", "captions.jsonl")
    ours = evaluate(engine_setup["teacher"], "caption", data, limit=4, batch_size=2, max_new_tokens=8,
                    dtype="float32")
    megamod_to_hf(engine_setup["teacher"], str(tmp_path / "hf"))
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    tok = load_tokenizer(str(tmp_path / "hf"))
    items = formats.read_open(data, limit=4)
    from megamod.data.templates import encode_prompt, get_template

    rows = [(i, encode_prompt(get_template("llava_mod"), tok, [], "<image>\n" + it.question).tolist(), it)
            for i, it in enumerate(items)]
    theirs = hf_generate(model, processor, rows, max_new_tokens=8, stop_ids=captions.stop_ids(tok))
    assert [p["text"] for p in ours["predictions"]] == [tok.decode(theirs[i]).strip() for i in range(4)]
    assert [p["tokens"] for p in ours["predictions"]] == [len(theirs[i]) for i in range(4)]


def test_caption_task_through_the_command(engine_setup, world1, tmp_path, capsys):
    out = tmp_path / "captions.json"
    data = os.path.join(engine_setup["data"], "eval", "captions.jsonl")
    assert main(["eval", "--ckpt", engine_setup["teacher"], "--task", "caption", "--data", data, "--limit", "3",
                 "--max-new-tokens", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["count"] == result["with_references"] == 3
    assert all(0 <= p["tokens"] <= 5 and p["references"] for p in result["predictions"])
    expected = captions.caption_metrics(formats.read_open(data, limit=3),
                                        [p["text"] for p in result["predictions"]])
    assert result["token_f1"] == pytest.approx(expected["token_f1"])
    assert "token_f1" in capsys.readouterr().out


def test_caption_metrics_hand_computed():
    assert captions.normalize("The red Circle, at the top.") == ["red", "circle", "at", "top"]
    assert captions.token_f1("a red circle", "The red circle.") == 1.0
    assert captions.token_f1("red square", "red circle") == pytest.approx(0.5)  # 1 common: p = r = 1/2
    assert captions.token_f1("", "") == 1.0 and captions.token_f1("", "red") == 0.0
    items = [formats.OpenItem(1, "q", None, ["A red circle.", "a blue square"], "f:1"),
             formats.OpenItem(2, "q", None, ["green cross"], "f:2"),
             formats.OpenItem(3, "q", None, [], "f:3")]
    m = captions.caption_metrics(items, ["a blue square", "green circle", "anything"])
    assert m == pytest.approx({"task": "caption", "count": 3, "with_references": 2, "exact_match": 0.5,
                               "token_f1": 0.75})


def test_reads_llava_question_files(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    lines = [{"question_id": "q1", "image": "a.png", "text": "What is it?", "answer": "a dot"},
             {"question_id": "q2", "image": "a.png", "text": "Say it.",
              "answers": [{"answer": "yes"}, {"answer": "yeah"}]},
             {"question_id": "q3", "text": "No image, no reference."}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = formats.read_open(str(path))
    assert [i.references for i in items] == [["a dot"], ["yes", "yeah"], []]
    assert items[0].image == str(tmp_path / "a.png") and items[2].image is None
    path.write_text(json.dumps({"question_id": 1, "text": "x", "answers": []}) + "\n")
    with pytest.raises(formats.FormatError, match=r"q.jsonl:1: field 'answers'"):
        formats.read_open(str(path))


def _mme_release(root):
    """Two sub-tasks in the two layouts of the release."""
    for cat, layout in (("existence", "flat"), ("artwork", "split")):
        base = root / cat
        q_dir, i_dir = (base, base) if layout == "flat" else (base / "questions_answers_YN", base / "images")
        q_dir.mkdir(parents=True, exist_ok=True)
        i_dir.mkdir(parents=True, exist_ok=True)
        for stem in ("001", "002"):
            Image.new("RGB", (4, 4)).save(i_dir / f"{stem}.{'png' if layout == 'flat' else 'jpg'}")
            (q_dir / f"{stem}.txt").write_text(f"Is there a dog? Please answer yes or no.\tYes\n"
                                               f"Is there a cat? Please answer yes or no.\tNo\n")


def test_reads_the_mme_release_and_scores_it(tmp_path):
    _mme_release(tmp_path)
    items = mme.read_mme(str(tmp_path))
    assert [i.category for i in items] == ["existence"] * 4 + ["artwork"] * 4  # MME's sub-task order
    assert [i.label for i in items[:2]] == [True, False] and items[0].group == "existence/001"
    assert items[4].image.endswith(os.path.join("artwork", "images", "001.jpg"))
    # existence: 3 of 4 right, one image fully right; artwork: all right
    scores = mme.mme_scores(items, [True, False, True, True] + [True] * 4)
    assert scores["categories"]["existence"] == pytest.approx({"accuracy": 75.0, "accuracy_plus": 50.0,
                                                               "score": 125.0})
    assert scores["perception"] == pytest.approx(325.0) and scores["cognition"] == 0.0


def test_bad_mme_lines_name_the_file_and_line(tmp_path):
    _mme_release(tmp_path)
    (tmp_path / "existence" / "002.txt").write_text("Is there a dog?\tMaybe\n")
    with pytest.raises(formats.FormatError, match=r"existence/002.txt:1: expected 'question<TAB>Yes\|No'"):
        mme.read_mme(str(tmp_path))
    (tmp_path / "existence" / "002.txt").write_text("Is there a dog?\tYes\n")
    os.remove(tmp_path / "existence" / "002.png")
    with pytest.raises(formats.FormatError, match=r"002.txt:1: no image 002"):
        mme.read_mme(str(tmp_path))


def test_mme_task_through_evaluate(engine_setup, world1, tmp_path):
    from megamod.eval.scoring import evaluate

    _mme_release(tmp_path)
    result = evaluate(engine_setup["teacher"], "mme", str(tmp_path), batch_size=3)
    assert result["count"] == 8 and set(result["categories"]) == {"existence", "artwork"}
    correct = [p["pred"] == p["label"] for p in result["predictions"]]
    assert result["accuracy"] == pytest.approx(sum(correct) / 8)
    assert result["perception"] == pytest.approx(sum(c["score"] for c in result["categories"].values()))
