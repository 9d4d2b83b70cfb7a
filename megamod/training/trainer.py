"""The training loop every stage shares.

Student: megatron DDP + megatron optimizer (AdamW, clipping, plain or distributed), cosine schedule with warm-up,
gradient accumulation over micro-batches through `get_forward_backward_func`. Teacher (stages that have one):
built on the same pipeline stages, frozen, run on each student micro-batch; or, with `teacher: {cache: DIR}`, no
teacher model at all: each micro-batch carries the teacher's cached rows, looked up by sample id. Checkpoints at `checkpoint.every`
steps and at the end; a run resumes from the newest complete checkpoint of its run directory; the final student
is written to `<out>/model`, the input of the next stage. A signal in `checkpoint.signals` stops the run at the next
step boundary with a checkpoint and exit status 75 (training/preemption.py).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil

import torch

from megamod import checkpoint as model_checkpoint
from megamod import distributed, performance
from megamod.distributed import collective_device
from megamod.training import checkpoint as train_checkpoint
from megamod.training.config import RunConfig, TeacherCacheConfig, TeacherRanksConfig, loss_weights
from megamod.flops import vision_flops
from megamod.training.metrics import StepLogger, Timer, micro_batch_counts, peak_memory_gb, step_flops
from megamod.loading.data import check_tokenizer_fits, load_run_tokenizer
from megamod.loading.microbatch import from_batch, pad_to
from megamod.loading.models import check_compatible, describe, load, load_teacher, vocab_rows
from megamod.models.moe_log import start_aux_loss_log
from megamod.teacher_cache.reader import open_cache
from megamod.training.models import DistillPair, shared_vision_tower, unwrap
from megamod.training.checkpoint_writers import BackgroundWriter, bound_writers
from megamod.training.objective import Objective
from megamod.training.preemption import Preempted, StopOnSignal
from megamod.training.stages import apply_trainable, get_stage
from megamod.training.step import build_optimizer, train_step, wrap_ddp

log = logging.getLogger(__name__)

PREFERENCE_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


class Trainer:
    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps

        self.cfg, self.stage = cfg, get_stage(cfg.stage)
        p = cfg.parallel
        remote = self.stage.teacher and isinstance(cfg.teacher, TeacherRanksConfig)
        split = None
        if remote:  # the teacher on its own ranks: this process must be one of the student's (training/teacher_ranks/)
            from megamod import split_world as world
            from megamod.training.teacher_ranks import launch

            split = world.current() or launch.start(cfg)
            if split.teacher:
                raise RuntimeError(f"global rank {split.global_rank} is a teacher rank (teacher.ranks="
                                   f"{cfg.teacher.ranks}): it serves the teacher (teacher_ranks.launch.serve), "
                                   f"the Trainer runs on the student's ranks")
        distributed.initialize(distributed.ParallelConfig(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp), seed=cfg.seed,
                               timeout_s=p.timeout_s)
        self.rank, self.dtype = torch.distributed.get_rank(), model_checkpoint.resolve_dtype(cfg.dtype)
        start_aux_loss_log()  # megatron-core's MoE log and aux-loss scale are process-wide: this run's from here
        performance.configure(cfg.performance)  # before any model is built
        performance.resolve(self.dtype)  # an option forced on where it cannot run raises, naming it
        if self.rank == 0:
            performance.log_table(self.dtype)
        self.ckpt_root = os.path.join(cfg.out, "checkpoints")
        train_checkpoint.check_writable(self.ckpt_root)
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.last_stage = ps.is_pipeline_last_stage()

        # The losses' vocabulary is the tokenizer's (data.tokenizer or the student's); a teacher and the student are
        # built with one padded vocabulary width, so that their logit shards line up under TP.
        self.tokenizer = load_run_tokenizer(cfg.data.tokenizer, cfg.student)
        online_teacher = self.stage.teacher and not isinstance(cfg.teacher, TeacherCacheConfig)
        teacher_ckpt = cfg.teacher.ckpt if remote else cfg.teacher
        rows = vocab_rows(cfg.student, *([teacher_ckpt] if online_teacher else []))
        self.student = load(cfg.student, self.dtype, vocab_rows=rows)
        check_tokenizer_fits(self.student, self.tokenizer, cfg.student)
        sparse = self.student.language.num_experts is not None
        if self.stage.sparse is not None and sparse != self.stage.sparse:
            raise ValueError(f"stage {cfg.stage} trains a {'sparse' if self.stage.sparse else 'dense'} student; "
                             f"{cfg.student} is {'sparse' if sparse else 'dense'}"
                             + (" (run `megamod upcycle` first)" if self.stage.sparse else ""))
        self.sparse = sparse
        self.groups = tuple(cfg.trainable) if cfg.trainable is not None else self.stage.trainable
        self.trainable = apply_trainable(self.student.model, self.groups)
        self._check_trainable()
        self.ddp = wrap_ddp(self.student.model, cfg.optim.distributed_optimizer)
        self.teacher = self.teacher_cache = self.remote = None
        if remote:
            check_compatible(describe(teacher_ckpt), self.student, teacher_ckpt, self.tokenizer)
        elif self.stage.teacher and isinstance(cfg.teacher, TeacherCacheConfig):
            self.teacher_cache = open_cache(cfg.teacher.cache, self.tokenizer, self.stage.pairs)
        elif self.stage.teacher:
            self.teacher = load_teacher(cfg.teacher, self.student, self.dtype,
                                        self.student.model.config.sequence_parallel, self.tokenizer)
        self.pair = DistillPair(self.ddp, self.teacher.model) if self.teacher and p.pp > 1 else None
        # One CLIP forward per micro-batch for both models when their towers are the same (checked by content):
        # shared_tower is the teacher's on the first pipeline stage, None elsewhere.
        self.shared_vision, self.shared_tower = False, None
        if self.teacher is not None and self.student.family.vision(self.student.cfg) is not None:
            self.shared_vision, self.shared_tower, why = shared_vision_tower(self.ddp, self.teacher.model)
            if self.rank == 0:
                log.info("vision tower: %s (%s)", "shared, one forward per micro-batch for teacher and student"
                         if self.shared_vision else "not shared, teacher and student run their own", why)
        o = cfg.optim
        self.lr = o.lr if o.lr is not None else self.stage.lr
        self.optimizer = build_optimizer([self.ddp], lr=self.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                                         use_distributed_optimizer=o.distributed_optimizer,
                                         adam_betas=(o.adam_beta1, o.adam_beta2), min_lr=o.min_lr,
                                         initial_loss_scale=o.initial_loss_scale)
        self._build_data()
        if remote:
            from megamod.training.teacher_ranks.client import RemoteTeacher

            self.remote = RemoteTeacher(cfg, split, self.student, self.tokenizer, self.dtype)
        self.sampler_state = None  # the data position after the micro-batches of the last step trained
        self.objective = Objective(loss_weights(cfg), self.tokenizer.vocab_size, self.student.family,
                                   cfg.loss.kd, cfg.loss.temperature, cfg.loss.preference, cfg.loss.beta,
                                   chunk_tokens=cfg.loss.chunk_tokens)
        self._check_losses()
        self.scheduler = self._build_scheduler()
        self.step = self.saved_step = 0  # saved_step: of the newest checkpoint (0: none to save at step 0)
        async_save = cfg.checkpoint.async_save
        if async_save is None:
            async_save = torch.cuda.is_available()
        self.writer = BackgroundWriter() if async_save else None
        if cfg.checkpoint.resume:
            self._resume()

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _check_trainable(self) -> None:
        count = torch.tensor([sum(p.numel() for p in self.student.model.parameters() if p.requires_grad)],
                             device=collective_device())
        torch.distributed.all_reduce(count)
        if int(count) == 0:
            raise ValueError(f"stage {self.cfg.stage} trains {self.groups}, which matches no parameter of "
                             f"{self.cfg.student} ({self.student.kind} model)")

    def _check_losses(self) -> None:
        w = self.objective.weights
        if not w:
            raise ValueError(f"stage {self.cfg.stage}: every loss weight is zero")
        if ("kd" in w or "preference" in w) and self.teacher is None and self.teacher_cache is None \
                and self.remote is None:
            raise ValueError(f"losses {sorted(w)} need a teacher; stage {self.cfg.stage} has none")
        if self.remote is not None and self.stage.pairs and "kd" in w:
            raise ValueError(f"stage {self.cfg.stage}: a teacher on its own ranks sends preference pairs' reference "
                             f"log-probs only, not KD rows; drop loss.weights.kd")
        if ("preference" in w) != self.stage.pairs:
            raise ValueError(f"stage {self.cfg.stage}: the preference loss goes with pair data and only with it")

    def _build_data(self) -> None:
        from megamod.data.datasets import MixedDataset
        from megamod.data.sampler import MixtureSampler, StatefulLoader
        from megamod.loading.data import build_collator, build_datasets

        cfg, d = self.cfg, self.cfg.data
        tok = self.tokenizer
        kind = "pairs" if self.stage.pairs else "conversations"
        datasets = build_datasets(self.student, tok, d.train, kind, d.max_length, d.on_bad_sample, d.check_images)
        dataset = MixedDataset(datasets)
        self.sampler = MixtureSampler(dataset.sizes, [s.weight for s in d.train], seed=d.seed, dp_rank=self.dp_rank,
                                      dp_size=self.dp, epoch_size=d.epoch_size,
                                      block_size=cfg.schedule.micro_batch_size,
                                      lengths=dataset.lengths if d.group_by_length else None,
                                      group_size=cfg.schedule.global_batch_size if d.group_by_length else None)
        collator = build_collator(self.student, tok, self.cfg.parallel.tp
                                  if self.student.model.config.sequence_parallel else 1)
        s = cfg.schedule
        self.micro_batch_size = s.micro_batch_size
        per_step = s.micro_batch_size * self.dp
        if s.global_batch_size % per_step:
            raise ValueError(f"schedule.global_batch_size {s.global_batch_size} is not a multiple of micro_batch_size "
                             f"x data-parallel size = {s.micro_batch_size} x {self.dp}")
        self.num_micro = s.global_batch_size // per_step
        self.loader = StatefulLoader(dataset, self.sampler, collator, s.micro_batch_size, num_workers=d.num_workers)
        self.total_steps = s.steps or max(1, int(s.epochs * self.sampler.epoch_size) // s.global_batch_size)

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.cfg.optim
        warmup = int(round(o.warmup_fraction * self.total_steps))
        return OptimizerParamScheduler(self.optimizer, init_lr=0.0, max_lr=self.lr, min_lr=o.min_lr,
                                       lr_warmup_steps=warmup, lr_decay_steps=self.total_steps,
                                       lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
                                       wd_incr_steps=self.total_steps, wd_incr_style="constant")

    def _resume(self) -> None:
        directory = train_checkpoint.find_resume(self.ckpt_root)
        if directory is None:
            return
        model = json.loads(json.dumps(self.student.cfg.to_dict()))  # as saved: tuples become lists
        saved = train_checkpoint.read_state(directory).get("model", model)
        if saved != model:  # e.g. a stage re-run on a new student into the old run's out/
            raise ValueError(f"{directory} holds a checkpoint of another model ({_first_difference(saved, model)}): "
                             f"not a resume of this run; delete {self.ckpt_root} or set checkpoint.resume: false")
        state = train_checkpoint.load(directory, unwrap(self.ddp), self.optimizer)
        if state.get("stage") != self.cfg.stage:
            raise ValueError(f"{directory} is a checkpoint of stage {state.get('stage')}, this run is {self.cfg.stage}")
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["sampler"])
        self.step = self.saved_step = state["step"]
        if self.rank == 0:
            log.info("resumed from %s at step %d", directory, self.step)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _fetch(self, batches) -> list:
        """One step's micro-batches on the CPU, each with its samples' ids (their locations where they have none)."""
        takes_images = self.student.family.takes_images
        items = []
        for _ in range(self.num_micro):
            batch = next(batches)
            mb = from_batch(batch, takes_images)
            rows = batch.chosen if hasattr(batch, "chosen") else batch
            if self.teacher_cache is not None:
                mb = dataclasses.replace(mb, cached=self.teacher_cache.for_micro_batch(rows.sample_ids,
                                                                                       rows.locations, mb))
            items.append((mb, [sid if sid is not None else where
                               for sid, where in zip(rows.sample_ids, rows.locations)]))
        if self.cfg.parallel.pp > 1:  # pipeline stages exchange activations of one shape per step
            length = max(mb.seq_length for mb, _ in items)
            items = [(pad_to(mb, length, self.tokenizer.pad_id), ids) for mb, ids in items]
        return items

    def _micro_batches(self, batches) -> list:
        """This step's micro-batches on the training device. A teacher on its own ranks gets them one step ahead:
        its rows of this step come back, then the next step's micro-batches go out, then this step trains."""
        if self.remote is None:
            mbs = [mb for mb, _ in self._fetch(batches)]
            self.sampler_state = copy.deepcopy(self.loader.state_dict())
        else:
            if self.remote.pending is None:  # the first step of this process
                self.remote.send(self.step, self._fetch(batches))
            self.sampler_state = copy.deepcopy(self.loader.state_dict())  # before the next step's are read
            mbs = self.remote.receive(self.step)
            if self.step + 1 < self.total_steps:
                self.remote.send(self.step + 1, self._fetch(batches))
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        return [mb.to(device) for mb in mbs]

    def _report_keys(self) -> list[str]:
        keys = ["loss", *sorted(self.objective.weights)]
        return keys + list(PREFERENCE_METRICS) if "preference" in self.objective.weights else keys

    def _reduce(self, losses: list[dict], step: int) -> dict:
        """Mean over micro-batches and data-parallel ranks of what the last stage reported; non-finite -> error."""
        from megatron.core import parallel_state as ps

        keys = self._report_keys()
        reporter = self.last_stage and ps.get_tensor_model_parallel_rank() == 0
        local = torch.zeros(len(keys) + 1, dtype=torch.float64, device=collective_device())
        if reporter:
            for i, k in enumerate(keys):
                local[i] = sum(float(d[k]) for d in losses) / len(losses)
            local[-1] = 1
        bad = torch.tensor([0 if bool(torch.isfinite(local).all()) else 1], dtype=torch.int64, device=local.device)
        bad_ranks = [torch.zeros_like(bad) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(bad_ranks, bad)
        torch.distributed.all_reduce(local)
        metrics = {k: float(local[i] / local[-1]) for i, k in enumerate(keys)}
        ranks = [r for r, b in enumerate(bad_ranks) if int(b)]
        if ranks:
            raise FloatingPointError(f"non-finite loss at step {step} on rank(s) {ranks}: {metrics}")
        return metrics

    def _aux_loss(self) -> float | None:
        """The MoE load-balancing loss (without its coefficient) summed over layers, mean over micro-batches.

        megatron's reduce_aux_losses_tracker_across_ranks does the same reduction with ReduceOp.AVG, which gloo
        lacks: here AVG is a SUM divided by the group size."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        entry = tracker.get("load_balancing_loss")
        if entry is None:
            return None
        values = entry["values"].clone().double()
        torch.distributed.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        if entry.get("reduce_group") is not None:
            torch.distributed.all_reduce(values, group=entry["reduce_group"])
        if "needs_dp_avg" in entry:  # megatron-core 0.19
            dp_average = entry["needs_dp_avg"]
        else:  # 0.16: the DP average comes with a reduce group that does not span DP
            dp_average = entry.get("reduce_group") is not None and not entry.get("reduce_group_has_dp", False)
        if dp_average:
            torch.distributed.all_reduce(values, group=ps.get_data_parallel_group())
            values /= ps.get_data_parallel_world_size()
        if entry.get("avg_group") is not None:
            torch.distributed.all_reduce(values, group=entry["avg_group"])
            values /= torch.distributed.get_world_size(entry["avg_group"])
        entry["values"].zero_()
        return float(values.sum()) / self.num_micro

    def _throughput(self, mbs: list, seconds: float) -> dict:
        from megatron.core import parallel_state as ps

        counts = torch.tensor(micro_batch_counts(mbs), dtype=torch.float64, device=collective_device())
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())
        tokens, images, pairs = int(counts[0]), int(counts[1]), float(counts[2])
        flops = step_flops(self.student, tokens, pairs, images, self.groups)
        if self.teacher is not None:
            flops += step_flops(self.teacher, tokens, pairs, images)
            if self.shared_vision:  # one tower ran for both: the student's did not run
                flops -= vision_flops(self.teacher.cfg.vision, self.teacher.language.hidden_size, images)["vision"]
        world = torch.distributed.get_world_size()
        return {"tokens_per_s": tokens / seconds, "tflops_per_rank": flops / seconds / world / 1e12,
                "step_s": seconds, "peak_mem_gb": peak_memory_gb()}

    def _update_metrics(self, result) -> dict:
        """grad_norm and lr of an applied update; for one megatron skipped (fp16 gradients overflowed the loss
        scale, which it has now lowered), skipped=1 and the new scale. Any other non-finite norm is an error."""
        out = {"lr": self.optimizer.param_groups[0]["lr"]}
        if not result.update_successful:
            scale = float(self.optimizer.get_loss_scale())
            if self.rank == 0:
                log.warning("step %d: update skipped, fp16 gradients overflowed the loss scale (now %g)", self.step,
                            scale)
            return {"grad_norm": float("nan"), "skipped": 1, "loss_scale": scale, **out}
        grad_norm = float(result.grad_norm) if result.grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step} (rank {self.rank})")
        return {"grad_norm": grad_norm, **out}

    def _forward_step(self):
        teacher = self.teacher.model if self.teacher is not None else None
        return self.objective.forward_step(self.ddp, teacher, self.pair, self.shared_tower)

    def _train_state(self) -> dict:
        return {"stage": self.cfg.stage, "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler_state if self.sampler_state is not None else self.loader.state_dict(),
                "config": self.cfg.to_dict(), "model": self.student.cfg.to_dict()}

    def save_checkpoint(self) -> str:
        directory = train_checkpoint.save(self.ckpt_root, self.step, unwrap(self.ddp), self.optimizer,
                                          self._train_state(), keep=self.cfg.checkpoint.keep, writer=self.writer)
        self.saved_step = self.step
        return directory

    def train(self) -> list[dict]:
        """Runs to the last step; returns rank 0's per-step metrics."""
        cfg = self.cfg
        logger = StepLogger(self.rank == 0, self.total_steps, self.step, cfg.log.every,
                            os.path.join(cfg.out, "tensorboard") if cfg.log.tensorboard else None, cfg.log.progress,
                            title=cfg.stage, jsonl_path=os.path.join(cfg.out, "metrics.jsonl"))
        if self.rank == 0:
            log.info("stage %s: %d steps of %d samples (%d micro-batches of %d per data-parallel rank, dp=%d), "
                     "lr %g, trainable %s", cfg.stage, self.total_steps, cfg.schedule.global_batch_size,
                     self.num_micro, self.micro_batch_size, self.dp, self.lr, ",".join(self.groups))
        batches = iter(self.loader)
        self.ddp.train()
        timer = Timer()
        try:
            with StopOnSignal(cfg.checkpoint.signals) as stop, bound_writers():
                while self.step < self.total_steps:
                    received = stop.agreed()  # one all-reduce: all ranks stop at the same step
                    if received:
                        self._stop(received)
                    if self.writer is not None:
                        self.writer.poll()  # publishes a finished background write
                    self._train_one(batches, logger, timer)
                    every = cfg.checkpoint.every
                    if (every and self.step % every == 0) or self.step == self.total_steps:
                        self.save_checkpoint()
                        timer.lap()  # checkpoint time is not step time
                if self.writer is not None:
                    self.writer.wait()
                if self.remote is not None:
                    self.remote.close(0)  # the teacher's ranks are done
                self.export(os.path.join(cfg.out, "model"))
        except Exception as e:
            hint = ""
            if isinstance(e, RuntimeError):
                hint = (f"; if a collective failed or timed out, another rank died or hung longer than "
                        f"parallel.timeout_s={cfg.parallel.timeout_s:g} s: see its log")
            log.error("rank %d: training failed after step %d of %d (in the next step or a checkpoint)%s",
                      self.rank, self.step, self.total_steps, hint)
            raise
        finally:
            logger.close()
        return logger.history if self.rank == 0 else []

    def _train_one(self, batches, logger: StepLogger, timer: Timer) -> None:
        waited = self.remote.wait_s if self.remote is not None else 0.0
        mbs = self._micro_batches(batches)
        seq = mbs[0].seq_length
        adjust = self.pair.adjust_tensor_shapes if self.pair is not None else None
        result = train_step([self.ddp], self.optimizer, self._forward_step(), mbs, seq, self.micro_batch_size,
                            schedule_model=self.pair, adjust_tensor_shapes_fn=adjust)
        if result.update_successful:  # as Megatron-LM: a skipped update does not advance the schedule
            self.scheduler.step(increment=1)
        self.step += 1
        metrics = self._reduce(result.losses, self.step)
        aux = self._aux_loss() if self.sparse else None
        if aux is not None:
            metrics["aux"] = aux
        metrics.update(self._update_metrics(result))
        if self.remote is not None:  # the wait for the teacher's rows, on the last pipeline stage
            metrics["teacher_wait_s"] = self.remote.wait_s - waited
        metrics.update(self._throughput(mbs, timer.lap()))
        logger.log(self.step, metrics)

    def _stop(self, received: str) -> None:
        """Every rank: checkpoint the last finished step (unless it has one), then end the process (Preempted)."""
        if self.saved_step != self.step:
            self.save_checkpoint()
        if self.writer is not None:
            self.writer.wait()
        if self.rank == 0:
            where = train_checkpoint.step_dir(self.ckpt_root, self.step) if self.step else "none (no step yet)"
            log.warning("stopped on %s after step %d of %d: checkpoint %s; the same command resumes from it",
                        received, self.step, self.total_steps, where)
        if self.remote is not None:
            from megamod.training.preemption import EXIT_PREEMPTED

            self.remote.close(EXIT_PREEMPTED)
        raise Preempted(self.step, received)

    def export(self, directory: str) -> None:
        """The trained student as a plain model checkpoint (the next stage's `student`), tokenizer included."""
        if os.path.exists(os.path.join(directory, model_checkpoint.METADATA)):
            meta = model_checkpoint.read_metadata(directory)
            if meta.get("trained_steps") == self.step:
                return  # a re-run of a finished stage
        if self.rank == 0 and os.path.exists(directory):
            shutil.rmtree(directory)
        torch.distributed.barrier()
        meta = {**self.student.meta, "source": {"trained": self.cfg.stage, "from": self.cfg.student,
                                                "steps": self.step}, "trained_steps": self.step}
        model_checkpoint.save_model([unwrap(self.ddp)], directory, meta)
        tokenizer = self.tokenizer.path if os.path.isdir(self.tokenizer.path) else None
        if self.rank == 0 and tokenizer:
            shutil.copytree(tokenizer, os.path.join(directory, "tokenizer"))
        torch.distributed.barrier()


def _first_difference(saved: dict, current: dict, prefix: str = "") -> str:
    """'language.num_layers: 2 in the checkpoint, 4 here' for the first key where two config dicts differ."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _first_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            return f"{prefix}{key}: {a!r} in the checkpoint, {b!r} here"
    return "same"
