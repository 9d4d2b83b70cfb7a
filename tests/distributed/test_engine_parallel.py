"""The distillation engine at TP=2, PP=2, EP=2, TP=2 x EP=2 and DP=2 (distributed optimizer) against one process.

Two launches (2 and 4 ranks) run every layout; the references run in the pytest process. Losses (total, KD, CE,
MoE aux) and gradient norms of every step must agree at rtol 1e-5. A run resumed at TP=2 from a single-process
checkpoint continues with the single-process losses.
"""
import json
import os
import shutil

import pytest

from tests.helpers import run_jobs
from tests.training_setup import base_recipe

KEYS = ("loss", "kd", "ce", "aux", "grad_norm")
STEPS = 4


def _d2s(p, out, **extra):
    return base_recipe(p["root"], "d2s", p["sparse"], out, teacher=p["teacher"], schedule={"steps": STEPS}, **extra)


def _reference(recipe):
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    return Trainer(load_config(base=recipe)).train()


def _assert_same(history, reference, keys=KEYS):
    assert [h["step"] for h in history] == [r["step"] for r in reference]
    for h, r in zip(history, reference):
        for k in keys:
            if k in r:
                assert h[k] == pytest.approx(r[k], rel=1e-5), (h["step"], k, h[k], r[k])


@pytest.fixture(scope="module")
def references(engine_setup, tmp_path_factory):
    p, root = engine_setup, tmp_path_factory.mktemp("engine-ref")
    d2s = _reference(_d2s(p, str(root / "d2s"), checkpoint={"every": 2, "keep": None}))
    d2d = _reference(base_recipe(p["root"], "d2d", p["student"], str(root / "d2d"), teacher=p["teacher"],
                                 schedule={"steps": 2}))
    # A copy of the single-process run as it was after step 2, to be resumed at TP=2.
    resume = root / "resume"
    shutil.copytree(root / "d2s", resume)
    shutil.rmtree(resume / "checkpoints" / "step_0000004")
    shutil.rmtree(resume / "model")
    with open(resume / "checkpoints" / "latest", "w") as f:
        f.write("step_0000002\n")
    return {"d2s": d2s, "d2d": d2d, "resume_dir": str(resume)}


def test_two_rank_layouts_match_one_process(engine_setup, references, tmp_path):
    p = engine_setup
    jobs, expected = [], {}
    for name, layout in {"tp2": {"tp": 2}, "pp2": {"pp": 2}, "ep2": {"ep": 2}}.items():
        jobs.append({"kind": "trainer", "recipe": _d2s(p, str(tmp_path / name), parallel=layout),
                     "out": str(tmp_path / f"{name}.json")})
        expected[name] = references["d2s"]
    jobs.append({"kind": "trainer", "out": str(tmp_path / "resume_tp2.json"),
                 "recipe": _d2s(p, references["resume_dir"], parallel={"tp": 2})})
    expected["resume_tp2"] = references["d2s"][2:]
    jobs.append({"kind": "trainer", "out": str(tmp_path / "dp2_distopt.json"),
                 "recipe": base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "dp2"), teacher=p["teacher"],
                                       schedule={"steps": 2}, optim={"distributed_optimizer": True})})
    expected["dp2_distopt"] = references["d2d"]
    run_jobs(2, jobs, str(tmp_path))
    for name, reference in expected.items():
        with open(tmp_path / f"{name}.json") as f:
            _assert_same(json.load(f), reference)
    assert os.path.exists(tmp_path / "pp2" / "model" / "megamod.json")


def test_tp2_x_ep2_matches_one_process(engine_setup, references, tmp_path):
    job = {"kind": "trainer", "recipe": _d2s(engine_setup, str(tmp_path / "run"), parallel={"tp": 2, "ep": 2}),
           "out": str(tmp_path / "tp2ep2.json")}
    run_jobs(4, [job], str(tmp_path))
    with open(tmp_path / "tp2ep2.json") as f:
        _assert_same(json.load(f), references["d2s"])
