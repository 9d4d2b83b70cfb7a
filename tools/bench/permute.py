"""Benchmark: megamod.ops permute + unpermute (forward + backward) against megatron-core's torch path.

Both run the same step on the same inputs: permute(tokens, routing_map, probs) -> unpermute(..., probs, routing_map)
-> backward, so all four kernels and both prob gradients are timed. Reports the median of repeats after warm-up, the
ratio, and the achieved bandwidth next to a plain copy of the same bytes (1.0 = as fast as copying them; the copy
reuses its buffer, while the ops allocate their outputs and so pay for first-touch page faults).

On CPU, megamod's outputs ask for transparent huge pages (csrc/bindings.cpp) and megatron's allocations do not;
THP_MEM_ALLOC_ENABLE=1 gives every torch allocation huge pages, to compare the kernels without that difference.

    python tools/bench/permute.py [--hidden 1024 2048] [--dtypes float32 bfloat16] [--json out.json]
"""
import argparse
import gc
import json
import statistics
import time

import torch
from megatron.core.transformer.moe import moe_utils

from megamod import ops


def make_inputs(T, H, E, K, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=gen)
    top_probs_TK, top_experts_TK = torch.softmax(logits_TE, dim=-1).topk(K, dim=-1)
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top_experts_TK, True)
    probs_TE = torch.zeros(T, E).scatter_(1, top_experts_TK, top_probs_TK)
    tokens_TH = torch.randn(T, H, generator=gen)
    grad_TH = torch.randn(T, H, generator=gen)
    return [t.to(device) for t in (tokens_TH.to(dtype), routing_map_TE, probs_TE.to(dtype), grad_TH.to(dtype))]


def step(impl, tokens_TH, routing_map_TE, probs_TE, grad_TH):
    tokens_TH = tokens_TH.detach().requires_grad_()
    probs_TE = probs_TE.detach().requires_grad_()
    permuted_PH, _, index_map = impl.permute(tokens_TH, routing_map_TE, probs=probs_TE)
    out_TH = impl.unpermute(permuted_PH, index_map, tokens_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
    out_TH.backward(grad_TH)


def seconds(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def median_seconds(fns, device, warmup, repeats):
    """Median time of each of fns (a dict). The functions take turns, so that a slow spell of the machine (a shared
    2-core VM varies by 2x from one second to the next) falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    gc.disable()  # as timeit does: a collection of megatron's many Python objects would land on a random repeat
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(seconds(fn, device))
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in times.items()}


def run(args):
    device = torch.device(args.device)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for H in args.hidden:
            inputs = make_inputs(args.tokens, H, args.experts, args.topk, dtype, device)
            P = args.tokens * args.topk
            # Least traffic of the four kernels: permute fwd reads T rows, writes P; unpermute fwd reads P, writes T;
            # unpermute bwd reads T + P, writes P; permute bwd reads P, writes T.
            moved = (4 * args.tokens + 5 * P) * H * inputs[0].element_size()
            src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            fns = dict(copy=lambda: dst.copy_(src), ref=lambda: step(moe_utils, *inputs),
                       ours=lambda: step(ops, *inputs))
            median = median_seconds(fns, device, args.warmup, args.repeats)
            copy_s, ref_s, ours_s = median["copy"], median["ref"], median["ours"]
            rows.append(
                dict(device=str(device), dtype=dtype_name, T=args.tokens, H=H, E=args.experts, K=args.topk,
                     threads=torch.get_num_threads(), megatron_ms=ref_s * 1e3, ours_ms=ours_s * 1e3,
                     speedup=ref_s / ours_s, ours_GBps=moved / ours_s / 1e9, copy_GBps=moved / copy_s / 1e9,
                     of_copy=copy_s / ours_s)
            )
    return rows


def print_table(rows):
    header = f"{'dtype':>9} {'H':>5} {'megatron ms':>12} {'ours ms':>8} {'speedup':>8} {'ours GB/s':>10} " \
             f"{'copy GB/s':>10} {'of copy':>8}"
    print(header)
    for r in rows:
        print(f"{r['dtype']:>9} {r['H']:>5} {r['megatron_ms']:>12.2f} {r['ours_ms']:>8.2f} {r['speedup']:>7.2f}x "
              f"{r['ours_GBps']:>10.1f} {r['copy_GBps']:>10.1f} {r['of_copy']:>8.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not ops.extension_available():
        raise SystemExit("megamod._C is not built: nothing to compare (pip install --no-build-isolation -e .)")
    rows = run(args)
    print(f"permute+unpermute fwd+bwd, T={args.tokens} E={args.experts} K={args.topk}, device={args.device}, "
          f"threads={torch.get_num_threads()}; median of {args.repeats} after {args.warmup} warm-up")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
