"""Benchmark: the student's MoE layer (megamod's dispatcher kernels) against megatron-core's own MoELayer, fwd + bwd.

The layers are built by the project's model code (a one-layer sparse language model; its MLP is the MoE layer) and
hold the same weights; megatron-core's layer permutes with its torch path; a third row runs megamod's layer with
grouped experts (performance.grouped_experts: two grouped GEMMs instead of a GEMM pair per expert) where the device
has a grouped GEMM for the dtype. Each is timed forward (router, dispatch,
experts, combine) and backward, alternating, median of repeats after warm-up.

Defaults: on cuda the Mixtral proxy of Megatron-LM's MoE perf test (T=4096 tokens per rank, H=4096, F=14336, E=8,
top-2, bf16); on cpu a 0.5B-student-like layer scaled to fit (T=512, H=512, F=1408, E=4, top-2, fp32).
Megatron-LM publishes 4.33 ms forward / 7.68 ms backward for the Mixtral proxy on H100 at EP=8 (alltoall, grouped
GEMM). One GPU at EP=1 with T=4096 does the same per-rank work: each EP=8 rank gets 4096 tokens and its one expert
receives 8192 (token, expert) rows, as do our 8 experts together (4096 x 2) -> 2.89 TFLOP of expert GEMMs per forward.
It skips the baseline's all-to-all and pays for 8 per-expert GEMMs instead of one grouped GEMM: the comparison is of
the computation, not of the communication.

    python tools/bench/moe_layer.py [--device cuda] [--tokens 4096 --hidden 4096 --ffn 14336 --experts 8 --topk 2]
                                    [--dtype bfloat16] [--warmup 3] [--repeats 20] [--json out.json]
"""
import torch

import benchlib

MIXTRAL_PROXY = dict(tokens=4096, hidden=4096, ffn=14336, experts=8, topk=2)
MEGATRON_BASELINE_MS = dict(forward=4.33, backward=7.68)  # H100, EP=8, alltoall, bf16 (moe_perf baseline.json)
DEFAULTS = {"cuda": dict(MIXTRAL_PROXY, dtype="bfloat16"),
            "cpu": dict(tokens=512, hidden=512, ffn=1408, experts=4, topk=2, dtype="float32")}
COLUMNS = [("layer", "layer", ""), ("forward_ms", "fwd ms", ".2f"), ("backward_ms", "bwd ms", ".2f"),
           ("total_ms", "fwd+bwd ms", ".2f"), ("speedup", "speed-up", ".2f"),
           ("forward_tflops", "expert fwd TFLOP/s", ".3g"), ("backward_tflops", "expert bwd TFLOP/s", ".3g")]


