"""One job, two worlds: the first N ranks run the teacher, the others the student, each at its own layout.

megatron-core keeps one parallel state per process, built over torch.distributed's default group. A rank here only
ever runs one side, so each rank makes its side's group the default one: megatron's groups, checkpoints, barriers
and every collective of the trainer then see a world of the side's ranks, numbered from 0, exactly as in a job of
that size. The whole job stays reachable through `bridge` (the launcher's world) for the point-to-point messages
between the sides (training/teacher_ranks/wire.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import distributed_c10d as c10d


@dataclass(frozen=True)
class Split:
    teacher: bool  # this rank runs the teacher
    global_rank: int
    teacher_ranks: tuple[int, ...]  # global ranks of each side
    student_ranks: tuple[int, ...]
    bridge: object  # the launcher's world: the process group the two sides talk over

    @property
    def side(self) -> str:
        return "teacher" if self.teacher else "student"


_split: Split | None = None


def current() -> Split | None:
    """This process's split, None in a job that is not split."""
    return _split


def split(teacher_ranks: int, timeout_s: float) -> Split:
    """Every rank of the launcher's world calls this once, after init_process_group and before megatron's parallel
    state: global ranks [0, teacher_ranks) become the teacher's world, the rest the student's."""
    global _split
    import datetime

    if _split is not None:
        if len(_split.teacher_ranks) != teacher_ranks:
            raise RuntimeError(f"the world is split with {len(_split.teacher_ranks)} teacher ranks, asked for "
                               f"{teacher_ranks}")
        return _split
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if not 0 < teacher_ranks < world:
        side = "student" if teacher_ranks else "teacher"
        raise ValueError(f"teacher.ranks = {teacher_ranks} leaves no rank for the {side}"
                         f" in a job of {world} ranks: launch teacher.ranks + the student's ranks")
    bridge = c10d.GroupMember.WORLD
    timeout = datetime.timedelta(seconds=timeout_s)
    teachers, students = tuple(range(teacher_ranks)), tuple(range(teacher_ranks, world))
    _agree_group_names(bridge)
    # Both groups are made by every rank, in this order (new_group is collective over the default group).
    groups = [torch.distributed.new_group(list(r), timeout=timeout) for r in (teachers, students)]
    mine = groups[0] if rank < teacher_ranks else groups[1]
    c10d._update_default_pg(mine)
    # "Global" ranks are the side's from here on: torch maps a group's ranks through the default group's (e.g.
    # checkpoint shards placed on "rank:0"), so the side's group maps its own ranks to themselves.
    c10d._world.pg_group_ranks[mine] = {r: r for r in range(mine.size())}
    _split = Split(rank < teacher_ranks, rank, teachers, students, bridge)
    return _split


def _agree_group_names(bridge) -> None:
    """Every rank names the groups it makes next alike. torch names a new group by a per-process counter and keeps
    its rendezvous keys under that name in the launcher's store; after a split job the two sides have made different
    numbers of groups (each its own megatron state), so a later split in the same processes would give one group
    different names on different ranks, or reuse a name an earlier group's keys are under: its ranks then connect to
    the wrong peers and hang. Starting from the highest counter of any rank avoids both."""
    nccl = torch.distributed.get_backend(bridge) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    count = torch.tensor([c10d._world.group_count], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=bridge)
    c10d._world.group_count = int(count.item())


def unsplit() -> None:
    """The launcher's world as the default group again (before the last barrier and tear-down of the job)."""
    global _split
    if _split is not None:
        side = _split.teacher_ranks if _split.teacher else _split.student_ranks
        c10d._world.pg_group_ranks[c10d._get_default_group()] = {g: r for r, g in enumerate(side)}
        c10d._update_default_pg(_split.bridge)
        _split = None
