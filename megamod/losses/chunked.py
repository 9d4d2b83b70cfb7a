"""Memory-lean vocabulary-parallel losses: KD, label log-probs (CE, sequence log-probs) and the cached top-k KD over
chunks of tokens, with recomputation in backward.

The reference losses (kd.py, ce.py, preference.py, topk_kd.py) hold fp32 copies of both models' logits [N, V/tp],
their shifted and exponentiated versions and autograd's saved tensors at once: at S=1024, V=151936, KD + CE held 16
bf16 logits tensors above their inputs. Here one autograd Function walks the tokens `chunk_tokens` at a time:

- forward: per chunk, the fp32 log-softmax statistics of student and teacher (TP all-reduces of the max, then of the
  sum-exp and the other local sums, per chunk, as the reference does for the whole tensor), and the per-token losses.
  It saves the inputs (references, no copies) and per-token statistics [N] only.
- backward: per chunk, recomputes the probabilities from the inputs and the saved statistics and writes the gradient
  of the student logits into one preallocated tensor in the input dtype (padding columns zero). A chunk whose tokens
  all have zero output gradient (masked out) is not recomputed.

So at most one chunk of fp32 [chunk, V/tp] work tensors (two to four of them) lives at a time, plus the gradient.
The gradient rule of kd.py holds: the losses depend on this rank's shard only through TP all-reduced sums, so each
rank's backward is its shard of the full-vocabulary gradient, with no communication (the statistics are global).

Gradients, per token with output gradient g, at temperature T (s = x / T, p = softmax):
    forward KL(p_T || p_S):  T g (p_S - p_T)
    reverse KL(p_S || p_T):  T g p_S (log p_S - log p_T - KL / T^2)
    log p(label):            g (onehot(label) - p_1)            (p_1: the softmax at temperature 1)
    top-k bucketed KL:       g (p_j Q - q'_j [j in top-k] - q_R [j not in top-k] e_j / tail),  Q = sum q' + q_R
Label log-probs: labels outside [0, vocab_size) (e.g. -100) give 0 and no gradient (the reference CE gives a
meaningless value there, which its callers mask out).
"""
from __future__ import annotations

import torch

# Tokens per chunk: the benchmark (tools/bench/loss_memory.py) at V=151936 found 256 as fast as larger chunks on
# CPU; one fp32 work tensor is then 256 * 151936 * 4 B = 156 MB, an eighth of a bf16 [4096, 151936] logits tensor.
DEFAULT_CHUNK_TOKENS = 256


def _tp():
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    return tp, ps.get_tensor_model_parallel_rank(), group


def _all_reduce(x: torch.Tensor, group, op=None) -> torch.Tensor:
    if group is not None:
        torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM, group=group)
    return x


def _local_max_c(x_cv: torch.Tensor) -> torch.Tensor:
    if x_cv.shape[-1] == 0:  # amax of an empty dim raises; -inf is MAX's identity
        return x_cv.new_full(x_cv.shape[:-1], float("-inf"))
    return x_cv.amax(dim=-1)


def _check_chunk(chunk_tokens: int) -> int:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return chunk_tokens


def _shard_geometry(logits_Nv: torch.Tensor, vocab_size: int, name: str):
    """(tp, group, start, width): this rank's first vocabulary id and its number of valid (non-padding) columns."""
    tp, rank, group = _tp()
    shard = logits_Nv.shape[-1]
    if not 0 < vocab_size <= tp * shard:
        raise ValueError(f"{name}: vocab_size {vocab_size} not in (0, tp * shard width = {tp} * {shard}]")
    start = rank * shard
    return tp, group, start, max(0, min(shard, vocab_size - start))


def _label_columns(labels_c: torch.Tensor, start: int, width: int):
    """(local column clamped into the shard, True where this rank owns the label); labels < 0 are nobody's."""
    local_c = labels_c - start
    inside_c = (local_c >= 0) & (local_c < width)
    return local_c.clamp(0, max(width - 1, 0)), inside_c


def _rows(N: int, chunk: int):
    return [slice(c0, min(c0 + chunk, N)) for c0 in range(0, N, chunk)]


