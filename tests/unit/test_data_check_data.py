"""`megamod check-data`, run in-process: every bad sample reported by file:line, exit status, summary."""
import json
import os

import pytest

from megamod.cli import main
from tests.data_fixtures.builders import build_hf, write_image, write_jsonl

GOOD = {"id": "ok", "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                          {"from": "gpt", "value": "Red."}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("check")
    write_image(str(d / "a.png"))
    (d / "junk.png").write_bytes(b"junk")
    build_hf(str(d / "tokenizer"))  # found beside the data file by default
    return d


def run(*argv):
    return main(["check-data", *argv, "--image-size", "32"])


def test_reports_every_bad_line_and_fails(folder, capsys):
    rows = [GOOD,
            '{"id": "cut", "conversations": [',
            {**GOOD, "id": "gone", "image": "gone.png"},
            {**GOOD, "id": "junk", "image": "junk.png"},
            {"id": "noconv", "image": "a.png"},
            {**GOOD, "id": "long", "conversations": [GOOD["conversations"][0],
                                                     {"from": "gpt", "value": "Red. " * 100}]},
            GOOD]
    path = write_jsonl(str(folder / "mixed.jsonl"), rows)
    assert run("--data", path, "--max-length", "100") == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert bad == [
        f"BAD {path}:2: malformed JSON line: Expecting value (column 33)",
        f"BAD {path}:3 (id=gone): image not found: {folder}/gone.png",
        f"BAD {path}:4 (id=junk): cannot read image {folder}/junk.png: cannot identify image file "
        f"'{folder}/junk.png'",
        f"BAD {path}:5 (id=noconv): missing field \"conversations\"",
        f"BAD {path}:6 (id=long): 243 tokens (text 243, 1 image(s) x 1) exceed max length 100",
    ]
    assert json.loads(out.strip().splitlines()[-1]) == {"records": 7, "good": 2, "bad": 5}
    assert "sequence length" in out


def test_clean_file_passes_with_workers(folder, capsys):
    path = write_jsonl(str(folder / "clean.jsonl"), [GOOD] * 5)
    assert run("--data", path, "--workers", "2", "--num-image-tokens", "16", "--template", "chatml") == 0
    out = capsys.readouterr().out
    assert "5 good, 0 bad" in out and "each image = 16" in out


def test_pairs_and_setup_errors(folder, capsys):
    pairs = write_jsonl(str(folder / "pairs.jsonl"), [
        {"id": "p", "image": "a.png", "question": "Color?", "chosen": "Red.", "rejected": "Blue."},
        {"id": "q", "image": "a.png", "question": "Color?", "chosen": "Red.", "rejected": "Red."}])
    assert run("--data", pairs) == 1
    out = capsys.readouterr().out
    assert f"BAD {pairs}:2 (id=q): chosen and rejected answers are identical" in out and "kind pairs" in out
    assert run("--data", pairs, "--tokenizer", str(folder / "nowhere")) == 1
    assert "does not exist" in capsys.readouterr().err


def test_synthetic_outputs_pass(tmp_path, capsys):
    assert main(["make-data", "--out", str(tmp_path), "--size", "20", "--seed", "3"]) == 0
    for name, template in (("captions.json", "plain"), ("conversations.json", "llava_mod"), ("pairs.jsonl", "chatml")):
        assert run("--data", os.path.join(tmp_path, name), "--template", template) == 0, name
    out = capsys.readouterr().out
    assert "20 good, 0 bad" in out and "21 good, 0 bad" in out
