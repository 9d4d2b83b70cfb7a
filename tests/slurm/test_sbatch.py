"""examples/slurm/train.sbatch on a real one-node SLURM: a 2-task d2d with the distributed optimizer, as a user
submits it. (a) a clean run completes; (b) a failing recipe is a FAILED job and `sbatch --wait` says so; (c) USR1
to the batch script (SLURM's warning before the time limit) checkpoints the step it interrupted, the job requeues
itself and the requeued run ends bitwise where (a) ends; (d) a task killed with SIGKILL fails the job within a
minute. No process of a job may outlive it."""
import json
import os
import signal
import sys
import time

import pytest
import torch

from tests.helpers import REPO
from tests.slurm.cluster import job_processes
from tests.training_setup import base_recipe, recipe

SBATCH = os.path.join(REPO, "examples", "slurm", "train.sbatch")
STEPS = 40  # enough that the signal, sent after step 2, arrives before the end


def _recipe(p, tmp_path, name, teacher=None, steps=STEPS):
    cfg = base_recipe(p["root"], "d2d", p["student"], str(tmp_path / name), teacher=teacher or p["teacher"],
                      schedule={"steps": steps}, optim={"distributed_optimizer": True},
                      checkpoint={"every": 0, "keep": None})
    return recipe(str(tmp_path / f"{name}.yaml"), **cfg)


def _submit(slurm, tmp_path, recipe_path, *args) -> tuple[str, str]:
    """Submits train.sbatch as a user would on a CPU partition; returns (job id, sbatch's output)."""
    env = {"PYTHON": sys.executable, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}  # 2 tasks on 2 cores
    proc = slurm.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                      "--open-mode=append", f"--output={tmp_path}/job-%j.out", f"--chdir={tmp_path}", *args,
                      SBATCH, recipe_path], env=env, check=False, timeout=300)
    job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
    assert job_id.isdigit(), proc.stdout + proc.stderr
    return job_id, proc


def _log(tmp_path, job_id) -> str:
    with open(tmp_path / f"job-{job_id}.out", errors="replace") as f:
        return f.read()


def _steps(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _wait_for_step(run_dir, step, slurm, job_id, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and any(m["step"] >= step for m in _steps(run_dir)):
            return
        assert slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job_id)
        time.sleep(0.1)
    raise AssertionError(f"step {step} not logged in {timeout_s}s")


def _assert_nothing_left(job_id):
    deadline = time.monotonic() + 10
    while (left := job_processes(job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of job {job_id} outlived it: {left}"


@pytest.fixture(scope="module")
def clean_run(slurm, engine_setup, tmp_path_factory):
    """(a): the uninterrupted run that (c) must end equal to."""
    tmp_path = tmp_path_factory.mktemp("slurm-clean")
    job_id, proc = _submit(slurm, tmp_path, _recipe(engine_setup, tmp_path, "run"), "--wait")
    return tmp_path, job_id, proc


def test_a_clean_run_completes(slurm, clean_run):
    tmp_path, job_id, proc = clean_run
    info = slurm.job(job_id)
    assert proc.returncode == 0 and (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
        _log(tmp_path, job_id)[-3000:]
    assert [m["step"] for m in _steps(tmp_path / "run")] == list(range(1, STEPS + 1))
    assert os.path.exists(tmp_path / "run" / "model" / "megamod.json")
    _assert_nothing_left(job_id)


def test_a_failing_recipe_is_a_failed_job(slurm, engine_setup, tmp_path):
    path = _recipe(engine_setup, tmp_path, "run", teacher=str(tmp_path / "no-such-teacher"))
    job_id, proc = _submit(slurm, tmp_path, path, "--wait")
    info = slurm.job(job_id)
    assert proc.returncode != 0 and info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert "no-such-teacher" in _log(tmp_path, job_id) and "training failed" in _log(tmp_path, job_id)
    _assert_nothing_left(job_id)


def test_the_time_limit_signal_checkpoints_requeues_and_resumes_bitwise(slurm, engine_setup, clean_run, tmp_path):
    from megatron.core import dist_checkpointing

    job_id, _ = _submit(slurm, tmp_path, _recipe(engine_setup, tmp_path, "run"))
    _wait_for_step(str(tmp_path / "run"), 2, slurm, job_id)
    slurm.run(["scancel", "--signal=USR1", "--batch", job_id])  # what --signal=B:USR1@600 sends
    info = slurm.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout_s=400)
    log = _log(tmp_path, job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    assert "requeueing job" in log and "resumed from" in log
    # The checkpoint was of the step the signal interrupted: the requeued run went on with the next one.
    steps = [m["step"] for m in _steps(tmp_path / "run")]
    assert steps == list(range(1, STEPS + 1)), steps
    stopped = int(log.split("after step ")[1].split()[0])
    assert 2 <= stopped < STEPS and f"step_{stopped:07d}" in os.listdir(tmp_path / "run" / "checkpoints")
    reference = clean_run[0] / "run"
    for a, b in zip(_steps(tmp_path / "run"), _steps(reference)):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    expected = dist_checkpointing.load_plain_tensors(str(reference / "model"))
    found = dist_checkpointing.load_plain_tensors(str(tmp_path / "run" / "model"))
    assert expected.keys() == found.keys()
    for k in expected:
        assert torch.equal(expected[k], found[k]), k
    _assert_nothing_left(job_id)


def test_a_killed_task_fails_the_job_within_a_minute(slurm, engine_setup, tmp_path):
    job_id, _ = _submit(slurm, tmp_path, _recipe(engine_setup, tmp_path, "run", steps=1000))
    _wait_for_step(str(tmp_path / "run"), 2, slurm, job_id)
    task = [pid for pid, p in job_processes(job_id).items() if p["procid"] == "1" and "megamod train" in p["cmdline"]]
    assert len(task) == 1, job_processes(job_id)
    os.kill(task[0], signal.SIGKILL)
    killed = time.monotonic()
    info = slurm.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout_s=120)
    assert time.monotonic() - killed < 60 and info["JobState"] == "FAILED", (time.monotonic() - killed, info)
    assert "training failed" in _log(tmp_path, job_id)
    _assert_nothing_left(job_id)
