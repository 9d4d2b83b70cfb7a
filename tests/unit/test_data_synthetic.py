"""The synthetic data set: deterministic bytes, and every answer checked against the scenes and the pixels."""
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megamod.data.synthetic import COLORS
from megamod.data.synthetic_writer import write_dataset

SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "cross": "crosses"}
SINGULAR = {v: k for k, v in SHAPES.items()}
NUMBER = {"no": 0, "one": 1, "two": 2, "three": 3, "four": 4}
POSITION = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
            (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
FACTS = {"How many sides does a triangle have?": "A triangle has three sides.",
         "How many sides does a square have?": "A square has four sides.",
         "How many sides does a diamond have?": "A diamond has four sides.",
         "How many sides does a circle have?": "A circle has no sides.",
         "What color do you get by mixing red and yellow?": "Mixing red and yellow gives orange.",
         "What color do you get by mixing blue and yellow?": "Mixing blue and yellow gives green.",
         "What color do you get by mixing red and blue?": "Mixing red and blue gives purple."}
DESCRIBE = {"Describe the image.", "What is in the image?", "Describe the shapes in the image.",
            "Describe the image briefly.", "Give a short description of the image.",
            "What does the image show? Be brief.", "Summarize the visual content of the image."}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_dataset(str(root / name), size=40, eval_size=12, seed=seed, progress=False)
    return root


def _digests(directory):
    out = {}
    for base, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(base, f)
            out[os.path.relpath(path, directory)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(data):
    a, b, c = (_digests(data / n) for n in "abc")
    assert len(a) == 40 + 12 + 12 and a == b  # images + 12 data, eval, tokenizer, info files
    assert set(a) == set(c)
    differ = {k for k in a if a[k] != c[k]}
    assert differ >= {"captions.json", "conversations.json", "pairs.jsonl", "scenes.jsonl",
                      "eval/pope_random.jsonl", "eval/mmbench.jsonl", "images/train/000000.png"}


def _objects(scene):
    return {(o["color"], o["shape"]): o for o in scene["objects"]}


def _description(text):
    """"A red circle at the top, a blue square at the center and ..." -> {(color, shape, position)}."""
    assert text.endswith(".")
    items = re.split(r", | and ", text[:-1])
    found = set()
    for item in items:
        m = re.fullmatch(r"[Aa]n? (\w+) (\w+) at the ([\w ]+)", item)
        assert m, item
        found.add(m.groups())
    return found


def truth(question, scene):
    """The true answer to `question` about `scene`, in the generator's words' meaning: a comparable value."""
    objs = _objects(scene)
    if question in DESCRIBE:
        return {(c, s, o["position"]) for (c, s), o in objs.items()}
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        of_shape = [c for c, s in objs if s == m[1]]
        assert len(of_shape) == 1, "colour asked of a shape that is not unique"
        return of_shape[0]
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return sum(s == SINGULAR[m[1]] for _, s in objs)
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        return objs[(m[1], m[2])]["position"]
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
        return (m[1], m[2]) in objs
    if m := re.fullmatch(r"Which shape is (\w+)\?", question):
        of_color = [s for c, s in objs if c == m[1]]
        assert len(of_color) == 1
        return of_color[0]
    raise AssertionError(f"unknown question {question!r}")


def claims(question, answer):
    """What `answer` asserts, in the form truth() returns."""
    if question in DESCRIBE:
        return _description(answer)
    if m := re.fullmatch(r"The (\w+) is (\w+)\.", answer):
        return m[2]
    if m := re.fullmatch(r"There is one (\w+)\.", answer):
        return 1
    if m := re.fullmatch(r"There are (\w+) (\w+)\.", answer):
        return NUMBER[m[1]]
    if m := re.fullmatch(r"The (\w+) (\w+) is at the ([\w ]+)\.", answer):
        return m[3]
    if m := re.fullmatch(r"Yes, there is an? (\w+) (\w+)\.", answer):
        return True
    if m := re.fullmatch(r"No, there is no (\w+) (\w+)\.", answer):
        return False
    raise AssertionError(f"unknown answer {answer!r} to {question!r}")


def _mcq_true(question, option, scene):
    value = truth(question, scene)
    return str(value) == option if isinstance(value, int) else value == option


def _question(value):
    return value.replace("<image>\n", "").replace("\n<image>", "")


@pytest.fixture(scope="module")
def loaded(data):
    d = data / "a"
    scenes = {s["image"]: s for s in map(json.loads, (d / "scenes.jsonl").read_text().splitlines())}
    return d, scenes, lambda name: [json.loads(line) for line in (d / name).read_text().splitlines()]


def test_conversations_and_captions_are_true(loaded):
    d, scenes, _ = loaded
    checked = Counter()
    for name in ("captions.json", "conversations.json"):
        for sample in json.loads((d / name).read_text()):
            turns = sample["conversations"]
            if "image" not in sample:
                assert FACTS[turns[0]["value"]] == turns[1]["value"]
                checked["text-only"] += 1
                continue
            scene = scenes[sample["image"]]
            assert scene["split"] == "train"
            first = turns[0]["value"]
            assert first.startswith("<image>\n") or first.endswith("\n<image>")
            for q, a in zip(turns[::2], turns[1::2]):
                question = _question(q["value"])
                if "\nA. " in question:
                    lines = question.split("\n")
                    options = {line[0]: line[3:] for line in lines[1:5]}
                    assert [_mcq_true(lines[0], o, scene) for o in options.values()].count(True) == 1
                    assert _mcq_true(lines[0], options[a["value"]], scene)
                    checked["mcq"] += 1
                else:
                    assert claims(question, a["value"]) == truth(question, scene), (question, a["value"])
                    checked[question.split()[0]] += 1
    assert checked["text-only"] == 2 and checked["mcq"] > 0 and len(checked) >= 6


def test_single_object_conversations_are_exactly_those_of_one_object_scenes(loaded):
    d, scenes, _ = loaded
    everything = json.loads((d / "conversations.json").read_text())
    single = json.loads((d / "conversations_single.json").read_text())
    wanted = [s for s in everything if "image" in s and len(scenes[s["image"]]["objects"]) == 1]
    assert single == wanted and 0 < len(single) < len(everything)


def test_preference_pairs_chosen_true_rejected_false(loaded):
    _, scenes, read_jsonl = loaded
    kinds = Counter()
    for pair in read_jsonl("pairs.jsonl"):
        scene, q = scenes[pair["image"]], pair["question"]
        assert "<image>" not in q  # RLAIF-V layout: the placeholder is added when templating
        assert claims(q, pair["chosen"]) == truth(q, scene)
        assert claims(q, pair["rejected"]) != truth(q, scene)
        kinds[q.split()[0]] += 1
        if q.startswith("Is there"):
            kinds["chosen " + pair["chosen"].split(",")[0]] += 1
            color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
            if pair["chosen"].startswith("No"):  # absent, but confusable with an object the image has
                assert any(color == c or shape == s for c, s in _objects(scene)), (q, scene)
    assert kinds["Is"] == kinds["chosen Yes"] + kinds["chosen No"] and kinds["Is"] >= 12  # half the pairs
    assert kinds["chosen Yes"] > 0 and kinds["chosen No"] > 0  # not a lesson in answering "no"
    assert sum(kinds[k] for k in kinds if not k.startswith("chosen")) == 40 and len(kinds) >= 6


def test_eval_files_are_true_balanced_and_held_out(loaded):
    _, scenes, read_jsonl = loaded
    for kind in ("random", "adversarial"):
        rows = read_jsonl(f"eval/pope_{kind}.jsonl")
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        labels = Counter(r["label"] for r in rows)
        assert labels["yes"] == labels["no"] > 0
        for r in rows:
            assert scenes[r["image"]]["split"] == "eval"
            assert ("yes" if truth(r["text"], scenes[r["image"]]) else "no") == r["label"]
    mmbench = read_jsonl("eval/mmbench.jsonl")
    assert [r["index"] for r in mmbench] == list(range(24)) and {r["answer"] for r in mmbench} <= set("ABCD")
    for r in mmbench:
        scene = scenes[r["image"]]
        assert scene["split"] == "eval"
        assert [_mcq_true(r["question"], r[letter], scene) for letter in "ABCD"] == \
            [letter == r["answer"] for letter in "ABCD"]
    captions = read_jsonl("eval/captions.jsonl")
    assert len(captions) == 12 and {r["image"] for r in captions} == {r["image"] for r in mmbench}
    for r in captions:  # the reference names exactly the scene's objects, where they are
        scene = scenes[r["image"]]
        assert _description(r["answer"]) == {(o["color"], o["shape"], o["position"]) for o in scene["objects"]}


def test_pixels_show_the_described_scene(loaded):
    d, scenes, _ = loaded
    palette = {tuple(v) for v in COLORS.values()} | {(255, 255, 255)}
    for path, scene in scenes.items():
        pixels = np.asarray(Image.open(d / path).convert("RGB"))
        assert pixels.shape == (64, 64, 3)
        assert {tuple(p) for p in pixels.reshape(-1, 3)} <= palette  # no anti-aliasing: only palette colours
        occupied = set()
        for o in scene["objects"]:
            x, y = o["center"]
            assert tuple(pixels[y, x]) == COLORS[o["color"]]
            row, col = y // 21, x // 21  # 3 x 3 grid of 21-pixel cells
            assert POSITION[(row, col)] == o["position"]
            mask = (pixels == COLORS[o["color"]]).all(-1)
            ys, xs = np.nonzero(mask[row * 21:(row + 1) * 21, col * 21:(col + 1) * 21])
            assert len(ys) >= 30  # the shape is drawn in its own cell
            occupied.add((row, col))
        for (row, col) in set(POSITION) - occupied:
            assert (pixels[row * 21:(row + 1) * 21, col * 21:(col + 1) * 21] == 255).all()


def test_tokenizer_loads_in_transformers_and_covers_the_text(loaded):
    from transformers import AutoTokenizer

    from megamod.data.tokenizer import load_tokenizer

    d = loaded[0]
    ours = load_tokenizer(str(d / "tokenizer"))
    theirs = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    assert 300 < ours.vocab_size <= 1024
    text = "USER: <image>\nIs there an orange cross in the image? ASSISTANT: No, there is no orange cross.<|endoftext|>"
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 30  # words are single tokens
    assert {ours.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|pad|>")} \
        == {0, 1, 2, 3, 4}


def test_question_mix_and_turns(tmp_path):
    write_dataset(str(tmp_path / "d"), size=30, eval_size=10, seed=3, progress=False, mix={"exist": 1.0},
                  turns=(4, 4))
    conversations = json.loads((tmp_path / "d" / "conversations.json").read_text())
    with_image = [c for c in conversations if "image" in c]
    assert len(with_image) == 30
    for c in with_image:
        questions = [t["value"].replace("<image>", "").strip() for t in c["conversations"][::2]]
        assert len(questions) == 4 and all(re.fullmatch(r"Is there an? \w+ \w+ in the image\?", q) for q in questions)
    info = json.loads((tmp_path / "d" / "info.json").read_text())
    assert info["mix"] == {"exist": 1.0} and info["turns"] == [4, 4]
    with pytest.raises(ValueError, match="kinds among"):
        write_dataset(str(tmp_path / "e"), size=2, progress=False, mix={"exists": 1.0})
    with pytest.raises(ValueError, match="turns"):
        write_dataset(str(tmp_path / "e"), size=2, progress=False, turns=(3, 2))
