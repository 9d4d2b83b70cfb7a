"""The demo report's charts (PNG, matplotlib's Agg backend): held-out scores per model and stage, the preference
stage's rewards, the distillation stages' KL to the teacher, and each training stage's losses.

Each function takes plain data (the eval JSON, rows of metrics.jsonl) and a path, writes the PNG there and returns the
(closed) figure, which tests inspect."""
from __future__ import annotations

from typing import TYPE_CHECKING

from megamod.demo.stages_table import CHANCE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SPLITS = (("pope_random", "POPE random"), ("pope_adversarial", "POPE adversarial"), ("mcq", "four-option (MCQ)"))
ACCURACY_COLOR, HALLUCINATION_COLOR = "#2a6fb0", "#d0483c"
# Logged beside the loss without being part of it: drawn dashed, and named as such.
UNSCALED = {"aux": "aux: MoE load balancing\n(before its coefficient)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax) -> None:
    """A log y axis labelled in plain numbers (0.002, 0.5, 2), with the in-between ticks labelled too where it spans
    about a decade or less."""
    from matplotlib import ticker

    class Plain(ticker.LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1.2, 0.6)))
    ax.tick_params(axis="y", which="minor", labelsize=8)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over the rows that carry it."""
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def moving_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_scores(scores: dict[str, dict], path: str, title: str = "Held-out scores per model and stage") -> Figure:
    """Horizontal bars, one row per model (in the dict's order, first on top) and one panel per split: accuracy, and on
    the POPE splits hallucination (the share of absent objects answered "yes"), in %, with chance marked."""
    plt = _pyplot()
    models = list(scores)
    n = len(models)
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(13, 1.4 + 0.62 * n), dpi=100, sharey=True,
                             gridspec_kw={"width_ratios": [1, 1, 0.75]})
    ys = list(range(n))
    for ax, (split, name) in zip(axes, SPLITS):
        yes_no = any("hallucination" in scores[m][split] for m in models)
        height = 0.38 if yes_no else 0.6
        bars = [("accuracy", ACCURACY_COLOR, -height / 2 if yes_no else 0.0)]
        if yes_no:
            bars.append(("hallucination", HALLUCINATION_COLOR, height / 2))
        for key, color, offset in bars:
            values = [100 * scores[m][split][key] for m in models]
            rects = ax.barh([y + offset for y in ys], values, height=height, color=color)
            ax.bar_label(rects, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=8)
        ax.axvline(100 * CHANCE[split], color="0.35", linestyle="--", linewidth=1)
        ax.text(100 * CHANCE[split], n - 0.45, " chance accuracy", fontsize=8, color="0.35", va="bottom")
        ax.set_xlim(0, 109)
        ax.set_ylim(n - 0.4, -0.75)  # first model on top, room for the chance label
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("%")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, models)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (ACCURACY_COLOR, HALLUCINATION_COLOR)]
    fig.suptitle(title, y=0.985, fontsize=11)
    fig.legend(handles, ["accuracy (higher is better)",
                         "hallucination: absent objects answered \"yes\" (lower is better)"],
               loc="upper center", ncol=2, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.945))
    fig.tight_layout(rect=(0, 0, 1, 0.87))
    fig.savefig(path)
    plt.close(fig)
    return fig


def plot_losses(rows: list[dict], title: str, path: str) -> Figure:
    """A training stage's loss and the terms logged beside it on a log scale (KL to the teacher is often a
    thousandth of the cross-entropy); a term equal to the loss at every step is drawn by the loss alone."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=100)
    steps, loss = _series(rows, "loss")
    (line,) = ax.plot(steps, loss, label="loss", color="black", linewidth=1.3)
    drawn, same = [loss], []
    for key in ("ce", "kd", "preference", "aux"):
        s, values = _series(rows, key)
        if not values:
            continue
        if s == steps and values == loss:
            same.append(key)
            continue
        ax.plot(s, values, label=UNSCALED.get(key, key), linewidth=0.9, linestyle="--" if key in UNSCALED else "-")
        drawn.append(values)
    if same:
        line.set_label(f"loss = {' = '.join(same)}")
    if all(v > 0 for values in drawn for v in values):
        _log_y(ax)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def plot_kd(stages: dict[str, list[dict]], path: str) -> Figure:
    """The KL divergence to the teacher through the distillation stages in order (steps counted on from one stage to
    the next), log scale; a dotted line marks each stage boundary."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    offset = 0
    for i, (stage, rows) in enumerate(stages.items()):
        steps, kd = _series(rows, "kd")
        if not kd:
            continue
        if offset:
            ax.axvline(offset + 0.5, color="0.5", linestyle=":", linewidth=1)
        ax.plot([offset + s for s in steps], kd, label=stage, linewidth=1, color=f"C{i}")
        offset += max(r["step"] for r in rows)
    _log_y(ax)
    ax.set_xlabel("step (counted on through the stages)")
    ax.set_ylabel("kd: KL to the teacher per token")
    ax.set_title("Distillation: KL to the teacher")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def plot_preference(rows: list[dict], path: str, window: int | None = None) -> Figure:
    """The preference stage's implicit rewards (beta * log pi/pi_ref of the chosen and rejected answers, their margin)
    and reward accuracy (share of pairs whose chosen answer gains more than the rejected one) per step: each step's
    value thin, the mean of the last `window` steps thick."""
    plt = _pyplot()
    window = window or max(1, len(rows) // 10)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4), dpi=100)
    for key, color in (("reward_chosen", "C2"), ("reward_rejected", "C3"), ("reward_margin", "black")):
        steps, values = _series(rows, key)
        if values:
            left.plot(steps, values, color=color, linewidth=0.6, alpha=0.35)
            left.plot(steps, moving_mean(values, window), color=color, linewidth=1.6, label=key.replace("_", " "))
    left.axhline(0, color="0.4", linewidth=0.8)
    left.set_title("rewards: beta * log(policy / reference)", fontsize=10)
    left.set_xlabel("step")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    steps, acc = _series(rows, "reward_accuracy")
    if acc:
        right.plot(steps, acc, color="C0", linewidth=0.6, alpha=0.35)
        right.plot(steps, moving_mean(acc, window), color="C0", linewidth=1.6, label="reward accuracy")
    right.axhline(0.5, color="0.35", linestyle="--", linewidth=1, label="chance")
    right.set_ylim(0, 1)
    right.set_title("reward accuracy: chosen reward > rejected reward", fontsize=10)
    right.set_xlabel("step")
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3)
    fig.suptitle(f"Preference stage (thin: each step; thick: mean of the last {window} steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig
