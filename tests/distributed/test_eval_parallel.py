"""`megamod eval` at TP=2, PP=2, EP=2 (two ranks) against one process: yes/no scores and greedy generations.

Dense checkpoints at TP=2 and PP=2, the sparse one at EP=2 (its experts split over the ranks, the rows over the two
data-parallel replicas). Caption generation at EP=2 also checks that replicas with different stopping points keep
stepping together.
"""
import json
import os

import pytest

from tests.helpers import run_jobs

LIMIT = 5


def _single(ckpt, task, data):
    from megamod import distributed
    from megamod.eval.scoring import evaluate

    distributed.initialize(distributed.ParallelConfig())
    result = evaluate(ckpt, task, data, limit=LIMIT, batch_size=3, max_new_tokens=8, dtype="float32")
    distributed.shutdown()
    return result


def test_eval_layouts_match_one_process(engine_setup, tmp_path):
    p = engine_setup
    files = {"pope": os.path.join(p["data"], "eval", "pope_random.jsonl"),
             "caption": os.path.join(p["data"], "eval", "captions.jsonl")}
    cases = {"tp2": ("teacher", {"tp": 2}), "pp2": ("teacher", {"pp": 2}), "ep2": ("sparse", {"ep": 2})}
    jobs = [{"kind": "eval", "layout": layout, "ckpt": p[name], "task": task, "data": files[task], "limit": LIMIT,
             "out": str(tmp_path / f"{case}-{task}.json")}
            for case, (name, layout) in cases.items() for task in files]
    run_jobs(2, jobs, str(tmp_path))
    for case, (name, _) in cases.items():
        for task, data in files.items():
            ref = _single(p[name], task, data)
            with open(tmp_path / f"{case}-{task}.json") as f:
                got = json.load(f)
            if task == "pope":
                assert [x["pred"] for x in got["predictions"]] == [x["pred"] for x in ref["predictions"]], case
                for g, r in zip(got["predictions"], ref["predictions"]):
                    assert g["scores"] == pytest.approx(r["scores"], abs=1e-4), case
            else:
                assert [x["text"] for x in got["predictions"]] == [x["text"] for x in ref["predictions"]], case
                assert got["token_f1"] == pytest.approx(ref["token_f1"])
