"""Preference pairs as RLAIF-V publishes them: parquet shards, image bytes embedded (megamod/data/parquet.py).

The fixture is written with pyarrow in openbmb/RLAIF-V-Dataset's column layout (ds_name, image {bytes, path},
question, chosen, rejected, origin_dataset, origin_split, idx, image_path); the same pairs as LLaVA-style JSONL with
the images as files must give the same samples, and a preference stage must train on it.
"""
import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megamod.data.collate import Collator
from megamod.data.datasets import BadSampleError, FileDataset, PairSample, Skipped
from megamod.data.images import ImageProcessor
from megamod.data.records import DataError
from megamod.data.tokenizer import load_tokenizer
from tests.data_fixtures.builders import build_hf, write_image, write_jsonl
from tests.training_setup import base_recipe

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the HF datasets Image feature
RLAIFV = pa.schema([("ds_name", pa.string()), ("image", IMAGE), ("question", pa.string()), ("chosen", pa.string()),
                    ("rejected", pa.string()), ("origin_dataset", pa.string()), ("origin_split", pa.string()),
                    ("idx", pa.int64()), ("image_path", pa.string())])


def rlaifv_rows(pairs: list[dict], image_folder: str) -> list[dict]:
    """JSON pairs {"id", "image", "question", "chosen", "rejected"} as RLAIF-V rows, the image files' bytes inline."""
    rows = []
    for k, pair in enumerate(pairs):
        with open(os.path.join(image_folder, pair["image"]), "rb") as f:
            blob = f.read()
        rows.append({"ds_name": "synthetic", "image": {"bytes": blob, "path": os.path.basename(pair["image"])},
                     "question": pair["question"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                     "origin_dataset": "synthetic", "origin_split": json.dumps({"split": "train"}),
                     "idx": int(pair["id"]) if str(pair["id"]).isdigit() else k,
                     "image_path": f"RLAIF-V-Dataset/images/{os.path.basename(pair['image'])}"})
    return rows


def write_parquet(path: str, rows: list[dict], schema=RLAIFV, row_group_size: int = 2) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


PAIRS = [
    {"id": "0", "image": "a.png", "question": "What color is the circle?", "chosen": "Red.", "rejected": "Blue."},
    {"id": "1", "image": "b.png", "question": "How many squares?", "chosen": "Two squares.",
     "rejected": "Three squares."},
    {"id": "2", "image": "c.jpg", "question": "<image>\nWhat color is the circle?", "chosen": "Red.",
     "rejected": "Two squares."},
    {"id": "3", "image": "a.png", "question": "How many squares?", "chosen": "Two squares.", "rejected": "Red."},
    {"id": "4", "image": "b.png", "question": "What color is the circle?", "chosen": "Blue.", "rejected": "Red."},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("parquet"))
    write_image(os.path.join(d, "a.png"), (24, 16), (200, 30, 30))
    write_image(os.path.join(d, "b.png"), (16, 30), (30, 30, 200))
    write_image(os.path.join(d, "c.png"), (20, 20), (30, 200, 30))
    from PIL import Image

    Image.open(os.path.join(d, "c.png")).save(os.path.join(d, "c.jpg"), format="JPEG")
    tok = load_tokenizer(build_hf(os.path.join(d, "tokenizer")))
    return {"dir": d, "tok": tok, "jsonl": write_jsonl(os.path.join(d, "pairs.jsonl"), PAIRS),
            "rows": rlaifv_rows(PAIRS, d)}


def dataset(env, path, **kw):
    kw = {"kind": "pairs", "max_length": 128, "image_processor": ImageProcessor(32), **kw}
    return FileDataset(path, env["tok"], **kw)


def assert_same_samples(a, b):
    assert len(a) == len(b)
    for k in range(len(a)):
        x, y = a[k], b[k]
        assert isinstance(x, PairSample) and isinstance(y, PairSample)
        assert x.sample_id == y.sample_id
        for side in ("chosen", "rejected"):
            ex, ey = getattr(x, side), getattr(y, side)
            assert ex.tokens.tolist() == ey.tokens.tolist() and ex.targets.tolist() == ey.targets.tolist()
        assert x.images.shape[0] == 1 and torch.equal(x.images, y.images)


def test_rlaifv_parquet_gives_the_samples_of_the_json_pairs(env, tmp_path):
    path = write_parquet(str(tmp_path / "rlaifv.parquet"), env["rows"])
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    ref, got = dataset(env, env["jsonl"]), dataset(env, path, image_folder=str(tmp_path / "nowhere"))
    assert_same_samples(ref, got)
    assert [got.location(k) for k in range(len(got))] == [f"{path} row {r}" for r in range(len(PAIRS))]
    assert got.lengths.tolist() == ref.lengths.tolist()
    # RLAIF-V's questions carry no placeholder: "<image>\n" goes before them, as for the JSON pairs.
    image_id = env["tok"].token_to_id("<image>")
    assert all(int((got[k].chosen.tokens == image_id).sum()) == 1 for k in range(len(got)))
    collate = Collator(image_id, env["tok"].pad_id)
    a, b = collate([ref[k] for k in range(4)]), collate([got[k] for k in range(4)])
    for side in ("chosen", "rejected"):
        for field in ("tokens", "labels", "loss_mask", "images", "image_sample_index"):
            assert torch.equal(getattr(getattr(a, side), field), getattr(getattr(b, side), field)), (side, field)

    # A directory of shards is one data set, in name order; locations name the shard and its row.
    shards = tmp_path / "shards"
    shards.mkdir()
    first = write_parquet(str(shards / "train-00000.parquet"), env["rows"][:3])
    second = write_parquet(str(shards / "train-00001.parquet"), env["rows"][3:])
    got = dataset(env, str(shards))
    assert_same_samples(ref, got)
    assert got.location(4) == f"{second} row 1" and got.location(2) == f"{first} row 2"

    # Pickled (a DataLoader worker) it reads the same.
    import pickle

    assert_same_samples(ref, pickle.loads(pickle.dumps(got)))


def test_a_broken_image_row_names_the_file_and_row(env, tmp_path):
    rows = [dict(r) for r in env["rows"]]
    rows[3] = {**rows[3], "image": {"bytes": b"\x89PNG but not really", "path": "a.png"}}
    path = write_parquet(str(tmp_path / "broken.parquet"), rows)
    ds = dataset(env, path)  # found when read: start-up reads no image
    assert isinstance(ds[2], PairSample)
    with pytest.raises(BadSampleError) as e:
        ds[3]
    assert str(e.value).startswith(f"{path} row 3 (id=3): cannot decode the image bytes of {path} row 3")
    skipped = dataset(env, path, on_bad_sample="skip")[3]
    assert isinstance(skipped, Skipped) and skipped.bad.location == f"{path} row 3"

    # No bytes and no path: found at start-up from the row groups' null counts.
    rows[3] = {**rows[3], "image": None}
    rows[1] = {**rows[1], "image": {"bytes": None, "path": None}}
    path = write_parquet(str(tmp_path / "missing.parquet"), rows)
    with pytest.raises(DataError) as e:
        dataset(env, path)
    assert f"{path} row 1: no image: " in str(e.value) and f"{path} row 3: no image: " in str(e.value)
    assert "neither bytes nor a path (id=1)" in str(e.value)
    ds = dataset(env, path, on_bad_sample="skip")
    assert len(ds) == 3 and [b.location for b in ds.report] == [f"{path} row 1", f"{path} row 3"]

    # No bytes but a path: an image file relative to the image folder (the HF Image feature's meaning).
    rows = [dict(r) for r in env["rows"]]
    rows[0] = {**rows[0], "image": {"bytes": None, "path": "a.png"}}
    rows[1] = {**rows[1], "image": {"bytes": None, "path": "gone.png"}}
    path = write_parquet(str(tmp_path / "paths.parquet"), rows)
    ds = dataset(env, path, image_folder=env["dir"], on_bad_sample="skip")
    assert [b.location for b in ds.report] == [f"{path} row 1"]
    assert f"image not found: {env['dir']}/gone.png" in str(ds.report.samples[0])
    assert_same_samples([dataset(env, env["jsonl"])[0]], [ds[0]])


def test_a_missing_column_names_the_column_and_file(env, tmp_path):
    schema = pa.schema([f for f in RLAIFV if f.name != "rejected"])
    path = write_parquet(str(tmp_path / "norejected.parquet"), [{k: v for k, v in r.items() if k != "rejected"}
                                                                 for r in env["rows"]], schema=schema)
    with pytest.raises(DataError, match=f'{path}: no column "rejected"'):
        dataset(env, path)
    with pytest.raises(DataError, match=f'{path}: no column "conversations"'):
        dataset(env, path, kind="conversations")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=f"cannot read parquet file {junk}"):
        dataset(env, str(junk))


