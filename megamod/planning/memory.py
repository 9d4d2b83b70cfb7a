"""Per-rank memory and FLOPs of one distillation step, from the model configs and a parallel layout.

What is counted (bytes, on the busiest pipeline stage: the first holds the embedding and the most in-flight
micro-batches, the last the output layer; the larger of the two is reported):
  weights      student parameters of this rank in the parameter dtype (with `vision`: its CLIP tower on the first
               stage; without it the tower, 0.3B frozen parameters for CLIP-L, is not counted)
  gradients    megatron DDP's fp32 gradient buffer, trainable parameters only
  optimizer    Adam moments (fp32, 8 bytes) + fp32 master weights when the parameters are 16-bit (4 bytes), divided
               by the data-parallel size (expert-data-parallel size for experts) with the distributed optimizer
  activations  what the student's backward keeps per layer and micro-batch (the tensors listed in
               `_layer_activation_elems`), times the micro-batches in flight (1F1B: min(pp, micro-batches) on the
               first stage); plus, on the last stage, the logits and what the losses hold beside them
               (`logit_bytes`: chunked losses one gradient buffer and a chunk of fp32 work; the unchunked
               reference KD + CE 36 bytes per logit)
  teacher      online: the frozen teacher's weights on the same TP/PP layout (dense teacher, no EP; with `vision`
               its own tower), its logits and one layer's working set; cached: the micro-batch's top-k rows
  buffers      pipeline send/receive buffers and the teacher-student joint activation (DistillPair)
Not counted: the CUDA context and allocator fragmentation (a few GB on a GPU: the planner keeps `headroom`).
"""
from __future__ import annotations

from dataclasses import dataclass

from megamod.models.language import LanguageModelConfig
from megamod.flops import causal_pairs, language_flops

TRAINS = {"sft": "language", "d2d": "language", "d2s": "ffn", "preference": "ffn", "align": "none"}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    mbs: int = 1
    seq: int = 2048
    num_micro: int = 1  # micro-batches per step and data-parallel rank
    param_bytes: int = 2  # bf16
    loss_chunk_tokens: int = 256  # Objective's chunk_tokens (losses/chunked.py); 0: the unchunked reference losses
    distributed_optimizer: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def _moe_layers(cfg: LanguageModelConfig) -> int:
    if cfg.num_experts is None:
        return 0
    return sum(1 for x in cfg.moe_layer_pattern if x) if cfg.moe_layer_pattern else cfg.num_layers


