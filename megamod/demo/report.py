"""runs/demo/report.md: a chart of the scores per model and stage first, then the scores with parameter counts, the
checks the demo exists to show (the teacher beats chance, the student comes close, preference distillation lowers
hallucination, the HF release reproduces the score), wall times, and training curves (preference rewards, KL to the
teacher, each stage's losses). Charts are drawn by charts.py into plots/."""
from __future__ import annotations

import datetime
import json
import os

from megamod.demo.charts import plot_kd, plot_losses, plot_preference, plot_scores
from megamod.demo.stages_table import CHANCE, EXPORT_TOL, FINAL, MODELS, TRAINING

EXPORT = "HF export (transformers)"  # the exported final student, scored by stock transformers, in the score chart
DISTILLATION = ("d2d", "d2s")  # the stages whose KL to the teacher the KD chart follows


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl -> one row per step (a resumed run repeats steps after its checkpoint: the last one wins)."""
    rows: dict[int, dict] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def param_counts(ckpt: str) -> tuple[int, int]:
    """(total, activated per token) parameters of a megamod checkpoint: an MoE layer's token runs top-k of its
    experts, so (E - k) / E of its expert weights are not activated."""
    from megamod.families.factory import read_model

    _, family, _, cfg = read_model(ckpt)
    model = family.build(cfg)
    total = sum(p.numel() for p in model.parameters())
    language = family.language(cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    inactive = experts * (language.num_experts - language.moe_router_topk) // language.num_experts \
        if language.num_experts else 0
    return total, total - inactive


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def checks(scores: dict, export: dict | None) -> list[tuple[bool, str]]:
    """(passed, what was checked with the numbers) for each claim the demo makes, from eval/scores.json and
    export/scores.json (None: the export was not scored, which fails its check)."""
    t, d2s, pref = scores["teacher"], scores["sparse student (d2s)"], scores[FINAL]
    out = []
    for split, chance in CHANCE.items():
        acc = t[split]["accuracy"]
        out.append((acc >= chance + 0.1, f"teacher beats chance on {split}: {_pct(acc)} % vs {_pct(chance)} % "
                                         f"(bar: +10 points)"))
    gap = max(t[s]["accuracy"] - pref[s]["accuracy"] for s in CHANCE)
    out.append((gap <= 0.1, f"final student within 10 points of the teacher on every split (largest gap "
                            f"{_pct(gap)} points)"))
    for split in ("pope_random", "pope_adversarial"):
        a, b = d2s[split]["hallucination"], pref[split]["hallucination"]
        acc_a, acc_b = d2s[split]["accuracy"], pref[split]["accuracy"]
        out.append((b < a and acc_b >= acc_a, f"preference distillation lowers hallucination on {split} without "
                                              f"losing accuracy: {_pct(a)} % -> {_pct(b)} %, accuracy "
                                              f"{_pct(acc_a)} % -> {_pct(acc_b)} %"))
        th = t[split]["hallucination"]
        out.append((b < th, f"final student hallucinates less than its teacher on {split}: {_pct(b)} % vs "
                            f"{_pct(th)} %"))
    if export is None:
        out.append((False, "the HF export, scored by stock transformers, reproduces the student: no export scores "
                           "(export/scores.json) to judge"))
    else:
        same = all(export[s]["reproduced"] for s in CHANCE)
        diff = max(export[s]["max_score_diff"] for s in CHANCE)
        acc = all(export[s]["accuracy"] == pref[s]["accuracy"] for s in CHANCE)
        over = sum(export[s].get("items_over_tol", 0) for s in CHANCE)
        tol = max(export[s].get("tol", EXPORT_TOL) for s in CHANCE)
        out.append((same, f"the HF export, scored by stock transformers, reproduces the student: largest answer-logit "
                          f"difference {diff:.1e} ({over} items over {tol:g}), accuracy "
                          f"{'identical' if acc else 'DIFFERENT'} on every split"))
    return out


def checks_section(scores: dict, export: dict | None) -> list[str]:
    """The report's "## Checks" lines: how many pass, then one checkbox per check, failures marked FAILED."""
    results = checks(scores, export)
    failed = sum(not ok for ok, _ in results)
    lines = ["## Checks", "",
             f"{len(results) - failed} of {len(results)} checks pass" + (f"; {failed} FAILED." if failed else "."), ""]
    lines += [f"- [x] {text}" if ok else f"- [ ] **FAILED**: {text}" for ok, text in results]
    return lines


