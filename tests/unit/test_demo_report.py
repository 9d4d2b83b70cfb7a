"""The demo report without a demo run: its checks on made-up scores (each claim passes on scores that hold it and fails
on scores that break it), its charts, and the whole report.md from a made-up run directory."""
from __future__ import annotations

import ast
import copy
import json
import os
from types import SimpleNamespace

import pytest

from megamod.demo import charts, report
from megamod.demo.stages_table import FINAL, MODELS, TRAINING
from tests.helpers import REPO

SPLITS = ("pope_random", "pope_adversarial", "mcq")
PNG = b"\x89PNG\r\n\x1a\n"


def _pope(accuracy, hallucination):
    return {"task": "pope", "count": 100, "accuracy": accuracy, "f1": accuracy, "yes_ratio": 0.5,
            "hallucination": hallucination}


def _model(pope_random, pope_adversarial, mcq):
    return {"pope_random": _pope(*pope_random), "pope_adversarial": _pope(*pope_adversarial),
            "mcq": {"task": "mcq", "count": 100, "accuracy": mcq}}


def _passing():
    """Scores on which every claim holds: the teacher 20+ points over chance, the students within 10 of it, and
    preference lowering hallucination below the d2s student's and the teacher's at no cost in accuracy."""
    scores = {"teacher": _model((0.80, 0.35), (0.72, 0.54), 0.41),
              "student (aligned)": _model((0.76, 0.37), (0.69, 0.52), 0.38),
              "dense student (d2d)": _model((0.79, 0.38), (0.71, 0.55), 0.40),
              "sparse student (d2s)": _model((0.78, 0.38), (0.70, 0.56), 0.40),
              FINAL: _model((0.79, 0.33), (0.71, 0.50), 0.40)}
    export = {s: {**scores[FINAL][s], "max_score_diff": 9e-6, "tol": 1e-3, "items_over_tol": 0, "confident_flips": 0,
                  "reproduced": True} for s in SPLITS}
    return scores, export


def _failed(scores, export):
    return [text for ok, text in report.checks(scores, export) if not ok]


def test_checks_pass_on_scores_that_hold_every_claim():
    scores, export = _passing()
    results = report.checks(scores, export)
    assert len(results) == 9 and all(ok for ok, _ in results), [t for ok, t in results if not ok]
    lines = report.checks_section(scores, export)
    assert "9 of 9 checks pass." in lines and not any("FAILED" in line for line in lines)
    assert sum(line.startswith("- [x] ") for line in lines) == 9
    assert "largest answer-logit difference 9.0e-06 (0 items over 0.001), accuracy identical" in results[-1][1]


def _break(path, value):
    def apply(scores, export):
        target = {"scores": scores, "export": export}[path[0]]
        for key in path[1:-1]:
            target = target[key]
        target[path[-1]] = value
    return apply


