"""The on-disk layout of a teacher cache, and the checks that make a damaged one an error.

    DIR/plan.json                    what is being cached (teacher, data, kind, top-k, dtype, shard size, and the
                                     vocabulary: the tokenizer's size, path and sha256 of its id -> token table);
                                     written first, so that a resumed run with other settings is refused
    DIR/shards/shard-NNNNN.safetensors   the rows of one shard of samples
    DIR/shards/shard-NNNNN.json      that shard's index (sample ids, first row, row count) and the sha256 and size
                                     of its .safetensors file; written after it: a shard without it is unfinished
    DIR/manifest.json                plan + every shard's file, sha256 and size + sample id -> [shard, first row,
                                     rows]; written last: a cache without it is incomplete

Tensors of a conversations shard (R = answer positions of its samples, in sample order, each sample's positions in
sequence order): `ids` int32 [R, K], `logprobs` [R, K] in the chosen dtype, `log_tail` float32 [R] (the log of the
teacher's mass outside the top-k; fp32 whatever the dtype: it is one number per position and small tails need the
range), `labels` int32 [R] (the answer token at each position, so that a student batch tokenised differently is
caught). A pairs shard (R = pairs): `reference` float32 [R, 2] (log pi_T(y+|x), log pi_T(y-|x), exactly the fp32
values the online path computes) and `labels_crc` int64 [R, 2] (crc32 of each answer's token ids).
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib

import torch

FORMAT = "megamod-teacher-cache"
VERSION = 1
KINDS = ("conversations", "pairs")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PLAN, MANIFEST, SHARDS = "plan.json", "manifest.json", "shards"
TENSORS = {"conversations": ("ids", "logprobs", "log_tail", "labels"), "pairs": ("reference", "labels_crc")}


class CacheError(ValueError):
    """A teacher cache that is missing, incomplete, damaged or written for other data."""


def shard_name(index: int) -> str:
    return os.path.join(SHARDS, f"shard-{index:05d}")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def labels_crc(labels_N: torch.Tensor) -> int:
    return zlib.crc32(labels_N.to(torch.int32).contiguous().numpy().tobytes())


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CacheError(f"{path} not found: {what}") from None
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON ({e}): the file is damaged") from None


def write_shard(directory: str, index: int, tensors: dict, sample_ids: list[str], starts: list[int],
                counts: list[int]) -> dict:
    """The shard's data file, then its index (atomically); returns the index."""
    from safetensors.torch import save_file

    base = os.path.join(directory, shard_name(index))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    tmp = f"{base}.safetensors.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, base + ".safetensors")
    entry = {"shard": index, "file": shard_name(index) + ".safetensors", "sha256": sha256_file(base + ".safetensors"),
             "bytes": os.path.getsize(base + ".safetensors"), "sample_ids": sample_ids, "starts": starts,
             "counts": counts}
    write_json_atomic(base + ".json", entry)
    return entry


def finished_shard(directory: str, index: int) -> dict | None:
    """The index of a shard whose data file is complete and intact, else None (it is to be (re)written)."""
    base = os.path.join(directory, shard_name(index))
    if not os.path.exists(base + ".json"):
        return None
    try:
        entry = read_json(base + ".json", "")
    except CacheError:
        return None
    data = os.path.join(directory, entry.get("file", ""))
    if not os.path.isfile(data) or os.path.getsize(data) != entry.get("bytes") or sha256_file(data) != entry.get(
            "sha256"):
        return None
    return entry


def check_shard(directory: str, entry: dict) -> str:
    """The path of a listed shard after checking its size and sha256 against the manifest."""
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        raise CacheError(f"teacher cache {directory}: shard {entry['file']} listed in {MANIFEST} is missing")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise CacheError(f"teacher cache {directory}: shard {entry['file']} has {size} bytes, the manifest says "
                         f"{entry['bytes']}: the file is truncated or damaged; re-run cache-teacher")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CacheError(f"teacher cache {directory}: shard {entry['file']} fails its checksum (sha256 {digest[:16]}..., "
                         f"manifest {entry['sha256'][:16]}...): the file is damaged; delete it and re-run "
                         f"cache-teacher to rewrite it")
    return path
