"""`megamod cache-teacher` as a user runs it (megamod.cli.main, in-process) on the tiny teacher: every argument
reaches the cache (non-default values, seen in the manifest), and the cache is the one write_cache writes directly
with those settings, row for row; a bad --topk is a clear error that writes nothing."""
import json
import os

import pytest
import torch

from megamod.cli import main

COMMON = ["--max-length", "256", "--batch-size", "3", "--shard-size", "10", "--no-progress"]


def _direct(p, data, out, **settings):
    from megamod import distributed
    from megamod.teacher_cache.writer import CacheJob, write_cache
    from megamod.training.config import DataSource

    distributed.initialize(distributed.ParallelConfig())
    return write_cache(CacheJob(ckpt=p["teacher"], data=[DataSource(data)], out=out, max_length=256, batch_size=3,
                                shard_size=10, progress=False, **settings))


def _same_rows(a: str, b: str) -> int:
    """Every sample's rows of cache a equal those of cache b exactly; returns the number of rows compared."""
    from megamod.teacher_cache.reader import TeacherCache

    ca, cb = TeacherCache(a), TeacherCache(b)
    assert set(ca.manifest["samples"]) == set(cb.manifest["samples"])
    rows = 0
    for sid in ca.manifest["samples"]:
        got, want = ca.rows(sid), cb.rows(sid)
        assert len(got) == len(want)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and torch.equal(x, y), sid
        rows += got[0].shape[0]
    return rows


def _manifest(out: str) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def test_conversations_from_the_command_line(engine_setup, tmp_path):
    p = engine_setup
    data = os.path.join(p["data"], "conversations.json")
    out = str(tmp_path / "cli")
    argv = ["cache-teacher", "--ckpt", p["teacher"], "--data", data, "--out", out, *COMMON]
    # --topk beyond the vocabulary: refused before anything is written, so the corrected command can use --out
    with pytest.raises(ValueError, match=r"--topk 100000 must be in \[1, vocabulary size \d+\]"):
        main([*argv, "--topk", "100000"])
    assert not os.path.exists(out)
    assert main([*argv, "--topk", "8", "--dtype", "float32"]) == 0
    manifest = _manifest(out)
    records = json.load(open(data))
    assert (manifest["kind"], manifest["topk"], manifest["dtype"], manifest["max_length"]) == (
        "conversations", 8, "float32", 256)
    assert manifest["data"] == [{"path": os.path.abspath(data), "template": "llava_mod"}]
    assert manifest["num_samples"] == len(records) and set(manifest["samples"]) == {str(r["id"]) for r in records}
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, len(records) - 20]
    direct = _direct(p, data, str(tmp_path / "direct"), topk=8, dtype="float32")
    assert manifest == direct  # same settings, same shards, same sha256 of every shard
    assert _same_rows(out, str(tmp_path / "direct")) > len(records)  # several answer tokens per sample


def test_pairs_from_the_command_line(engine_setup, tmp_path):
    p = engine_setup
    data = os.path.join(p["data"], "pairs.jsonl")
    out = str(tmp_path / "cli")
    assert main(["cache-teacher", "--ckpt", p["teacher"], "--data", data, "--out", out, "--kind", "pairs",
                 *COMMON]) == 0
    manifest = _manifest(out)
    pairs = [json.loads(line) for line in open(data) if line.strip()]
    assert (manifest["kind"], manifest["topk"], manifest["num_samples"]) == ("pairs", None, len(pairs))
    assert manifest == _direct(p, data, str(tmp_path / "direct"), kind="pairs")
    assert _same_rows(out, str(tmp_path / "direct")) == len(pairs)  # one row per pair
    from megamod.teacher_cache.reader import TeacherCache

    reference_12, _ = TeacherCache(out).rows(next(iter(manifest["samples"])))
    assert reference_12.shape == (1, 2) and torch.all(reference_12 < 0)  # two sequence log-probs
