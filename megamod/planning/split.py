"""The teacher on its own ranks: a job of G GPUs split into N teacher ranks and G - N student ranks.

The layout this plans for (recipe `teacher: {ckpt, ranks: N, parallel: {tp, pp}, send: topk|full, topk: K}`): the
teacher runs forward only, frozen, on its N ranks with its own TP/PP and DP = N / (TP PP); the student trains on the
other ranks with its own TP/PP/EP/DP; the teacher computes each sample's per-position top-k log-probs and tail mass
(or its full-vocabulary log-prob shards) and sends each student data-parallel rank its rows point-to-point, one step
ahead of the student (a bounded queue).

Memory per GPU, on each side's busiest pipeline stage (bytes):
  teacher  weights      its parameters on this rank (memory.param_counts), in the parameter dtype (+ its CLIP tower
                        on the first stage with `vision`)
           activations  one forward's working set: a layer's (tokens x (3 ffn / tp + 4 hidden)) and, on the last
                        stage, the micro-batch's logit shard [tokens, V/tp]: the in-job planner's teacher term
           send         last stage: the fp32 log-softmax of one micro-batch's logit shard (top-k and tail are taken
                        from it) + the rows of the step it works ahead on, this rank's share, waiting to be sent
           buffers      pipeline send/receive of hidden states (pp > 1)
  student  memory.step_memory with no teacher (what the planner counts for a student alone) + `recv` on its last
           stage: its data-parallel rank's rows of the step it trains on and of the next one arriving (top-k rows
           whole on every TP rank, full rows as the TP rank's V/tp shard)

Time per step: model FLOPs per rank (megamod/flops.py's count; memory.step_flops for the student) / (peak x mfu),
times the pipeline's fill and drain, (m + pp - 1) / m for m micro-batches per pipeline (1F1B for the student, a
forward-only pipeline for the teacher). The teacher's replicas share the global batch; when its data-parallel size
does not divide the batch, the step waits for a replica holding ceil(batch / dp) rows.

Transfer, per response token: top-k: K int32 ids + K log-probs in the send dtype + the fp32 log tail mass; full:
the teacher's padded vocabulary of log-probs in the send dtype (each TP rank sends its V/tp). The teacher's last-stage
ranks (dp x tp; a TP group splits the top-k rows after merging its shards' candidates) send, the student's last-stage
ranks (dp x tp) receive; transfer time = the busier end's bytes per rank / the link bandwidth.
Step of the pair = max(teacher step, student step) + transfer (not assumed to overlap the compute); a side's idle
fraction = 1 - its step / the pair's step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megamod.flops import causal_pairs, language_flops
from megamod.models.language import LanguageModelConfig
from megamod.planning import memory
from megamod.planning.memory import Layout, param_counts, step_flops, step_memory, vision_params
from megamod.planning.search import search

PEAK = ("H100 SXM bf16 dense, data sheet", 989.0)  # TFLOP/s (tools/bench/benchlib.py's table)
LINK = ("400 Gb/s InfiniBand NDR, one NIC per GPU, line rate", 50.0)  # GB/s per GPU, each direction
SENDS = ("topk", "full")
_TAIL_BYTES, _ID_BYTES = 4, 4  # fp32 log tail mass per token; int32 token id (as the offline cache stores them)


@dataclass(frozen=True)
class Settings:
    """What both sides share: the step, the hardware and how the teacher's rows travel."""
    gpu_mem_gb: float = 80.0
    headroom: float = 0.1  # kept free on every GPU (CUDA context, fragmentation), as in search()
    trains: str = "ffn"  # memory.TRAINS[stage]
    mbs: int = 1
    teacher_mbs: int | None = None  # the teacher's micro-batch; None: mbs
    seq: int = 2048
    global_batch: int = 128
    response_tokens: int | None = None  # positions per row that get teacher rows; None: every position (a bound)
    send: str = "topk"
    topk: int = 64
    send_bytes: int = 2  # bytes of a sent log-prob: 2 bf16, 4 fp32
    param_bytes: int = 2
    peak_tflops: float = PEAK[1]
    mfu: float = 1.0  # fraction of the peak the step runs at; 1: time at the peak
    link_gbs: float = LINK[1]
    ahead: int = 1  # steps the teacher works ahead of the student

    @property
    def budget(self) -> float:
        return (1 - self.headroom) * self.gpu_mem_gb * 1e9

    @property
    def tokens_per_row(self) -> int:
        return self.seq if self.response_tokens is None else self.response_tokens

    def seconds(self, flops: float) -> float:
        return flops / (self.peak_tflops * 1e12 * self.mfu)


