"""Faults under torchrun (2 ranks, d2d, distributed optimizer): a signal to one rank, a rank killed while it writes a
checkpoint, a rank that hangs, an output directory nobody can write. Each run must end, non-zero, within a bounded
time, and no process of it (workers, megatron's checkpoint writers) may outlive it."""
import json
import os
import re
import signal
import sys
import time

import pytest

from megamod.distributed import free_port
from tests.faults import FAULT_ENV, rank_pid, run_watched, wait_for_step
from tests.helpers import REPO
from tests.training_setup import base_recipe, recipe


def _launch(p, tmp_path, during=None, fault=None, torchrun_args=(), **sections):
    cfg = base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "run"), teacher=p["teacher"],
                      optim={"distributed_optimizer": True}, **sections)
    path = recipe(str(tmp_path / "d2d.yaml"), **cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           *torchrun_args, os.path.join(REPO, "tests", "faults.py"), "train", "--config", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "PYTHONFAULTHANDLER": "1"}
    if fault:
        env[FAULT_ENV] = json.dumps(fault)
    rc, out, survivors = run_watched(cmd, env, str(tmp_path / "torchrun.log"), timeout_s=300, cwd=REPO,
                                     during=during)
    assert not survivors, f"processes outlived the run: {survivors}\n{out[-4000:]}"
    return rc, out


def _steps(tmp_path) -> list[int]:
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f]


def test_sigterm_to_one_rank_stops_every_rank_at_a_checkpoint(engine_setup, tmp_path):
    from megamod.training import checkpoint

    def sigterm_rank1(proc):
        wait_for_step(str(tmp_path / "run" / "metrics.jsonl"), 2, proc)
        os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)

    rc, out = _launch(engine_setup, tmp_path, during=sigterm_rank1, schedule={"steps": 40})
    assert rc != 0, out[-3000:]
    # both ranks stopped with status 75 (torchrun itself reports a failure), none was killed or failed
    assert out.count("exitcode  : 75") == 2 and "exitcode  : -" not in out and "exitcode  : 1 " not in out, \
        out[-3000:]
    stopped = _steps(tmp_path)[-1]  # rank 0 got no signal: it stopped because rank 1 had one
    assert 2 <= stopped < 40 and f"stopped on a signal to another rank after step {stopped} of 40" in out
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", f"step_{stopped:07d}"]  # the step it stopped at: nothing lost
    assert checkpoint.verify(str(root / f"step_{stopped:07d}")) is None


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "background"])
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(engine_setup, tmp_path, async_save):
    from megamod.training import checkpoint

    start = time.monotonic()
    # rank 0: at DP=2 the other rank holds no main replica and writes nothing
    rc, out = _launch(engine_setup, tmp_path, fault={"kill": "during_write", "step": 2, "rank": 0},
                      schedule={"steps": 4}, checkpoint={"every": 1, "async_save": async_save})
    assert rc != 0, out[-3000:]
    # written in the background, the files of step 2 are still being written while step 3 may run
    failed_after = "(2|3)" if async_save else "2"
    # rank 1 ends either on its own, its collective failing against the dead peer, or by torchrun's SIGTERM when
    # the agent notices rank 0's death first (a race that a loaded machine tips either way); never still running
    rank1_failed = re.search(f"rank 1: training failed after step {failed_after} of 4", out)
    rank1_stopped = re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -15", out)
    assert "exitcode  : -9" in out and (rank1_failed or rank1_stopped), out[-3000:]
    root = str(tmp_path / "run" / "checkpoints")
    assert checkpoint.find_resume(root).endswith("step_0000001")
    assert os.path.exists(os.path.join(root, ".tmp-step_0000002"))  # the interrupted write, never renamed
    assert time.monotonic() - start < 120


def test_a_hung_rank_ends_the_run_within_the_timeout(engine_setup, tmp_path):
    times = {}

    def stop_rank1(proc):
        wait_for_step(str(tmp_path / "run" / "metrics.jsonl"), 2, proc)
        rank0 = rank_pid(proc.pid, 0)
        os.kill(rank_pid(proc.pid, 1), signal.SIGSTOP)
        times["hung"] = time.monotonic()
        while os.path.exists(f"/proc/{rank0}") and proc.poll() is None:
            time.sleep(0.1)
        times["rank0"] = time.monotonic()

    rc, out = _launch(engine_setup, tmp_path, during=stop_rank1, schedule={"steps": 1000},
                      parallel={"timeout_s": 10})
    assert rc != 0, out[-3000:]
    assert "rank 0: training failed after step" in out and "parallel.timeout_s=10 s" in out, out[-3000:]
    assert 10 <= times["rank0"] - times["hung"] < 10 + 15, times  # the timeout, then the exit
    # torchrun SIGKILLs the hung rank 30 s after it asked it to end (its SIGTERM waits while the rank is stopped)
    assert time.monotonic() - times["hung"] < 10 + 15 + 30 + 15


def test_an_unwritable_output_directory_fails_every_rank_before_training(engine_setup, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoints folder should be")
    start = time.monotonic()
    rc, out = _launch(engine_setup, tmp_path, schedule={"steps": 4})
    assert rc != 0
    assert out.count(f"out: cannot write the run's checkpoints to {tmp_path / 'run' / 'checkpoints'}") >= 2, \
        out[-3000:]  # both ranks say so
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert time.monotonic() - start < 90


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the run's processes")
