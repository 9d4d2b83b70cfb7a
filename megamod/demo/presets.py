"""Sizes of the demo: `full` (the README's main command, minutes on 2 CPU cores) and `tiny` (the test suite's run).

Both follow LLaVA-MoD's shapes at a small scale: teacher and student share one vision tower (the paper's CLIP), the
student's language model is smaller than the teacher's and is upcycled to `experts` experts, top-`topk`, on every
other layer. The student is the trained teacher with narrower MLPs (`student_prune`: `megamod prune` arguments), a
stand-in for the paper's separately pre-trained small LLM (see pipeline.py). Per training stage: steps, global batch,
micro-batch, learning rate, weight decay, and the parallel layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageRun:
    steps: int
    global_batch: int
    micro_batch: int
    lr: float
    weight_decay: float = 0.0
    tp: int = 1
    ep: int = 1
    ranks: int = 1


@dataclass(frozen=True)
class Preset:
    name: str
    train_images: int
    eval_images: int
    # Conversation question kinds, weighted towards what the held-out splits ask (existence, A/B/C/D).
    mix: dict
    turns: tuple  # least, most question-answer turns per conversation
    vision: dict
    vision_steps: int
    vision_lr: float
    teacher: dict
    student_prune: dict  # how the student is cut from the trained teacher: megamod.commands.prune.prune's arguments
    experts: int
    topk: int
    stages: dict = field(default_factory=dict)  # stage name -> StageRun
    eval_limit: int | None = None  # items per eval file (None: all)


# The tower sees the 3 x 3 scene grid as 3 x 3 patches of 16 px (48 px input): one image token per grid cell.
VISION = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4, image_size=48,
              patch_size=16)
MIX = {"color": 1, "count": 0.5, "position": 1, "exist": 4, "describe": 0.3, "mcq": 2}
TURNS = (3, 6)  # several questions per image: the image and the system prompt are paid once

FULL = Preset(
    name="full", train_images=4000, eval_images=100, mix=MIX, turns=TURNS, vision=VISION, vision_steps=1000,
    vision_lr=1e-2,
    teacher=dict(hidden_size=128, num_layers=4, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=352,
                 max_position_embeddings=512),
    student_prune=dict(ffn_hidden_size=96),  # of 352: 0.65M parameters of the teacher's 1.05M
    experts=4, topk=2,
    stages={
        "teacher_align": StageRun(50, 32, 16, 1e-3),
        # The grounding (which object is in which image token) appears only after a plateau at chance: single-object
        # scenes first shorten it (pipeline.py); weight decay shortens it too (single-turn existence data: ~800
        # steps instead of ~1400).
        "teacher_single": StageRun(650, 32, 16, 3e-3, weight_decay=0.1),
        "teacher_sft": StageRun(350, 32, 16, 3e-3, weight_decay=0.1),
        "student_align": StageRun(30, 32, 16, 1e-4),
        "d2d": StageRun(100, 32, 8, 1e-3, tp=2, ranks=2),
        "d2s": StageRun(100, 32, 8, 5e-4, ep=2, ranks=2),
        "preference": StageRun(60, 32, 8, 5e-4, ep=2, ranks=2),
    })

TINY = Preset(
    name="tiny", train_images=48, eval_images=10, mix=MIX, turns=TURNS, vision=VISION, vision_steps=20,
    vision_lr=1e-2,
    teacher=dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 max_position_embeddings=512),
    student_prune=dict(ffn_hidden_size=32),
    experts=4, topk=2,
    stages={
        "teacher_align": StageRun(2, 4, 2, 1e-3),
        "teacher_single": StageRun(2, 4, 2, 1e-3),
        "teacher_sft": StageRun(3, 4, 2, 1e-3),
        "student_align": StageRun(2, 4, 2, 1e-3),
        "d2d": StageRun(2, 4, 2, 1e-3, tp=2, ranks=2),
        "d2s": StageRun(2, 4, 2, 1e-3, ep=2, ranks=2),
        "preference": StageRun(2, 4, 2, 1e-4, ep=2, ranks=2),
    },
    eval_limit=12)

PRESETS = {p.name: p for p in (FULL, TINY)}
