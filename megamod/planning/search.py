"""The parallel layouts of N GPUs that fit a distillation step in memory, least model parallelism first."""
from __future__ import annotations

import os

import yaml

from megamod.models.language import LanguageModelConfig
from megamod.planning.memory import Layout, step_flops, step_memory


def load_language_config(path: str) -> LanguageModelConfig:
    """A megamod checkpoint directory (its megamod.json; LLaVA: the language model) or a YAML/JSON file of
    LanguageModelConfig fields (examples/plan/)."""
    if os.path.isdir(path):
        from megamod.families.factory import read_model

        _, family, _, cfg = read_model(path)
        return family.language(cfg)
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of LanguageModelConfig fields")
    return LanguageModelConfig.from_dict(data.get("language", data))


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _valid(cfg: LanguageModelConfig, tp: int, pp: int, ep: int) -> bool:
    try:
        cfg.validate(tp, pp, ep)
    except ValueError:
        return False
    return True


def search(student: LanguageModelConfig, teacher: LanguageModelConfig | None, gpus: int, gpu_mem_gb: float,
           trains: str = "ffn", mbs: int = 1, seq: int = 2048, global_batch: int = 128, cached_topk: int | None = None,
           headroom: float = 0.1, tp: int | None = None, pp: int | None = None, ep: int | None = None,
           param_bytes: int = 2) -> list[dict]:
    """Every layout (TP <= 8 within a node, PP, EP, DP = gpus / (TP PP)) both models can take, with its memory and
    FLOPs per rank and whether it fits in (1 - headroom) of the GPU memory; fitting layouts first, then the
    smallest TP x PP (the most data parallelism), then the least memory."""
    rows = []
    experts = student.num_experts or 1
    for t in [tp] if tp else _divisors(8, 8):
        for p in [pp] if pp else _divisors(student.num_layers, 64):
            if gpus % (t * p):
                continue
            dp = gpus // (t * p)
            for e in [ep] if ep else _divisors(experts, experts):
                if (dp * t) % e or not _valid(student, t, p, e) or (teacher and not _valid(teacher, t, p, 1)):
                    continue
                if global_batch % (mbs * dp):
                    continue
                lay = Layout(tp=t, pp=p, ep=e, dp=dp, mbs=mbs, seq=seq, num_micro=global_batch // (mbs * dp),
                             param_bytes=param_bytes)
                mem = step_memory(student, lay, trains, teacher=teacher, cached_topk=cached_topk)
                flops = step_flops(student, lay, teacher, trains)
                rows.append({"layout": lay, "memory": mem, "flops": flops,
                             "fits": mem["total"] <= (1 - headroom) * gpu_mem_gb * 1e9})
    # FLOPs per rank do not depend on the layout; less model parallelism means less communication per FLOP.
    rows.sort(key=lambda r: (not r["fits"], r["layout"].tp * r["layout"].pp, r["memory"]["total"]))
    return rows
