"""What every benchmark in tools/bench/ shares: timing, the run's environment, peak FLOP/s, the JSON it writes.

Timing: the candidates of one comparison run side by side in one process, taking turns after warm-up, and the
median of the repeats is kept; on a GPU each call is timed with CUDA events.

The JSON each benchmark writes (read by perf_report.py, which turns it into a docs/PERF.md section):
    {"benchmark": name, "title": one line, "env": environment(), "config": the arguments,
     "columns": [[key, header, format], ...], "rows": [{key: value}, ...], "notes": [line, ...]}
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import time

import torch

# Dense bf16 peak of the GPUs megamod is measured on (vendor data sheets, TFLOP/s, no sparsity). Matched in order
# against torch.cuda.get_device_name(): the PCIe/NVL H100 parts are slower than the SXM one.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    """Wall time of one call of fn: CUDA events on a GPU (the call's kernels only), perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def median_seconds(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median time of each of fns (name -> function). The functions take turns, so that a slow spell of the machine
    (a shared 2-core VM varies by 2x from one second to the next) falls on all of them alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    gc.disable()  # as timeit does: a collection of megatron's many Python objects would land on a random repeat
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(seconds(fn, device))
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in times.items()}


def forward_backward_seconds(calls: dict, grad: torch.Tensor, device: torch.device, warmup: int,
                             repeats: int) -> dict:
    """Median (forward, backward) seconds of each of `calls` (name -> function returning the output that `grad`
    flows back into), timed taking turns as median_seconds does."""
    outputs, fns = {}, {}
    for name, call in calls.items():
        def forward(name=name, call=call):
            outputs[name] = call()

        def backward(name=name):
            outputs.pop(name).backward(grad)

        fns[f"{name}/forward"], fns[f"{name}/backward"] = forward, backward
    median = median_seconds(fns, device, warmup, repeats)
    return {name: (median[f"{name}/forward"], median[f"{name}/backward"]) for name in calls}


def profile_to_file(fns: dict, device: torch.device, path: str, rows: int = 40) -> None:
    """Run each of fns once under torch.profiler and write its operators, by device time and by host time, with the
    step's kernel count and host/device totals: where a step's time goes, read without a GPU at hand."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with open(path, "w") as f:
        for name, fn in fns.items():
            synchronize(device)
            begin = time.perf_counter()
            with profile(activities=activities) as prof:
                fn()
                synchronize(device)
            wall = time.perf_counter() - begin
            events = prof.key_averages()
            kernels = sum(e.count for e in prof.events() if e.device_type.name == "CUDA")
            device_us = sum(e.self_device_time_total for e in events)
            f.write(f"== {name}: wall {wall * 1e3:.1f} ms (profiled), device busy {device_us / 1e3:.1f} ms, "
                    f"{kernels} kernels\n")
            for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
                f.write(events.table(sort_by=key, row_limit=rows, max_name_column_width=70) + "\n")


@contextlib.contextmanager
def moe_aux_loss_scale(device: torch.device):
    """megatron-core keeps the MoE aux-loss log and gradient scale process-wide (megamod/models/moe_log.py): the
    benchmark gets its own (a backward outside the pipeline schedule would otherwise create the scale with shape
    [], which the schedule's later copy_ of a [1] scale cannot fill), and leaves the caller's as found (tests run
    the benchmarks in their process)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megamod.models.moe_log import own_aux_loss_log

    with own_aux_loss_log():
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1, device=device)
        yield


def parse_sized_args(description: str, sizes: tuple, defaults: dict, argv=None):
    """The arguments of a benchmark that compares two modules at one size: --device, one int option per name in
    `sizes` ("head-dim" -> a.head_dim), --dtype, --warmup, --repeats, --json; options left out take the device's
    `defaults`. Returns (args, device)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in sizes:
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the result to this JSON file")
    a = parser.parse_args(argv)
    device = parse_device(a.device)
    for key, value in defaults[device.type].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a, device


def parse_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: expected cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Device and versions, recorded with every result so that figures are compared only like with like."""
    try:
        from importlib.metadata import version

        megatron = version("megatron-core")
    except Exception:  # an unpackaged checkout of megatron-core still runs the benchmarks
        megatron = "unknown"
    env = {"device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "megatron_core": megatron, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu_cores": os.cpu_count()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"{_cpu_name()} ({os.cpu_count()} CPU cores)"
    return env


def datasheet_tflops(device: torch.device) -> float | None:
    """The bf16 dense data-sheet peak of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def measure_matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul on random data (zeros run faster on some GPUs), median of repeats after
    warm-up: what this device's GEMMs reach, the ceiling MFU is honestly taken against."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    s = median_seconds({"mm": lambda: torch.mm(a, b, out=out)}, device, 3, repeats)["mm"]
    return 2.0 * n ** 3 / s / 1e12


def measure_copy_gbps(device: torch.device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    s = median_seconds({"copy": lambda: dst.copy_(src)}, device, 3, repeats)["copy"]
    return 2.0 * nbytes / s / 1e9


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The peak to divide by for MFU and where it comes from: the one given, else (on a GPU) the bf16 GEMM rate
    measured here and now, else None (no honest peak for a CPU)."""
    if given is not None:
        if given <= 0:
            raise SystemExit(f"--peak-tflops must be positive, got {given}")
        return given, "given (--peak-tflops)"
    if device.type != "cuda":
        return None, "none (CPU; --peak-tflops)"
    return measure_matmul_tflops(device), "measured bf16 8192^3 GEMM"


def result(benchmark: str, title: str, device: torch.device, config: dict, columns: list, rows: list,
           notes: list | None = None) -> dict:
    return {"benchmark": benchmark, "title": title, "env": environment(device), "config": config,
            "columns": [list(c) for c in columns], "rows": rows, "notes": list(notes or [])}


def format_value(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and fmt:
        return format(value, fmt)
    return str(value)


def print_table(res: dict) -> None:
    """The result as a fixed-width table on stdout, its notes below."""
    print(res["title"])
    headers = [header for _, header, _ in res["columns"]]
    cells = [[format_value(row.get(key), fmt) for key, _, fmt in res["columns"]] for row in res["rows"]]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    for note in res["notes"]:
        print(f"  {note}")


def write_json(res: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