def test_conversations_in_parquet_read_as_the_json_ones(env, tmp_path):
    turns = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "Red."}]
    jsonl = write_jsonl(str(tmp_path / "conv.jsonl"), [{"id": "c0", "image": "a.png", "conversations": turns}])
    with open(os.path.join(env["dir"], "a.png"), "rb") as f:
        row = {"id": "c0", "image": {"bytes": f.read(), "path": None}, "conversations": turns}
    schema = pa.schema([("id", pa.string()), ("image", IMAGE),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])
    path = write_parquet(str(tmp_path / "conv.parquet"), [row], schema=schema)
    ref = dataset(env, jsonl, kind="conversations", image_folder=env["dir"])[0]
    got = dataset(env, path, kind="conversations")[0]
    assert got.text.tokens.tolist() == ref.text.tokens.tolist() and torch.equal(got.images, ref.images)


def test_check_data_reads_parquet_and_lists_bad_rows_in_order(env, tmp_path, capsys):
    from megamod.cli import main

    rows = [dict(r) for r in env["rows"]]
    rows[4] = {**rows[4], "image": {"bytes": b"junk", "path": None}}
    rows[1] = {**rows[1], "image": None}
    path = write_parquet(str(tmp_path / "check.parquet"), rows)
    tokenizer = os.path.join(env["dir"], "tokenizer")
    assert main(["check-data", "--data", path, "--tokenizer", tokenizer, "--image-size", "32"]) == 1  # kind: pairs
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert [b.split(": ")[0] for b in bad] == [f"BAD {path} row 1", f"BAD {path} row 4 (id=4)"]
    assert json.loads(out.strip().splitlines()[-1]) == {"records": 5, "good": 3, "bad": 2}


