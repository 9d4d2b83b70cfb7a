"""The demo pipeline at the tiny preset, end to end (`python -m megamod demo --preset tiny`), and its parts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from megamod.demo.pipeline import compare_predictions
from megamod.demo.report import read_metrics
from megamod.demo.stages_table import MODELS, ORDER, TRAINING
from tests.helpers import REPO

PREVIOUS = {"teacher_align": "init/teacher", "teacher_single": "teacher_align/model",
            "teacher_sft": "teacher_single/model", "student_align": "prune/model", "d2d": "student_align/model",
            "d2s": "upcycle/model", "preference": "d2s/model"}


def _run_demo(out, log):
    with open(log, "w") as f:  # a file, not a pipe: the children write a lot
        return subprocess.run([sys.executable, "-m", "megamod", "demo", "--preset", "tiny", "--out", str(out)],
                              cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    rc = _run_demo(root / "run", root / "first.log")
    assert rc == 0, open(root / "first.log").read()[-4000:]
    return root


def test_stages_ran_in_order_and_chain(demo_run):
    run = demo_run / "run"
    state = json.loads((run / "state.json").read_text())
    assert list(state["stages"]) == list(ORDER)
    for name, (stage, _, _) in TRAINING.items():
        recipe = yaml.safe_load((run / "recipes" / f"{name}.yaml").read_text())
        assert recipe["stage"] == stage
        assert recipe["student"] == str(run / PREVIOUS[name])  # each stage starts from the previous one's output
        if stage in ("d2d", "d2s", "preference"):
            assert recipe["teacher"] == str(run / "teacher_sft" / "model")
        meta = json.loads((run / name / "model" / "megamod.json").read_text())
        assert meta["source"]["trained"] == stage and meta["source"]["from"] == recipe["student"]
        assert meta["trained_steps"] == recipe["schedule"]["steps"]
        rows = read_metrics(str(run / name / "metrics.jsonl"))
        assert [r["step"] for r in rows] == list(range(1, recipe["schedule"]["steps"] + 1))
        assert all(np.isfinite(r["loss"]) for r in rows)
    assert yaml.safe_load((run / "recipes" / "d2d.yaml").read_text())["parallel"]["tp"] == 2
    single = yaml.safe_load((run / "recipes" / "teacher_single.yaml").read_text())["data"]["train"]
    assert [os.path.basename(s["path"]) for s in single] == ["conversations_single.json"]  # the curriculum
    assert yaml.safe_load((run / "recipes" / "d2s.yaml").read_text())["parallel"]["ep"] == 2
    experts = {n: json.loads((run / n / "model" / "megamod.json").read_text())["model"]["language"]["num_experts"]
               for n in ("d2d", "upcycle", "d2s", "preference")}
    assert experts == {"d2d": None, "upcycle": 4, "d2s": 4, "preference": 4}
    # the teacher starts from the pre-trained vision tower (the paper's CLIP); the student is the trained teacher
    # with narrower MLPs, so it shares that tower
    assert json.loads((run / "init" / "teacher" / "megamod.json").read_text())["source"]["vision"] == \
        str(run / "vision" / "tower.pt")
    pruned = json.loads((run / "prune" / "model" / "megamod.json").read_text())
    assert pruned["source"]["pruned_from"] == str(run / "teacher_sft" / "model")
    teacher = json.loads((run / "teacher_sft" / "model" / "megamod.json").read_text())["model"]["language"]
    assert pruned["model"]["language"] == {**teacher, "ffn_hidden_size": 32}


def test_report_and_export(demo_run):
    run = demo_run / "run"
    report = (run / "report.md").read_text()
    for model in MODELS:
        assert f"| {model} |" in report
    assert "HF export of the final student" in report and "## Checks" in report
    assert any(line.endswith(" of 9 checks pass.") or " of 9 checks pass; " in line for line in report.splitlines())
    for name in ["scores", "preference_rewards", "kd", *TRAINING]:  # test_demo_report.py tests what they show
        assert f"plots/{name}.png" in report
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert set(scores) == set(MODELS)
    export = json.loads((run / "export" / "scores.json").read_text())
    for split in ("pope_random", "pope_adversarial", "mcq"):
        assert export[split]["reproduced"] and export[split]["max_score_diff"] <= 1e-4
        assert export[split]["accuracy"] == scores["sparse student (preference)"][split]["accuracy"]
    assert (run / "export" / "hf" / "config.json").exists()


def test_rerun_resumes(demo_run):
    run = demo_run / "run"
    before = (run / "state.json").read_text()
    assert _run_demo(run, demo_run / "second.log") == 0
    log = (demo_run / "second.log").read_text()
    assert log.count("skipped") == len(ORDER)
    assert (run / "state.json").read_text() == before


def test_compare_predictions():
    ours = [{"scores": [1.0, 0.0], "pred": "yes"}, {"scores": [0.5, 0.5 + 1e-7], "pred": "no"}]
    near_tie = [{"scores": [1.0, 1e-6], "pred": "yes"}, {"scores": [0.5 + 2e-7, 0.5], "pred": "yes"}]
    assert compare_predictions(ours, near_tie)["reproduced"]  # only a near-tie flipped
    flipped = [{"scores": [1.0, 0.0], "pred": "no"}, ours[1]]
    assert compare_predictions(ours, flipped)["confident_flips"] == 1
    far = [{"scores": [1.01, 0.0], "pred": "yes"}, ours[1]]
    assert not compare_predictions(ours, far)["reproduced"] and compare_predictions(ours, far)["items_over_tol"] == 1


def test_read_metrics_keeps_last_of_repeated_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                                           {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]))
    assert [r["loss"] for r in read_metrics(str(path))] == [3.0, 1.5, 1.0]
    path.write_text('{"step": 1, "loss": 3.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(str(path))


def test_cell_labels():
    from megamod.demo.vision_pretrain import cell_labels

    colors, shapes = cell_labels([{"row": 0, "col": 2, "color": "blue", "shape": "circle"},
                                  {"row": 2, "col": 0, "color": "red", "shape": "cross"}])
    assert colors.tolist() == [0, 0, 3, 0, 0, 0, 1, 0, 0]  # 1 + index in COLORS (red, green, blue, ...)
    assert shapes.tolist() == [0, 0, 1, 0, 0, 0, 5, 0, 0]  # 1 + index in SHAPES (circle, ..., cross)


def test_demo_refuses_other_preset(tmp_path):
    from megamod.demo.pipeline import Demo
    from megamod.demo.presets import FULL, TINY

    Demo(str(tmp_path), TINY)._finish("data", 1.0)
    with pytest.raises(ValueError, match="preset 'tiny'"):
        Demo(str(tmp_path), FULL)

