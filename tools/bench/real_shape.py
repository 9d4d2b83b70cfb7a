"""Real-shape d2s step on CPU: process memory against megamod.planning's prediction, step time, the full vocabulary.

Builds, with random weights, in one process (world size 1, gloo) through megamod's own builders:
  student  Qwen1.5-0.5B shape (hidden 1024, 16 heads, FFN 2816, tied embeddings) upcycled: 4 experts, top-2, on
           the even layers (built sparse directly; upcycling copies a dense FFN into the experts, same shapes)
  teacher  Qwen1.5-1.8B shape (hidden 2048, 16 heads, FFN 5504, untied)
  towers   CLIP ViT-L/14-336 shape, one per model (576 image tokens)
vocabulary 151936 (Qwen's tokenizer; a multiple of 128, so no padded rows), and runs d2s steps the Trainer's way
(distill_step.py's builders: stages' trainable set, megatron DDP + optimizer, `train_step` with `Objective`): teacher
forward, student forward, KD + CE over all 151936 ids, backward, Adam step. One micro-batch of 1 x seq: one image at
the start, random text after it.

Measured: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs before each phase) above the RSS before
anything is built, after each build phase and over the steps; the wall time of each step; the bytes the autograd
graph saves (student layers vs the loss). Compared with megamod.planning.memory.step_memory for the same layout
(TP=PP=EP=DP=1, one micro-batch, same seq and dtype, d2s, online teacher) plus the two CLIP towers' weights, which
the planner leaves out. Asserts that the KD sees logits 151936 wide from both models and the tokenizer vocabulary
151936.

Full depth (24 layers) at seq 2048 needs ~30 GiB (the planner's figure is printed); --layers/--seq run the same
widths and vocabulary shallower or shorter where memory is short.

    MALLOC_ARENA_MAX=2 python tools/bench/real_shape.py [--layers 24] [--seq 2048] [--dtype bfloat16] [--steps 2]
                                                        [--json out.json]
"""
import argparse
import ctypes
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import distill_step  # noqa: E402

QWEN_VOCAB = distill_step.QWEN_VOCAB
GIB = 2 ** 30


def proc_status(key: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux >= 4.0), so that the next VmHWM is this phase's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class SavedBytes:
    """Bytes the autograd graph saves for backward (unique storages, parameters excluded), split at the loss."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen, self.part = {}, "layers"

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.seen:
            self.seen[s.data_ptr()] = (self.part, s.nbytes())
        return t

    def total(self, part):
        return sum(n for p, n in self.seen.values() if p == part)


def planned(student_cfg, teacher_cfg, seq: int, dtype, chunk_tokens: int) -> dict:
    """The planner's bytes for this layout (d2s trains the FFNs and routers; both CLIP towers counted)."""
    from megamod.planning.memory import Layout, step_memory

    lay = Layout(seq=seq, mbs=1, num_micro=1, param_bytes=torch.finfo(dtype).bits // 8,
                 loss_chunk_tokens=chunk_tokens)
    out = step_memory(student_cfg.language, lay, "ffn", teacher_cfg.language, vision=student_cfg.vision)
    out.pop("stage")
    return out