def send_bytes_per_token(teacher: LanguageModelConfig, send: str, topk: int, dtype_bytes: int) -> int:
    """Bytes one response token's teacher row takes on the wire, all TP shards together."""
    if send == "topk":
        return topk * (_ID_BYTES + dtype_bytes) + _TAIL_BYTES
    if send == "full":
        return teacher.padded_vocab_size * dtype_bytes
    raise ValueError(f"teacher.send (--send) must be one of {SENDS}, got {send!r}")


def pipeline_factor(pp: int, micro: int) -> float:
    """Time of m micro-batches through pp stages over m times one micro-batch's: the fill and drain."""
    return (micro + pp - 1) / micro


def _check(teacher: LanguageModelConfig, s: Settings) -> None:
    if s.send not in SENDS:
        raise ValueError(f"teacher.send (--send) must be one of {SENDS}, got {s.send!r}")
    if s.send == "topk" and not 1 <= s.topk <= teacher.padded_vocab_size:
        raise ValueError(f"teacher.topk (--topk) must be in 1..{teacher.padded_vocab_size}, got {s.topk}")
    if not 0 < s.tokens_per_row <= s.seq:
        raise ValueError(f"--response-tokens must be in 1..seq ({s.seq}), got {s.response_tokens}")


# ------------------------------------------------------------------------------------------------------------ teacher


def teacher_memory(teacher: LanguageModelConfig, lay: Layout, rows: int, s: Settings, vision=None) -> dict:
    """Bytes per teacher rank by kind (module docstring) on its busiest stage; `rows`: rows of its replica per step."""
    best = None
    for stage in (("first", "last") if lay.pp > 1 else ("first",)):
        m = _teacher_stage_memory(teacher, lay, rows, s, stage, vision)
        best = m if best is None or m["total"] > best["total"] else best
    return best


def _teacher_stage_memory(teacher, lay: Layout, rows: int, s: Settings, stage: str, vision=None) -> dict:
    pb, tokens = lay.param_bytes, lay.mbs * lay.seq
    last = stage == "last" or lay.pp == 1
    tower = vision_params(vision) * pb if vision is not None and stage == "first" else 0
    shard = teacher.padded_vocab_size / lay.tp
    out = {"weights": sum(param_counts(teacher, lay, stage).values()) * pb + tower}
    working = tokens * (3 * teacher.ffn_hidden_size / lay.tp + 4 * teacher.hidden_size) * pb
    out["activations"] = working + (tokens * shard * pb if last else 0)
    per_token = send_bytes_per_token(teacher, s.send, s.topk, s.send_bytes)
    queue = s.ahead * rows * s.tokens_per_row * per_token / lay.tp
    out["send"] = tokens * shard * 4 + queue if last else 0
    out["buffers"] = 2 * tokens * teacher.hidden_size * pb if lay.pp > 1 else 0
    out["total"] = sum(out.values())
    out["stage"] = stage
    return out


def teacher_flops(teacher: LanguageModelConfig, lay: Layout, rows: int) -> float:
    """Forward FLOPs per rank of a replica that runs `rows` full-length rows in a step."""
    tokens, pairs = rows * lay.seq, rows * causal_pairs(lay.seq)
    return sum(language_flops(teacher, tokens, pairs).values()) / (lay.tp * lay.pp)


