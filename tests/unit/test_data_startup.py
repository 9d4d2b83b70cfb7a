"""Start-up cost of the JSON data path: image checks at start-up or on read (data.check_images), length estimates
only when something uses them, computed once per file and cached."""
import json
import os

import numpy as np
import pytest

from megamod.data import records
from megamod.data.datasets import BadSampleError, FileDataset, MixedDataset, Skipped
from megamod.data.images import ImageProcessor
from megamod.data.records import DataError
from megamod.data.sampler import MixtureSampler
from megamod.data.tokenizer import load_tokenizer
from tests.data_fixtures.builders import build_hf, write_image, write_json


def conv(sample_id, image, question, answer):
    return {"id": sample_id, **({"image": image} if image else {}),
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


ROWS = [conv("a", "a.png", "<image>\nWhat color is it?", "Red."),
        conv("gone", "gone.png", "<image>\nWhat?", "Blue."),
        conv("t", None, "How many sides has a triangle?", "Three sides.")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("startup"))
    write_image(os.path.join(d, "a.png"), (24, 16), (200, 30, 30))
    return {"dir": d, "tok": load_tokenizer(build_hf(os.path.join(d, "tokenizer"))),
            "json": write_json(os.path.join(d, "rows.json"), ROWS)}


def dataset(env, path, **kw):
    return FileDataset(path, env["tok"], **{"max_length": 128, "image_processor": ImageProcessor(32), **kw})


def line_of(path, k):
    return records.RecordFile(path).line(k)


def test_startup_check_is_unchanged(env):
    with pytest.raises(DataError, match=rf"{env['json']}:{line_of(env['json'], 1)} \(id=gone\): image not found: "
                                        rf"{env['dir']}/gone.png"):
        dataset(env, env["json"])
    ds = dataset(env, env["json"], on_bad_sample="skip")
    assert len(ds) == 2 and len(ds.report) == 1


def test_lazy_check_names_file_line_when_read(env, monkeypatch):
    lookups = []
    real = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: lookups.append(p) or real(p))
    ds = dataset(env, env["json"], check_image_files=False)
    assert len(ds) == 3 and not ds.report and not [p for p in lookups if p.endswith(".png")]  # no lookups at start
    assert ds[0].sample_id == "a"
    where = f"{env['json']}:{line_of(env['json'], 1)}"
    with pytest.raises(BadSampleError, match=rf"^{where} \(id=gone\): image not found: {env['dir']}/gone.png$"):
        ds[1]
    skipping = dataset(env, env["json"], check_image_files=False, on_bad_sample="skip")
    item = skipping[1]
    assert isinstance(item, Skipped) and item.bad.location == where and "image not found" in item.bad.reason


def test_lengths_only_when_asked(env, monkeypatch):
    calls = []
    real = FileDataset._estimate_length
    monkeypatch.setattr(FileDataset, "_estimate_length", lambda self, r: calls.append(1) or real(self, r))
    ds = dataset(env, env["json"], on_bad_sample="skip")
    MixtureSampler([len(ds)], shuffle=True, num_epochs=1)  # no length grouping: nothing asks
    assert calls == []
    assert ds.lengths.tolist() == [5 + 1, 6 + 2] and len(calls) == 3  # "a" and "t" (every parseable record once)
    ds.lengths
    assert MixedDataset([ds]).lengths.tolist() == [6, 8] and len(calls) == 3


def test_lengths_cached_once_per_file(env, tmp_path, monkeypatch):
    monkeypatch.setattr(records, "CACHE_MIN_BYTES", 0)
    monkeypatch.delenv(records.CACHE_DIR_ENV, raising=False)
    path = write_json(str(tmp_path / "rows.json"), ROWS)
    write_image(str(tmp_path / "a.png"), (8, 8), (1, 2, 3))
    first = dataset(env, path, on_bad_sample="skip", num_image_tokens=5).lengths
    assert first.tolist() == [6 + 4, 8]  # words plus 4 more positions per image
    assert sorted(os.listdir(tmp_path)) == ["a.png", "rows.json", "rows.json.megamod-index.npz",
                                            "rows.json.megamod-lengths-conversations-5.npz"]
    calls = []
    monkeypatch.setattr(FileDataset, "_estimate_length", lambda self, r: calls.append(1))
    # another rank / run, with the image check off: every record is usable and its estimate comes from the cache
    lazy = dataset(env, path, check_image_files=False, num_image_tokens=5)
    assert lazy.lengths.tolist() == [10, 3 + 4, 8] and calls == []
    rows = ROWS + [conv("new", None, "one two three", "four")]
    write_json(path, rows)  # changed file: estimated again
    monkeypatch.setattr(FileDataset, "_estimate_length", lambda self, r: calls.append(1) or 1)
    assert dataset(env, path, check_image_files=False, num_image_tokens=5).lengths.tolist() == [1, 1, 1, 1]


def test_check_images_config(tmp_path):
    from megamod.training.config import ConfigError, load_config

    good = {"stage": "sft", "student": "s", "out": "o", "data": {"train": [{"path": "x.json"}]}}
    assert load_config(base=good).data.check_images == "startup"
    assert load_config(base=good, overrides=["data.check_images=lazy"]).data.check_images == "lazy"
    with pytest.raises(ConfigError, match="data.check_images must be startup or lazy"):
        load_config(base=good, overrides=["data.check_images=never"])


def test_benchmark_runs_tiny(tmp_path, capsys):
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_data_startup",
                                                  os.path.join(REPO, "tools", "bench", "data_startup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    assert module.main(["--samples", "200", "--root", str(tmp_path / "root"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "data_startup" and "json cold" in capsys.readouterr().out
    assert [r["variant"] for r in res["rows"]][:2] == ["json cold", "json cached"]
    assert all(r["samples"] == 200 and r["seconds"] > 0 and r["peak_mb"] >= 0 for r in res["rows"])


def test_the_trainer_passes_check_images_on(engine_setup, tmp_path, monkeypatch):
    from megamod.loading import data as data_setup
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer
    from tests.training_setup import base_recipe

    seen = []
    real = data_setup.build_datasets

    def spy(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("check_images"))
        return real(*args, **kwargs)

    monkeypatch.setattr(data_setup, "build_datasets", spy)
    p = engine_setup
    Trainer(load_config(base=base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "run"), teacher=p["teacher"],
                                         data={"check_images": "lazy"})))
    assert seen == ["lazy"]
