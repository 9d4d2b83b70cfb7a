"""`megamod logits`: one forward pass of a checkpoint, fp32 logits of every position saved as [S, V].

V is the true vocabulary size (padding rows dropped), so the file compares directly against
transformers' `model(input_ids).logits[0]`.
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from megamod import checkpoint, distributed
from megamod.models.language import LanguageModelConfig, build_language_model

log = logging.getLogger(__name__)


def compute_logits(ckpt: str, input_ids: list[int], tp: int = 1, pp: int = 1, ep: int = 1) -> torch.Tensor | None:
    """Every rank calls this; the last pipeline stage gets [S, V] fp32 logits, the others None."""
    from megamod.inference import forward_logits

    meta = checkpoint.read_metadata(ckpt)
    if meta.get("kind") != "language":
        raise ValueError(f"{ckpt}: kind {meta.get('kind')!r} is not supported by `logits` yet")
    cfg = LanguageModelConfig.from_dict(meta["model"])
    distributed.initialize(distributed.ParallelConfig(tp=tp, pp=pp, ep=ep))
    bad = [i for i in input_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ValueError(f"input ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
    model = build_language_model(cfg, params_dtype=checkpoint.dtype_from_name(meta["dtype"]), init_weights=False)
    checkpoint.load_model(model, ckpt)
    logits_BSV = forward_logits(model, torch.tensor([input_ids]), cfg.vocab_size)
    return None if logits_BSV is None else logits_BSV[0]


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids must be comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--input-ids is empty")
    return ids


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="megamod checkpoint directory")
    p.add_argument("--input-ids", required=True, type=_ids, help="comma-separated token ids, e.g. 3,17,5")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (sparse checkpoints)")


def run(args) -> int:
    from megatron.core import parallel_state as ps

    logits_SV = compute_logits(args.ckpt, args.input_ids, args.tp, args.pp, args.ep)
    if logits_SV is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save(logits_SV, args.out)
        log.info("saved logits %s to %s", tuple(logits_SV.shape), args.out)
    distributed.shutdown()
    return 0