def _check_parallel(teacher: LanguageModelConfig, tp: int | None, pp: int | None) -> None:
    for key, v in (("tp", tp), ("pp", pp)):
        if v is not None and v < 1:
            raise ValueError(f"teacher.parallel.{key} (--teacher-{key}) must be at least 1, got {v}")
    if tp or pp:
        try:
            teacher.validate(tp or 1, pp or 1, 1)
        except ValueError as e:
            raise ValueError(f"teacher.parallel (--teacher-tp/--teacher-pp): {e}") from None


def teacher_layouts(teacher: LanguageModelConfig, ranks: int, s: Settings, tp: int | None = None,
                    pp: int | None = None, vision=None) -> list[dict]:
    """Every forward-only layout of the teacher on `ranks` GPUs (TP <= 8 within a node, PP dividing its layers,
    DP = ranks / (TP PP)): fitting layouts first, then the shortest step, the least model parallelism, the least
    memory."""
    if ranks < 1:
        raise ValueError(f"teacher.ranks (--teacher-ranks) must be at least 1, got {ranks}")
    _check_parallel(teacher, tp, pp)
    if tp and pp and ranks % (tp * pp):
        raise ValueError(f"teacher.ranks={ranks} (--teacher-ranks) is not divisible by teacher.parallel.tp x "
                         f"teacher.parallel.pp = {tp} x {pp} = {tp * pp}")
    mbs = s.teacher_mbs or s.mbs
    rows_out = []
    for t in [tp] if tp else (1, 2, 4, 8):
        for p in [pp] if pp else [d for d in range(1, min(teacher.num_layers, 64) + 1) if not teacher.num_layers % d]:
            if ranks % (t * p):
                continue
            try:
                teacher.validate(t, p, 1)
            except ValueError:
                continue
            dp = ranks // (t * p)
            rows = math.ceil(s.global_batch / dp)
            lay = Layout(tp=t, pp=p, dp=dp, mbs=mbs, seq=s.seq, num_micro=math.ceil(rows / mbs),
                         param_bytes=s.param_bytes)
            mem = teacher_memory(teacher, lay, rows, s, vision)
            flops = teacher_flops(teacher, lay, rows)
            rows_out.append({"layout": lay, "rows": rows, "memory": mem, "flops": flops,
                             "seconds": s.seconds(flops) * pipeline_factor(p, lay.num_micro),
                             "fits": mem["total"] <= s.budget})
    if not rows_out and (tp or pp):
        raise ValueError(f"teacher.ranks={ranks} (--teacher-ranks) is not divisible by teacher.parallel.tp x "
                         f"teacher.parallel.pp ({tp or 'any'} x {pp or 'any'}) at any valid layout")
    rows_out.sort(key=lambda r: (not r["fits"], r["seconds"], r["layout"].tp * r["layout"].pp,
                                 r["memory"]["total"]))
    return rows_out


def best_teacher(teacher: LanguageModelConfig, ranks: int, s: Settings, tp=None, pp=None, vision=None) -> dict:
    rows = teacher_layouts(teacher, ranks, s, tp, pp, vision)
    if not rows:
        raise ValueError(f"teacher.ranks={ranks} (--teacher-ranks): no valid teacher layout (TP <= 8 dividing "
                         f"{teacher.num_query_groups} query groups, PP dividing {teacher.num_layers} layers) "
                         f"divides {ranks} ranks")
    if not rows[0]["fits"]:
        least = min(rows, key=lambda r: r["memory"]["total"])
        lay = least["layout"]
        raise ValueError(f"teacher.ranks={ranks} (--teacher-ranks): the teacher fits at no layout of {ranks} ranks in "
                         f"{s.budget / 1e9:.0f} GB per GPU ({s.gpu_mem_gb:g} GB less {s.headroom:.0%}); the least, "
                         f"tp={lay.tp} pp={lay.pp}, needs {least['memory']['total'] / 1e9:.1f} GB")
    return rows[0]


