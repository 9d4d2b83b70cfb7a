"""A tiny LLaVA-MoD set-up for the engine tests: synthetic data, a trained teacher, dense and sparse students.

Built once per test session in a temporary folder (a few seconds): the teacher is trained from its initial
checkpoint by two `sft` steps (the engine refuses an untrained teacher); the dense student starts from its own
initial checkpoint; the sparse student is the dense one upcycled.
"""
from __future__ import annotations

import os
import shutil

import yaml

STUDENT_LM = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  max_position_embeddings=512)
TEACHER_LM = dict(hidden_size=96, num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                  max_position_embeddings=512)


def llava_config(vocab_size: int, image_token_id: int, **lm):
    from megamod.models.language import LanguageModelConfig
    from megamod.models.llava import LlavaConfig
    from megamod.models.vision import VisionConfig

    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4, image_size=64,
                          patch_size=16)
    return LlavaConfig(LanguageModelConfig(vocab_size=vocab_size, **lm), vision, image_token_id)


def recipe(path: str, **sections) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(sections, f)
    return path


def base_recipe(root: str, stage: str, student: str, out: str, teacher: str | None = None, **extra) -> dict:
    data = os.path.join(root, "data")
    train = [{"path": os.path.join(data, "conversations.json")}]
    if stage == "preference":
        train = [{"path": os.path.join(data, "pairs.jsonl")}]
    if stage == "align":
        train = [{"path": os.path.join(data, "captions.json"), "template": "plain"}]
    cfg = {"stage": stage, "student": student, "out": out, "data": {"train": train, "max_length": 256},
           "schedule": {"global_batch_size": 4, "micro_batch_size": 2, "steps": 3},
           "log": {"tensorboard": False, "progress": False}, "optim": {"lr": 1e-3}}
    if teacher:
        cfg["teacher"] = teacher
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def run_as_of(src: str, dst: str, step: int) -> str:
    """A copy of run directory `src` as a crash right after its step-`step` checkpoint would have left it: no later
    checkpoint, no exported model."""
    shutil.copytree(src, dst)
    ckpts = os.path.join(dst, "checkpoints")
    for name in os.listdir(ckpts):
        if name.startswith("step_") and int(name[len("step_"):]) > step:
            shutil.rmtree(os.path.join(ckpts, name))
    shutil.rmtree(os.path.join(dst, "model"), ignore_errors=True)
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write(f"step_{step:07d}\n")
    return dst


def build(root: str) -> dict:
    """Every rank of an initialised world (or one process) calls this with the same root."""
    import torch

    from megamod import distributed
    from megamod.convert.upcycle import upcycle
    from megamod.data.synthetic_writer import write_dataset
    from megamod.data.tokenizer import load_tokenizer
    from megamod.families.factory import init_checkpoint
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    paths = {k: os.path.join(root, k) for k in ("data", "teacher_init", "teacher_run", "student", "sparse")}
    paths["teacher"] = os.path.join(paths["teacher_run"], "model")
    paths["root"] = root
    if os.path.exists(os.path.join(paths["sparse"], "megamod.json")):
        return paths
    distributed.initialize(distributed.ParallelConfig())
    if torch.distributed.get_rank() == 0:
        write_dataset(paths["data"], size=24, eval_size=10, seed=0, progress=False)
    torch.distributed.barrier()
    tok_dir = os.path.join(paths["data"], "tokenizer")
    tok = load_tokenizer(tok_dir)
    init_checkpoint(llava_config(tok.vocab_size, tok.image_id, **TEACHER_LM), paths["teacher_init"], seed=1,
                    tokenizer_dir=tok_dir)
    init_checkpoint(llava_config(tok.vocab_size, tok.image_id, **STUDENT_LM), paths["student"], seed=2,
                    tokenizer_dir=tok_dir)
    sft = base_recipe(root, "sft", paths["teacher_init"], paths["teacher_run"], schedule={"steps": 2})
    Trainer(load_config(base=sft)).train()
    upcycle(paths["student"], paths["sparse"], num_experts=4, topk=2, moe_layers="even")
    return paths


def student_with_teacher_tower(paths: dict, out: str, nudge: str | None = None) -> str:
    """A fresh student (STUDENT_LM, seed 2) around the trained teacher's CLIP tower, as the recipe's students start
    (training/models.py shares one tower between them). `nudge`: a tower weight whose first element moves one ulp,
    a tower one weight apart. Every rank of an initialised world (or one process) calls this."""
    import torch

    from megamod.data.tokenizer import load_tokenizer
    from megamod.families.factory import init_checkpoint
    from megamod.loading.models import load

    tok_dir = os.path.join(paths["data"], "tokenizer")
    tok = load_tokenizer(tok_dir)
    tower = load(paths["teacher"], torch.float32).model.vision_model.state_dict()
    tower = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in tower.items()}
    if nudge is not None:
        w = tower[nudge].clone()
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
        tower[nudge] = w
    init_checkpoint(llava_config(tok.vocab_size, tok.image_id, **STUDENT_LM), out, seed=2,
                    tokenizer_dir=tok_dir, vision_state=tower, vision_source=paths["teacher"])
    return out
