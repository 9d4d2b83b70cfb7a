"""The LLaVA-MoD stages as data: what trains, which losses with which weights, the default learning rate.

METHOD.md section 3. One trainer runs them all; a stage only changes these fields. Parameter groups are named by
where a parameter lives, so the same stage applies to a language-only model (no vision/projector groups) and to
LLaVA:
  vision     the CLIP tower (frozen in every stage)
  projector  the MLP adapter
  language   the whole language model
  ffn        the language model's MLPs: experts of MoE layers and the dense FFNs of the other layers (no routers)
  router     the MoE routers
"""
from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("vision", "projector", "language", "ffn", "router")
LOSSES = ("ce", "kd", "preference")


@dataclass(frozen=True)
class Stage:
    name: str
    trainable: tuple[str, ...]
    losses: dict = field(default_factory=dict)  # loss name -> weight; the MoE aux loss comes with sparse models
    lr: float = 2e-5
    teacher: bool = False  # needs the teacher model (KD target or preference reference)
    sparse: bool | None = None  # True: needs a sparse student; False: a dense one; None: either
    pairs: bool = False  # trains on preference pairs instead of conversations


STAGES = {
    "align": Stage("align", ("projector",), {"ce": 1.0}, lr=1e-3),
    "sft": Stage("sft", ("projector", "language"), {"ce": 1.0}, lr=2e-5),
    "d2d": Stage("d2d", ("projector", "language"), {"kd": 1.0}, lr=2e-5, teacher=True, sparse=False),
    "d2s": Stage("d2s", ("projector", "ffn", "router"), {"kd": 1.0, "ce": 1.0}, lr=2e-5, teacher=True, sparse=True),
    "preference": Stage("preference", ("projector", "ffn", "router"), {"preference": 1.0}, lr=2e-6, teacher=True,
                        pairs=True),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
    return STAGES[name]


def param_groups(name: str) -> set[str]:
    """The groups a parameter of a LlavaModel or GPTModel (by its name in named_parameters) belongs to."""
    if name.startswith("vision_model."):
        return {"vision"}
    if name.startswith("vision_projection."):
        return {"projector"}
    groups = {"language"}
    if ".mlp.router." in name:
        groups.add("router")
    elif ".mlp." in name and "layer_norm" not in name:  # TE fuses the pre-MLP norm into linear_fc1
        groups.add("ffn")
    return groups


def apply_trainable(model, trainable: tuple[str, ...]) -> list[str]:
    """Set requires_grad per the stage; returns the names of the trainable parameters. A stage whose trainable set
    matches nothing on this model (e.g. `projector` on a language-only model, on every pipeline stage) is fine on
    one stage but an error job-wide: the trainer checks the global count."""
    unknown = set(trainable) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; the groups are {GROUPS}")
    names = []
    for name, p in model.named_parameters():
        train = bool(param_groups(name) & set(trainable))
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names
