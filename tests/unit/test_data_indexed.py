"""tools/preprocess_data.py + megamod.data.indexed: the indexed data set gives the samples of the JSON path."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from megamod.data.datasets import FileDataset, PairSample
from megamod.data.images import ImageProcessor
from megamod.data.indexed import IndexedSampleDataset, spans_of, targets_of
from megamod.data.records import DataError
from megamod.data.tokenizer import add_special_tokens, load_tokenizer
from megamod.data.synthetic_writer import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def preprocess(*argv):
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that worker processes can find its functions
    spec.loader.exec_module(module)
    return module.main(list(argv))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    write_dataset(str(d), size=24, eval_size=10, seed=7, progress=False)
    return d


def test_spans_round_trip():
    for targets in ([0, 1, 1, 0, 1], [1, 1], [0, 0], [1, 0, 0, 1]):
        t = np.asarray(targets, dtype=bool)
        np.testing.assert_array_equal(targets_of(spans_of(t), len(t)), t)
    assert spans_of(np.asarray([0, 1, 1, 0, 1], dtype=bool)).tolist() == [1, 3, 4, 5]


@pytest.mark.parametrize("name,kind,template,workers", [("conversations.json", "conversations", "llava_mod", 1),
                                                         ("pairs.jsonl", "pairs", "chatml", 2),
                                                         ("captions.json", "conversations", "plain", 1)])
def test_round_trip_equals_json_path(synth, tmp_path, name, kind, template, workers):
    prefix = str(tmp_path / "out" / "data")
    assert preprocess("--data", str(synth / name), "--kind", kind, "--tokenizer", str(synth / "tokenizer"),
                      "--template", template, "--max-length", "300", "--out", prefix,
                      "--workers", str(workers)) == 0
    tok = load_tokenizer(str(synth / "tokenizer"))
    processor = ImageProcessor(32)
    ref = FileDataset(str(synth / name), tok, kind=kind, template=template, max_length=300, image_processor=processor)
    got = IndexedSampleDataset(prefix, image_processor=processor)
    got.check_tokenizer(tok)
    assert len(got) == len(ref) and got.meta["template"] == template
    for k in range(len(ref)):
        a, b = ref[k], got[k]
        assert (a.sample_id, a.location) == (b.sample_id, b.location)
        assert torch.equal(a.images, b.images)
        pairs = [(a.chosen, b.chosen), (a.rejected, b.rejected)] if isinstance(a, PairSample) else [(a.text, b.text)]
        for x, y in pairs:
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_array_equal(x.targets, y.targets)
            np.testing.assert_array_equal(x.labels(), y.labels())


def test_bad_samples_stop_or_are_skipped(synth, tmp_path, capsys):
    lines = (synth / "pairs.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace('"image": "images', '"image": "missing')
    lines[5] = lines[5][:20]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    common = ("--data", str(bad), "--kind", "pairs", "--tokenizer", str(synth / "tokenizer"),
              "--image-folder", str(synth))
    assert preprocess(*common, "--out", str(tmp_path / "x")) == 1
    assert f"{bad}:4 (id=pair-000003): image not found" in capsys.readouterr().err
    assert preprocess(*common, "--out", str(tmp_path / "y"), "--on-bad-sample", "skip") == 0
    out = capsys.readouterr().out
    assert "22 samples" in out and f"{bad}:6: malformed JSON line" in out
    got = IndexedSampleDataset(str(tmp_path / "y"))
    assert len(got) == 22 and got[3].location == f"{bad}:5"


def test_tokenizer_mismatch_and_missing_files(synth, tmp_path):
    prefix = str(tmp_path / "d")
    assert preprocess("--data", str(synth / "captions.json"), "--tokenizer", str(synth / "tokenizer"),
                      "--template", "plain", "--out", prefix) == 0
    other = add_special_tokens(load_tokenizer(str(synth / "tokenizer")), ["<video>"])
    with pytest.raises(DataError, match="vocab_size"):
        IndexedSampleDataset(prefix).check_tokenizer(other)
    os.remove(prefix + ".samples.jsonl")
    with pytest.raises(DataError, match="missing .*samples.jsonl"):
        IndexedSampleDataset(prefix)