def score_chart_rows(scores: dict, export: dict | None) -> dict[str, dict]:
    """The score chart's rows: every model in the report's order, then the HF export when it was scored."""
    rows = {model: scores[model] for model in MODELS}
    if export is not None:
        rows[EXPORT] = export
    return rows


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_report(demo) -> str:
    scores = _read_json(demo.path("eval", "scores.json"))
    if scores is None:
        raise FileNotFoundError(f"{demo.path('eval', 'scores.json')}: the eval stage has not run")
    export = _read_json(demo.path("export", "scores.json"))
    os.makedirs(demo.path("plots"), exist_ok=True)
    stages = demo.state["stages"]
    metrics = {stage: read_metrics(demo.path(stage, "metrics.jsonl")) for stage in TRAINING
               if os.path.exists(demo.path(stage, "metrics.jsonl"))}
    plot_scores(score_chart_rows(scores, export), demo.path("plots", "scores.png"))
    lines = [f"# LLaVA-MoD demo report ({demo.preset.name} preset)", "",
             f"Written {datetime.datetime.now().isoformat(timespec='seconds')}; run directory `{demo.out}`. "
             "Held-out splits: POPE-style yes/no questions about unseen images (random and adversarial negatives) "
             "and four-option multiple choice (MMBench-style). Hallucination = share of absent objects answered "
             "\"yes\" (false-positive rate).", "",
             "![scores per model and stage](plots/scores.png)", "",
             "## Scores", "",
             "| model | params (total / activated) | POPE rand. acc | F1 | halluc. | POPE adv. acc | F1 | halluc. | "
             "MCQ acc |", "|---|---|---|---|---|---|---|---|---|"]
    for model, ckpt in MODELS.items():
        total, active = param_counts(demo.path(ckpt))
        s = scores[model]
        cells = [f"{total / 1e6:.2f}M / {active / 1e6:.2f}M"]
        for split in ("pope_random", "pope_adversarial"):
            cells += [_pct(s[split]["accuracy"]), _pct(s[split]["f1"]), _pct(s[split]["hallucination"])]
        cells.append(_pct(s["mcq"]["accuracy"]))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if export is not None:
        cells = ["(as above)"]
        for split in ("pope_random", "pope_adversarial"):
            cells += [_pct(export[split]["accuracy"]), _pct(export[split]["f1"]),
                      _pct(export[split]["hallucination"])]
        cells.append(_pct(export["mcq"]["accuracy"]))
        lines.append("| HF export of the final student, scored by transformers | " + " | ".join(cells) + " |")
    lines += [""] + checks_section(scores, export)
    lines += ["", "## Stages", "", "| stage | wall time (s) | how |", "|---|---|---|"]
    for stage, info in stages.items():
        how = ""
        if stage in TRAINING:
            how = (f"`{info['recipe']}`: {info['steps']} steps on {info['ranks']} rank(s)"
                   + (f", TP={info['tp']}" if info["tp"] > 1 else "") + (f", EP={info['ep']}" if info["ep"] > 1 else ""))
        lines.append(f"| {stage} | {info['seconds']:.1f} | {how} |")
    lines.append(f"| **total** | {sum(i['seconds'] for i in stages.values()):.1f} | |")
    lines += ["", "## Training curves", ""]
    if "preference" in metrics:
        plot_preference(metrics["preference"], demo.path("plots", "preference_rewards.png"))
        lines += ["Preference distillation (DPO against the teacher): the implicit rewards of the chosen and rejected "
                  "answers, their margin, and the share of pairs ranked the right way.", "",
                  "![preference rewards](plots/preference_rewards.png)", ""]
    distilled = {stage: metrics[stage] for stage in DISTILLATION if stage in metrics}
    if distilled:
        plot_kd(distilled, demo.path("plots", "kd.png"))
        lines += ["The student's KL divergence to the teacher through dense-to-dense and dense-to-sparse distillation "
                  "(log scale).", "", "![kd](plots/kd.png)", ""]
    lines += ["Each training stage's loss and its terms (log scale).", ""]
    for stage, rows in metrics.items():
        trained = TRAINING[stage][0]
        plot_losses(rows, stage if trained == stage else f"{stage} ({trained})", demo.path("plots", f"{stage}.png"))
        lines.append(f"![{stage}](plots/{stage}.png)")
    path = demo.path("report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
