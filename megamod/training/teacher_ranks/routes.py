"""Who sends what to whom, from every rank's role (wire.gather_roles).

Student data-parallel rank d is served by teacher replica d mod (teacher data-parallel size); a replica serves its
student ranks in order of d within a step. d's micro-batches go from one student rank (its first pipeline stage,
tensor-parallel rank 0) to every rank of the replica; the rows come back from the replica's last pipeline stage,
tensor-parallel rank 0, to each of d's last-stage ranks. With `send: full` every last-stage tensor-parallel rank of
the replica sends each of d's last-stage ranks the columns of its own vocabulary shard that rank holds (`pieces`):
no rank gathers the whole vocabulary, and the bytes leave from all of them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Routes:
    student_dp: int
    teacher_dp: int
    student_tp: int
    sender: dict  # student dp -> global rank sending its micro-batches
    receivers: dict  # student dp -> [(global rank, tensor-parallel rank)] of its last pipeline stage
    members: dict  # teacher replica -> its global ranks
    rows_sender: dict  # teacher replica -> global rank sending its rows (top-k, preference pairs)
    shards: dict  # teacher replica -> [(global rank, lo, hi)]: its last stage's vocabulary shards, by lo

    def replica(self, student_dp: int) -> int:
        return student_dp % self.teacher_dp

    def served(self, replica: int) -> list[int]:
        return [d for d in range(self.student_dp) if self.replica(d) == replica]

    def pieces(self, replica: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(global rank, a, b) for `send: full`: which of the replica's ranks send vocabulary columns [a, b) of the
        student's columns [lo, hi), in order; together they cover [lo, hi) exactly."""
        out = [(rank, max(lo, s_lo), min(hi, s_hi)) for rank, s_lo, s_hi in self.shards[replica]
               if max(lo, s_lo) < min(hi, s_hi)]
        if sum(b - a for _, a, b in out) != hi - lo:
            raise RuntimeError(f"teacher ranks: the teacher's vocabulary shards {self.shards[replica]} do not cover "
                               f"the student's columns [{lo}, {hi})")
        return out


def role(side: str, rank: int, vocab_rows: int) -> dict:
    """This rank's place in its side's megatron parallel state; vocab_rows: its model's padded vocabulary."""
    from megatron.core import parallel_state as ps

    return {"side": side, "rank": rank, "vocab_rows": vocab_rows, "dp": ps.get_data_parallel_rank(),
            "dp_size": ps.get_data_parallel_world_size(), "tp": ps.get_tensor_model_parallel_rank(),
            "tp_size": ps.get_tensor_model_parallel_world_size(), "first": ps.is_pipeline_first_stage(),
            "last": ps.is_pipeline_last_stage()}


def build(roles: list[dict]) -> Routes:
    students = [r for r in roles if r["side"] == "student"]
    teachers = [r for r in roles if r["side"] == "teacher"]
    s_dp, t_dp = students[0]["dp_size"], teachers[0]["dp_size"]
    sender, receivers, members, rows_sender, shards = {}, {}, {}, {}, {}
    for r in students:
        if r["first"] and r["tp"] == 0:
            sender.setdefault(r["dp"], r["rank"])
        if r["last"]:
            receivers.setdefault(r["dp"], []).append((r["rank"], r["tp"]))
    for r in teachers:
        members.setdefault(r["dp"], []).append(r["rank"])
        if r["last"] and r["tp"] == 0:
            rows_sender.setdefault(r["dp"], r["rank"])
        if r["last"]:
            width = r["vocab_rows"] // r["tp_size"]
            shards.setdefault(r["dp"], []).append((r["rank"], r["tp"] * width, (r["tp"] + 1) * width))
    for replica in shards.values():
        replica.sort(key=lambda shard: shard[1])
    routes = Routes(s_dp, t_dp, students[0]["tp_size"], sender, receivers, members, rows_sender, shards)
    if sorted(sender) != list(range(s_dp)) or sorted(rows_sender) != list(range(t_dp)):
        raise RuntimeError(f"teacher ranks: incomplete routes from roles {roles}")
    return routes
