"""The student's side of a teacher on its own ranks: send each step's micro-batches, receive their rows.

The trainer sends step n+1's micro-batches right after receiving step n's rows and before training step n, so the
teacher computes step n+1 while the student trains step n: a step costs about max(teacher, student) + transfer,
and the teacher is never more than one step ahead (a queue of one).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from megamod.training.teacher_ranks import routes, rows, wire


class RemoteTeacher:
    def __init__(self, cfg, split, student, tokenizer, dtype: torch.dtype):
        """Every student rank calls this once (the teacher's ranks meet it in wire.gather_roles)."""
        from megatron.core import parallel_state as ps

        from megamod.training.stages import get_stage

        self.cfg, self.split, t = cfg, split, cfg.teacher
        self.kind = "pairs" if get_stage(cfg.stage).pairs else "conversations"
        padded = student.language.padded_vocab_size
        self.routes = routes.build(wire.gather_roles(routes.role("student", split.global_rank, padded),
                                                     split.bridge))
        self.dp = ps.get_data_parallel_rank()
        replica = self.routes.replica(self.dp)
        self.members = self.routes.members[replica]
        self.sends = split.global_rank == self.routes.sender[self.dp]
        self.receives = ps.is_pipeline_last_stage()
        tp, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.width = padded // tp_size
        lo, hi = rows.columns(tp, tp_size, padded, tokenizer.vocab_size)
        # who sends this rank its rows, each with how many vocabulary columns (full: one piece per teacher shard)
        self.full = t.send == "full" and self.kind == "conversations"
        if self.full:
            self.sources = [(rank, b - a) for rank, a, b in self.routes.pieces(replica, lo, hi)]
        else:
            self.sources = [(self.routes.rows_sender[replica], 0)]
        self.topk_dtype, self.logits_dtype = getattr(torch, t.dtype), dtype
        self.outbox = wire.Outbox(split.bridge)
        self.pending: tuple[int, list] | None = None  # the step whose micro-batches went out, its rows not back yet
        self.wait_s = 0.0

    def send(self, step: int, items: list) -> None:
        """items: (micro-batch on the CPU, its sample ids) of one step, on every student rank alike."""
        if self.pending is not None:
            raise RuntimeError(f"teacher ranks: step {step} sent before step {self.pending[0]}'s rows came back")
        self.pending = (step, items)
        if self.sends:
            # the previous step's are through: the teacher sent that step's rows after taking them
            self.outbox.drain(f"student (global rank {self.split.global_rank}) sending step {step - 1}")
            message = {"step": step, "micro": [mb for mb, _ in items], "ids": [ids for _, ids in items], "stop": None}
            for dst in self.members:
                self.outbox.post_object(message, dst, wire.INPUTS)

    def receive(self, step: int) -> list:
        """The step's micro-batches with their teacher rows (MicroBatch.cached) on the last pipeline stage."""
        if self.pending is None or self.pending[0] != step:
            raise RuntimeError(f"teacher ranks: rows of step {step} asked for, step "
                               f"{self.pending and self.pending[0]} is in flight")
        items, self.pending = self.pending[1], None
        if not self.receives:
            return [mb for mb, _ in items]
        start, out = time.perf_counter(), []
        for i, (mb, ids) in enumerate(items):
            what = (f"student (global rank {self.split.global_rank}) waiting for the teacher's rows of step {step}, "
                    f"micro-batch {i}")
            expected = rows.header(step, self.dp, i, mb, ids)
            pieces = []
            for src, cols in self.sources:
                got = wire.recv(expected.shape, torch.int64, src, self.split.bridge, wire.ROWS, what)
                if not torch.equal(got, expected):
                    raise wire.LinkError(f"{what}: global rank {src} sent rows of [step, dp, micro-batch, positions, "
                                         f"sample ids] = {got.tolist()}, expected {expected.tolist()} (samples "
                                         f"{ids}); refusing to train on another sample's rows")
                pieces.append([wire.recv(shape, dtype, src, self.split.bridge, wire.ROWS, what)
                               for shape, dtype in rows.specs(self.kind, self.cfg.teacher.send, int(expected[3]),
                                                              mb.pairs, self.cfg.teacher.topk, self.topk_dtype,
                                                              self.logits_dtype, cols)])
            # full: the teacher shards' columns side by side (none for a shard of padding only); otherwise the one
            # sender's tensors
            if self.full:
                tensors = [torch.cat([p[0] for p in pieces], dim=1) if pieces
                           else torch.empty(int(expected[3]), 0, dtype=self.logits_dtype)]
            else:
                tensors = pieces[0]
            out.append(dataclasses.replace(mb, cached=rows.scatter(self.kind, self.cfg.teacher.send, tensors, mb,
                                                                   self.width)))
        self.wait_s += time.perf_counter() - start
        return out

    def close(self, status: int) -> None:
        """Tell the teacher's ranks this student rank is done (`status`: its exit status), after taking in rows still
        on their way (a stop between steps leaves the next step's in flight)."""
        if self.pending is not None:
            self.receive(self.pending[0])
        if self.sends:
            for dst in self.members:
                self.outbox.post_object({"stop": status}, dst, wire.INPUTS)
            self.outbox.drain(f"student (global rank {self.split.global_rank}) telling the teacher's ranks to stop")
