"""Read a teacher cache by sample id and line its rows up with a student micro-batch.

Rows are found by sample id, never by position in a file, so a run with another data-parallel size, batch size or
order reads the right ones. Every row is checked against the student's batch (number of answer positions and
their tokens), so a cache written with another tokenizer, template or max_length is an error naming the sample,
not a silent misalignment. A shard's sha256 is checked the first time this process reads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from megamod.teacher_cache import format as fmt

REQUIRED = ("format", "version", "kind", "topk", "dtype", "teacher", "vocab_size", "num_samples", "shards", "samples")


@dataclass
class CachedTeacher:
    """The cached teacher of one micro-batch. Conversations: `ids_BSK`, `logprobs_BSK`, `log_tail_BS` (zeros
    outside the answer positions); pairs: `reference_2B` (chosen rows, then rejected, as MicroBatch orders them).
    A teacher on its own ranks with `send: full` fills `logits_BSv` instead: this rank's vocabulary columns of its
    logits (zeros outside the answer positions and past the tokenizer's ids)."""

    ids_BSK: torch.Tensor | None = None
    logprobs_BSK: torch.Tensor | None = None
    log_tail_BS: torch.Tensor | None = None
    reference_2B: torch.Tensor | None = None
    logits_BSv: torch.Tensor | None = None

    def to(self, device) -> "CachedTeacher":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return CachedTeacher(move(self.ids_BSK), move(self.logprobs_BSK), move(self.log_tail_BS),
                             move(self.reference_2B), move(self.logits_BSv))

    def pad_to(self, length: int) -> "CachedTeacher":
        if self.logits_BSv is not None and self.logits_BSv.shape[1] < length:
            extra = self.logits_BSv.new_zeros((self.logits_BSv.shape[0], length - self.logits_BSv.shape[1],
                                               self.logits_BSv.shape[2]))
            return replace(self, logits_BSv=torch.cat([self.logits_BSv, extra], dim=1))
        if self.ids_BSK is None or self.ids_BSK.shape[1] >= length:
            return self
        extra = length - self.ids_BSK.shape[1]

        def pad(t):
            return torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)

        return replace(self, ids_BSK=pad(self.ids_BSK), logprobs_BSK=pad(self.logprobs_BSK),
                       log_tail_BS=pad(self.log_tail_BS))


