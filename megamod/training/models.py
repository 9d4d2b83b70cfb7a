"""What a distillation run adds to its loaded models (loading/models.py): `DistillPair` lets Megatron's pipeline
schedules move both models' activations between stages as one tensor, [student | teacher] along the hidden
dimension; when both hold the same frozen CLIP tower (checked by content: shared_vision_tower), it runs once per
micro-batch for both.
"""
from __future__ import annotations

import torch


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class DistillPair:
    """What the pipeline schedule sees when a teacher rides along: the student's config (loss scaling, grad sync),
    and one input tensor per stage that carries both models' activations."""

    def __init__(self, student_ddp, teacher):
        self.student, self.teacher = student_ddp, teacher
        self.config = student_ddp.config
        self.model_type = unwrap(student_ddp).model_type
        self.student_hidden = self.config.hidden_size
        self.teacher_hidden = teacher.config.hidden_size

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if tensor is None:
            unwrap(self.student).set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        unwrap(self.student).set_input_tensor(tensor[..., : self.student_hidden])
        self.teacher.set_input_tensor(tensor[..., self.student_hidden:].detach())

    def join(self, student_SBH: torch.Tensor, teacher_SBH: torch.Tensor) -> torch.Tensor:
        return torch.cat([student_SBH, teacher_SBH.detach().to(student_SBH.dtype)], dim=-1)

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        def widen(shapes):
            return [(*s[:-1], self.student_hidden + self.teacher_hidden) for s in shapes]

        return widen(recv_shapes), widen(send_shapes)


def _local_tower_difference(student_model, teacher_model) -> str | None:
    """Why this rank's student and teacher towers cannot share one forward (None: they can, or neither is here)."""
    student, teacher = unwrap(student_model), unwrap(teacher_model)
    s, t = getattr(student, "vision_model", None), getattr(teacher, "vision_model", None)
    if s is None and t is None:
        return None  # a later pipeline stage: the towers live on the first
    if s is None or t is None:
        return "only one model has a vision tower on this rank"
    if s.cfg != t.cfg:
        return "the vision configs differ"
    for name, tower in (("student", s), ("teacher", t)):
        if any(p.requires_grad for p in tower.parameters()):
            return f"the {name}'s vision tower trains"
        if tower.config.hidden_dropout or tower.config.attention_dropout:
            return f"the {name}'s vision tower has dropout"
    if [type(m) for m in s.modules()] != [type(m) for m in t.modules()] \
            or s.config.params_dtype != t.config.params_dtype:
        return "the vision towers are built differently"
    a, b = dict(s.named_parameters()), dict(t.named_parameters())
    a.update(s.named_buffers())
    b.update(t.named_buffers())
    if a.keys() != b.keys():
        return "the vision towers hold different tensors"
    for name, x in a.items():
        y = b[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            return f"the vision towers' weights differ ({name})"
    return None


def shared_vision_tower(student_model, teacher_model) -> tuple[bool, torch.nn.Module | None, str]:
    """Whether the two LLaVA models' CLIP towers can run as one (once per micro-batch, the features going to both
    adapters), the tower to run on this rank, and why (or why not). Every rank calls this (one all-reduce).

    Shared when the student's and the teacher's towers are the same: same vision config, bitwise-equal weights
    (each rank compares its own tensor-parallel shard; all must agree), both frozen and without dropout, so that
    the student's tower computes exactly what the teacher's does on the micro-batch's one pixel tensor (LLaVA-MoD's
    case: the student starts from the teacher's CLIP and neither trains it). The tower returned is the teacher's;
    None on ranks without one (later pipeline stages) or when not shared."""
    from megamod.distributed import collective_device

    reason = _local_tower_difference(student_model, teacher_model)
    ok = torch.tensor([0 if reason else 1], dtype=torch.int64, device=collective_device())
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if not int(ok):
        return False, None, reason or "the vision towers differ on another rank"
    return True, getattr(unwrap(teacher_model), "vision_model", None), \
        "same vision config and weights, both frozen, no dropout"
