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
    assert (f"srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 --kill-on-bad-exit=1 python -m megamod train "
            f"--config {recipe} optim.lr=1e-5") in out