def malloc_trim() -> None:
    """Hand glibc's freed heap pages back to the OS (what torch.cuda.empty_cache is to a GPU): megatron's CPU
    initialisation frees fp32 master copies that would otherwise stay resident, a CPU-only artefact."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def run(a) -> dict:
    from megamod import cpu_compat
    from megamod.families.factory import build_model
    from megamod.families.llava import LLAVA
    from megamod.training.objective import Objective
    from megamod.training.stages import apply_trainable, get_stage
    from megamod.training.step import build_optimizer, train_step, wrap_ddp

    dtype, device = getattr(torch, a.dtype), torch.device("cpu")
    p = dict(distill_step.PRESETS["gpu"], seq=a.seq, mbs=1, micro=1, dtype=a.dtype)
    p["student"] = dict(p["student"], num_layers=a.layers, tie_word_embeddings=True)  # Qwen1.5-0.5B ties them
    p["teacher"] = dict(p["teacher"], num_layers=a.layers)
    student_cfg, teacher_cfg = distill_step.llava_configs(p, a.experts, a.topk)
    stage = get_stage("d2s")
    rss = {"baseline": proc_status("VmRSS")}
    phases = {}

    def phase(name):
        phases[name] = proc_status("VmRSS") - rss["baseline"]

    torch.manual_seed(0)
    student = build_model(student_cfg, dtype, init_weights=True)
    trainable = apply_trainable(student, stage.trainable)
    phase("student built")
    teacher = build_model(teacher_cfg, dtype, init_weights=True).requires_grad_(False).eval()
    phase("teacher built")
    malloc_trim()
    phase("malloc_trim")
    ddp = wrap_ddp(student)
    phase("DDP grad buffer")
    with cpu_compat.cuda_type_names():  # megatron's non-distributed bf16 optimizer takes only CUDA type names
        optimizer = build_optimizer([ddp], lr=1e-5)
    phase("optimizer built")
    ddp.train()
    mbs = distill_step.micro_batches(student_cfg, p, device)
    vocab = student_cfg.language.vocab_size
    objective = Objective(dict(stage.losses), vocab, family=LLAVA, chunk_tokens=a.chunk_tokens)
    saved = SavedBytes(list(student.parameters()))
    widths = {}
    loss = objective.loss

    def checked_loss(student_BSV, teacher_BSV, mb):
        saved.part = "loss"  # from here on the graph's saved tensors are the loss's
        widths.update(student=student_BSV.shape[-1], teacher=teacher_BSV.shape[-1], vocab=objective.vocab_size)
        return loss(student_BSV, teacher_BSV, mb)

    objective.loss = checked_loss
    step_s, peaks, losses = [], [], []
    for _ in range(a.steps):
        saved.seen, saved.part = {}, "layers"
        # glibc keeps the previous step's freed activation pages in its heaps, so without a trim each step's peak
        # lands on top of the last one's leftovers; a GPU's caching allocator reuses those blocks instead.
        malloc_trim()
        reset_peak()
        begin = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            result = train_step([ddp], optimizer, objective.forward_step(ddp, teacher), mbs, p["seq"], 1)
        step_s.append(time.perf_counter() - begin)
        peaks.append(proc_status("VmHWM") - rss["baseline"])
        losses.append({k: float(v) for k, v in result.losses[0].items()})
    phase("after steps")
    if not all(math.isfinite(v) for d in losses for v in d.values()):
        raise SystemExit(f"non-finite losses: {losses}")
    padded = student_cfg.language.padded_vocab_size
    assert widths == dict(student=padded, teacher=padded, vocab=QWEN_VOCAB), widths
    params = lambda m, prefix="": sum(t.numel() * t.element_size() for n, t in m.named_parameters()  # noqa: E731
                                      if n.startswith(prefix))
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    state = [t for o in opts for s in o.optimizer.state.values() for t in s.values()
             if torch.is_tensor(t) and t.numel() > 1]  # Adam's moments (not its step counters)
    masters = [q for o in opts for g in getattr(o, "fp32_from_float16_groups", []) for q in g]
    measured = dict(
        student_weights=params(student), teacher_weights=params(teacher),
        vision_towers=params(student, "vision_model.") + params(teacher, "vision_model."),
        gradients=sum(b.grad_data.numel() * b.grad_data.element_size()
                      for b in ddp.buffers + ddp.expert_parallel_buffers),
        optimizer=sum(t.numel() * t.element_size() for t in state + masters),
        saved_layers=saved.total("layers"), saved_loss=saved.total("loss"))
    return dict(p=p, student_cfg=student_cfg, teacher_cfg=teacher_cfg, rss=rss, phases=phases, peaks=peaks,
                step_s=step_s, losses=losses, widths=widths, measured=measured, trainable=len(trainable),
                plan=planned(student_cfg, teacher_cfg, a.seq, dtype, objective.chunk_tokens))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="language layers of student and teacher")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length: 1 + 576 image positions + text")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="d2s steps (the first also allocates Adam's state)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="Objective's loss chunk (0: reference losses)")
    parser.add_argument("--plan-only", action="store_true", help="print the planner's figures and build nothing")
    parser.add_argument("--json", help="also write the result to this JSON file")
    a = parser.parse_args(argv)
    if torch.cuda.is_available():
        raise SystemExit("real_shape.py measures CPU process memory; run it on a machine without CUDA")
    from megamod import distributed

    distributed.initialize(distributed.ParallelConfig())
    try:
        if a.plan_only:
            p = dict(distill_step.PRESETS["gpu"], seq=a.seq)
            p["student"] = dict(p["student"], num_layers=a.layers, tie_word_embeddings=True)
            p["teacher"] = dict(p["teacher"], num_layers=a.layers)
            s, t = distill_step.llava_configs(p, a.experts, a.topk)
            plan = planned(s, t, a.seq, getattr(torch, a.dtype), a.chunk_tokens)
            print(", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.items()) + " GiB")
            return plan
        with benchlib.moe_aux_loss_scale(torch.device("cpu")):
            r = run(a)
    finally:
        distributed.shutdown()
    plan, measured = r["plan"], r["measured"]
    peak = max(r["peaks"])
    rows = [dict(part=f"step {i + 1}", step_s=s, peak_gib=pk / GIB, plan_gib=plan["total"] / GIB,
                 ratio=pk / plan["total"]) for i, (s, pk) in enumerate(zip(r["step_s"], r["peaks"]))]
    tokens = r["p"]["seq"]
    notes = [f"RSS before building: {r['rss']['baseline'] / GIB:.2f} GiB (python, torch, megatron; not counted); "
             f"peak absolute {(peak + r['rss']['baseline']) / GIB:.2f} GiB",
             "RSS above it after: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["phases"].items()) + " GiB",
             "tensors (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in measured.items()),
             "planner (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.items()),
             f"KD logits width: student {r['widths']['student']}, teacher {r['widths']['teacher']}; "
             f"tokenizer vocabulary reaching the loss {r['widths']['vocab']}",
             f"losses: {r['losses'][-1]}",
             f"loss chunk_tokens {a.chunk_tokens}; {tokens} tokens per step ({tokens - 1 - 576} text); {r['trainable']} trainable student tensors",
             f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}"]
    config = dict(layers=a.layers, chunk_tokens=a.chunk_tokens, seq_length=a.seq, dtype=a.dtype, experts=a.experts, topk=a.topk, steps=a.steps,
                  vocab=QWEN_VOCAB, peak_gib=peak / GIB, plan_gib=plan["total"] / GIB, ratio=peak / plan["total"],
                  plan={k: v / GIB for k, v in plan.items()}, measured={k: v / GIB for k, v in measured.items()},
                  phases={k: v / GIB for k, v in r["phases"].items()}, baseline_gib=r["rss"]["baseline"] / GIB)
    columns = [("part", "part", ""), ("step_s", "step s", ".1f"), ("peak_gib", "peak RSS GiB", ".2f"),
               ("plan_gib", "planner GiB", ".2f"), ("ratio", "measured / planner", ".3f")]
    res = benchlib.result(
        "real_shape", f"d2s step at real shapes, {a.layers} layers, 1 x {a.seq} tokens, {a.dtype}, vocabulary "
        f"{QWEN_VOCAB}, device=cpu, threads={torch.get_num_threads()}; peak RSS above the pre-build baseline",
        torch.device("cpu"), config, columns, rows, notes)
    benchlib.print_table(res)
    benchlib.write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
