"""Benchmark: peak memory and time of KD + CE forward + backward on vocabulary-parallel logits, the reference losses
(kd.kd_loss_BS + ce.cross_entropy_BS) against the chunked ones (losses/chunked.py, as the Objective runs them).

What it computes: masked_mean(KD) + masked_mean(CE) of bf16 student and teacher logits [1, S, V] (forward KL, T=1,
all positions in the mask, TP=1), then backward into the student logits; the student's gradient is kept (it is part of
what a step holds). Memory is reported above the inputs, in units of one bf16 logits tensor (S * V * 2 bytes).

How memory is measured: each variant runs in a fresh subprocess. On CPU: after one warm-up forward + backward (its
gradient dropped), the resident set size (VmRSS) is read as the baseline, the high-water mark is reset
(/proc/self/clear_refs, "5"), one forward + backward runs, and the peak is VmHWM - baseline. glibc hands blocks of
this size (>= 32 MB) back to the kernel on free, so RSS follows the tensors' lifetimes; it also counts anything else
the process touches meanwhile (a few MB). On CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before.
A variant whose estimated peak exceeds the memory available (MemAvailable, CPU) is skipped with a note.

Time: the median of --repeats forward + backward calls after the memory run, in the same subprocess (variants do
not take turns here: each needs its own process for the memory figure).

    python tools/bench/loss_memory.py [--device cpu|cuda] [--seqs 1024 4096] [--vocab 151936]
                                      [--chunks 256 1024] [--repeats 3] [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

import benchlib

COLUMNS = [("variant", "loss path", ""), ("seq", "S", "d"), ("vocab", "V", "d"),
           ("peak_gb", "peak above inputs GB", ".2f"), ("peak_x", "x one bf16 logits", ".2f"),
           ("ms", "fwd+bwd ms", ".0f"), ("time_ratio", "time / reference", ".2f"), ("note", "note", "")]
REFERENCE_X = 17.0  # the reference's peak estimate, in bf16 logits tensors (16 measured, plus slack)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(a) -> dict:
    """One variant in this process: the memory run, then the timed repeats."""
    from megamod import distributed
    from megamod.losses.ce import cross_entropy_BS, masked_mean
    from megamod.losses.chunked import chunked_losses_BS
    from megamod.losses.kd import kd_loss_BS

    device = benchlib.parse_device(a.device)
    distributed.initialize(distributed.ParallelConfig())
    gen = torch.Generator().manual_seed(0)
    S, V = a.seq, a.vocab
    student_BSV = (2 * torch.randn(1, S, V, generator=gen)).to(device, torch.bfloat16).requires_grad_()
    teacher_BSV = (2 * torch.randn(1, S, V, generator=gen)).to(device, torch.bfloat16)
    labels_BS = torch.randint(0, V, (1, S), generator=gen).to(device)
    mask_BS = torch.ones(1, S, device=device)

    def step():
        if a.variant == "reference":
            loss = masked_mean(kd_loss_BS(student_BSV, teacher_BSV, V), mask_BS) \
                + masked_mean(cross_entropy_BS(student_BSV, labels_BS, V), mask_BS)
        else:
            kd_BS, logp_BS = chunked_losses_BS(student_BSV, V, teacher_logits_BSv=teacher_BSV, labels_BS=labels_BS,
                                               chunk_tokens=a.chunk)
            loss = masked_mean(kd_BS, mask_BS) + masked_mean(-logp_BS, mask_BS)
        loss.backward()
        return loss.detach()

    step()  # warm-up: lazy initialisation, allocator
    student_BSV.grad = None
    benchlib.synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        base = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        peak = (_rss_kb("VmHWM") - base) * 1024
    times = []
    for _ in range(a.repeats):
        student_BSV.grad = None
        times.append(benchlib.seconds(step, device))
    times.sort()
    return {"peak_bytes": peak, "seconds": times[len(times) // 2]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a JSON job: run one variant, print its result
    a = parser.parse_args(argv)
    if a.worker:
        job = argparse.Namespace(**json.loads(a.worker))
        print("RESULT " + json.dumps(worker(job)))
        return
    device = benchlib.parse_device(a.device)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(here)), here,
                                                       os.environ.get("PYTHONPATH", "")])}
    rows = []
    for seq in a.seqs:
        unit = seq * a.vocab * 2  # one bf16 logits tensor
        ref_s = None
        for variant, chunk in [("reference", 0)] + [("chunked", c) for c in a.chunks]:
            name = "reference (kd_loss_BS + cross_entropy_BS)" if variant == "reference" else f"chunked, {chunk} tokens"
            row = {"variant": name, "seq": seq, "vocab": a.vocab, "chunk": chunk, "unit_bytes": unit}
            need = (REFERENCE_X if variant == "reference" else 4.0) * unit
            if device.type == "cpu" and need > 0.9 * _available_bytes():
                row["note"] = (f"skipped: needs ~{need / 1e9:.0f} GB, {_available_bytes() / 1e9:.0f} GB available")
                rows.append(row)
                continue
            job = dict(variant=variant, chunk=chunk, seq=seq, vocab=a.vocab, device=a.device, repeats=a.repeats)
            begin = time.perf_counter()
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)], env=env,
                                 capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode or line is None:
                row["note"] = f"failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"
                rows.append(row)
                continue
            res = json.loads(line[len("RESULT "):])
            row.update(peak_gb=res["peak_bytes"] / 1e9, peak_x=res["peak_bytes"] / unit, ms=res["seconds"] * 1e3,
                       wall_s=time.perf_counter() - begin)
            if variant == "reference":
                ref_s = res["seconds"]
            if ref_s:
                row["time_ratio"] = res["seconds"] / ref_s
            rows.append(row)
            print(f"  {name} S={seq}: {row.get('peak_x', 0):.2f}x, {row.get('ms', 0):.0f} ms", file=sys.stderr)
    method = ("CUDA max_memory_allocated" if device.type == "cuda" else
              "CPU peak RSS (VmHWM reset via clear_refs) minus RSS before, fresh process per variant")
    res = benchlib.result(
        "loss_memory", f"KD + CE fwd+bwd, B=1, bf16 logits, TP=1, device={device.type}, threads="
        f"{torch.get_num_threads()}; one run for memory, median of {a.repeats} for time", device,
        vars(a), COLUMNS, rows,
        notes=[f"peak above inputs: {method}; the student's gradient (1x) is included",
               "x one bf16 logits = peak / (S * V * 2 bytes); time / reference: at the same S"])
    benchlib.print_table(res)
    benchlib.write_json(res, a.json)


if __name__ == "__main__":
    main()