def _live_chunks(chunks, *grads_N):
    """Which chunks have a token with a non-zero output gradient (one host sync for all chunks)."""
    if not chunks:
        return []
    live_N = torch.zeros_like(next(g for g in grads_N if g is not None), dtype=torch.bool)
    for g_N in grads_N:
        if g_N is not None:
            live_N |= g_N != 0
    ends = torch.tensor([r.stop for r in chunks], device=live_N.device)
    counts_C = torch.cumsum(live_N.long(), 0).index_select(0, ends - 1).diff(prepend=live_N.new_zeros(1).long())
    return (counts_C > 0).tolist()


class _Work:
    """fp32 [chunk, width] work tensors, allocated once per call and reused by every chunk: fresh ones per chunk would
    be fresh pages for the kernel to fault in and zero (on CPU that cost more than the arithmetic)."""

    def __init__(self, like: torch.Tensor, chunk: int, width: int):
        self.like, self.shape, self.bufs = like, (min(chunk, like.shape[0]), width), {}

    def __call__(self, i: int, n: int) -> torch.Tensor:
        if i not in self.bufs:
            self.bufs[i] = self.like.new_empty(self.shape, dtype=torch.float32)
        return self.bufs[i][:n]


class _ChunkedLosses(torch.autograd.Function):
    """Outputs (kd_N, logp_N), fp32 [N]; either may be empty when not asked for."""

    @staticmethod
    def forward(ctx, student_Nv, teacher_Nv, labels_N, vocab_size, mode, temperature, chunk, want_kd, want_logp):
        tp, group, start, width = _shard_geometry(student_Nv, vocab_size, "chunked losses")
        N, T, f32 = student_Nv.shape[0], float(temperature), torch.float32
        MAX = torch.distributed.ReduceOp.MAX
        kd_N = student_Nv.new_empty(N if want_kd else 0, dtype=f32)
        logp_N = student_Nv.new_empty(N if want_logp else 0, dtype=f32)
        # per-token statistics (global over the TP group): maxima and sums of exp of the shifted logits
        stats = {k: student_Nv.new_empty(N, dtype=f32) for k in
                 (["mS", "zS", "mT", "zT"] if want_kd else []) + (["wz"] if want_kd and mode == "reverse" else [])
                 + (["m1", "z1"] if want_logp else [])}
        separate_logp = want_logp and (not want_kd or T != 1.0)  # CE at temperature 1 needs its own softmax
        work = _Work(student_Nv, chunk, width)
        for r in _rows(N, chunk):
            n = r.stop - r.start
            s_cv = work(0, n).copy_(student_Nv[r, :width])
            maxima = [_local_max_c(s_cv)]  # max(x / T) == max(x) / T exactly: fp32 division is monotone
            if want_kd:
                if T != 1.0:
                    s_cv.div_(T)
                t_cv = work(1, n).copy_(teacher_Nv[r, :width])
                if T != 1.0:
                    t_cv.div_(T)
                maxima.append(_local_max_c(t_cv))
            m_nc = _all_reduce(torch.stack(maxima), group, MAX)
            sums = []
            if want_kd:
                mS_c, mT_c = m_nc[0] / T if T != 1.0 else m_nc[0], m_nc[1]
                s_cv.sub_(mS_c.unsqueeze(-1))  # dS
                t_cv.sub_(mT_c.unsqueeze(-1))  # dT
                if want_logp and not separate_logp:
                    local_c, inside_c = _label_columns(labels_N[r], start, width)
                    picked_c = s_cv.gather(-1, local_c.unsqueeze(-1)).squeeze(-1) if width else s_cv.new_zeros(
                        local_c.shape)
                    picked_c = torch.where(inside_c, picked_c, torch.zeros_like(picked_c))
                e_cv = torch.exp(t_cv if mode == "forward" else s_cv, out=work(2, n))
                ze_c = e_cv.sum(-1)
                other_cv = torch.exp(s_cv if mode == "forward" else t_cv, out=work(3, n))
                zo_c = other_cv.sum(-1)
                # forward: U = sum e_T (d_T - d_S); reverse: V = sum e_S (d_S - d_T)   (kd.py)
                diff_cv = torch.sub(t_cv, s_cv, out=other_cv) if mode == "forward" else torch.sub(s_cv, t_cv,
                                                                                                  out=other_cv)
                w_c = diff_cv.mul_(e_cv).sum(-1)
                del e_cv, other_cv, diff_cv, t_cv
                zS_c, zT_c = (zo_c, ze_c) if mode == "forward" else (ze_c, zo_c)
                sums += [zS_c, zT_c, w_c]
                stats["mS"][r], stats["mT"][r] = mS_c, mT_c
                if want_logp and not separate_logp:
                    sums += [picked_c]
            if separate_logp:
                m1_c = m_nc[0]
                x_cv = s_cv if not want_kd else s_cv.copy_(student_Nv[r, :width])
                x_cv.sub_(m1_c.unsqueeze(-1))
                local_c, inside_c = _label_columns(labels_N[r], start, width)
                picked_c = x_cv.gather(-1, local_c.unsqueeze(-1)).squeeze(-1) if width else x_cv.new_zeros(
                    local_c.shape)
                picked_c = torch.where(inside_c, picked_c, torch.zeros_like(picked_c))
                sums += [x_cv.exp_().sum(-1), picked_c]
                stats["m1"][r] = m1_c
            del s_cv
            total_nc = _all_reduce(torch.stack(sums), group)
            if want_kd:
                zS_c, zT_c, w_c = total_nc[0], total_nc[1], total_nc[2]
                # log of the ratio, not a difference of logs (kd.py)
                if mode == "forward":
                    kd_N[r] = (w_c / zT_c + (zS_c / zT_c).log()) * T**2
                else:
                    kd_N[r] = (w_c / zS_c + (zT_c / zS_c).log()) * T**2
                    stats["wz"][r] = w_c / zS_c
                stats["zS"][r], stats["zT"][r] = zS_c, zT_c
            if want_logp:
                z1_c, picked_c = (total_nc[-2], total_nc[-1]) if separate_logp else (total_nc[0], total_nc[-1])
                if not separate_logp:
                    stats["m1"][r] = stats["mS"][r]
                labels_c = labels_N[r]
                valid_c = (labels_c >= 0) & (labels_c < vocab_size)
                logp_c = picked_c - z1_c.log()
                logp_N[r] = torch.where(valid_c, logp_c, torch.zeros_like(logp_c))
                stats["z1"][r] = z1_c
        ctx.save_for_backward(student_Nv, teacher_Nv if want_kd else None, labels_N if want_logp else None,
                              *stats.values())
        ctx.keys = list(stats)
        ctx.meta = (vocab_size, mode, T, chunk, want_kd, want_logp, start, width, separate_logp)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*([] if want_kd else [kd_N]), *([] if want_logp else [logp_N]))
        return kd_N, logp_N

    @staticmethod
    def backward(ctx, grad_kd_N, grad_logp_N):
        student_Nv, teacher_Nv, labels_N, *saved = ctx.saved_tensors
        st = dict(zip(ctx.keys, saved))
        vocab_size, mode, T, chunk, want_kd, want_logp, start, width, separate_logp = ctx.meta
        if not want_kd:
            grad_kd_N = None
        if not want_logp:
            grad_logp_N = None
        grad_Nv = torch.empty_like(student_Nv, memory_format=torch.contiguous_format)
        grad_Nv[:, width:] = 0  # padding columns
        if grad_kd_N is None and grad_logp_N is None:
            grad_Nv.zero_()
            return grad_Nv, None, None, None, None, None, None, None, None
        N, f32 = student_Nv.shape[0], torch.float32
        chunks = _rows(N, chunk)
        work = _Work(student_Nv, chunk, width)
        for r, live in zip(chunks, _live_chunks(chunks, grad_kd_N, grad_logp_N)):
            n = r.stop - r.start
            if not live:
                grad_Nv[r, :width] = 0
                continue
            b_c = None
            if grad_logp_N is not None:  # labels outside [0, vocab_size) have a constant 0 log-prob
                labels_c = labels_N[r]
                b_c = torch.where((labels_c >= 0) & (labels_c < vocab_size), grad_logp_N[r].float(), 0.0)
            shared = b_c is not None and not separate_logp  # the label term uses p_S (temperature 1)
            out_cv = None  # the fp32 gradient of this chunk
            if grad_kd_N is not None:
                a_c = grad_kd_N[r].float() * T  # d/dx = T d/ds
                s_cv = work(0, n).copy_(student_Nv[r, :width])
                t_cv = work(1, n).copy_(teacher_Nv[r, :width])
                if T != 1.0:
                    s_cv.div_(T)
                    t_cv.div_(T)
                s_cv.sub_(st["mS"][r].unsqueeze(-1))
                t_cv.sub_(st["mT"][r].unsqueeze(-1))
                if mode == "forward":
                    # T g (p_S - p_T)  [- g_logp p_S]
                    t_cv.exp_().div_(st["zT"][r].unsqueeze(-1)).mul_(a_c.unsqueeze(-1))
                    s_cv.exp_().div_(st["zS"][r].unsqueeze(-1))
                    out_cv = s_cv.mul_((a_c - b_c if shared else a_c).unsqueeze(-1)).sub_(t_cv)
                else:
                    # l - KL/T^2 = (d_S - d_T) - log(Z_S/Z_T) - (W/Z_S + log(Z_T/Z_S)) = d_S - d_T - W/Z_S:
                    # p_S (T g (d_S - d_T - W/Z_S)  [- g_logp])
                    r_cv = torch.sub(s_cv, t_cv, out=t_cv).sub_(st["wz"][r].unsqueeze(-1)).mul_(a_c.unsqueeze(-1))
                    if shared:
                        r_cv.sub_(b_c.unsqueeze(-1))
                    out_cv = r_cv.mul_(s_cv.exp_().div_(st["zS"][r].unsqueeze(-1)))
                del s_cv, t_cv
            if b_c is not None:
                if not shared:  # - g p_1, p_1 the softmax at temperature 1
                    p1_cv = work(2, n).copy_(student_Nv[r, :width])
                    p1_cv.sub_(st["m1"][r].unsqueeze(-1)).exp_().div_(st["z1"][r].unsqueeze(-1))
                    p1_cv.mul_(-b_c.unsqueeze(-1))
                    out_cv = p1_cv if out_cv is None else out_cv.add_(p1_cv)
                    del p1_cv
                # + g onehot(label)
                local_c, inside_c = _label_columns(labels_N[r], start, width)
                if width:
                    add_c = torch.where(inside_c, b_c, torch.zeros_like(b_c))
                    out_cv.scatter_add_(-1, local_c.unsqueeze(-1), add_c.unsqueeze(-1))
            grad_Nv[r, :width] = out_cv
        return grad_Nv, None, None, None, None, None, None, None, None


