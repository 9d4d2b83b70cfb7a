"""Resume with the distributed optimizer (`optim.distributed_optimizer`, as every recipe in examples/ has it).

One 2-rank launch: a dense (d2d) and a sparse (d2s) student trained 4 steps at DP=2 (and the sparse one at EP=2)
with checkpoints at steps 2 and 4, then each resumed from a copy of its run as a crash after step 2 left it: at the
same layout, which must end bitwise equal to the uninterrupted run (every metric, and the step-4 checkpoint:
parameters, Adam moments and steps), and the DP=2 runs at TP=2. The sparse DP=2 run once more with its checkpoints
written in the background (`checkpoint.async_save`): the same checkpoints, and resumed from them bitwise. In the pytest process, the DP=2 runs are resumed
once more at DP=1. Other layouts give the uninterrupted losses and gradient norms at rtol 1e-5.
"""
import json

import pytest
import torch

from tests.helpers import run_jobs
from tests.training_setup import base_recipe, run_as_of

STUDENTS = {"d2d": "student", "d2s": "sparse"}
# Uninterrupted 2-rank runs: name -> stage, layout. At EP=2 the expert parameters have an optimizer of their own
# (megatron chains the two), as in the d2s recipes of examples/.
UNINTERRUPTED = {"d2d": ("d2d", {}), "d2s": ("d2s", {}), "d2s-ep2": ("d2s", {"ep": 2})}
KEYS = ("loss", "kd", "ce", "aux", "grad_norm", "lr")


def _recipe(p, stage, out, async_save=False, **parallel):
    return base_recipe(p["root"], stage, p[STUDENTS[stage]], out, teacher=p["teacher"], schedule={"steps": 4},
                       checkpoint={"every": 2, "keep": None, "async_save": async_save},
                       optim={"distributed_optimizer": True}, parallel=parallel)


def _history(path):
    with open(path) as f:
        return json.load(f)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return {key: leaf for k, v in tree.items() for key, leaf in _leaves(v, f"{prefix}{k}/").items()}
    return {prefix: tree}


def _plain(directory):
    """Every tensor (parameters, Adam moments) and every saved value (param groups: lr, step ...) of a checkpoint."""
    from megatron.core import dist_checkpointing

    return _leaves(dist_checkpointing.load_plain_tensors(directory))


@pytest.fixture(scope="module")
def runs(engine_setup, tmp_path_factory):
    p, root = engine_setup, tmp_path_factory.mktemp("resume-distopt")
    jobs = [{"kind": "trainer", "recipe": _recipe(p, stage, str(root / name), **layout),
             "out": str(root / f"{name}.json")} for name, (stage, layout) in UNINTERRUPTED.items()]
    resumed = {f"{name}-same": (name, layout) for name, (_, layout) in UNINTERRUPTED.items()}
    resumed.update({f"{stage}-tp2": (stage, {"tp": 2}) for stage in STUDENTS})
    for name, (source, layout) in resumed.items():
        jobs.append({"kind": "trainer", "recipe": _recipe(p, UNINTERRUPTED[source][0], str(root / name), **layout),
                     "out": str(root / f"{name}.json"), "resume": [str(root / source), 2]})
    # checkpoints written in the background (checkpoint.async_save), and a resume from them
    jobs.append({"kind": "trainer", "recipe": _recipe(p, "d2s", str(root / "d2s-async"), async_save=True),
                 "out": str(root / "d2s-async.json")})
    jobs.append({"kind": "trainer", "recipe": _recipe(p, "d2s", str(root / "d2s-async-same"), async_save=True),
                 "out": str(root / "d2s-async-same.json"), "resume": [str(root / "d2s-async"), 2]})
    run_jobs(2, jobs, str(root))
    return root


@pytest.mark.parametrize("name", UNINTERRUPTED)
def test_resume_at_the_same_layout_is_bitwise_equal(runs, name):
    straight, resumed = _history(runs / f"{name}.json"), _history(runs / f"{name}-same.json")
    assert [h["step"] for h in resumed] == [3, 4]
    for h, r in zip(resumed, straight[2:]):
        assert {k: h.get(k) for k in KEYS} == {k: r.get(k) for k in KEYS}, h["step"]
    expected = _plain(str(runs / name / "checkpoints" / "step_0000004"))
    found = _plain(str(runs / f"{name}-same" / "checkpoints" / "step_0000004"))
    assert found.keys() == expected.keys()
    assert any("optimizer.state.exp_avg_sq." in k for k in expected)  # Adam's moments are compared
    for k, v in expected.items():
        assert torch.equal(found[k], v) if isinstance(v, torch.Tensor) else found[k] == v, k


@pytest.mark.parametrize("stage", STUDENTS)
def test_resume_at_another_layout_gives_the_same_losses(engine_setup, runs, stage):
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    dp1 = run_as_of(str(runs / stage), str(runs / f"{stage}-dp1"), 2)
    histories = {"tp2": _history(runs / f"{stage}-tp2.json"),
                 "dp1": Trainer(load_config(base=_recipe(engine_setup, stage, dp1))).train()}
    straight = _history(runs / f"{stage}.json")[2:]
    for name, history in histories.items():
        assert [h["step"] for h in history] == [3, 4], name
        for h, r in zip(history, straight):
            for k in KEYS:
                if k in r:
                    assert h[k] == pytest.approx(r[k], rel=1e-5), (name, h["step"], k, h[k], r[k])


def test_background_checkpoints_equal_synchronous_ones_and_resume_bitwise(runs):
    def losses(name):
        return [{k: h.get(k) for k in KEYS} for h in _history(runs / f"{name}.json")]

    assert losses("d2s-async") == losses("d2s")
    for step in (2, 4):
        name = f"step_{step:07d}"
        expected = _plain(str(runs / "d2s" / "checkpoints" / name))
        for run in ("d2s-async", "d2s-async-same") if step == 4 else ("d2s-async",):
            found = _plain(str(runs / run / "checkpoints" / name))
            assert found.keys() == expected.keys(), run
            for k, v in expected.items():
                assert torch.equal(found[k], v) if isinstance(v, torch.Tensor) else found[k] == v, (run, k)
    assert losses("d2s-async-same") == losses("d2s")[2:]