class TeacherCache:
    def __init__(self, directory: str):
        self.directory = directory
        if not os.path.isdir(directory):
            raise fmt.CacheError(f"teacher cache {directory} does not exist")
        self.manifest = m = fmt.read_json(os.path.join(directory, fmt.MANIFEST),
                                          f"teacher cache {directory} is incomplete (cache-teacher did not finish; "
                                          f"re-run it with the same arguments to resume)")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise fmt.CacheError(f"{directory}/{fmt.MANIFEST} lacks {missing}: not a complete megamod teacher cache")
        if m["format"] != fmt.FORMAT or m["version"] != fmt.VERSION:
            raise fmt.CacheError(f"{directory}/{fmt.MANIFEST}: format {m['format']} v{m['version']}, this megamod "
                                 f"reads {fmt.FORMAT} v{fmt.VERSION}")
        if m["kind"] not in fmt.KINDS:
            raise fmt.CacheError(f"{directory}/{fmt.MANIFEST}: unknown kind {m['kind']!r}")
        if len(m["samples"]) != m["num_samples"]:
            raise fmt.CacheError(f"{directory}/{fmt.MANIFEST} indexes {len(m['samples'])} samples of "
                                 f"{m['num_samples']}: the cache is incomplete")
        for entry in m["shards"]:
            path = os.path.join(directory, entry["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
                raise fmt.CacheError(f"teacher cache {directory}: shard {entry['file']} is missing or not "
                                     f"{entry['bytes']} bytes long: the cache is incomplete or damaged")
        self.kind, self.topk, self.vocab_size = m["kind"], m["topk"], m["vocab_size"]
        self._open: dict[int, object] = {}

    def _shard(self, index: int):
        if index not in self._open:
            from safetensors import safe_open

            path = fmt.check_shard(self.directory, self.manifest["shards"][index])
            self._open[index] = safe_open(path, framework="pt")
        return self._open[index]

    def rows(self, sample_id: str) -> tuple:
        """The sample's tensors, in format.TENSORS[kind] order."""
        if sample_id not in self.manifest["samples"]:
            raise fmt.CacheError(f"sample id {sample_id!r} is not in teacher cache {self.directory} (written from "
                                 f"{[d['path'] for d in self.manifest.get('data', [])]}): cache the data you train on")
        shard, start, count = self.manifest["samples"][sample_id]
        f = self._shard(shard)
        out = tuple(f.get_slice(name)[start:start + count] for name in fmt.TENSORS[self.kind])
        if self.kind == "conversations" and count and (int(out[0].min()) < 0 or int(out[0].max()) >= self.vocab_size):
            raise fmt.CacheError(f"teacher cache {self.directory}: sample {sample_id!r} has token ids outside "
                                 f"[0, {self.vocab_size}) in {self.manifest['shards'][shard]['file']}")
        return out

    def for_micro_batch(self, sample_ids: list, locations: list, mb) -> CachedTeacher:
        """The rows of a collated micro-batch (MicroBatch `mb`, built from the batch with these sample ids)."""
        for sid, where in zip(sample_ids, locations):
            if sid is None:
                raise fmt.CacheError(f"{where}: the sample has no id; a teacher cache keys its rows by sample id")
        mask_BS = mb.loss_mask.bool()
        if self.kind == "pairs":
            return self._pairs(sample_ids, locations, mb, mask_BS)
        B, S = mb.tokens.shape
        ids_BSK = torch.zeros(B, S, self.topk, dtype=torch.int64)
        logprobs_BSK = torch.zeros(B, S, self.topk, dtype=fmt.DTYPES[self.manifest["dtype"]])
        log_tail_BS = torch.zeros(B, S)
        for b, (sid, where) in enumerate(zip(sample_ids, locations)):
            ids_NK, logprobs_NK, log_tail_N, labels_N = self.rows(sid)
            m = mask_BS[b]
            if int(m.sum()) != labels_N.shape[0] or not torch.equal(mb.labels[b][m], labels_N.long()):
                raise self._mismatch(sid, where, f"{int(m.sum())} answer tokens", f"{labels_N.shape[0]}")
            ids_BSK[b][m], logprobs_BSK[b][m], log_tail_BS[b][m] = ids_NK.long(), logprobs_NK, log_tail_N
        return CachedTeacher(ids_BSK=ids_BSK, logprobs_BSK=logprobs_BSK, log_tail_BS=log_tail_BS)

    def _pairs(self, sample_ids, locations, mb, mask_BS) -> CachedTeacher:
        P = mb.pairs
        if not P or len(sample_ids) != P:
            raise fmt.CacheError(f"teacher cache {self.directory} holds preference pairs; the batch is not pairs")
        reference_P2 = torch.zeros(P, 2)
        for p, (sid, where) in enumerate(zip(sample_ids, locations)):
            reference_12, crc_12 = self.rows(sid)
            crcs = [fmt.labels_crc(mb.labels[r][mask_BS[r]].cpu()) for r in (p, P + p)]
            if crcs != crc_12[0].tolist():
                raise self._mismatch(sid, where, "chosen/rejected answer tokens", "other answer tokens")
            reference_P2[p] = reference_12[0]
        return CachedTeacher(reference_2B=torch.cat([reference_P2[:, 0], reference_P2[:, 1]]))

    def _mismatch(self, sid, where, ours: str, cached: str) -> fmt.CacheError:
        m = self.manifest
        return fmt.CacheError(f"{where} (id {sid!r}): the student's batch has {ours}, teacher cache {self.directory} "
                              f"has {cached}: the cache was written with another tokenizer, template or max_length "
                              f"(it used max_length {m.get('max_length')}, data {m.get('data')}); re-write it with the "
                              f"training data settings")


def open_cache(directory: str, tokenizer, pairs: bool):
    """A teacher cache of the kind the stage reads (pairs or conversations), written with the run's tokenizer."""
    from megamod.data.tokenizer import vocabulary_fingerprint

    cache = TeacherCache(directory)
    kind = "pairs" if pairs else "conversations"
    if cache.kind != kind:
        raise fmt.CacheError(f"teacher cache {directory} holds {cache.kind}; this stage trains on {kind}")
    fingerprint = vocabulary_fingerprint(tokenizer)
    written = cache.manifest.get("tokenizer") or {}  # absent in caches written before it was recorded
    if cache.vocab_size != tokenizer.vocab_size or written.get("sha256", fingerprint) != fingerprint:
        raise fmt.CacheError(f"teacher cache {directory} was written with tokenizer {written.get('path', '?')} "
                         f"({cache.vocab_size} ids), the student reads tokenizer {tokenizer.path} "
                         f"({tokenizer.vocab_size} ids): different tokenizers; re-write the cache with the student's")
    return cache
