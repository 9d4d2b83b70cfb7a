"""`torchrun --nproc-per-node 2 -m megamod cache-teacher --tp 2`, the command docs/TEACHER_CACHE.md gives, writes
the cache one process writes at TP=1: the same samples in the same rows, the same top-k ids and answer tokens,
log-probs and tail masses within 1e-5 (the teacher's logits differ by the TP=2 all-reduce order only)."""
import json
import os

import torch

from tests.helpers import torchrun

TOPK = 8
SETTINGS = ["--topk", str(TOPK), "--dtype", "float32", "--max-length", "256", "--batch-size", "3",
            "--shard-size", "10", "--no-progress"]


def test_tp2_cache_equals_tp1(engine_setup, tmp_path):
    from megamod.cli import main
    from megamod.teacher_cache.reader import TeacherCache

    p = engine_setup
    argv = ["cache-teacher", "--ckpt", p["teacher"], "--data", os.path.join(p["data"], "conversations.json")]
    tp1, tp2 = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    assert main([*argv, "--out", tp1, *SETTINGS]) == 0
    torchrun(2, ["-m", "megamod", *argv, "--out", tp2, "--tp", "2", *SETTINGS])
    m1, m2 = (json.load(open(os.path.join(d, "manifest.json"))) for d in (tp1, tp2))
    assert {k: v for k, v in m2.items() if k != "shards"} == {k: v for k, v in m1.items() if k != "shards"}
    assert [s["samples"] for s in m2["shards"]] == [s["samples"] for s in m1["shards"]]
    c1, c2 = TeacherCache(tp1), TeacherCache(tp2)
    worst = {"logprobs": 0.0, "log_tail": 0.0}
    rows = 0
    for sid in m1["samples"]:
        ids1_NK, logprobs1_NK, log_tail1_N, labels1_N = c1.rows(sid)
        ids2_NK, logprobs2_NK, log_tail2_N, labels2_N = c2.rows(sid)
        assert torch.equal(labels2_N, labels1_N), sid
        assert torch.equal(ids2_NK, ids1_NK), sid
        worst["logprobs"] = max(worst["logprobs"], (logprobs2_NK - logprobs1_NK).abs().max().item())
        worst["log_tail"] = max(worst["log_tail"], (log_tail2_N - log_tail1_N).abs().max().item())
        rows += ids1_NK.shape[0]
    print(f"\ncache-teacher TP=2 vs TP=1, {rows} answer positions: max |diff| log-probs {worst['logprobs']:.3g}, "
          f"log tail {worst['log_tail']:.3g}")
    assert rows > len(m1["samples"])
    assert worst["logprobs"] <= 1e-5 and worst["log_tail"] <= 1e-5
    # and the teacher did run split: a run that dropped --tp would be DP=2, bitwise equal to TP=1
    assert worst["logprobs"] > 0
