"""Run the teacher alone over a data set and keep what the student needs (format.py has the layout).

The teacher runs at its own TP/PP layout (data parallel over whatever ranks are left: shard s goes to DP rank
s mod dp), through the training data pipeline (loading/data.py) and megamod's forward-only pass, so that its
inputs are exactly those the online teacher would see. Samples are split into shards of `shard_size` in file
order; a shard is written and indexed on its own, so a killed run resumes at the first unfinished shard.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from megamod.teacher_cache import format as fmt

log = logging.getLogger(__name__)


@dataclass
class CacheJob:
    ckpt: str
    data: list  # training.config.DataSource
    out: str
    kind: str = "conversations"
    topk: int = 64
    dtype: str = "bfloat16"  # storage of the top-k log-probs
    shard_size: int = 1024  # samples per shard
    batch_size: int = 4
    max_length: int = 2048
    tokenizer: str | None = None
    model_dtype: str = "auto"
    tp: int = 1
    pp: int = 1
    progress: bool = True

    def plan(self, tokenizer, num_samples: int) -> dict:
        """What the cache holds; a resumed run must agree on all of it. The vocabulary is the tokenizer's (the
        teacher's rows past it are padding); its fingerprint lets training refuse a student with another one."""
        from megamod.data.tokenizer import vocabulary_fingerprint

        return {"format": fmt.FORMAT, "version": fmt.VERSION, "kind": self.kind,
                "topk": self.topk if self.kind == "conversations" else None, "dtype": self.dtype,
                "teacher": os.path.abspath(self.ckpt), "vocab_size": tokenizer.vocab_size,
                "tokenizer": {"path": os.path.abspath(tokenizer.path), "sha256": vocabulary_fingerprint(tokenizer)},
                "max_length": self.max_length,
                "data": [{"path": os.path.abspath(s.path), "template": s.template} for s in self.data],
                "shard_size": self.shard_size, "num_samples": num_samples}


def _samples(datasets) -> list[tuple[int, int, str]]:
    """(source, index, sample id) of every sample; ids must exist and be unique: they are the cache's keys."""
    seen, out = {}, []
    for s, ds in enumerate(datasets):
        for k in range(len(ds)):
            sid = ds.sample_id(k)
            if sid is None:
                raise fmt.CacheError(f"{ds.location(k)}: the sample has no id; a teacher cache keys its rows by "
                                     f"sample id (field \"id\", or \"idx\" for pairs)")
            if sid in seen:
                raise fmt.CacheError(f"sample id {sid!r} appears twice: {seen[sid]} and {ds.location(k)}; a teacher "
                                     f"cache needs unique ids")
            seen[sid] = ds.location(k)
            out.append((s, k, sid))
    return out


def _check_plan(out: str, plan: dict) -> None:
    path = os.path.join(out, fmt.PLAN)
    if os.path.exists(path):
        old = fmt.read_json(path, "")
        diff = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
        if diff:
            raise fmt.CacheError(f"{out} holds a cache written with other settings (then vs now): {diff}; use "
                                 f"another --out or delete it")
    else:
        os.makedirs(out, exist_ok=True)
        fmt.write_json_atomic(path, plan)


class _Rows:
    """What one shard accumulates on the writing rank."""

    def __init__(self, kind: str):
        self.kind, self.parts, self.ids, self.starts, self.counts, self.rows = kind, [], [], [], [], 0

    def add(self, sample_id: str, tensors: tuple) -> None:
        n = tensors[0].shape[0]
        self.parts.append(tensors)
        self.ids.append(sample_id)
        self.starts.append(self.rows)
        self.counts.append(n)
        self.rows += n

    def tensors(self) -> dict:
        names = fmt.TENSORS[self.kind]
        return {name: torch.cat([p[i] for p in self.parts]) for i, name in enumerate(names)}


def _teacher_rows(job: CacheJob, teacher, mb, vocab_size: int, dtype: torch.dtype):
    """Per sample of the micro-batch, its rows (format.py), on the last pipeline stage; None elsewhere."""
    from megamod.inference import forward_only
    from megamod.losses.preference import sequence_logprobs_B
    from megamod.losses.topk_kd import teacher_topk_BSK
    from megamod.loading.microbatch import run_model

    if job.kind == "pairs":
        keep = lambda logits_BSv: sequence_logprobs_B(logits_BSv, mb.labels, mb.loss_mask, vocab_size)  # noqa: E731
    else:
        keep = lambda logits_BSv: teacher_topk_BSK(logits_BSv, vocab_size, job.topk)  # noqa: E731
    out = forward_only(teacher.model, lambda m: run_model(m, mb, teacher.family), keep, mb.seq_length, mb.tokens.shape[0])
    if out is None:
        return None
    mask_BS = mb.loss_mask.bool()
    if job.kind == "pairs":
        P = mb.pairs
        reference_P2 = torch.stack([out[:P], out[P:]], dim=1).float().cpu()
        crc_2P = [[fmt.labels_crc(mb.labels[r][mask_BS[r]].cpu()) for r in (p, P + p)] for p in range(P)]
        return [(reference_P2[p:p + 1], torch.tensor([crc_2P[p]], dtype=torch.int64)) for p in range(P)]
    ids_BSK, logprobs_BSK, log_tail_BS = out
    rows = []
    for b in range(mb.tokens.shape[0]):
        m = mask_BS[b]
        rows.append((ids_BSK[b][m].to(torch.int32).cpu(), logprobs_BSK[b][m].to(dtype).cpu(),
                     log_tail_BS[b][m].float().cpu(), mb.labels[b][m].to(torch.int32).cpu()))
    return rows


