"""Model weights as Megatron dist checkpoints (torch_dist), with megamod's metadata beside them.

A checkpoint directory holds the dist-checkpoint files plus `megamod.json` (model config, dtype, provenance),
written last: a directory without it is incomplete. Keys are Megatron's canonical ones, so a checkpoint written
at one TP/PP/EP layout loads at any other.
"""
from __future__ import annotations

import json
import os

import torch

METADATA = "megamod.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_dtype(name: str) -> torch.dtype:
    """A dtype name, or "auto": bf16 on GPU, fp32 on CPU (training and evaluation alike)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return dtype_from_name(name)


def read_metadata(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, METADATA)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a megamod checkpoint, or it was not completely written"
        )
    with open(path) as f:
        return json.load(f)


def _sharded(model_chunks):
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}, chunks


def save_model(model_chunks, ckpt_dir: str, metadata: dict) -> None:
    """Every rank calls this; rank 0 writes the metadata once all shards are on disk."""
    from megatron.core import dist_checkpointing

    sharded, _ = _sharded(model_chunks)
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.listdir(ckpt_dir):
            raise FileExistsError(f"{ckpt_dir} is not empty; refusing to mix two checkpoints")
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, ckpt_dir)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(ckpt_dir, METADATA), "w") as f:
            json.dump(metadata, f, indent=2)
    torch.distributed.barrier()


def load_model(model_chunks, ckpt_dir: str) -> None:
    """Load weights into a model built at any layout. Every tensor the model has must be in the checkpoint and
    every tensor in the checkpoint must be used (StrictHandling.RAISE_ALL)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    read_metadata(ckpt_dir)
    sharded, chunks = _sharded(model_chunks)
    state = dist_checkpointing.load(sharded, ckpt_dir, strict=StrictHandling.RAISE_ALL)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"], strict=True)
