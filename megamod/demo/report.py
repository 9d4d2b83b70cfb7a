"""runs/demo/report.md: scores per model and stage, parameter counts, wall times, loss plots, and the checks the
demo exists to show (the teacher beats chance, the student comes close, preference distillation lowers
hallucination, the HF release reproduces the score)."""
from __future__ import annotations

import datetime
import json
import os

CHANCE = {"pope_random": 0.5, "pope_adversarial": 0.5, "mcq": 0.25}
PLOTTED = ("loss", "ce", "kd", "preference", "aux")


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


def plot_losses(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = [r["step"] for r in rows]
    for key in PLOTTED:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values) and (key == "loss" or len({v for v in values}) > 1):
            ax.plot(steps, values, label=key, linewidth=1.2 if key == "loss" else 0.9)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def param_counts(ckpt: str) -> tuple[int, int]:
    """(total, activated per token) parameters of a megamod checkpoint: an MoE layer's token runs top-k of its
    experts, so (E - k) / E of its expert weights are not activated."""
    from megamod import checkpoint
    from megamod.models.factory import build_model, config_from_dict

    meta = checkpoint.read_metadata(ckpt)
    cfg = config_from_dict(meta["kind"], meta["model"])
    model = build_model(cfg, meta["kind"])
    total = sum(p.numel() for p in model.parameters())
    language = cfg.language if meta["kind"] == "llava" else cfg
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    inactive = experts * (language.num_experts - language.moe_router_topk) // language.num_experts \
        if language.num_experts else 0
    return total, total - inactive


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _checks(scores: dict, export: dict | None) -> list[tuple[bool, str]]:
    t, d2s, pref = scores["teacher"], scores["sparse student (d2s)"], scores["sparse student (preference)"]
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
    if export is not None:
        from megamod.demo.pipeline import EXPORT_TOL

        same = all(export[s]["reproduced"] for s in CHANCE)
        diff = max(export[s]["max_score_diff"] for s in CHANCE)
        acc = all(export[s]["accuracy"] == pref[s]["accuracy"] for s in CHANCE)
        over = sum(export[s].get("items_over_tol", 0) for s in CHANCE)
        tol = max(export[s].get("tol", EXPORT_TOL) for s in CHANCE)
        out.append((same, f"the HF export, scored by stock transformers, reproduces the student: largest answer-logit "
                          f"difference {diff:.1e} ({over} items over {tol:g}), accuracy "
                          f"{'identical' if acc else 'DIFFERENT'} on every split"))
    return out


def write_report(demo) -> str:
    from megamod.demo.pipeline import MODELS, TRAINING

    with open(demo.path("eval", "scores.json")) as f:
        scores = json.load(f)
    export_path = demo.path("export", "scores.json")
    export = None
    if os.path.exists(export_path):
        with open(export_path) as f:
            export = json.load(f)
    os.makedirs(demo.path("plots"), exist_ok=True)
    stages = demo.state["stages"]
    lines = [f"# LLaVA-MoD demo report ({demo.preset.name} preset)", "",
             f"Written {datetime.datetime.now().isoformat(timespec='seconds')}; run directory `{demo.out}`. "
             "Held-out splits: POPE-style yes/no questions about unseen images (random and adversarial negatives) "
             "and four-option multiple choice (MMBench-style). Hallucination = share of absent objects answered "
             "\"yes\" (false-positive rate).", "",
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
    lines += ["", "## Checks", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}" for ok, text in _checks(scores, export)]
    lines += ["", "## Stages", "", "| stage | wall time (s) | how |", "|---|---|---|"]
    for stage, info in stages.items():
        how = ""
        if stage in TRAINING:
            how = (f"`{info['recipe']}`: {info['steps']} steps on {info['ranks']} rank(s)"
                   + (f", TP={info['tp']}" if info["tp"] > 1 else "") + (f", EP={info['ep']}" if info["ep"] > 1 else ""))
        lines.append(f"| {stage} | {info['seconds']:.1f} | {how} |")
    lines.append(f"| **total** | {sum(i['seconds'] for i in stages.values()):.1f} | |")
    lines += ["", "## Loss curves", ""]
    for stage in TRAINING:
        metrics = demo.path(stage, "metrics.jsonl")
        if not os.path.exists(metrics):
            continue
        png = demo.path("plots", f"{stage}.png")
        plot_losses(read_metrics(metrics), f"{stage} ({TRAINING[stage][0]})", png)
        lines.append(f"![{stage}](plots/{stage}.png)")
    path = demo.path("report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