def write_cache(job: CacheJob) -> dict | None:
    """Every rank of a world initialised with the job's TP and PP (distributed.initialize, by the entry point) calls
    this; returns the manifest on global rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps

    from megamod import checkpoint
    from megamod.data.datasets import MixedDataset
    from megamod.loading.data import build_collator, build_datasets, load_model_tokenizer
    from megamod.loading.microbatch import from_batch
    from megamod.loading.models import load_frozen_teacher

    if job.kind not in fmt.KINDS:
        raise ValueError(f"kind {job.kind!r} is not one of {fmt.KINDS}")
    if job.dtype not in fmt.DTYPES:
        raise ValueError(f"storage dtype {job.dtype!r} is not one of {sorted(fmt.DTYPES)}")
    layout = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) \
        if ps.model_parallel_is_initialized() else None
    if layout != (job.tp, job.pp):
        raise RuntimeError(f"write_cache runs in the caller's parallel state; it is {layout or 'not initialised'}, "
                           f"the job asks TP={job.tp} PP={job.pp}: call distributed.initialize("
                           f"ParallelConfig(tp={job.tp}, pp={job.pp})) first")
    teacher = load_frozen_teacher(job.ckpt, checkpoint.resolve_dtype(job.model_dtype))
    tok = load_model_tokenizer(teacher, job.tokenizer, job.ckpt)
    vocab_size = tok.vocab_size  # the teacher's rows past the tokenizer are padding: never in the top-k or the tail
    if job.kind == "conversations" and not 0 < job.topk <= vocab_size:
        raise ValueError(f"--topk {job.topk} must be in [1, vocabulary size {vocab_size}]")
    datasets = build_datasets(teacher, tok, job.data, job.kind, job.max_length)
    dataset = MixedDataset(datasets)
    sp = teacher.model.config.sequence_parallel
    collator = build_collator(teacher, tok, job.tp if sp else 1)
    samples = _samples(datasets)
    plan = job.plan(tok, len(samples))
    num_shards = -(-len(samples) // job.shard_size)
    rank = torch.distributed.get_rank()
    done = [None]
    if rank == 0:
        _check_plan(job.out, plan)
        done = [[s for s in range(num_shards) if fmt.finished_shard(job.out, s) is not None]]
    torch.distributed.broadcast_object_list(done, src=0)
    done = set(done[0])
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    mine = [s for s in range(num_shards) if s % dp == dp_rank and s not in done]
    if rank == 0:
        log.info("teacher cache %s: %d samples in %d shards, %d already written; this run writes %d", job.out,
                 len(samples), num_shards, len(done), len(mine) * dp)
    bar = None
    if job.progress and rank == 0:
        from tqdm import tqdm

        written = sum(len(samples[s * job.shard_size:(s + 1) * job.shard_size]) for s in done)
        bar = tqdm(total=len(samples), initial=written, desc="cache-teacher", dynamic_ncols=True)
    offsets = [sum(len(d) for d in datasets[:i]) for i in range(len(datasets))]
    store = fmt.DTYPES[job.dtype]
    for shard in mine:
        chunk = samples[shard * job.shard_size:(shard + 1) * job.shard_size]
        rows = _Rows(job.kind)
        for start in range(0, len(chunk), job.batch_size):
            part = chunk[start:start + job.batch_size]
            mb = from_batch(collator([dataset[offsets[s] + k] for s, k, _ in part]), teacher.family.takes_images)
            out = _teacher_rows(job, teacher, mb, vocab_size, store)
            if writer:
                for (_, _, sid), tensors in zip(part, out):
                    rows.add(sid, tensors)
            if bar is not None:
                bar.update(len(part) * dp)
        if writer:
            fmt.write_shard(job.out, shard, rows.tensors(), rows.ids, rows.starts, rows.counts)
    if bar is not None:
        bar.close()
    torch.distributed.barrier()
    if rank != 0:
        return None
    return _write_manifest(job.out, plan, num_shards)


def _write_manifest(out: str, plan: dict, num_shards: int) -> dict:
    shards, index = [], {}
    for s in range(num_shards):
        entry = fmt.finished_shard(out, s)
        if entry is None:
            raise fmt.CacheError(f"{out}: shard {s} was not written completely; re-run cache-teacher to resume")
        for sid, start, count in zip(entry["sample_ids"], entry["starts"], entry["counts"]):
            index[sid] = [s, start, count]
        shards.append({k: entry[k] for k in ("file", "sha256", "bytes")} | {"samples": len(entry["sample_ids"])})
    manifest = {**plan, "shards": shards, "samples": index}
    fmt.write_json_atomic(os.path.join(out, fmt.MANIFEST), manifest)
    return manifest
