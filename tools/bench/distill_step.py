"""Benchmark: one dense-to-sparse distillation step (LLaVA teacher online, sparse LLaVA student) on one device.

Times, alternating, median of repeats after warm-up:
  (a) the d2s step: teacher forward + student forward/backward with the KD and CE losses + optimizer step;
  (b) the student step alone (CE only, no teacher);
  (c) the teacher forward alone;
and reports tokens/s, model TFLOP/s, MFU and the KD overhead ratio a / (b + c) (1.0: distilling costs exactly a
student step plus a teacher forward; above 1: what the KD loss and holding both models add).
(a) and (b) run what the Trainer runs for a step (stages' trainable set, megatron DDP and optimizer,
`training.step.train_step` with `training.objective.Objective`), on synthetic micro-batches (one image per sample
at the start, random tokens), so no checkpoint or data set is needed; both models start from random weights.

FLOPs are megamod.flops' count of what each part computes: the student's trainable weights (d2s: adapter,
FFNs, routers) 6N, its frozen ones behind them (attention, output layer) 4N, its frozen CLIP tower 2N, the teacher
2N, top-k of E experts per MoE layer, causal attention scores, the towers' attention. MFU is taken against the bf16
GEMM rate measured on the device at start (--peak-tflops to give another), printed beside the data-sheet peak.

Presets (--preset, default by device): gpu = Qwen1.5-0.5B student upcycled to 4 experts top-2 in even layers +
Qwen1.5-1.8B teacher, CLIP ViT-L/14-336, bf16, 4 micro-batches of 1 x 2048 tokens; cpu = the same shape of job
scaled to run in seconds; tiny = for tests.

    python tools/bench/distill_step.py [--device cuda] [--preset gpu] [--seq-length 2048] [--micro-batch-size 1]
                                       [--micro-batches 4] [--peak-tflops 790] [--repeats 5] [--json out.json]
                                       [--profile ops.txt]
"""
import argparse
import dataclasses
import math

import torch

import benchlib

QWEN_VOCAB = 151936
PRESETS = {
    # language: student / teacher LanguageModelConfig fields; vision: VisionConfig fields ({} = CLIP ViT-L/14-336)
    # mbs 1: megatron's local (unfused) attention keeps S x S scores per head for backward; 4 micro-batches per step
    "gpu": dict(vocab=QWEN_VOCAB, dtype="bfloat16", seq=2048, mbs=1, micro=4, vision={},
                student=dict(hidden_size=1024, num_layers=24, num_attention_heads=16, num_query_groups=16,
                             ffn_hidden_size=2816),
                teacher=dict(hidden_size=2048, num_layers=24, num_attention_heads=16, num_query_groups=16,
                             ffn_hidden_size=5504)),
    "cpu": dict(vocab=4096, dtype="float32", seq=256, mbs=2, micro=2,
                vision=dict(hidden_size=128, intermediate_size=512, num_layers=2, num_attention_heads=4,
                            image_size=64, patch_size=16),
                student=dict(hidden_size=256, num_layers=4, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=704),
                teacher=dict(hidden_size=512, num_layers=4, num_attention_heads=8, num_query_groups=2,
                             ffn_hidden_size=1408)),
    "tiny": dict(vocab=512, dtype="float32", seq=32, mbs=2, micro=1,
                 vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=16),
                 student=dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=96),
                 teacher=dict(hidden_size=96, num_layers=2, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=128)),
}
COLUMNS = [("part", "part", ""), ("step_ms", "ms", ".1f"), ("tokens_per_s", "tokens/s", ".0f"),
           ("tflops", "model TFLOP/s", ".3g"), ("mfu", "MFU", ".1%"), ("kd_overhead", "KD overhead", ".2f")]


def llava_configs(p: dict, experts: int, topk: int):
    from megamod.models.language import LanguageModelConfig
    from megamod.models.llava import LlavaConfig
    from megamod.models.upcycle import moe_layer_pattern
    from megamod.models.vision import VisionConfig

    vision, image_id = VisionConfig(**p["vision"]), p["vocab"] - 1
    layers = p["student"]["num_layers"]
    student = LanguageModelConfig(vocab_size=p["vocab"], max_position_embeddings=p["seq"], num_experts=experts,
                                  moe_router_topk=topk, moe_layer_pattern=moe_layer_pattern("even", layers),
                                  **p["student"])
    teacher = LanguageModelConfig(vocab_size=p["vocab"], max_position_embeddings=p["seq"], **p["teacher"])
    return LlavaConfig(student, vision, image_id), LlavaConfig(teacher, vision, image_id)


def step_flops(cfg, p: dict, groups) -> dict:
    """megamod.flops' breakdown of one step on full-length rows (groups None: forward only)."""
    from megamod.flops import causal_pairs, model_flops

    rows = p["micro"] * p["mbs"]
    return model_flops(cfg.language, cfg.vision, rows * p["seq"], rows * causal_pairs(p["seq"]), rows, groups)