def param_counts(cfg: LanguageModelConfig, lay: Layout, stage: str) -> dict:
    """Parameters on one rank of pipeline stage `stage` ("first" or "last"), split into groups:
    attention/norms (`other`), dense FFNs (`ffn`), experts (`experts`), routers (`router`), embedding/output."""
    h, hd, tp = cfg.hidden_size, cfg.head_dim, lay.tp
    layers = cfg.num_layers // lay.pp
    moe = round(_moe_layers(cfg) / lay.pp)
    attn = (h * hd * (cfg.num_attention_heads + 2 * cfg.num_query_groups) + cfg.num_attention_heads * hd * h) // tp
    attn += (hd * (cfg.num_attention_heads + 2 * cfg.num_query_groups)) // tp if cfg.qkv_bias else 0
    norms = 2 * h
    ffn = 3 * h * cfg.ffn_hidden_size // tp
    expert = 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)  # expert TP = 1
    counts = {"other": layers * (attn + norms), "ffn": (layers - moe) * ffn,
              "experts": moe * (cfg.num_experts or 0) // lay.ep * expert, "router": moe * h * (cfg.num_experts or 0)}
    vocab = cfg.padded_vocab_size * h // tp
    single = lay.pp == 1
    counts["embedding"] = vocab if stage == "first" or single or cfg.tie_word_embeddings else 0
    counts["output"] = vocab if (stage == "last" or single) and not (cfg.tie_word_embeddings and single) else 0
    counts["other"] += h if stage == "last" or single else 0  # final norm
    return counts


def _trainable(counts: dict, trains: str) -> tuple[int, int]:
    """(dense, expert) trainable parameters of this rank."""
    if trains == "language":
        return sum(v for k, v in counts.items() if k != "experts"), counts["experts"]
    if trains == "ffn":
        return counts["ffn"] + counts["router"], counts["experts"]
    return 0, 0


def _layer_activation_elems(cfg: LanguageModelConfig, lay: Layout, moe: bool) -> float:
    """Elements a layer keeps for its backward, per micro-batch: norm inputs and outputs, q/k/v (and rotated q/k),
    the attention's log-sum-exp (fused SDPA, models/attention.py: no [S, S] scores are kept; fp32, counted as two
    elements), the context, the residual, fc1's output, the SwiGLU output; MoE: the router's logits and
    probabilities, and the permuted tokens (topk copies)."""
    t = lay.mbs * lay.seq  # tokens
    h, hd, tp = cfg.hidden_size, cfg.head_dim, lay.tp
    qkv = hd * (cfg.num_attention_heads + 2 * cfg.num_query_groups)
    attention = t * (2 * h + (2 * qkv - 2 * cfg.num_query_groups * hd) / tp + h / tp + h) \
        + 2 * lay.mbs * cfg.num_attention_heads / tp * lay.seq
    ffn_width = (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size) if moe else cfg.ffn_hidden_size / tp
    copies = cfg.moe_router_topk if moe else 1
    ffn = t * 2 * h + t * copies * (3 * ffn_width + h)
    if moe:
        ffn += t * (2 * (cfg.num_experts or 0) + copies * h)
    return attention + ffn


def vision_params(vision) -> int:
    """Parameters of a CLIP ViT tower (models/vision.py's VisionConfig): patch conv, class and position
    embeddings, pre-norm, and per layer q/k/v/o with biases, the MLP with biases and two LayerNorms."""
    h, f = vision.hidden_size, vision.intermediate_size
    layer = 4 * (h * h + h) + 2 * h * f + f + h + 2 * 2 * h
    return 3 * vision.patch_size ** 2 * h + h + (vision.num_patches + 1) * h + 2 * h + vision.num_layers * layer


def logit_bytes(student: LanguageModelConfig, lay: Layout, teacher: LanguageModelConfig | None = None):
    """(student, teacher) bytes on the last stage per micro-batch for the logits and what the losses hold beside
    them at their peak. Chunked losses (lay.loss_chunk_tokens > 0, losses/chunked.py): the student's logits, their
    gradient (one buffer in the logits' dtype) and four fp32 [chunk, vocab] work tensors; the teacher's logits.
    Reference losses (0): the student's logits + CE's fp32 copy + with an online teacher the KD loss's eight fp32
    [tokens, vocab] tensors alive together (losses/kd.py), measured 36 bytes per logit for KD + CE; without one two
    fp32 copies."""
    tokens, pb, v = lay.mbs * lay.seq, lay.param_bytes, student.padded_vocab_size / lay.tp
    t_logits = tokens * teacher.padded_vocab_size / lay.tp * pb if teacher is not None else 0
    if lay.loss_chunk_tokens:
        return tokens * v * 2 * pb + 4 * min(tokens, lay.loss_chunk_tokens) * v * 4, t_logits
    return tokens * v * (pb + 4 * (1 + 8) if teacher is not None else pb + 4 + 4), t_logits


def step_memory(student: LanguageModelConfig, lay: Layout, trains: str = "language",
                teacher: LanguageModelConfig | None = None, cached_topk: int | None = None, vision=None) -> dict:
    """Bytes per rank by kind (module docstring), the larger of the first and last pipeline stage. `vision`: the
    LLaVA models' VisionConfig (each model holds a frozen tower on its first stage, replicated over TP); None
    leaves the towers out."""
    best = None
    for stage in (("first", "last") if lay.pp > 1 else ("first",)):
        m = _stage_memory(student, lay, trains, teacher, cached_topk, stage, vision)
        best = m if best is None or m["total"] > best["total"] else best
    return best


def _stage_memory(student, lay, trains, teacher, cached_topk, stage, vision=None) -> dict:
    counts = param_counts(student, lay, stage)
    dense_t, expert_t = _trainable(counts, trains)
    pb = lay.param_bytes
    tower = vision_params(vision) * pb if vision is not None and stage == "first" else 0
    out = {"weights": sum(counts.values()) * pb + tower, "gradients": 4 * (dense_t + expert_t)}
    opt_per_param = 8 + (4 if pb < 4 else 0)
    expert_dp = max(1, lay.dp * lay.tp // lay.ep)
    shard = (lay.dp, expert_dp) if lay.distributed_optimizer else (1, 1)
    out["optimizer"] = opt_per_param * (dense_t / shard[0] + expert_t / shard[1])
    in_flight = min(lay.pp, lay.num_micro) if stage == "first" else 1
    layers = student.num_layers // lay.pp
    moe = round(_moe_layers(student) / lay.pp)
    per_micro = (layers - moe) * _layer_activation_elems(student, lay, False) + moe * _layer_activation_elems(
        student, lay, True)
    last = stage == "last" or lay.pp == 1
    tokens = lay.mbs * lay.seq
    logits, t_logits = logit_bytes(student, lay, teacher) if last else (0, 0)
    out["activations"] = per_micro * pb * in_flight + logits
    if teacher is not None:
        t_counts = param_counts(teacher, Layout(tp=lay.tp, pp=lay.pp, mbs=lay.mbs, seq=lay.seq), stage)
        working = tokens * (3 * teacher.ffn_hidden_size / lay.tp + 4 * teacher.hidden_size) * pb
        out["teacher"] = sum(t_counts.values()) * pb + tower + working + t_logits
        joint = tokens * (student.hidden_size + teacher.hidden_size) * pb * 2 if lay.pp > 1 else 0
    elif cached_topk:
        out["teacher"] = tokens * cached_topk * (8 + 4) + tokens * 4 if last else 0
        joint = 0
    else:
        out["teacher"], joint = 0, 0
    out["buffers"] = joint + (2 * tokens * student.hidden_size * pb if lay.pp > 1 else 0)
    out["total"] = sum(out.values())
    out["stage"] = stage
    return out


def step_flops(student: LanguageModelConfig, lay: Layout, teacher: LanguageModelConfig | None = None,
               trains: str = "language") -> dict:
    """Model FLOPs of one step per rank (megamod/flops.py's count) of the language models on full-length rows:
    student forward + backward with `trains` trainable (and the projector, as in every stage, so input gradients
    reach the first layer), teacher forward (online only)."""
    rows = lay.mbs * lay.num_micro * lay.dp
    tokens, pairs = rows * lay.seq, rows * causal_pairs(lay.seq)
    groups = {"language": ("language",), "ffn": ("ffn", "router"), "none": ()}[trains]
    student_f = sum(language_flops(student, tokens, pairs, groups, upstream=True).values())
    teacher_f = sum(language_flops(teacher, tokens, pairs).values()) if teacher is not None else 0.0
    return {"student": student_f / lay.world, "teacher": teacher_f / lay.world,
            "total": (student_f + teacher_f) / lay.world}