# ------------------------------------------------------------------------------------------------------------ student


def recv_bytes(teacher: LanguageModelConfig, lay: Layout, s: Settings) -> float:
    """Bytes a student last-stage rank holds for the teacher's rows: its data-parallel rank's rows of this step and
    of the `ahead` steps arriving."""
    rows = s.global_batch // lay.dp
    per_token = send_bytes_per_token(teacher, s.send, s.topk, s.send_bytes)
    per_token = per_token if s.send == "topk" else per_token / lay.tp
    return (s.ahead + 1) * rows * s.tokens_per_row * per_token


def student_layouts(student: LanguageModelConfig, teacher: LanguageModelConfig, gpus: int, s: Settings,
                    tp=None, pp=None, ep=None, vision=None) -> list[dict]:
    """search()'s layouts of the student alone on `gpus` (its order: least model parallelism first), each with the
    receive buffers on its last stage, its step time, and whether it still fits."""
    out = []
    for r in search(student, None, gpus, s.gpu_mem_gb, s.trains, s.mbs, s.seq, s.global_batch, None, s.headroom,
                    tp, pp, ep, s.param_bytes):
        lay = r["layout"]
        stages = ("first", "last") if lay.pp > 1 else ("first",)
        per_stage = [memory._stage_memory(student, lay, s.trains, None, None, st, vision) for st in stages]
        per_stage[-1] = dict(per_stage[-1], recv=recv_bytes(teacher, lay, s))
        for m in per_stage:
            m.setdefault("recv", 0.0)
            m["total"] = sum(v for k, v in m.items() if k not in ("total", "stage"))
        mem = max(per_stage, key=lambda m: m["total"])
        flops = step_flops(student, lay, None, s.trains)["student"]
        out.append({"layout": lay, "memory": mem, "flops": flops,
                    "seconds": s.seconds(flops) * pipeline_factor(lay.pp, lay.num_micro),
                    "fits": mem["total"] <= s.budget})
    out.sort(key=lambda r: not r["fits"])  # stable: search()'s order among the fitting ones
    return out


# --------------------------------------------------------------------------------------------------------------- pair


def transfer(teacher: LanguageModelConfig, t_row: dict, s_row: dict, s: Settings) -> dict:
    """Bytes per step on the wire and per busiest sending / receiving rank, and the seconds they take."""
    per_token = send_bytes_per_token(teacher, s.send, s.topk, s.send_bytes)
    t_lay, s_lay = t_row["layout"], s_row["layout"]
    sent = s.global_batch * s.tokens_per_row * per_token
    per_sender = t_row["rows"] * s.tokens_per_row * per_token / t_lay.tp
    per_receiver = recv_bytes(teacher, s_lay, s) / (s.ahead + 1)
    busiest = max(per_sender, per_receiver)
    return {"bytes_per_token": per_token, "sent": sent, "per_sender": per_sender, "per_receiver": per_receiver,
            "seconds": busiest / (s.link_gbs * 1e9)}


def pair_step(teacher_s: float, student_s: float, transfer_s: float) -> dict:
    """The pair's step (max of the sides + transfer) and each side's idle fraction."""
    step = max(teacher_s, student_s) + transfer_s
    return {"step": step, "teacher_idle": 1 - teacher_s / step, "student_idle": 1 - student_s / step}


