"""Benchmark: megamod.ops permute + unpermute (forward + backward) against megatron-core's torch path.

Both run the same step on the same inputs: permute(tokens, routing_map, probs) -> unpermute(..., probs, routing_map)
-> backward, so all four kernels and both prob gradients are timed. Reports the median of repeats after warm-up, the
ratio, and the achieved bandwidth next to a plain copy of the same bytes (a device copy on GPU, memcpy on CPU;
1.0 = as fast as copying them; the copy reuses its buffer, while the ops allocate their outputs and so pay for
first-touch page faults).

On CPU, megamod's outputs ask for transparent huge pages (csrc/bindings.cpp) and megatron's allocations do not;
THP_MEM_ALLOC_ENABLE=1 gives every torch allocation huge pages, to compare the kernels without that difference.

Shapes are TxHxExK (tokens, hidden, experts, top-k). Defaults: on cuda, Mixtral-like 16384x4096x8x2, the 2B student
16384x2048x4x2 and the 0.5B student 16384x1024x4x2; on cpu, 16384x1024x8x2 and 16384x2048x8x2.

    python tools/bench/permute.py [--device cuda] [--shapes 16384x4096x8x2 ...] [--dtypes float32 bfloat16]
                                  [--warmup 3] [--repeats 20] [--json out.json]
"""
import argparse

import torch

import benchlib
from megamod import ops
from megamod.ops.permute import MEGATRON_TORCH_PATH as MEGATRON

DEFAULT_SHAPES = {"cuda": ["16384x4096x8x2", "16384x2048x4x2", "16384x1024x4x2"],
                  "cpu": ["16384x1024x8x2", "16384x2048x8x2"]}
COLUMNS = [("dtype", "dtype", ""), ("T", "T", "d"), ("H", "H", "d"), ("E", "E", "d"), ("K", "K", "d"),
           ("megatron_ms", "megatron ms", ".2f"), ("ours_ms", "ours ms", ".2f"), ("speedup", "speed-up", ".2f"),
           ("ours_GBps", "ours GB/s", ".1f"), ("copy_GBps", "copy GB/s", ".1f"), ("of_copy", "of copy", ".2f")]


def parse_shape(text: str) -> tuple:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} is not TxHxExK with positive integers, e.g. 16384x4096x8x2")
    T, H, E, K = map(int, parts)
    if K > E:
        raise argparse.ArgumentTypeError(f"shape {text!r}: top-k {K} is more than the {E} experts")
    return T, H, E, K


def make_inputs(T, H, E, K, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=gen)
    top_probs_TK, top_experts_TK = torch.softmax(logits_TE, dim=-1).topk(K, dim=-1)
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top_experts_TK, True)
    probs_TE = torch.zeros(T, E).scatter_(1, top_experts_TK, top_probs_TK)
    tokens_TH = torch.randn(T, H, generator=gen)
    grad_TH = torch.randn(T, H, generator=gen)
    return [t.to(device) for t in (tokens_TH.to(dtype), routing_map_TE, probs_TE.to(dtype), grad_TH.to(dtype))]


def step(impl, num_out, tokens_TH, routing_map_TE, probs_TE, grad_TH):
    """One permute -> unpermute -> backward as the dispatcher calls them: the number of routed rows is known on the
    host (dropless top-k: num_out = T * K), so neither implementation has to count them with a device-to-host sync."""
    tokens_TH = tokens_TH.detach().requires_grad_()
    probs_TE = probs_TE.detach().requires_grad_()
    permuted_PH, _, index_map = impl.permute(tokens_TH, routing_map_TE, probs=probs_TE, num_out_tokens=num_out)
    out_TH = impl.unpermute(permuted_PH, index_map, tokens_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
    out_TH.backward(grad_TH)


def run(args, device) -> list:
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for T, H, E, K in args.shapes:
            inputs = make_inputs(T, H, E, K, dtype, device)
            P = T * K
            # Least traffic of the four kernels: permute fwd reads T rows, writes P; unpermute fwd reads P, writes T;
            # unpermute bwd reads T + P, writes P; permute bwd reads P, writes T.
            moved = (4 * T + 5 * P) * H * inputs[0].element_size()
            src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            fns = dict(copy=lambda: dst.copy_(src), ref=lambda: step(MEGATRON, P, *inputs),
                       ours=lambda: step(ops, P, *inputs))
            median = benchlib.median_seconds(fns, device, args.warmup, args.repeats)
            copy_s, ref_s, ours_s = median["copy"], median["ref"], median["ours"]
            rows.append(dict(dtype=dtype_name, T=T, H=H, E=E, K=K, megatron_ms=ref_s * 1e3, ours_ms=ours_s * 1e3,
                             speedup=ref_s / ours_s, ours_GBps=moved / ours_s / 1e9, copy_GBps=moved / copy_s / 1e9,
                             of_copy=copy_s / ours_s))
            del inputs, src, dst
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="TxHxExK, e.g. 16384x4096x8x2")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    device = benchlib.parse_device(args.device)
    args.shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES[device.type]]
    if not ops.extension_available():
        raise SystemExit("megamod._C is not built: nothing to compare (pip install --no-build-isolation -e .)")
    rows = run(args, device)
    notes = ["speed-up = megatron-core torch path time / megamod time; of copy = copy time / megamod time "
             "(same bytes, 1.0 = copy speed)"]
    res = benchlib.result(
        "permute", f"permute+unpermute fwd+bwd, megamod vs megatron-core torch path, device={device}, "
        f"threads={torch.get_num_threads()}; median of {args.repeats} after {args.warmup} warm-up", device,
        {"shapes": ["x".join(map(str, s)) for s in args.shapes], "dtypes": args.dtypes, "warmup": args.warmup,
         "repeats": args.repeats}, COLUMNS, rows, notes)
    benchlib.print_table(res)
    benchlib.write_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
