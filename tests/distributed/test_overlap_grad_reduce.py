"""performance.overlap_grad_reduce at DP=2 (gloo, forced on CPU): megatron's DDP reduce-scatters gradient buckets
during the backward; the training gives the same losses and gradient norms as the reduction after the backward."""
import json

import pytest

from tests.helpers import run_jobs
from tests.training_setup import base_recipe

KEYS = ("loss", "kd", "ce", "aux", "grad_norm")


def test_overlapped_gradient_reduction_trains_the_same(engine_setup, tmp_path):
    p = engine_setup
    jobs = []
    for overlap in (False, True):
        name = f"overlap-{overlap}"
        recipe = base_recipe(p["root"], "d2s", p["sparse"], str(tmp_path / name), teacher=p["teacher"],
                             schedule={"steps": 3}, optim={"distributed_optimizer": True},
                             performance={"overlap_grad_reduce": overlap})
        jobs.append({"kind": "trainer", "recipe": recipe, "out": str(tmp_path / f"{name}.json"),
                     "ddp_out": str(tmp_path / f"{name}-ddp.json")})
    run_jobs(2, jobs, str(tmp_path))
    for overlap in (False, True):
        with open(tmp_path / f"overlap-{overlap}-ddp.json") as f:
            assert json.load(f)["overlap_grad_reduce"] is overlap  # the run's DDP was configured so
    histories = {}
    for overlap in (False, True):
        with open(tmp_path / f"overlap-{overlap}.json") as f:
            histories[overlap] = json.load(f)
    assert [h["step"] for h in histories[True]] == [1, 2, 3]
    for a, b in zip(histories[True], histories[False]):
        for k in KEYS:
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-6), (a["step"], k)