def plan_split(teacher: LanguageModelConfig, student: LanguageModelConfig, gpus: int, teacher_ranks: int,
               s: Settings = Settings(), teacher_tp=None, teacher_pp=None, tp=None, pp=None, ep=None,
               vision=None) -> dict:
    """The teacher's best layout on `teacher_ranks` GPUs, the student's on the rest, the transfer and the pair's
    step. Impossible inputs raise ValueError naming the recipe key (and the option)."""
    _check(teacher, s)
    if teacher_ranks >= gpus:
        raise ValueError(f"teacher.ranks={teacher_ranks} (--teacher-ranks) leaves no GPU for the student: the job "
                         f"has {gpus} (--gpus)")
    t_row = best_teacher(teacher, teacher_ranks, s, teacher_tp, teacher_pp, vision)
    student_gpus = gpus - teacher_ranks
    s_rows = student_layouts(student, teacher, student_gpus, s, tp, pp, ep, vision)
    if not s_rows or not s_rows[0]["fits"]:
        why = "no layout of them divides the global batch" if not s_rows else \
            f"the least needs {min(r['memory']['total'] for r in s_rows) / 1e9:.1f} GB of {s.budget / 1e9:.0f}"
        raise ValueError(f"teacher.ranks={teacher_ranks} (--teacher-ranks): the student fits at no layout of the "
                         f"{student_gpus} GPUs left of {gpus} (--gpus): {why}")
    s_row = s_rows[0]
    xfer = transfer(teacher, t_row, s_row, s)
    return {"gpus": gpus, "teacher": t_row, "student": s_row, "transfer": xfer, "send": s.send, "topk": s.topk,
            **pair_step(t_row["seconds"], s_row["seconds"], xfer["seconds"])}


def best_split(teacher: LanguageModelConfig, student: LanguageModelConfig, gpus: int, s: Settings = Settings(),
               **layouts) -> list[dict]:
    """plan_split for every teacher share of `gpus` that fits, shortest step first (then fewer teacher GPUs)."""
    _check(teacher, s)  # settings errors are the caller's; a split that does not fit is skipped
    _check_parallel(teacher, layouts.get("teacher_tp"), layouts.get("teacher_pp"))
    out = []
    for n in range(1, gpus):
        try:
            out.append(plan_split(teacher, student, gpus, n, s, **layouts))
        except ValueError:
            continue
    if not out:
        raise ValueError(f"--gpus {gpus}: no split into teacher and student ranks fits both in "
                         f"{s.budget / 1e9:.0f} GB per GPU")
    out.sort(key=lambda p: (p["step"], p["teacher"]["layout"].world))
    return out


# ------------------------------------------------------------------------------------- the designs it is compared with


def in_job(teacher: LanguageModelConfig, student: LanguageModelConfig, gpus: int, s: Settings = Settings(),
           tp=None, pp=None, ep=None, vision=None) -> dict | None:
    """Today's online layout (search()'s first fitting row: the teacher on the student's TP/PP) and its step time;
    None if nothing fits."""
    rows = search(student, teacher, gpus, s.gpu_mem_gb, s.trains, s.mbs, s.seq, s.global_batch, None, s.headroom,
                  tp, pp, ep, s.param_bytes)
    if not rows or not rows[0]["fits"]:
        return None
    r = rows[0]
    return dict(r, step=s.seconds(r["flops"]["total"]) * pipeline_factor(r["layout"].pp, r["layout"].num_micro))


def cached(teacher: LanguageModelConfig, student: LanguageModelConfig, gpus: int, s: Settings = Settings(),
           tp=None, pp=None, ep=None) -> dict | None:
    """The offline cache (top-k rows read from disk): search()'s first fitting row, its step time, and the teacher's
    forward FLOPs of one step's rows spread over all `gpus`, paid once when the cache is written."""
    rows = search(student, None, gpus, s.gpu_mem_gb, s.trains, s.mbs, s.seq, s.global_batch, s.topk, s.headroom,
                  tp, pp, ep, s.param_bytes)
    if not rows or not rows[0]["fits"]:
        return None
    r = rows[0]
    once = teacher_flops(teacher, Layout(seq=s.seq), s.global_batch) / gpus
    return dict(r, step=s.seconds(r["flops"]["total"]) * pipeline_factor(r["layout"].pp, r["layout"].num_micro),
                cache_once=s.seconds(once))
