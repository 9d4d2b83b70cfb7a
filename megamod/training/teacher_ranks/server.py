"""The teacher's ranks: receive each served student data-parallel rank's micro-batches, run the frozen teacher at its
own layout (megamod's forward-only pass through megatron's pipeline schedule), send the rows back (rows.py).

The student decides everything: which samples (its sampler), when to stop (a stop message carrying its exit status:
0 at the end, 75 when it stopped on a signal after a checkpoint). Nothing of the teacher is checkpointed: a resumed
student sends the samples of its resumed step. Stop signals reaching a teacher rank are ignored: the student's ranks
agree when to stop and say so.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time

import torch

from megamod.training.metrics import micro_batch_counts, step_flops
from megamod.training.teacher_ranks import routes, rows, wire

log = logging.getLogger(__name__)


class TeacherServer:
    def __init__(self, cfg, split):
        from megatron.core import parallel_state as ps

        from megamod import checkpoint
        from megamod.loading.data import check_tokenizer_fits, load_run_tokenizer
        from megamod.loading.models import load_frozen_teacher, vocab_rows
        from megamod.training.config import loss_weights
        from megamod.training.objective import Objective
        from megamod.training.stages import get_stage

        self.cfg, self.split, t = cfg, split, cfg.teacher
        self.kind = "pairs" if get_stage(cfg.stage).pairs else "conversations"
        self.dtype = checkpoint.resolve_dtype(cfg.dtype)
        self.tokenizer = load_run_tokenizer(cfg.data.tokenizer, cfg.student)
        self.teacher = load_frozen_teacher(t.ckpt, self.dtype)
        check_tokenizer_fits(self.teacher, self.tokenizer, f"teacher {t.ckpt}")
        self.vocab_size = self.tokenizer.vocab_size
        # the student's padded vocabulary, as the student builds it (Trainer: vocab_rows(student, teacher))
        self.student_padded_vocab = vocab_rows(cfg.student, t.ckpt)
        self.objective = Objective(loss_weights(cfg), self.vocab_size, self.teacher.family, cfg.loss.kd,
                                   cfg.loss.temperature, cfg.loss.preference, cfg.loss.beta,
                                   chunk_tokens=cfg.loss.chunk_tokens)
        padded = self.teacher.language.padded_vocab_size
        self.routes = routes.build(wire.gather_roles(routes.role("teacher", split.global_rank, padded),
                                                     split.bridge))
        self.replica = ps.get_data_parallel_rank()
        self.counts_tokens = split.global_rank == self.routes.rows_sender[self.replica]
        # full: every last-stage rank sends each student tensor-parallel rank the columns of its own vocabulary shard
        # that rank holds (numbered within the shard; none when it holds none); top-k and pairs: TP rank 0 sends all
        full = t.send == "full" and self.kind == "conversations"
        shard_lo = {rank: lo for rank, lo, _ in self.routes.shards[self.replica]}
        self.columns = {}
        if full and split.global_rank in shard_lo:
            me, tp_size = split.global_rank, self.routes.student_tp
            for tp in range(tp_size):
                lo, hi = rows.columns(tp, tp_size, self.student_padded_vocab, self.vocab_size)
                self.columns.update({tp: (a - shard_lo[me], b - shard_lo[me])
                                     for rank, a, b in self.routes.pieces(self.replica, lo, hi) if rank == me})
        self.sends_rows = split.global_rank in shard_lo if full else self.counts_tokens
        self.outboxes = {d: wire.Outbox(split.bridge) for d in self.routes.served(self.replica)}
        self.busy_s = self.wait_s = self.startup_wait_s = 0.0
        self.micro_batches = self.steps = 0
        self.bytes_sent = self.answer_tokens = 0
        self.served = [0, 0, 0.0]  # tokens, images, causal attention pairs this replica ran (metrics.step_flops)

    def _keep(self, mb):
        """What the last stage keeps of the teacher's vocab-parallel logits for this micro-batch."""
        from megamod.losses.topk_kd import teacher_topk_BSK

        t, V = self.cfg.teacher, self.vocab_size
        if self.kind == "pairs":
            return lambda logits_BSv: self.objective.reference_2B(logits_BSv, mb)
        if t.send == "topk":
            return lambda logits_BSv: teacher_topk_BSK(logits_BSv, V, t.topk)
        return lambda logits_BSv: logits_BSv  # this rank's shard of the vocabulary, sent as it is (routes.pieces)

    def _rows(self, mb) -> list | None:
        """Per receiving student tensor-parallel rank, the tensors to send (rows.py); None off the last stage."""
        from megamod.inference import forward_only
        from megamod.loading.microbatch import run_model

        family = self.teacher.family
        out = forward_only(self.teacher.model, lambda m: run_model(m, mb, family), self._keep(mb), mb.seq_length,
                           mb.tokens.shape[0])
        if out is None:
            return None
        t = self.cfg.teacher
        if self.kind == "pairs":
            return lambda tp: [out.double()]
        mask_BS = mb.loss_mask.bool()
        if t.send == "topk":
            ids_BSK, logprobs_BSK, log_tail_BS = out
            # left on the teacher's device: wire.Outbox.post puts them where the link needs them
            sent = [ids_BSK[mask_BS].to(torch.int32), logprobs_BSK[mask_BS].to(getattr(torch, t.dtype)),
                    log_tail_BS[mask_BS].float()]
            return lambda tp: sent
        logits_Nv = out[mask_BS].to(self.dtype)
        return lambda tp: [logits_Nv[:, slice(*self.columns[tp])]] if tp in self.columns else []

    def _serve_one(self, d: int) -> int | None:
        """One step of student data-parallel rank d; its stop status when it sent one instead."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        msg = wire.recv_object(self.routes.sender[d], self.split.bridge, wire.INPUTS,
                               f"teacher (global rank {self.split.global_rank}) waiting for the micro-batches of "
                               f"student data-parallel rank {d}")
        got = time.perf_counter()
        if self.steps:
            self.wait_s += got - start
        else:  # the first wait is the student's start-up (loading, building its data), not the teacher's idle time
            self.startup_wait_s += got - start
        # d sent this after taking the previous step's rows on the rank that sends; its other ranks need nothing of
        # ours to take theirs
        self.outboxes[d].drain(f"teacher (global rank {self.split.global_rank}) sending rows to student "
                               f"data-parallel rank {d}")
        if msg["stop"] is not None:
            return int(msg["stop"])
        for i, (mb, ids) in enumerate(zip(msg["micro"], msg["ids"])):
            part = self._rows(mb.to(device))
            self.micro_batches += 1
            if self.counts_tokens:  # one rank per replica
                self.served = [a + b for a, b in zip(self.served, micro_batch_counts([mb]))]
            if not self.sends_rows:
                continue
            head = rows.header(msg["step"], d, i, mb, ids)
            self.answer_tokens += int(head[3]) if self.counts_tokens else 0
            for dst, tp in self.routes.receivers[d]:
                tensors = part(tp)
                if not tensors:
                    continue
                self.outboxes[d].post(head, dst, wire.ROWS)
                for tensor in tensors:
                    self.outboxes[d].post(tensor, dst, wire.ROWS)
                    self.bytes_sent += tensor.numel() * tensor.element_size()
        self.busy_s += time.perf_counter() - got
        return None

    def serve(self) -> int:
        """Until every served student rank sent its stop; returns the student's exit status."""
        served = self.routes.served(self.replica)
        codes: dict[int, int] = {}
        previous = {s: signal.signal(signal.Signals[s], signal.SIG_IGN) for s in self.cfg.checkpoint.signals}
        if torch.distributed.get_rank() == 0:
            log.info("teacher ranks: %d replicas (TP=%d PP=%d) serve %d student data-parallel ranks; send %s",
                     self.routes.teacher_dp, self.cfg.teacher.parallel.tp, self.cfg.teacher.parallel.pp,
                     self.routes.student_dp, self.cfg.teacher.send)
        restore = lambda: [signal.signal(signal.Signals[s], h) for s, h in previous.items()]  # noqa: E731
        try:
            while len(codes) < len(served):
                for d in served:
                    if d not in codes:
                        code = self._serve_one(d)
                        if code is not None:
                            codes[d] = code
                self.steps += 1
        except BaseException:
            restore()
            raise
        status = max(codes.values())
        if status == 0:
            restore()
        # else the student stopped on a signal: the job is ending with its status, and a launcher's SIGTERM to the
        # ranks still up (torchrun's, once a first rank has exited) must not turn this rank's 75 into a kill
        self._report()
        return status

    def _report(self) -> None:
        """Every teacher rank's busy and waiting time (after the first step's micro-batches came), bytes sent and
        model FLOPs run (the student's ranks log only their own), logged by the teacher's rank 0 and kept in
        <out>/teacher_ranks.json."""
        tokens, images, pairs = self.served
        mine = {"global_rank": self.split.global_rank, "micro_batches": self.micro_batches, "busy_s": self.busy_s,
                "wait_s": self.wait_s, "startup_wait_s": self.startup_wait_s, "bytes_sent": self.bytes_sent,
                "answer_tokens": self.answer_tokens,
                "flops": step_flops(self.teacher, tokens, pairs, images) if tokens else 0.0}
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
        if torch.distributed.get_rank() != 0:
            return
        busy, wait = sum(r["busy_s"] for r in every), sum(r["wait_s"] for r in every)
        tokens, flops = sum(r["answer_tokens"] for r in every), sum(r["flops"] for r in every)
        # the teacher's forwards per rank and second over the time it served (after the student's start-up)
        served_s = max(r["busy_s"] + r["wait_s"] for r in every)
        summary = {"send": self.cfg.teacher.send, "idle_fraction": wait / max(busy + wait, 1e-9),
                   "bytes_per_answer_token": sum(r["bytes_sent"] for r in every) / max(tokens, 1), "flops": flops,
                   "tflops_per_rank": flops / max(served_s, 1e-9) / len(every) / 1e12, "ranks": every}
        log.info("teacher ranks: busy %.1f s, waiting %.1f s (idle %.0f %%), %.0f bytes sent per answer token, "
                 "%.3g TFLOP/s per rank", busy, wait, 100 * summary["idle_fraction"],
                 summary["bytes_per_answer_token"], summary["tflops_per_rank"])
        os.makedirs(self.cfg.out, exist_ok=True)
        with open(os.path.join(self.cfg.out, "teacher_ranks.json"), "w") as f:
            json.dump(summary, f, indent=1)