def micro_batches(cfg, p: dict, device):
    """Synthetic full-length samples: one image at the start of each, random text after it."""
    from megamod.loading.microbatch import MicroBatch

    gen = torch.Generator().manual_seed(0)
    B, S, n_img = p["mbs"], p["seq"], cfg.vision.num_image_tokens
    if n_img >= S:
        raise SystemExit(f"--seq-length {S} leaves no text after the {n_img} image positions")
    out = []
    for _ in range(p["micro"]):
        tokens_BS = torch.randint(0, cfg.image_token_id, (B, S), generator=gen)
        tokens_BS[:, 1:1 + n_img] = cfg.image_token_id
        labels_BS = torch.randint(0, cfg.image_token_id, (B, S), generator=gen)
        labels_BS[:, : 1 + n_img] = -100
        images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
        out.append(MicroBatch(tokens_BS, torch.arange(S).expand(B, S).contiguous(), labels_BS,
                              (labels_BS != -100).float(), images, B * S, B,
                              torch.zeros(B, S, dtype=torch.bool)).to(device))
    return out


def run(p: dict, a, device):
    from megamod.families.factory import build_model
    from megamod.families.llava import LLAVA
    from megamod.loading.microbatch import run_model
    from megamod.training.objective import Objective
    from megamod.training.stages import apply_trainable, get_stage
    from megamod.training.step import build_optimizer, train_step, wrap_ddp

    dtype = getattr(torch, p["dtype"])
    student_cfg, teacher_cfg = llava_configs(p, a.experts, a.topk)
    stage = get_stage("d2s")
    student = build_model(student_cfg, dtype, init_weights=True).to(device)
    apply_trainable(student, stage.trainable)
    teacher = build_model(teacher_cfg, dtype, init_weights=True).to(device).requires_grad_(False).eval()
    student_flops, teacher_flops = step_flops(student_cfg, p, stage.trainable), step_flops(teacher_cfg, p, None)
    ddp = wrap_ddp(student)
    optimizer = build_optimizer([ddp], lr=1e-5)
    ddp.train()
    mbs = micro_batches(student_cfg, p, device)
    vocab = student_cfg.language.vocab_size
    kd = Objective(dict(stage.losses), vocab, family=LLAVA)
    ce = Objective({"ce": 1.0}, vocab, family=LLAVA)
    losses = {}

    def step(name, objective, with_teacher):
        result = train_step([ddp], optimizer, objective.forward_step(ddp, teacher if with_teacher else None), mbs,
                            p["seq"], p["mbs"])
        losses[name] = [float(d["loss"]) for d in result.losses]

    def teacher_forward():
        with torch.no_grad():
            for mb in mbs:
                run_model(teacher, mb, LLAVA)

    fns = {"kd": lambda: step("kd", kd, True), "student": lambda: step("student", ce, False),
           "teacher": teacher_forward}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    median = benchlib.median_seconds(fns, device, a.warmup, a.repeats)
    if a.profile:
        benchlib.profile_to_file({k: fns[k] for k in ("student", "kd")}, device, a.profile)
    peak_memory_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    bad = {k: v for k, v in losses.items() if not all(map(math.isfinite, v))}
    if bad:
        raise SystemExit(f"non-finite losses: {bad}")
    tokens = p["micro"] * p["mbs"] * p["seq"]
    flops = {"kd": student_flops["total"] + teacher_flops["total"], "student": student_flops["total"],
             "teacher": teacher_flops["total"]}
    median["student+teacher"] = median["student"] + median["teacher"]
    flops["student+teacher"] = flops["student"] + flops["teacher"]
    peak, peak_source = benchlib.peak_tflops(device, a.peak_tflops)
    labels = {"kd": "(a) d2s step: teacher fwd + student fwd/bwd + KD", "student": "(b) student step alone",
              "teacher": "(c) teacher forward alone", "student+teacher": "(b) + (c)"}
    rows = []
    for key, label in labels.items():
        s = median[key]
        tflops = flops[key] / s / 1e12
        rows.append(dict(part=label, step_ms=s * 1e3, tokens_per_s=tokens / s, tflops=tflops,
                         mfu=tflops / peak if peak else None,
                         kd_overhead=median["kd"] / median["student+teacher"] if key == "kd" else None))
    info = dict(tokens_per_step=tokens, student_params=sum(t.numel() for t in student.parameters()),
                student_flops={k: v / tokens for k, v in student_flops.items()},
                teacher_flops={k: v / tokens for k, v in teacher_flops.items()}, peak_tflops=peak,
                peak_source=peak_source, datasheet_tflops=benchlib.datasheet_tflops(device),
                trainable=list(stage.trainable), kd_overhead=rows[0]["kd_overhead"], d2s_loss=losses["kd"][-1],
                peak_memory_gb=peak_memory_gb)
    return rows, info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model sizes (default: gpu on cuda, cpu on cpu)")
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--micro-batches", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default on a GPU: its bf16 GEMM rate, measured)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--profile", help="after timing, profile one (b) and one (a) step; tables to this file")
    parser.add_argument("--performance", choices=["auto", "off", "both"], default="auto",
                        help="megamod's performance paths (megamod/performance.py): as resolved for the device, all "
                             "off (megatron-core's unfused path), or both, one after the other")
    a = parser.parse_args(argv)
    device = benchlib.parse_device(a.device)
    preset = a.preset or ("gpu" if device.type == "cuda" else "cpu")
    p = dict(PRESETS[preset])
    for key, arg in (("seq", a.seq_length), ("mbs", a.micro_batch_size), ("micro", a.micro_batches),
                     ("dtype", a.dtype)):
        if arg is not None:
            p[key] = arg
    if min(p["seq"], p["mbs"], p["micro"], a.experts, a.topk) < 1 or a.topk > a.experts:
        raise SystemExit("--seq-length, --micro-batch-size, --micro-batches, --experts, --topk must be positive "
                         "and --topk <= --experts")
    if device.type == "cpu" and torch.cuda.is_available():
        # megamod runs megatron-core on CPU only where CUDA is absent (megamod.cpu_compat refuses otherwise)
        raise SystemExit("--device cpu needs a machine without CUDA; use --device cuda here")
    from megamod import distributed, performance

    distributed.initialize(distributed.ParallelConfig())
    modes = ["off", "auto"] if a.performance == "both" else [a.performance]
    rows, by_mode = [], {}
    try:
        with benchlib.moe_aux_loss_scale(device):
            for mode in modes:
                off = {f.name: False for f in dataclasses.fields(performance.PerformanceConfig)}
                performance.configure(performance.PerformanceConfig(**(off if mode == "off" else {})))
                profile, a.profile = a.profile, (a.profile if mode == modes[-1] else None)
                mode_rows, info = run(p, a, device)
                a.profile = profile
                info["performance"] = {k: c.on for k, c in performance.resolve(getattr(torch, p["dtype"])).items()}
                by_mode[mode] = info
                for row in mode_rows:
                    rows.append(dict(row, part=f"[{mode}] {row['part']}") if len(modes) > 1 else row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        performance.configure(performance.PerformanceConfig())
        distributed.shutdown()
    per_token = lambda f: ", ".join(f"{k} {v / 1e9:.3g}" for k, v in f.items() if k != "total")  # noqa: E731
    peak = (f"{info['peak_tflops']:.0f} TFLOP/s ({info['peak_source']}"
            + (f"; data sheet {info['datasheet_tflops']:g})" if info["datasheet_tflops"] else ")")
            if info["peak_tflops"] else "no peak (n/a; --peak-tflops)")
    notes = [f"student {info['student_params'] / 1e6:.1f}M parameters; {info['tokens_per_step']} tokens per step",
             f"GFLOP per token, student fwd+bwd (d2s trainable: {', '.join(info['trainable'])}): "
             f"{info['student_flops']['total'] / 1e9:.3g} ({per_token(info['student_flops'])})",
             f"GFLOP per token, teacher forward: {info['teacher_flops']['total'] / 1e9:.3g} "
             f"({per_token(info['teacher_flops'])})",
             f"MFU against {peak}",
             f"KD overhead = (a) / ((b) + (c)) = {info['kd_overhead']:.2f}"]
    if info["peak_memory_gb"] is not None:
        notes.append("peak GPU memory " + ", ".join(f"{m} {i['peak_memory_gb']:.1f} GiB" for m, i in by_mode.items()))
    for mode, i in by_mode.items():
        on = [k for k, v in i["performance"].items() if v]
        notes.append(f"performance {mode}: {', '.join(on) if on else 'all paths off'}")
    if len(modes) > 1:
        step_ms = {r["part"].split("]")[0][1:]: r["step_ms"] for r in rows if "(a)" in r["part"]}
        notes.append(f"(a) step time, off / auto: {step_ms['off'] / step_ms['auto']:.2f}x")
    config = dict(preset=preset, seq_length=p["seq"], micro_batch_size=p["mbs"], micro_batches=p["micro"],
                  dtype=p["dtype"], experts=a.experts, topk=a.topk, warmup=a.warmup, repeats=a.repeats,
                  performance_modes=by_mode, **info)
    res = benchlib.result(
        "distill_step", f"d2s distillation step, preset {preset}, {p['dtype']}, {p['micro']} x {p['mbs']} x "
        f"{p['seq']} tokens, device={device}, threads={torch.get_num_threads()}; median of {a.repeats} after "
        f"{a.warmup} warm-up", device, config, COLUMNS, rows, notes)
    benchlib.print_table(res)
    benchlib.write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
