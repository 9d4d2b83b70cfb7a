"""The shipped recipes are valid recipes, and the SLURM script parses and prints the command it would run."""
import glob
import os
import subprocess

import pytest

from tests.helpers import REPO

# Training recipes; examples/plan/ holds model shapes for tools/plan.py (tested in test_plan.py).
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "examples", "**", "*.yaml"), recursive=True)
                 if os.path.relpath(p, os.path.join(REPO, "examples")).split(os.sep)[0] != "plan")
SBATCH = os.path.join(REPO, "examples", "slurm", "train.sbatch")


def test_there_are_recipes_for_both_sizes_and_every_student_stage():
    names = {os.path.relpath(r, os.path.join(REPO, "examples")) for r in RECIPES}
    for size in ("llava_mod_2b", "llava_mod_1b"):
        for stage in ("align", "d2d", "d2s", "preference"):
            assert f"{size}/{stage}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_loads(path):
    from megamod.training.config import load_config
    from megamod.training.stages import get_stage

    cfg = load_config(path)
    stage = get_stage(cfg.stage)
    assert os.path.basename(path).startswith(cfg.stage)
    assert (cfg.teacher is not None) == stage.teacher
    assert cfg.optim.lr == stage.lr  # the paper's learning rates are the stage defaults


def test_sbatch_parses_and_dry_run_prints_the_srun_line():
    subprocess.run(["bash", "-n", SBATCH], check=True)
    recipe = os.path.join("examples", "llava_mod_2b", "d2s.yaml")
    out = subprocess.run(["bash", SBATCH, recipe, "optim.lr=1e-5"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "8"}, check=True).stdout
    assert "world size 16 (2 nodes x 8 GPUs)" in out
    assert (f"srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 --wait=30 python -m megamod train "
            f"--config {recipe} optim.lr=1e-5") in out


# A stand-in for srun: records its arguments, then does what SRUN_MODE says. "signal" sends the batch script the
# USR1 SLURM sends before the time limit while the script waits; the script must pass it on to srun, whose tasks
# then checkpoint and exit 75 ("signal") or, past the point where they could, fail ("signal-fail").
STUB_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/srun.args"
case "$SRUN_MODE" in
  fail) exit 1 ;;
  kill) kill -9 $$ ;;
  signal) trap 'exit 75' USR1; sleep 0.5; kill -USR1 $PPID; sleep 5 >/dev/null 2>&1 & wait; exit 3 ;;
  signal-fail) trap 'echo got USR1 > "$STUB_DIR/srun.usr1"' USR1; sleep 0.5; kill -USR1 $PPID; sleep 1; exit 3 ;;
esac
"""
STUB_SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" > "$STUB_DIR/scontrol.args"
"""


def _run_sbatch(tmp_path, mode: str, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    for name, text in {"srun": STUB_SRUN, "scontrol": STUB_SCONTROL}.items():
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("GPUS_PER_NODE",
                                                                                           "TASKS_PER_NODE")}
    env = {**clean, "PATH": f"{stub}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "SRUN_MODE": mode,
           "SLURM_JOB_ID": "42", **env}
    proc = subprocess.run(["bash", SBATCH, "recipe.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, (tmp_path / "srun.args").read_text().split("\n")[:-1]


@pytest.mark.parametrize("mode, status", [("ok", 0), ("fail", 1), ("kill", 128 + 9)])
def test_sbatch_exits_with_the_status_of_the_training(tmp_path, mode, status):
    proc, _ = _run_sbatch(tmp_path, mode, SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2")
    assert proc.returncode == status, proc.stderr
    assert ("training failed" in proc.stderr) == (status != 0)


def test_sbatch_passes_the_time_limit_signal_on_and_requeues_after_the_checkpoint(tmp_path):
    """USR1 interrupts the script's wait (which then returns 138): the status must still be srun's; 75 (the tasks
    checkpointed and stopped) requeues the job, anything else fails it."""
    proc, _ = _run_sbatch(tmp_path, "signal", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "42"]
    (tmp_path / "scontrol.args").unlink()
    proc, _ = _run_sbatch(tmp_path, "signal-fail", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2")
    assert proc.returncode == 3 and "training failed" in proc.stderr, proc.stdout + proc.stderr
    assert (tmp_path / "srun.usr1").exists() and not (tmp_path / "scontrol.args").exists()


def test_sbatch_passes_gpu_flags_only_when_there_are_gpus(tmp_path):
    # A CPU partition: no GPU request anywhere (a gres flag fails where no GPU exists), the job's tasks per node.
    for env in ({}, {"GPUS_PER_NODE": "0"}):
        proc, args = _run_sbatch(tmp_path, "ok", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2", **env)
        assert proc.returncode == 0, proc.stderr
        assert args[:4] == ["--nodes", "1", "--ntasks-per-node", "2"]
        assert not any("gpu" in a or "gres" in a for a in args), args
        assert "world size 2 (1 nodes x 2 CPU tasks)" in proc.stdout
    with open(SBATCH) as f:
        assert not any(line.startswith("#SBATCH") and ("gpu" in line or "gres" in line) for line in f)
    # A job given GPUs (sbatch --gpus-per-node h100:4): one task per GPU, the GPUs passed on to srun.
    proc, args = _run_sbatch(tmp_path, "ok", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8",
                             SLURM_GPUS_PER_NODE="h100:4")
    assert proc.returncode == 0, proc.stderr
    assert args[:6] == ["--nodes", "2", "--ntasks-per-node", "4", "--gpus-per-node", "4"]
    assert args[6:] == ["--wait=30", "python", "-m", "megamod", "train", "--config", "recipe.yaml"]
    proc = subprocess.run(["bash", SBATCH, "recipe.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "GPUS_PER_NODE": "eight"})
    assert proc.returncode == 2 and "GPUS_PER_NODE" in proc.stderr
