"""The whole LLaVA-MoD recipe on the synthetic data set, as one resumable job (`python -m megamod demo`).

    data           the synthetic data set (images, conversations, preference pairs, held-out POPE/MMBench splits)
    vision         the shared vision tower, pre-trained as a stand-in for CLIP (vision_pretrain.py)
    init           a fresh teacher checkpoint around that tower
    teacher_align  teacher: adapter alignment on captions (LLaVA-1.5 stage 1)
    teacher_single teacher: instruction tuning on the single-object scenes first (a curriculum, see below)
    teacher_sft    teacher: instruction tuning on every scene (LLaVA-1.5 stage 2)
    prune          the student: the trained teacher with narrower MLPs (`megamod prune`)
    student_align  student: adapter alignment
    d2d            dense-to-dense mimic distillation (KL to the teacher), TP=2 on two ranks
    upcycle        the dense student becomes a sparse MoE one
    d2s            dense-to-sparse mimic distillation (KL + CE + MoE aux), EP=2 on two ranks
    preference     preference distillation (DPO, the teacher as reference), EP=2 on two ranks
    eval           every model on the held-out POPE (random, adversarial) and A/B/C/D splits
    export         the final student to HF; stock transformers re-scores it
    report         report.md with scores, parameter counts, wall times and loss plots

The paper's student starts from a separately pre-trained small LLM (Qwen1.5-1.8B / 0.5B), which already knows the
language the teacher speaks; the demo has no pre-trained LLM to start from, and a small language model trained from
scratch needs as long as the teacher to learn to read the image tokens (measured: a fresh student distilled from a
70 %-POPE teacher stays at chance through 500 steps). So the demo's student is the trained teacher with each MLP cut
to its most important neurons, as Minitron makes small models from large ones, and distillation recovers what pruning
lost (measured: MLP width 352 -> 96 keeps 67 % / 62 % of the teacher's 71 % / 67 % POPE accuracy before any
training; dropping layers 1 and 2 of 4 instead falls to chance, and 150 distillation steps bring it back to 55 %).

A language model trained from scratch learns to read the image tokens only after a long plateau at chance, and
when it escapes depends on the draw: on all scenes (1-4 objects) one draw stayed at chance through 600-700 steps,
another was at 70 % POPE by step 1000. On single-object scenes there is nothing to pick among, so the answer is in
every image token's average: on the first draw, with two initialisations, those alone lifted the teacher off chance
by step 300-400 (63-64 % POPE random on held-out scenes of 1-4 objects), and 350 steps on every scene then took it
to 80 % / 72 % (three draws tried).

Training stages run `python -m megamod train` (under torchrun for two ranks) on recipes written to `recipes/`, so
each stage is exactly what a user would run; the rest runs in this process. `state.json` records finished stages
with their wall time: a re-run skips them, and a training stage interrupted midway resumes from its checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import yaml

from megamod.demo.presets import Preset
from megamod.demo.stages_table import EVAL_FILES, EXPORT_TOL, MODELS, ORDER, TEACHER, TRAINING

log = logging.getLogger(__name__)


def banner(text: str) -> None:
    print(f"\n{'=' * 8} {text} {'=' * max(4, 100 - len(text))}", flush=True)


class Demo:
    def __init__(self, out: str, preset: Preset, threads: int | None = None):
        self.out, self.preset = os.path.abspath(out), preset
        self.threads = threads or max(1, os.cpu_count() or 1)
        os.makedirs(self.out, exist_ok=True)
        self.state_path = os.path.join(self.out, "state.json")
        self.state = {"preset": preset.name, "stages": {}}
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.state = json.load(f)
            if self.state.get("preset") != preset.name:
                raise ValueError(f"{self.out} holds a run of preset {self.state.get('preset')!r}, not "
                                 f"{preset.name!r}: use another --out or --fresh")

    # ---- paths ------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    @property
    def data(self) -> str:
        return self.path("data")

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def _finish(self, stage: str, seconds: float, **info) -> None:
        self.state["stages"][stage] = {"seconds": round(seconds, 2), **info}
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.state_path)

    def run(self, until: str | None = None) -> dict:
        start = time.time()
        stop = ORDER.index(until) if until else len(ORDER) - 1
        for i, stage in enumerate(ORDER[:stop + 1]):
            title = f"{i + 1}/{len(ORDER)} {stage}"
            if self.done(stage):
                banner(f"{title}: done ({self.state['stages'][stage]['seconds']:.0f}s), skipped")
                continue
            banner(title)
            t0 = time.time()
            info = getattr(self, f"stage_{stage}")() or {}
            self._finish(stage, time.time() - t0, **info)
        log.info("demo: %d stages in %.0fs this run; outputs in %s", stop + 1, time.time() - start, self.out)
        return self.state

    # ---- stages run in this process --------------------------------------------------------------------------
    def _world(self) -> None:
        from megamod import distributed

        distributed.initialize(distributed.ParallelConfig())

    def stage_data(self) -> dict:
        from megamod.data.synthetic_writer import write_dataset

        p = self.preset
        if os.path.exists(self.data):
            shutil.rmtree(self.data)
        return write_dataset(self.data, size=p.train_images, eval_size=p.eval_images, seed=0, mix=p.mix,
                             turns=p.turns, progress=True)["counts"]

    def _vision_cfg(self):
        from megamod.models.vision import VisionConfig

        return VisionConfig(**self.preset.vision)

    def stage_vision(self) -> dict:
        import torch

        from megamod.demo.vision_pretrain import pretrain_vision
        from megamod.models.vision import CLIPVisionTower

        self._world()
        torch.manual_seed(0)
        tower = CLIPVisionTower(self._vision_cfg())
        scores = pretrain_vision(tower, self.data, steps=self.preset.vision_steps, lr=self.preset.vision_lr)
        os.makedirs(self.path("vision"), exist_ok=True)
        torch.save(tower.state_dict(), self.path("vision", "tower.pt"))
        print(f"held-out cells: colour {scores['color_acc']:.1%}, shape {scores['shape_acc']:.1%}")
        return scores

    def stage_init(self) -> dict:
        import torch

        from megamod.data.tokenizer import load_tokenizer
        from megamod.families.factory import init_checkpoint
        from megamod.models.language import LanguageModelConfig
        from megamod.models.llava import LlavaConfig

        self._world()
        tok_dir = os.path.join(self.data, "tokenizer")
        tok = load_tokenizer(tok_dir)
        tower = torch.load(self.path("vision", "tower.pt"))
        out = self.path("init", "teacher")
        if os.path.exists(out):
            shutil.rmtree(out)
        cfg = LlavaConfig(LanguageModelConfig(vocab_size=tok.vocab_size, **self.preset.teacher), self._vision_cfg(),
                          tok.image_id)
        init_checkpoint(cfg, out, seed=1, tokenizer_dir=tok_dir, vision_state=tower,
                        vision_source=self.path("vision", "tower.pt"))
        return {}

    def stage_prune(self) -> dict:
        from megamod.convert.prune import prune

        self._world()
        out = self.path("prune", "model")
        if os.path.exists(out):
            shutil.rmtree(out)
        info = prune(self.path(TEACHER), out, **self.preset.student_prune)
        return {"layers": info["num_layers"], "ffn_hidden_size": info["ffn_hidden_size"]}

    def stage_upcycle(self) -> dict:
        from megamod.convert.upcycle import upcycle

        self._world()
        out = self.path("upcycle", "model")
        if os.path.exists(out):
            shutil.rmtree(out)
        info = upcycle(self.path("d2d", "model"), out, num_experts=self.preset.experts, topk=self.preset.topk,
                       moe_layers="even")
        return {k: v for k, v in info.items() if isinstance(v, (int, float, str))}

    def stage_eval(self) -> dict:
        from megamod.eval.scoring import evaluate

        os.makedirs(self.path("eval"), exist_ok=True)
        results = {}
        for model, ckpt in MODELS.items():
            results[model] = {}
            for split, (task, rel) in EVAL_FILES.items():
                self._world()
                r = evaluate(self.path(ckpt), task, os.path.join(self.data, rel), batch_size=16,
                             limit=self.preset.eval_limit)
                results[model][split] = summary(r)
                _dump(self.path("eval", _slug(model), f"{split}.json"), r)
                print(f"{model:30} {split:17} " + _fmt(results[model][split]), flush=True)
        _dump(self.path("eval", "scores.json"), results)
        return {}

    def stage_export(self) -> dict:
        from megamod.convert.checkpoint import megamod_to_hf
        from megamod.eval.hf import evaluate_hf

        hf_dir = self.path("export", "hf")
        if os.path.exists(hf_dir):
            shutil.rmtree(hf_dir)
        self._world()
        megamod_to_hf(self.path("preference", "model"), hf_dir)
        rows = {}
        for split, (task, rel) in EVAL_FILES.items():
            r = evaluate_hf(hf_dir, task, os.path.join(self.data, rel), batch_size=16, limit=self.preset.eval_limit)
            with open(self.path("eval", _slug("sparse student (preference)"), f"{split}.json")) as f:
                ours = json.load(f)
            rows[split] = {**summary(r), **compare_predictions(ours["predictions"], r["predictions"])}
            print(f"transformers {split:17} {_fmt(rows[split])} | megamod accuracy {ours['accuracy']:.3f}, "
                  f"max |score diff| {rows[split]['max_score_diff']:.2e}, items over {rows[split]['tol']:g}: "
                  f"{rows[split]['items_over_tol']}{'' if rows[split]['reproduced'] else '  NOT REPRODUCED'}",
                  flush=True)
        _dump(self.path("export", "scores.json"), rows)  # report.md's checks judge it, as they judge the scores
        return {}

    def stage_report(self) -> dict:
        from megamod.demo.report import write_report

        self._world()  # parameter counts build the models
        path = write_report(self)
        print(f"report: {path}")
        return {}

    # ---- training stages: a recipe, then `megamod train` in a child process -----------------------------------
    def recipe(self, name: str) -> dict:
        from megamod.training.stages import get_stage

        stage, previous, data = TRAINING[name]
        run = self.preset.stages[name]
        source = {"captions": {"path": os.path.join(self.data, "captions.json"), "template": "plain"},
                  "conversations": {"path": os.path.join(self.data, "conversations.json")},
                  "single": {"path": os.path.join(self.data, "conversations_single.json")},
                  "pairs": {"path": os.path.join(self.data, "pairs.jsonl")}}[data]
        cfg = {"stage": stage, "student": self.path(previous), "out": self.path(name),
               "data": {"train": [source], "max_length": 512, "group_by_length": True},
               "parallel": {"tp": run.tp, "ep": run.ep},
               "optim": {"lr": run.lr, "min_lr": run.lr / 10, "warmup_fraction": 0.05,
                         "weight_decay": run.weight_decay},
               "schedule": {"global_batch_size": run.global_batch, "micro_batch_size": run.micro_batch,
                            "steps": run.steps},
               "checkpoint": {"every": max(50, run.steps // 4), "keep": 1},
               "log": {"every": max(1, run.steps // 10), "tensorboard": True, "progress": True}}
        if get_stage(stage).teacher:
            cfg["teacher"] = self.path(TEACHER)
        return cfg

    def _train(self, name: str) -> dict:
        from megamod import distributed

        cfg = self.recipe(name)
        os.makedirs(self.path("recipes"), exist_ok=True)
        recipe = self.path("recipes", f"{name}.yaml")
        with open(recipe, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        run = self.preset.stages[name]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, self.threads // run.ranks))}
        if run.ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={run.ranks}",
                   f"--master-port={distributed.free_port()}", "-m", "megamod", "train", "--config", recipe]
        else:
            cmd = [sys.executable, "-m", "megamod", "train", "--config", recipe]
        print("$ " + " ".join(os.path.relpath(c) if c == recipe else c for c in cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        return {"recipe": os.path.relpath(recipe, self.out), "ranks": run.ranks, "tp": run.tp, "ep": run.ep,
                "steps": run.steps}


def _slug(model: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in model).strip("_").replace("__", "_")


def _dump(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def compare_predictions(ours: list[dict], theirs: list[dict], tol: float = EXPORT_TOL) -> dict:
    """Per-item scores of two implementations of one model: reproduced when every score agrees within `tol` and
    every choice agrees where megamod's margin between the best two classes exceeds twice the largest difference
    (a near-tie may fall either way under another summation order)."""
    diff, flips, over = 0.0, 0, 0
    for a, b in zip(ours, theirs, strict=True):
        item = max(abs(x - y) for x, y in zip(a["scores"], b["scores"], strict=True))
        diff, over = max(diff, item), over + (item > tol)
    for a, b in zip(ours, theirs):
        top = sorted(a["scores"], reverse=True)
        if a["pred"] != b["pred"] and top[0] - top[1] > 2 * diff:
            flips += 1
    return {"max_score_diff": diff, "tol": tol, "items_over_tol": over, "confident_flips": flips,
            "reproduced": diff <= tol and flips == 0}


def summary(result: dict) -> dict:
    """Metrics without the per-item predictions; yes/no results gain `hallucination`, the share of absent objects
    answered yes (false-positive rate)."""
    out = {k: v for k, v in result.items() if k not in ("predictions", "ckpt", "data", "hf")}
    if result["task"] == "pope":
        negatives = [p for p in result["predictions"] if p["label"] == "no"]
        out["hallucination"] = sum(p["pred"] == "yes" for p in negatives) / len(negatives) if negatives else 0.0
    return out


def _fmt(m: dict) -> str:
    keys = ("accuracy", "f1", "yes_ratio", "hallucination") if "yes_ratio" in m else ("accuracy",)
    return " ".join(f"{k} {m[k]:.3f}" for k in keys)


for _name in TRAINING:  # one stage_<name> method per training stage
    setattr(Demo, f"stage_{_name}", lambda self, _n=_name: self._train(_n))