def build_layers(a, dtype, device):
    """(megamod's MoE layer, megatron-core's MoELayer with the same weights, megamod's layer with grouped experts or
    None where the device has no grouped GEMM for `dtype`), all on `device`."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megamod import performance
    from megamod.models.grouped_experts import device_runs_grouped_mm
    from megamod.models.language import LanguageModelConfig, build_language_model

    heads = max(1, a.hidden // 128)
    cfg = LanguageModelConfig(vocab_size=128, hidden_size=a.hidden, num_layers=1, num_attention_heads=heads,
                              num_query_groups=heads, ffn_hidden_size=a.ffn, num_experts=a.experts,
                              moe_router_topk=a.topk, max_position_embeddings=a.tokens)

    def build(grouped):
        performance.configure(performance.PerformanceConfig(grouped_experts=grouped))
        torch.manual_seed(0)
        return build_language_model(cfg, params_dtype=dtype).decoder.layers[0].mlp.to(device)

    ours = build(False)
    theirs = MoELayer(ours.config, ours.submodules, layer_number=1).to(device)
    theirs.load_state_dict(ours.state_dict())
    grouped = build(True) if device_runs_grouped_mm(device, dtype) else None
    if grouped is not None:
        grouped.load_state_dict(ours.state_dict())
    performance.configure(performance.PerformanceConfig())
    return ours, theirs, grouped


def expert_forward_flops(a) -> float:
    """SwiGLU experts: fc1 (H -> 2F) and fc2 (F -> H) per routed row, 2 FLOPs per multiply-add."""
    return 2.0 * a.tokens * a.topk * 3 * a.hidden * a.ffn


def run(a, device):
    dtype = getattr(torch, a.dtype)
    ours, theirs, grouped = build_layers(a, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x_SBH = torch.randn(a.tokens, 1, a.hidden, generator=gen).to(device, dtype).requires_grad_()
    grad_SBH = torch.randn(a.tokens, 1, a.hidden, generator=gen).to(device, dtype)
    layers = {"megamod": ours, "megatron": theirs, "grouped": grouped}
    layers = {name: layer for name, layer in layers.items() if layer is not None}
    with torch.no_grad():
        reference = theirs(x_SBH)[0].float()
        max_diff = {name: (layer(x_SBH)[0].float() - reference).abs().max().item() for name, layer in layers.items()}
    times = benchlib.forward_backward_seconds({name: (lambda layer=layer: layer(x_SBH)[0])
                                               for name, layer in layers.items()},
                                              grad_SBH, device, a.warmup, a.repeats)
    flops = expert_forward_flops(a)
    rows = []
    labels = (("megatron", "megatron-core MoELayer"), ("megamod", "megamod MoE layer"),
              ("grouped", "megamod MoE layer, grouped experts"))
    for name, label in [(n, lab) for n, lab in labels if n in layers]:
        f, b = times[name]
        rows.append(dict(layer=label, forward_ms=f * 1e3, backward_ms=b * 1e3, total_ms=(f + b) * 1e3,
                         forward_tflops=flops / f / 1e12, backward_tflops=2 * flops / b / 1e12))
    for row in rows:
        row["speedup"] = rows[0]["total_ms"] / row["total_ms"]
    return rows, max_diff


def main(argv=None):
    sizes = ("tokens", "hidden", "ffn", "experts", "topk")
    a, device = benchlib.parse_sized_args(__doc__.splitlines()[0], sizes, DEFAULTS, argv)
    if min(a.tokens, a.hidden, a.ffn, a.experts, a.topk) < 1 or a.topk > a.experts:
        raise SystemExit(f"sizes must be positive with topk <= experts: {vars(a)}")
    if device.type == "cpu" and torch.cuda.is_available():
        # megamod runs megatron-core on CPU only where CUDA is absent (megamod.cpu_compat refuses otherwise)
        raise SystemExit("--device cpu needs a machine without CUDA; use --device cuda here")
    from megamod import distributed, ops

    distributed.initialize(distributed.ParallelConfig())
    try:
        with benchlib.moe_aux_loss_scale(device):
            rows, max_diff = run(a, device)
    finally:
        distributed.shutdown()
    diffs = ", ".join(f"{name} {d:.3g}" for name, d in max_diff.items() if name != "megatron")
    notes = [f"megamod._C kernels: {'yes' if ops.extension_available() else 'NO (both layers use the torch path)'}; "
             f"max |layer - megatron| forward output: {diffs}"
             + ("" if "grouped" in max_diff else f"; grouped experts: no grouped GEMM for {a.dtype} on this device"),
             "speed-up = megatron-core fwd+bwd time / this layer's; TFLOP/s count the expert GEMMs only"]
    if all(getattr(a, k) == v for k, v in MIXTRAL_PROXY.items()):
        ours = rows[1]
        notes.append(f"Megatron-LM baseline (H100, EP=8, alltoall, grouped GEMM, bf16): "
                     f"{MEGATRON_BASELINE_MS['forward']} ms fwd / {MEGATRON_BASELINE_MS['backward']} ms bwd for the "
                     f"same per-rank expert work; megamod here: {ours['forward_ms'] / MEGATRON_BASELINE_MS['forward']:.2f}x "
                     f"/ {ours['backward_ms'] / MEGATRON_BASELINE_MS['backward']:.2f}x its time "
                     f"(EP=1: no all-to-all, 8 per-expert GEMMs)")
    config = {k: getattr(a, k) for k in ("tokens", "hidden", "ffn", "experts", "topk", "dtype", "warmup", "repeats")}
    res = benchlib.result(
        "moe_layer", f"MoE layer fwd+bwd, T={a.tokens} H={a.hidden} F={a.ffn} E={a.experts} K={a.topk} {a.dtype}, "
        f"device={device}, threads={torch.get_num_threads()}; median of {a.repeats} after {a.warmup} warm-up",
        device, config, COLUMNS, rows, notes)
    benchlib.print_table(res)
    benchlib.write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