# (how the scores are broken, the start of each check that must then fail: no other may)
BROKEN = {
    "teacher at chance on mcq": (_break(("scores", "teacher", "mcq", "accuracy"), 0.34),
                                 ["teacher beats chance on mcq"]),
    "teacher at chance on POPE adversarial": (_break(("scores", "teacher", "pope_adversarial", "accuracy"), 0.55),
                                              ["teacher beats chance on pope_adversarial"]),
    "final student 11 points under the teacher": (_break(("scores", FINAL, "mcq", "accuracy"), 0.30),
                                                  ["final student within 10 points"]),
    "preference raises hallucination": (_break(("scores", FINAL, "pope_random", "hallucination"), 0.385),
                                        ["preference distillation lowers hallucination on pope_random",
                                         "final student hallucinates less than its teacher on pope_random"]),
    "preference lowers hallucination but loses accuracy": (
        _break(("scores", FINAL, "pope_adversarial", "accuracy"), 0.69),
        ["preference distillation lowers hallucination on pope_adversarial"]),
    "final student hallucinates more than the teacher": (
        _break(("scores", "teacher", "pope_adversarial", "hallucination"), 0.49),
        ["final student hallucinates less than its teacher on pope_adversarial"]),
    "export not reproduced": (_break(("export", "mcq", "reproduced"), False), ["the HF export"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_check_fails_on_scores_that_break_its_claim(case):
    scores, export = _passing()
    apply_break, expected = BROKEN[case]
    apply_break(scores, export)
    failed = _failed(scores, export)
    assert len(failed) == len(expected), failed
    for text, start in zip(failed, expected):
        assert text.startswith(start), (text, start)
    lines = report.checks_section(scores, export)
    assert f"{9 - len(expected)} of 9 checks pass; {len(expected)} FAILED." in lines
    assert sum(line.startswith("- [ ] **FAILED**: ") for line in lines) == len(expected)


def test_export_check_fails_without_export_scores_and_names_a_changed_accuracy():
    scores, export = _passing()
    assert [t.split(":")[0] for t in _failed(scores, None)] == \
        ["the HF export, scored by stock transformers, reproduces the student"]
    changed = copy.deepcopy(export)
    changed["pope_random"]["accuracy"] += 0.01  # a near-tie flipped: still reproduced, but the report says so
    assert "accuracy DIFFERENT on every split" in report.checks(scores, changed)[-1][1]


def _metrics(stage, steps):
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 2.0 / step}
        if stage in ("d2d", "d2s"):
            row["kd"] = 0.01 / step
        if stage == "d2s":
            row["ce"], row["loss"], row["aux"] = 1.0 / step, 1.0 / step + 0.01 / step, 2.0
        if stage == "preference":
            row.update(preference=row["loss"], aux=2.0, reward_chosen=-0.1 * step, reward_rejected=-0.3 * step,
                       reward_margin=0.2 * step, reward_accuracy=min(1.0, 0.5 + 0.05 * step))
        rows.append(row)
    return rows


def test_plot_losses_log_scale_and_terms(tmp_path):
    fig = charts.plot_losses(_metrics("d2s", 20), "d2s", str(tmp_path / "d2s.png"))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # kd (a hundredth of ce here) stays visible
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["loss", "ce", "kd", charts.UNSCALED["aux"]]
    assert (tmp_path / "d2s.png").read_bytes()[:8] == PNG
    # a term equal to the loss is drawn once; a loss that reaches 0 keeps a linear axis
    rows = [{"step": s, "loss": 1.0 - s / 4, "ce": 1.0 - s / 4} for s in range(1, 5)]
    ax = charts.plot_losses(rows, "sft", str(tmp_path / "sft.png")).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["loss = ce"] and ax.get_yscale() == "linear"


def test_plot_preference_and_kd(tmp_path):
    fig = charts.plot_preference(_metrics("preference", 20), str(tmp_path / "pref.png"))
    rewards, accuracy = fig.axes
    assert {"reward chosen", "reward rejected", "reward margin"} <= {line.get_label() for line in rewards.get_lines()}
    assert "reward accuracy" in {line.get_label() for line in accuracy.get_lines()}
    assert accuracy.get_ylim() == (0, 1)
    fig = charts.plot_kd({"d2d": _metrics("d2d", 10), "d2s": _metrics("d2s", 10)}, str(tmp_path / "kd.png"))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    d2d, d2s = [line for line in ax.get_lines() if line.get_label() in ("d2d", "d2s")]
    assert list(d2d.get_xdata()) == list(range(1, 11)) and list(d2s.get_xdata()) == list(range(11, 21))
    assert charts.moving_mean([1.0, 2.0, 3.0, 5.0], 2) == [1.0, 1.5, 2.5, 4.0]


def test_plot_scores(tmp_path):
    scores, export = _passing()
    rows = report.score_chart_rows(scores, export)
    assert list(rows) == [*MODELS, report.EXPORT]
    fig = charts.plot_scores(rows, str(tmp_path / "scores.png"))
    pope, _, mcq = fig.axes
    assert [t.get_text() for t in pope.get_yticklabels()] == list(rows)
    assert len(pope.containers) == 2 and len(mcq.containers) == 1  # accuracy and hallucination; accuracy
    assert list(pope.containers[1].datavalues) == pytest.approx([100 * rows[m]["pope_random"]["hallucination"]
                                                                 for m in rows])
    assert [t.get_text() for t in mcq.texts][:len(rows)] == ["41.0", "38.0", "40.0", "40.0", "40.0", "40.0"]
    assert (tmp_path / "scores.png").read_bytes()[:8] == PNG


def test_write_report(tmp_path, monkeypatch):
    """report.md from a run directory holding only what the report reads (no checkpoints: parameter counts stubbed)."""
    scores, export = _passing()
    scores[FINAL]["pope_random"]["hallucination"] = 0.40  # one claim broken: the report must say so
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "scores.json").write_text(json.dumps(scores))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "scores.json").write_text(json.dumps(export))
    stages = {}
    for stage in TRAINING:
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(stage, 12)))
        stages[stage] = {"seconds": 1.0, "recipe": f"recipes/{stage}.yaml", "steps": 12, "ranks": 1, "tp": 1, "ep": 1}
    demo = SimpleNamespace(out=str(tmp_path), preset=SimpleNamespace(name="made-up"), state={"stages": stages},
                           path=lambda *parts: os.path.join(str(tmp_path), *parts))
    monkeypatch.setattr(report, "param_counts", lambda ckpt: (1_000_000, 800_000))
    text = open(report.write_report(demo)).read()
    lines = text.splitlines()
    assert lines.index("![scores per model and stage](plots/scores.png)") < lines.index("## Scores")
    assert "7 of 9 checks pass; 2 FAILED." in lines
    assert "- [ ] **FAILED**: preference distillation lowers hallucination on pope_random without losing accuracy: " \
           "38.0 % -> 40.0 %, accuracy 78.0 % -> 79.0 %" in lines
    for model in MODELS:
        assert f"| {model} | 1.00M / 0.80M |" in text
    for png in ["scores", "preference_rewards", "kd", *TRAINING]:
        assert f"(plots/{png}.png)" in text
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:8] == PNG


def _imports(path):
    """Every module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_report_does_not_import_the_pipeline():
    """pipeline.py imports report.py (its last stage): report.py and what it imports read the shared tables from
    stages_table.py, a leaf, so that the two do not import each other."""
    demo = os.path.join(REPO, "megamod", "demo")
    for name in ("report.py", "charts.py", "stages_table.py"):
        assert "megamod.demo.pipeline" not in _imports(os.path.join(demo, name)), name
    assert not any(m.startswith("megamod") for m in _imports(os.path.join(demo, "stages_table.py")))