def chunked_losses_BS(student_logits_BSv: torch.Tensor, vocab_size: int, *, teacher_logits_BSv=None, labels_BS=None,
                      mode: str = "forward", temperature: float = 1.0,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """Per-token KD [B, S] (with a teacher) and label log-probs log p(label) [B, S] (with labels) from one pass over
    this rank's student logit shard [B, S, V/tp]; (kd_BS or None, logp_BS or None), fp32.

    KD is kd.kd_loss_BS's (mode, temperature, Hinton's T^2); -logp is ce.cross_entropy_BS's per-token loss at the
    labels in [0, vocab_size); both share one gradient tensor, so the student logits get one gradient buffer."""
    from megamod.losses.kd import KD_MODES

    want_kd, want_logp = teacher_logits_BSv is not None, labels_BS is not None
    if not (want_kd or want_logp):
        raise ValueError("chunked_losses_BS: give a teacher (KD), labels (log-probs) or both")
    if want_kd:
        if student_logits_BSv.shape != teacher_logits_BSv.shape:
            raise ValueError(f"chunked_losses_BS: student and teacher logit shards differ in shape: "
                             f"{tuple(student_logits_BSv.shape)} vs {tuple(teacher_logits_BSv.shape)}")
        if mode not in KD_MODES:
            raise ValueError(f"chunked_losses_BS: unknown mode {mode!r}; expected one of {KD_MODES}")
        if not temperature > 0:
            raise ValueError(f"chunked_losses_BS: temperature must be > 0, got {temperature}")
    if want_logp and labels_BS.shape != student_logits_BSv.shape[:-1]:
        raise ValueError(f"chunked_losses_BS: labels {tuple(labels_BS.shape)} do not match logits "
                         f"{tuple(student_logits_BSv.shape)}")
    chunk = _check_chunk(chunk_tokens)
    lead, v = student_logits_BSv.shape[:-1], student_logits_BSv.shape[-1]
    student_Nv = student_logits_BSv.reshape(-1, v)
    teacher_Nv = teacher_logits_BSv.detach().reshape(-1, v) if want_kd else None
    labels_N = labels_BS.reshape(-1) if want_logp else None
    kd_N, logp_N = _ChunkedLosses.apply(student_Nv, teacher_Nv, labels_N, vocab_size, mode, temperature, chunk,
                                        want_kd, want_logp)
    return (kd_N.view(lead) if want_kd else None), (logp_N.view(lead) if want_logp else None)


def chunked_kd_loss_BS(student_logits_BSv, teacher_logits_BSv, vocab_size: int, mode: str = "forward",
                       temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """kd.kd_loss_BS, chunked."""
    return chunked_losses_BS(student_logits_BSv, vocab_size, teacher_logits_BSv=teacher_logits_BSv, mode=mode,
                             temperature=temperature, chunk_tokens=chunk_tokens)[0]


def chunked_cross_entropy_BS(logits_BSv, labels_BS, vocab_size: int,
                             chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """ce.cross_entropy_BS, chunked (0 at labels outside [0, vocab_size), e.g. -100)."""
    return -chunked_losses_BS(logits_BSv, vocab_size, labels_BS=labels_BS, chunk_tokens=chunk_tokens)[1]


def chunked_sequence_logprobs_B(logits_BSv, labels_BS, loss_mask_BS, vocab_size: int,
                                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """preference.sequence_logprobs_B, chunked."""
    logp_BS = chunked_losses_BS(logits_BSv, vocab_size, labels_BS=labels_BS, chunk_tokens=chunk_tokens)[1]
    return (logp_BS * loss_mask_BS.to(torch.bool).to(logp_BS.dtype)).sum(-1)


class _ChunkedTopkKD(torch.autograd.Function):
    """topk_kd.topk_kd_loss_BS over token chunks: output kl_N fp32 [N]."""

    @staticmethod
    def forward(ctx, student_Nv, ids_NK, lq_NK, lq_tail_N, vocab_size, chunk):
        from megamod.losses.topk_kd import _topk_mask_BSv

        tp, group, start, width = _shard_geometry(student_Nv, vocab_size, "chunked top-k KD")
        N, f32 = student_Nv.shape[0], torch.float32
        m_N, z_N, tail_N = (student_Nv.new_empty(N, dtype=f32) for _ in range(3))
        d_NK = student_Nv.new_empty(ids_NK.shape, dtype=f32)
        work = _Work(student_Nv, chunk, width)
        for r in _rows(N, chunk):
            x_cv = work(0, r.stop - r.start).copy_(student_Nv[r, :width])
            m_c = _all_reduce(_local_max_c(x_cv), group, torch.distributed.ReduceOp.MAX)
            x_cv.sub_(m_c.unsqueeze(-1))
            # the student's (shifted) logit at each top-k id: only the owning rank contributes a non-zero term
            local_cK = ids_NK[r] - start
            inside_cK = (local_cK >= 0) & (local_cK < width)
            picked_cK = x_cv.gather(-1, local_cK.clamp(0, max(width - 1, 0))) if width else x_cv.new_zeros(
                local_cK.shape)
            picked_cK = torch.where(inside_cK, picked_cK, torch.zeros_like(picked_cK))
            e_cv = x_cv.exp_()
            z_c = e_cv.sum(-1, keepdim=True)
            tail_c = e_cv.masked_fill_(_topk_mask_BSv(ids_NK[r], start, width, e_cv.shape), 0).sum(-1, keepdim=True)
            total_cn = _all_reduce(torch.cat([picked_cK, z_c, tail_c], -1), group)
            d_NK[r], z_N[r], tail_N[r], m_N[r] = total_cn[:, :-2], total_cn[:, -2], total_cn[:, -1], m_c
            del x_cv, e_cv
        # per token, as topk_kd.topk_kd_loss_BS
        log_z_N = z_N.log()
        lp_NK = d_NK - log_z_N.unsqueeze(-1)
        q_NK = lq_NK.exp()
        kl_N = (q_NK * (lq_NK - lp_NK)).sum(-1)
        has_tail_N = lq_tail_N > float("-inf")
        lq_tail_N = torch.where(has_tail_N, lq_tail_N, torch.zeros_like(lq_tail_N))
        q_tail_N = torch.where(has_tail_N, lq_tail_N.exp(), torch.zeros_like(lq_tail_N))
        tiny = torch.finfo(torch.float32).tiny
        lp_tail_N = tail_N.clamp(min=tiny).log() - log_z_N
        kl_N = kl_N + q_tail_N * (lq_tail_N - lp_tail_N)
        # backward's per-token coefficients: e_j (Q / z - [j not in top-k] q_R / tail) - [j in top-k] q'_j
        q_sum_N = q_NK.sum(-1) + q_tail_N
        tail_coef_N = torch.where(tail_N >= tiny, q_tail_N / tail_N.clamp(min=tiny), torch.zeros_like(tail_N))
        ctx.save_for_backward(student_Nv, ids_NK, q_NK, m_N, q_sum_N / z_N, tail_coef_N)
        ctx.meta = (start, width, chunk)
        ctx.set_materialize_grads(False)
        return kl_N

    @staticmethod
    def backward(ctx, grad_N):
        student_Nv, ids_NK, q_NK, m_N, cz_N, tail_coef_N = ctx.saved_tensors
        start, width, chunk = ctx.meta
        grad_Nv = torch.empty_like(student_Nv, memory_format=torch.contiguous_format)
        grad_Nv[:, width:] = 0
        if grad_N is None:
            grad_Nv.zero_()
            return grad_Nv, None, None, None, None, None
        N = student_Nv.shape[0]
        chunks = _rows(N, chunk)
        work = _Work(student_Nv, chunk, width)
        for r, live in zip(chunks, _live_chunks(chunks, grad_N)):
            if not live:
                grad_Nv[r, :width] = 0
                continue
            g_c = grad_N[r].float()
            e_cv = work(0, r.stop - r.start).copy_(student_Nv[r, :width])
            e_cv.sub_(m_N[r].unsqueeze(-1)).exp_()
            local_cK = ids_NK[r] - start
            inside_cK = (local_cK >= 0) & (local_cK < width)
            idx_cK = local_cK.clamp(0, max(width - 1, 0))
            e_cK = e_cv.gather(-1, idx_cK) if width else e_cv.new_zeros(idx_cK.shape)
            out_cv = e_cv.mul_((cz_N[r] - tail_coef_N[r]).unsqueeze(-1))  # the tail ids' gradient
            if width:  # the top-k ids' gradient: e_j Q / z - q'_j (q' summed over repeated ids)
                rows_cK = torch.arange(out_cv.shape[0], device=out_cv.device).unsqueeze(-1).expand_as(idx_cK)
                at = (rows_cK[inside_cK], idx_cK[inside_cK])
                out_cv[at] = (e_cK * cz_N[r].unsqueeze(-1))[inside_cK]
                out_cv.index_put_(at, -q_NK[r][inside_cK], accumulate=True)
            grad_Nv[r, :width] = out_cv.mul_(g_c.unsqueeze(-1))
        return grad_Nv, None, None, None, None, None


def chunked_topk_kd_loss_BS(student_logits_BSv, ids_BSK, logprobs_BSK, log_tail_BS, vocab_size: int,
                            chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """topk_kd.topk_kd_loss_BS (the bucketed KL against a cached teacher), chunked."""
    from megamod.losses.topk_kd import renormalise

    if ids_BSK.shape != logprobs_BSK.shape or ids_BSK.shape[:-1] != student_logits_BSv.shape[:-1] \
            or log_tail_BS.shape != ids_BSK.shape[:-1]:
        raise ValueError(f"chunked_topk_kd_loss_BS: shapes do not line up: student {tuple(student_logits_BSv.shape)}, "
                         f"ids {tuple(ids_BSK.shape)}, logprobs {tuple(logprobs_BSK.shape)}, "
                         f"tail {tuple(log_tail_BS.shape)}")
    chunk = _check_chunk(chunk_tokens)
    lead, v, K = student_logits_BSv.shape[:-1], student_logits_BSv.shape[-1], ids_BSK.shape[-1]
    lq_NK, lq_tail_N = renormalise(logprobs_BSK.reshape(-1, K), log_tail_BS.reshape(-1))
    kl_N = _ChunkedTopkKD.apply(student_logits_BSv.reshape(-1, v), ids_BSK.reshape(-1, K), lq_NK.detach(),
                                lq_tail_N.detach(), vocab_size, chunk)
    return kl_N.view(lead)
