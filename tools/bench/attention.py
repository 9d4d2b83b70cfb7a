"""Benchmark: megamod's core attention (torch SDPA) against megatron-core's local DotProductAttention, fwd + bwd.

Both modules are built from one TransformerConfig (causal self-attention, grouped-query heads) and take the same
[s, b, heads, head_dim] query and [s, b, groups, head_dim] key/value; each is timed forward and backward,
alternating, median of repeats after warm-up. On a GPU with TransformerEngine the local specs are not used at all;
this compares the two paths megamod can take without it.

Defaults: on cpu the demo teacher's shape (micro-batch 16, 240 positions, 8 heads of 16 in 4 groups, fp32); on cuda
a Qwen1.5-1.8B-like layer (b=4, s=2048, 16 heads of 128, bf16).

    python tools/bench/attention.py [--device cuda] [--batch 4 --seq 2048 --heads 16 --groups 16 --head-dim 128]
                                    [--dtype bfloat16] [--warmup 3] [--repeats 20] [--json out.json]
"""
import torch

import benchlib

DEFAULTS = {"cpu": dict(batch=16, seq=240, heads=8, groups=4, head_dim=16, dtype="float32"),
            "cuda": dict(batch=4, seq=2048, heads=16, groups=16, head_dim=128, dtype="bfloat16")}
COLUMNS = [("attention", "core attention", ""), ("forward_ms", "fwd ms", ".2f"), ("backward_ms", "bwd ms", ".2f"),
           ("total_ms", "fwd+bwd ms", ".2f"), ("speedup", "speed-up", ".2f"), ("tflops", "fwd+bwd TFLOP/s", ".3g")]


def build(a, dtype):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megamod.models.attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=a.heads * a.head_dim, num_attention_heads=a.heads,
                            num_query_groups=a.groups, kv_channels=a.head_dim, attention_dropout=0.0,
                            params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    kw = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(**kw), DotProductAttention(**kw)


def causal_flops(a) -> float:
    """QK^T and PV over the causal half, forward (2 FLOPs per multiply-add) and backward (twice the forward)."""
    forward = 2 * 2 * a.batch * a.heads * a.head_dim * a.seq * (a.seq + 1) / 2
    return 3 * forward


def run(a, device):
    dtype = getattr(torch, a.dtype)
    ours, theirs = build(a, dtype)
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    q = tensor(a.seq, a.batch, a.heads, a.head_dim)
    k, v = tensor(a.seq, a.batch, a.groups, a.head_dim), tensor(a.seq, a.batch, a.groups, a.head_dim)
    grad = torch.randn(a.seq, a.batch, a.heads * a.head_dim, generator=gen).to(device, dtype)
    with torch.no_grad():
        max_diff = (ours(q, k, v, None).float() - theirs(q, k, v, None).float()).abs().max().item()
    times = benchlib.forward_backward_seconds({"megamod": lambda: ours(q, k, v, None),
                                               "megatron": lambda: theirs(q, k, v, None)},
                                              grad, device, a.warmup, a.repeats)
    rows = []
    for name, label in (("megatron", "megatron-core DotProductAttention"), ("megamod", "megamod SDPA")):
        f, b = times[name]
        rows.append(dict(attention=label, forward_ms=f * 1e3, backward_ms=b * 1e3, total_ms=(f + b) * 1e3,
                         tflops=causal_flops(a) / (f + b) / 1e12))
    for row in rows:
        row["speedup"] = rows[0]["total_ms"] / row["total_ms"]
    return rows, max_diff


def main(argv=None):
    sizes = ("batch", "seq", "heads", "groups", "head-dim")
    a, device = benchlib.parse_sized_args(__doc__.splitlines()[0], sizes, DEFAULTS, argv)
    if min(a.batch, a.seq, a.heads, a.groups, a.head_dim) < 1 or a.heads % a.groups:
        raise SystemExit(f"sizes must be positive, heads a multiple of groups: {vars(a)}")
    if device.type == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu needs a machine without CUDA; use --device cuda here")
    from megamod import distributed

    distributed.initialize(distributed.ParallelConfig())
    try:
        rows, max_diff = run(a, device)
    finally:
        distributed.shutdown()
    notes = [f"max |megamod - megatron| forward output: {max_diff:.3g}",
             "speed-up = megatron-core fwd+bwd time / this module's; TFLOP/s count the causal half of QK^T and PV"]
    config = {k: getattr(a, k) for k in ("batch", "seq", "heads", "groups", "head_dim", "dtype", "warmup", "repeats")}
    res = benchlib.result(
        "attention", f"causal core attention fwd+bwd, b={a.batch} s={a.seq} heads={a.heads} groups={a.groups} "
        f"head_dim={a.head_dim} {a.dtype}, device={device}, threads={torch.get_num_threads()}; median of "
        f"{a.repeats} after {a.warmup} warm-up", device, config, COLUMNS, rows, notes)
    benchlib.print_table(res)
    benchlib.write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