def test_preprocess_data_sends_parquet_to_training(env, tmp_path, capsys):
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = write_parquet(str(tmp_path / "pre.parquet"), env["rows"])
    argv = ["--data", path, "--kind", "pairs", "--tokenizer", os.path.join(env["dir"], "tokenizer"),
            "--out", str(tmp_path / "pre")]
    assert tool.main(argv) == 1
    assert "images embedded" in capsys.readouterr().err and not os.path.exists(tmp_path / "pre.bin")


def _train(cfg: dict) -> list[dict]:
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    return Trainer(load_config(base=cfg)).train()


def test_a_preference_stage_trains_on_rlaifv_parquet(engine_setup, tmp_path):
    p = engine_setup
    data = os.path.join(p["root"], "data")
    with open(os.path.join(data, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    path = write_parquet(str(tmp_path / "rlaifv.parquet"), rlaifv_rows(pairs, data), row_group_size=5)
    runs = {}
    for name, source in (("json", os.path.join(data, "pairs.jsonl")), ("parquet", path)):
        cfg = base_recipe(p["root"], "preference", p["teacher"], str(tmp_path / name), teacher=p["teacher"],
                          schedule={"steps": 2}, data={"train": [{"path": source, "kind": "pairs"}]})
        runs[name] = _train(cfg)
    history = runs["parquet"]
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["preference"] == pytest.approx(math.log(2), abs=1e-6)  # the teacher is the reference
    assert all(math.isfinite(h["preference"]) and h["grad_norm"] > 0 for h in history)
    for a, b in zip(runs["json"], history):  # the same samples in the same order: the same run
        assert a["preference"] == pytest.approx(b["preference"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
