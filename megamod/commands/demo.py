"""`megamod demo`: what megamod can do end to end today, on CPU, in about a minute.

Builds a small random Qwen2 model with transformers, converts it to a megamod checkpoint, computes logits with
megamod at TP=1 and at TP=2 (two gloo ranks under torchrun) and compares them with transformers, then exports the
checkpoint back to HF format and checks it is bitwise the original. The full LLaVA-MoD distillation pipeline
replaces this as the stages land.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import torch

log = logging.getLogger(__name__)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory")


def run(args) -> int:
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megamod import distributed
    from megamod.commands.logits import compute_logits
    from megamod.convert.checkpoint import hf_to_megamod, megamod_to_hf

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    hf_dir, ckpt, export = (os.path.join(out, d) for d in ("hf", "megamod", "hf-export"))
    for d in (ckpt, export):
        if os.path.exists(d):
            subprocess.run(["rm", "-rf", d], check=True)

    _banner("1/4 a small random Qwen2 model (transformers)")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=352, max_position_embeddings=512, rope_theta=1e6)
    hf = Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(hf_dir)
    print(f"{sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M parameters -> {hf_dir}")

    _banner("2/4 convert HF -> megamod (Megatron dist checkpoint)")
    hf_to_megamod(hf_dir, ckpt)

    ids = torch.randint(0, config.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref_SV = hf(torch.tensor([ids])).logits[0]

    _banner("3/4 megamod logits vs transformers at TP=1 and TP=2")
    ours_SV = compute_logits(ckpt, ids)
    distributed.shutdown()
    tp2_file = os.path.join(out, "logits-tp2.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={distributed.free_port()}",
           "-m", "megamod", "logits", "--ckpt", ckpt, "--input-ids", ",".join(map(str, ids)), "--out", tp2_file,
           "--tp", "2"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    tp2_SV = torch.load(tp2_file)
    rows = [("TP=1", _max_diff(ours_SV, ref_SV), torch.equal(ours_SV.argmax(-1), ref_SV.argmax(-1))),
            ("TP=2", _max_diff(tp2_SV, ref_SV), torch.equal(tp2_SV.argmax(-1), ref_SV.argmax(-1)))]
    print(f"{'layout':8} {'max |diff|':>12} {'argmax equal':>13}")
    for name, diff, same in rows:
        print(f"{name:8} {diff:12.2e} {str(same):>13}")

    _banner("4/4 export megamod -> HF and compare with the original")
    megamod_to_hf(ckpt, export)
    a = load_file(os.path.join(hf_dir, "model.safetensors"))
    b = load_file(os.path.join(export, "model.safetensors"))
    bitwise = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{len(a)} tensors, bitwise equal: {bitwise}")
    distributed.shutdown()

    ok = bitwise and all(diff <= 1e-4 and same for _, diff, same in rows)
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.time() - start:.0f}s; outputs in {out}")
    return 0 if ok else 1
