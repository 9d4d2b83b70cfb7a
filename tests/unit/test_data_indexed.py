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
    np.testing.assert_array_equal(got.lengths, ref.lengths)  # grouping by length orders both paths alike
    assert got.lengths.dtype == ref.lengths.dtype == np.int64
    for k in range(len(ref)):
        a, b = ref[k], got[k]
        assert (a.sample_id, a.location) == (b.sample_id, b.location)
        assert (ref.sample_id(k), ref.location(k)) == (got.sample_id(k), got.location(k))
        tokens = max(len(x.tokens) for x in ([a.chosen, a.rejected] if isinstance(a, PairSample) else [a.text]))
        assert got.token_lengths[k] == tokens
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


def _files(prefix):
    from megamod.data.indexed import SUFFIXES

    out = {}
    for suffix in SUFFIXES:
        with open(prefix + suffix, "rb") as f:
            out[suffix] = f.read()
    return out


def _args(synth, out, *extra):
    return ("--data", str(synth / "conversations.json"), "--tokenizer", str(synth / "tokenizer"),
            "--max-length", "300", "--out", out, "--chunk-size", "5", *extra)


def test_parallel_output_equals_serial(synth, tmp_path):
    assert preprocess(*_args(synth, str(tmp_path / "serial"), "--workers", "1")) == 0
    assert preprocess(*_args(synth, str(tmp_path / "parallel"), "--workers", "3")) == 0
    serial, parallel = _files(str(tmp_path / "serial")), _files(str(tmp_path / "parallel"))
    assert serial == parallel and len(IndexedSampleDataset(str(tmp_path / "serial"))) == 25
    assert not os.path.exists(str(tmp_path / "serial") + ".partial")  # merged and cleaned up


def test_interrupted_run_resumes_to_identical_files(synth, tmp_path, capsys):
    reference = str(tmp_path / "ref")
    assert preprocess(*_args(synth, reference)) == 0
    out = str(tmp_path / "run")
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools",
                                                                                   "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    original, calls = module._write_chunk, []

    def dies_on_third_chunk(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while tokenizing chunk 2
        return original(task)

    module._write_chunk = dies_on_third_chunk
    with pytest.raises(KeyboardInterrupt):
        module.main(list(_args(synth, out)))
    assert not os.path.exists(out + ".meta.json") and os.path.exists(out + ".partial/chunk-000001.done")
    with open(out + ".partial/chunk-000002.bin", "wb") as f:  # what a chunk half written leaves
        f.write(b"garbage")
    capsys.readouterr()
    assert preprocess(*_args(synth, out)) == 0
    assert "resuming: 2 of 5 chunks already done" in capsys.readouterr().out
    assert _files(out) == _files(reference)
    # other arguments: the finished chunks are not reused
    assert preprocess(*_args(synth, out, "--keep-partial")) == 0
    assert preprocess(*_args(synth, str(tmp_path / "run"), "--template", "chatml")) == 0
    assert "starting over" in capsys.readouterr().err
    assert IndexedSampleDataset(out).meta["template"] == "chatml"


def test_unreadable_image_is_reported_once_here(synth, tmp_path, capsys):
    import re

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = (synth / "pairs.jsonl").read_text().splitlines()
    lines[2] = re.sub(r'"image": "[^"]*"', '"image": "images/broken.png"', lines[2])
    for name in os.listdir(synth / "images"):
        os.symlink(synth / "images" / name, tmp_path / "images" / name)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = ("--data", str(data), "--kind", "pairs", "--tokenizer", str(synth / "tokenizer"), "--workers", "2",
              "--chunk-size", "4")
    assert preprocess(*common, "--out", str(tmp_path / "x")) == 1
    err = capsys.readouterr().err
    assert f"{data}:3 (id=pair-000002): unreadable image: {tmp_path}/images/broken.png" in err
    assert not os.path.exists(str(tmp_path / "x") + ".meta.json")
    assert "unreadable image" in (tmp_path / "x.bad_samples.txt").read_text()
    assert preprocess(*common, "--out", str(tmp_path / "x"), "--on-bad-sample", "skip") == 0  # reuses the chunks
    got = IndexedSampleDataset(str(tmp_path / "x"))
    assert len(got) == 23 and got.location(2) == f"{data}:4"


class _TextModel:
    """A language model as loading.data sees it: the default image processor, one position per <image>."""
    cfg = None

    @property
    def family(self):
        from megamod.families.language import LANGUAGE

        return LANGUAGE


def test_prefix_sources_mix_with_json_and_refuse_another_run(synth, tmp_path):
    from megamod.data.datasets import MixedDataset
    from megamod.data.sampler import MixtureSampler
    from megamod.training.config import ConfigError, DataSource, load_config
    from megamod.loading.data import build_datasets
    from tests.helpers import swap_token_ids

    prefix = str(tmp_path / "conv")
    assert preprocess(*_args(synth, prefix)) == 0
    tok = load_tokenizer(str(synth / "tokenizer"))
    sources = [DataSource(prefix=prefix, weight=2.0), DataSource(path=str(synth / "captions.json"), template="plain")]
    prefixed = MixedDataset(build_datasets(_TextModel(), tok, sources, "conversations", 300))
    sources[0] = DataSource(path=str(synth / "conversations.json"), weight=2.0)
    plain = MixedDataset(build_datasets(_TextModel(), tok, sources, "conversations", 300))
    np.testing.assert_array_equal(prefixed.lengths, plain.lengths)
    orders = [MixtureSampler(d.sizes, [2.0, 1.0], seed=3, lengths=d.lengths, group_size=8).epoch_order(0)
              for d in (prefixed, plain)]
    np.testing.assert_array_equal(*orders)
    for k in orders[0][:10]:
        np.testing.assert_array_equal(prefixed[k].text.tokens, plain[k].text.tokens)

    def refused(source, *args, tokenizer=tok, match):
        with pytest.raises(ConfigError, match=match):
            build_datasets(_TextModel(), tokenizer, [DataSource(str(synth / "captions.json"), template="plain"),
                                                     source], *args)

    refused(DataSource(prefix=prefix, template="chatml"), "conversations", 300,
            match=r"data.train\[1\] \(prefix .*template: preprocessed 'llava_mod', this run 'chatml'")
    refused(DataSource(prefix=prefix), "conversations", 256, match="max_length: preprocessed 300, this run 256")
    refused(DataSource(prefix=prefix, kind="pairs"), "conversations", 300,
            match="kind: preprocessed 'conversations', this run 'pairs'")
    swapped = load_tokenizer(swap_token_ids(str(synth / "tokenizer"), str(tmp_path / "swapped")))
    refused(DataSource(prefix=prefix), "conversations", 300, tokenizer=swapped, match="vocab_sha256")

    base = {"stage": "sft", "student": "s", "out": "o"}
    for entry in ({"path": "a.json", "prefix": prefix}, {"weight": 2.0}):
        with pytest.raises(ConfigError, match=r"data.train\[1\] needs exactly one of path .* or prefix"):
            load_config(base={**base, "data": {"train": [{"path": "b.json"}, entry]}})
    cfg = load_config(base={**base, "data": {"train": [{"prefix": prefix, "weight": 3}, {"path": "b.json"}]}})
    assert cfg.data.train[0].prefix == prefix and cfg.data.train[0].path is None
