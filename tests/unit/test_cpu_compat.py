"""megamod.cpu_compat: every adjustment is needed (the real megatron-core call fails without it) and correct (with it
the same call gives checkable numbers), plus the apply/revert/without machinery and SequenceParallelTorchNorm.

Adjustments are process-global. Other test modules may have applied them already, so every test works either way:
"fails without" uses `cpu_compat.without(name)`, which restores the adjustment afterwards, and the module leaves the
process as `megamod.distributed.initialize()` leaves it (all adjustments applied, RNG tracker seeded).

`make test` runs this file on megatron-core 0.16 (.venv) and 0.19 (.venv312): an adjustment that a series does not
need is absent there (`cpu_compat.needed()`), and its test shows the unadjusted call already works.

The two-rank checks (uneven gloo collectives, alltoall split sizes) run in ONE launch of two plain Python processes
that re-run this file as a script (`python test_cpu_compat.py --two-rank-worker ...`), which works whatever pytest's
import mode is. A hang fails the test: the workers dump their stacks and exit via faulthandler, the parent kills them
after a deadline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWO_RANK_TIMEOUT_S = 120  # worker watchdog; the parent waits a little longer
# What a CUDA call raises without a GPU: the CPU build of torch (.venv, Python 3.11) asserts or has dummy stream
# classes; the CUDA build PyPI serves for Python 3.12 (.venv312) finds no driver.
NO_CUDA = (AssertionError, RuntimeError)
NO_CUDA_MSG = "not compiled with CUDA|requires CUDA|dummy base class Event|no NVIDIA driver|CUDA driver version"

# Two-rank inputs, shared by the worker (which computes) and the tests (which know the expected answers).
SIZES = [2, 3]  # uneven first-dim split over the two ranks
A2A_IN = [[1, 2], [3, 1]]  # A2A_IN[r][s]: rows rank r sends to rank s


def _a2a_out(rank):
    return [A2A_IN[src][rank] for src in range(2)]


def _gather_input(rank):
    return torch.arange(SIZES[rank] * 2.0).reshape(-1, 2) + 100 * rank


def _gather_grad(rank):
    return (rank + 1) * torch.arange(sum(SIZES) * 2.0).reshape(-1, 2)


def _rs_input(rank):
    return (rank + 1) * torch.arange(sum(SIZES) * 2.0).reshape(-1, 2)


def _rs_grad(rank):
    return 10.0 * (rank + 1) + torch.arange(SIZES[rank] * 2.0).reshape(-1, 2)


def _a2a_input(rank):
    return torch.arange(sum(A2A_IN[rank]) * 2.0).reshape(-1, 2) + 1000 * rank


def _rows(rank):
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


# --------------------------------------------------------------------------------------------------------------------
# two-rank worker (runs in a child process; keep its imports minimal)
# --------------------------------------------------------------------------------------------------------------------
def _two_rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import datetime
    import faulthandler

    faulthandler.dump_traceback_later(TWO_RANK_TIMEOUT_S, exit=True)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=TWO_RANK_TIMEOUT_S))
    from megamod import cpu_compat

    # current_device too, so that the unadjusted megatron paths get as far as the gloo call they make.
    cpu_compat.apply(["current_device", "uneven_collectives", "split_sizes"])
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import token_dispatcher

    group = dist.group.WORLD
    results = {}

    def record(name, fn):
        try:
            value = fn()
            if torch.is_tensor(value):
                value = value.tolist()
            results[name] = {"value": value}
        except Exception as e:  # the test asserts on the type and message
            results[name] = {"raised": type(e).__name__, "message": str(e)[:500]}

    def gather_forward():
        return mappings.gather_from_sequence_parallel_region(_gather_input(rank), group=group,
                                                             output_split_sizes=SIZES)

    def gather_backward():
        x = _gather_input(rank).requires_grad_()
        y = mappings.gather_from_sequence_parallel_region(x, group=group, output_split_sizes=SIZES)
        y.backward(_gather_grad(rank))
        return x.grad

    def rs_forward():
        return mappings.reduce_scatter_to_sequence_parallel_region(_rs_input(rank), group=group,
                                                                   input_split_sizes=SIZES)

    def rs_backward():
        z = _rs_input(rank).requires_grad_()
        out = mappings.reduce_scatter_to_sequence_parallel_region(z, group=group, input_split_sizes=SIZES)
        out.backward(_rs_grad(rank))
        return z.grad

    def a2a():
        # what the alltoall dispatcher does with its split sizes before megatron's all_to_all
        in_splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor(A2A_IN[rank]), as_numpy=True)
        out_splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor(_a2a_out(rank)), as_numpy=True)
        results.setdefault("a2a_split_types", []).append(type(in_splits).__module__ + "." + type(in_splits).__name__)
        return mappings.all_to_all(group, _a2a_input(rank), out_splits, in_splits)

    with cpu_compat.without("uneven_collectives"):
        record("gather_without", gather_forward)
        record("rs_forward_without", rs_forward)
        record("rs_backward_without", rs_backward)
    record("gather_with", gather_forward)
    record("gather_backward_with", gather_backward)
    record("rs_forward_with", rs_forward)
    record("rs_backward_with", rs_backward)
    with cpu_compat.without("split_sizes"):
        record("a2a_without", a2a)
    record("a2a_with", a2a)

    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    """Results of the two-rank worker, one dict per rank (one launch for all two-rank tests)."""
    out = tmp_path_factory.mktemp("cpu_compat_two_rank")
    from megamod.distributed import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONFAULTHANDLER="1")
    logs = [open(out / f"rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--two-rank-worker", str(r), "2",
                               str(port), str(out)], cwd=REPO, env=env, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(2)]
    deadline = time.monotonic() + TWO_RANK_TIMEOUT_S + 15
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.kill()
            p.wait()
    text = []
    for r, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if hung or any(p.returncode != 0 for p in procs):
        pytest.fail(("two-rank worker hung\n" if hung else "two-rank worker failed\n") + "\n".join(text))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# --------------------------------------------------------------------------------------------------------------------
# single-process fixtures
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    """A gloo world of one with megatron's parallel state and every adjustment applied."""
    from megamod import distributed

    distributed.initialize()
    yield
    # Some tests re-seed or drop the RNG tracker (without("rng"), revert()): leave it as initialize() leaves it.
    distributed.initialize()


@pytest.fixture(autouse=True)
def _leave_adjusted():
    yield
    from megamod import cpu_compat

    cpu_compat.apply()


def _compat():
    from megamod import cpu_compat

    return cpu_compat


def _series():
    from megamod import mcore_version

    return mcore_version.check()


# --------------------------------------------------------------------------------------------------------------------
# 1. rng
# --------------------------------------------------------------------------------------------------------------------
def test_rng_tracker_needed_and_forks_cpu_streams():
    cpu_compat = _compat()
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    with cpu_compat.without("rng"):
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            tensor_parallel.model_parallel_cuda_manual_seed(123)

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, mrandom.CudaRNGStatesTracker)
    assert set(tracker.get_states()) == {"model-parallel-rng", "expert-parallel-rng", "data-parallel-rng"}

    torch.manual_seed(7)
    outer = torch.get_rng_state()
    with tracker.fork():
        a = torch.randn(6)
    assert torch.equal(torch.get_rng_state(), outer), "the fork must leave the default CPU generator untouched"
    with tracker.fork():
        b = torch.randn(6)
    default = torch.randn(6)

    # model-parallel seed = seed + 2718 + tp_rank; the stream continues across forks
    ref = torch.randn(12, generator=torch.Generator().manual_seed(123 + 2718))
    assert torch.equal(a, ref[:6]) and torch.equal(b, ref[6:])
    assert torch.equal(default, torch.randn(6, generator=torch.Generator().manual_seed(7)))
    assert not torch.allclose(a, default)

    # expert-parallel seed = seed + 1024 + 100 * ep_rank + etp_rank
    with tracker.fork(tensor_parallel.get_expert_parallel_rng_tracker_name()):
        e = torch.randn(4)
    assert torch.equal(e, torch.randn(4, generator=torch.Generator().manual_seed(123 + 1024)))

    # nested forks restore the outer fork's stream, and the outer stream continues where it left off
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tracker.fork():
        n1 = torch.randn(3)
        with tracker.fork(tensor_parallel.get_data_parallel_rng_tracker_name()):
            d = torch.randn(3)
        n2 = torch.randn(3)
    assert torch.equal(torch.cat([n1, n2]), ref[:6])
    assert torch.equal(d, torch.randn(3, generator=torch.Generator().manual_seed(123)))

    # reproducible: the same seed gives the same numbers again
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        again = torch.randn(6)
    assert torch.equal(again, a)

    # megatron's own state helpers read and write the CPU generator
    torch.manual_seed(5)
    state = mrandom._get_cuda_rng_state()
    x = torch.randn(3)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.randn(3), x)


def test_without_rng_keeps_seeded_tracker():
    cpu_compat = _compat()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(99)
    with cpu_compat.without("rng"):
        pass
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert set(tracker.get_states()) == {"model-parallel-rng", "expert-parallel-rng", "data-parallel-rng"}
    with tracker.fork():
        a = torch.randn(3)
    assert torch.equal(a, torch.randn(3, generator=torch.Generator().manual_seed(99 + 2718)))


# --------------------------------------------------------------------------------------------------------------------
# 2. current_device
# --------------------------------------------------------------------------------------------------------------------
def test_current_device_needed_and_allocates_on_cpu():
    cpu_compat = _compat()
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.utils import GlobalMemoryBuffer

    with cpu_compat.without("current_device"):
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "mpu")
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)

    assert torch.cuda.current_device() == torch.device("cpu")

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=False)
    assert rope.inv_freq.device.type == "cpu"
    expected = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    torch.testing.assert_close(rope.inv_freq, expected)

    buf = GlobalMemoryBuffer()
    t1 = buf.get_tensor((2, 3), torch.float32, "mpu")
    assert t1.device.type == "cpu" and t1.shape == (2, 3) and t1.dtype == torch.float32
    t1.copy_(torch.arange(6.0).reshape(2, 3))
    t2 = buf.get_tensor((3, 2), torch.float32, "mpu")  # same name, same size: a view of the same storage
    assert t2.data_ptr() == t1.data_ptr()
    assert torch.equal(t2, torch.arange(6.0).reshape(3, 2))


# --------------------------------------------------------------------------------------------------------------------
# 3. device_mode
# --------------------------------------------------------------------------------------------------------------------
def test_device_mode_needed_and_maps_cuda_to_cpu():
    cpu_compat = _compat()
    from megatron.core.transformer.utils import get_default_causal_mask

    with cpu_compat.without("device_mode"):
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            get_default_causal_mask(4)
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            torch.ones(2).cuda()

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())

    x = torch.arange(3.0)
    assert x.cuda() is x
    for moved in (x.to("cuda"), x.to(device="cuda:0"), x.to(torch.device("cuda"), torch.float64)):
        assert moved.device.type == "cpu"
        assert torch.equal(moved, x.to(moved.dtype))
    assert x.to("cuda", torch.float64).dtype == torch.float64
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=0).device.type == "cpu"


# --------------------------------------------------------------------------------------------------------------------
# 4. streams
# --------------------------------------------------------------------------------------------------------------------
def _tiny_moe_config():
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=4, moe_router_topk=2,
                             moe_token_dispatcher_type="alltoall", moe_permute_fusion=False, add_bias_linear=False,
                             use_cpu_initialization=True)


def test_streams_needed_and_alltoall_dispatcher_round_trip(monkeypatch):
    cpu_compat = _compat()
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    config = _tiny_moe_config()
    build = lambda: MoEAlltoAllTokenDispatcher(4, [0, 1, 2, 3], config, pg_collection=get_default_pg_collection())

    def side_stream_copy(src):
        # the side-stream pattern of the alltoall dispatcher's _maybe_dtoh_and_synchronize
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = src * 2
        event = side.record_event()
        event.synchronize()
        torch.cuda.current_stream().wait_event(event)
        torch.cuda.synchronize()
        return out

    with cpu_compat.without("streams"):
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            torch.cuda.synchronize()
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            torch.cuda.Stream()
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):  # the CUDA build makes an Event lazily: record fails
            torch.cuda.Event().record()
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            side_stream_copy(torch.arange(3.0))
        # the dispatcher creates its class-wide DtoH stream on first construction
        monkeypatch.setattr(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None)
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            build()
    assert torch.cuda.synchronize() is None
    assert torch.equal(side_stream_copy(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))

    dispatcher = build()
    tokens, hidden = 6, 8
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen)
    top = torch.randn(tokens, 4, generator=gen).topk(2, dim=1)
    routing_map = torch.zeros(tokens, 4, dtype=torch.bool).scatter(1, top.indices, True)
    probs = torch.zeros(tokens, 4).scatter(1, top.indices, torch.softmax(top.values, dim=1))

    with cpu_compat.without("streams"):
        # _maybe_dtoh_and_synchronize asks for torch.cuda.current_stream()
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            dispatcher.dispatch_preprocess(h, routing_map, probs)

    x, p = dispatcher.dispatch_preprocess(h, routing_map, probs)
    x, p = dispatcher.token_dispatch(x, p)
    x, tokens_per_expert, p = dispatcher.dispatch_postprocess(x, p)
    assert torch.equal(torch.as_tensor(tokens_per_expert), routing_map.sum(dim=0))
    # identity experts weighted by their routing probability: the combine gives sum_k p_k * h
    y = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(x * p[:, None])))
    torch.testing.assert_close(y, h * probs.sum(dim=1, keepdim=True))


# --------------------------------------------------------------------------------------------------------------------
# 5. te_names
# --------------------------------------------------------------------------------------------------------------------
def test_te_names_needed_on_016_only_and_router_gating_equals_linear():
    cpu_compat = _compat()
    from megatron.core.transformer.moe import moe_utils

    from megamod import te_absent

    gen = torch.Generator().manual_seed(1)
    inp = torch.randn(5, 8, generator=gen)
    weight = torch.randn(4, 8, generator=gen)

    if _series() == "0.16":
        assert "te_names" in cpu_compat.needed()
        with cpu_compat.without("te_names"):
            with pytest.raises(NameError, match="te_general_gemm"):
                moe_utils.router_gating_linear(inp, weight, None, torch.float32)
            # the same fix on a GPU without TransformerEngine (distributed.initialize applies it there)
            assert te_absent.apply() and not te_absent.apply()
            torch.testing.assert_close(moe_utils.router_gating_linear(inp, weight, None, torch.float32),
                                       torch.nn.functional.linear(inp, weight))
            del moe_utils.te_general_gemm
    else:
        # 0.19 defines the name as None without TransformerEngine: nothing to adjust, and apply() refuses to
        assert "te_names" not in cpu_compat.needed() and "te_names" not in cpu_compat.applied()
        assert moe_utils.te_general_gemm is None and not te_absent.apply()
        with pytest.raises(ValueError, match="'te_names' is for megatron-core 0.16, not the installed 0.19"):
            cpu_compat.apply(["te_names"])

    x = inp.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    ref_x = inp.clone().requires_grad_()
    ref_w = weight.clone().requires_grad_()
    ref = torch.nn.functional.linear(ref_x, ref_w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    g = torch.randn(5, 4, generator=gen)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)


# --------------------------------------------------------------------------------------------------------------------
# 6. split_sizes
# --------------------------------------------------------------------------------------------------------------------
def test_split_sizes_needed_and_become_numpy():
    import numpy as np

    cpu_compat = _compat()
    from megatron.core.transformer.moe import token_dispatcher

    splits = torch.tensor([3])
    inp = torch.arange(3.0)
    out = torch.full((3,), -1.0)

    with cpu_compat.without("split_sizes"):
        moved = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
        assert torch.is_tensor(moved)  # only CUDA tensors are converted
        with pytest.raises(TypeError, match="incompatible function arguments"):
            torch.distributed.all_to_all_single(out, inp, output_split_sizes=moved, input_split_sizes=moved)

    moved = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert isinstance(moved, np.ndarray) and moved.tolist() == [3]
    torch.distributed.all_to_all_single(out, inp, output_split_sizes=moved, input_split_sizes=moved)
    assert torch.equal(out, inp)
    kept = token_dispatcher.maybe_move_tensor_to_cpu(splits)
    assert torch.is_tensor(kept) and torch.equal(kept, splits)
    assert token_dispatcher.maybe_move_tensor_to_cpu(None, as_numpy=True) is None
    assert token_dispatcher.maybe_move_tensor_to_cpu(12) == 12


def test_split_sizes_two_ranks_megatron_all_to_all(two_rank):
    for rank, res in enumerate(two_rank):
        # without: the dispatcher's split sizes stay tensors and megatron's all_to_all hands them to torch
        assert res["a2a_split_types"] == ["torch.Tensor", "numpy.ndarray"]
        assert res["a2a_without"].get("raised") == "TypeError", res["a2a_without"]
        assert "incompatible function arguments" in res["a2a_without"]["message"]
        expected = torch.cat([
            _a2a_input(src).split(A2A_IN[src])[rank] for src in range(2)
        ])
        assert "value" in res["a2a_with"], res["a2a_with"]
        assert torch.equal(torch.tensor(res["a2a_with"]["value"]), expected)


# --------------------------------------------------------------------------------------------------------------------
# 7. uneven_collectives (two gloo ranks)
# --------------------------------------------------------------------------------------------------------------------
def test_uneven_gather_two_ranks(two_rank):
    full = torch.cat([_gather_input(r) for r in range(2)])
    grad_sum = _gather_grad(0) + _gather_grad(1)
    for rank, res in enumerate(two_rank):
        assert res["gather_without"].get("raised") == "RuntimeError", res["gather_without"]
        assert "allgather" in res["gather_without"]["message"]
        assert "value" in res["gather_with"], res["gather_with"]
        assert torch.equal(torch.tensor(res["gather_with"]["value"]), full)
        # backward of the gather is an uneven reduce-scatter of the output gradient
        assert "value" in res["gather_backward_with"], res["gather_backward_with"]
        assert torch.equal(torch.tensor(res["gather_backward_with"]["value"]), grad_sum[_rows(rank)])


def test_uneven_reduce_scatter_two_ranks(two_rank):
    total = _rs_input(0) + _rs_input(1)
    grads = torch.cat([_rs_grad(r) for r in range(2)])
    for rank, res in enumerate(two_rank):
        # torch 2.13's gloo does have a list reduce_scatter, so megatron's forward is already right without the
        # adjustment; its backward is an uneven all_gather, which gloo refuses.
        assert "value" in res["rs_forward_without"], res["rs_forward_without"]
        assert torch.equal(torch.tensor(res["rs_forward_without"]["value"]), total[_rows(rank)])
        assert res["rs_backward_without"].get("raised") == "RuntimeError", res["rs_backward_without"]
        assert "allgather" in res["rs_backward_without"]["message"]
        assert "value" in res["rs_forward_with"], res["rs_forward_with"]
        assert torch.equal(torch.tensor(res["rs_forward_with"]["value"]), total[_rows(rank)])
        assert "value" in res["rs_backward_with"], res["rs_backward_with"]
        assert torch.equal(torch.tensor(res["rs_backward_with"]["value"]), grads)


# --------------------------------------------------------------------------------------------------------------------
# 8. clip_grads
# --------------------------------------------------------------------------------------------------------------------
def test_clip_grads_needed_and_scales_to_max_norm():
    cpu_compat = _compat()
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5)),
              torch.nn.Parameter(torch.zeros(2))]
    params[0].grad = 10 * torch.randn(3, 4, generator=gen)
    params[1].grad = 10 * torch.randn(5, generator=gen)  # params[2] has no gradient
    before = [p.grad.clone() for p in params[:2]]
    total = clip_grads.get_grad_norm_fp32([p.grad for p in params[:2]])
    expected_total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before])).item()
    assert total == pytest.approx(expected_total, rel=1e-6)
    assert total > 1.0

    with cpu_compat.without("clip_grads"):
        with pytest.raises(AssertionError):
            clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, total)
        with pytest.raises(AssertionError):  # the name MegatronOptimizer.clip_grad_norm calls
            moptimizer.clip_grad_by_total_norm_fp32(params, 1.0, total)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))

    assert moptimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, total)
    coeff = 1.0 / (total + 1e-6)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b * coeff)
    assert params[2].grad is None
    new_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params[:2]])).item()
    assert new_norm == pytest.approx(1.0, rel=1e-5)

    # below the max norm nothing changes
    kept = [p.grad.clone() for p in params[:2]]
    clip_grads.clip_grad_by_total_norm_fp32(params, 5.0, new_norm)
    assert all(torch.equal(p.grad, k) for p, k in zip(params, kept))


# --------------------------------------------------------------------------------------------------------------------
# 9. optimizer_types
# --------------------------------------------------------------------------------------------------------------------
def test_cuda_type_names_only_inside_context():
    cpu_compat = _compat()
    orig = torch.Tensor.type
    x = torch.zeros(2)
    assert x.type() == "torch.FloatTensor"
    with cpu_compat.cuda_type_names():
        assert x.type() == "torch.cuda.FloatTensor"
        assert torch.nn.Parameter(torch.zeros(2)).type() == "torch.cuda.FloatTensor"
        assert x.half().type() == "torch.cuda.HalfTensor"
        assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(2, dtype=torch.long).type() == "torch.LongTensor"
        converted = x.type(torch.float64)  # conversions are untouched
        assert torch.is_tensor(converted) and converted.dtype == torch.float64
    assert x.type() == "torch.FloatTensor"
    assert torch.Tensor.type is orig
    with pytest.raises(ValueError):
        with cpu_compat.cuda_type_names():
            raise ValueError
    assert torch.Tensor.type is orig and x.type() == "torch.FloatTensor"


def _tiny_ddp_model():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megamod.models.language import LanguageModelConfig, build_language_model

    cfg = LanguageModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_attention_heads=2, num_query_groups=1,
                              ffn_hidden_size=32, vocab_pad_multiple=8, max_position_embeddings=16)
    torch.manual_seed(0)
    model = build_language_model(cfg)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    return DistributedDataParallel(model.config, ddp_config, model)


def test_optimizer_types_needed_and_distributed_optimizer_steps():
    cpu_compat = _compat()
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opt_config = OptimizerConfig(optimizer="adam", lr=0.01, weight_decay=0.0, clip_grad=0.0,
                                 use_distributed_optimizer=True, bf16=False, fp16=False)
    with cpu_compat.without("optimizer_types"):
        with pytest.raises(TypeError, match="Received torch.FloatTensor"):
            get_megatron_optimizer(opt_config, [_tiny_ddp_model()])

    model = _tiny_ddp_model()
    optimizer = get_megatron_optimizer(opt_config, [model])
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    assert len(inner) == 1 and isinstance(inner[0], DistributedOptimizer)
    # every (fp32) parameter was classified and sharded: a world of one holds all of it
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for group in inner[0].shard_fp32_groups for p in group) == n_params
    assert torch.Tensor.type(torch.zeros(1)) == "torch.FloatTensor"  # type names are back to normal

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(8).expand(2, 8)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    model(tokens, positions, None, labels=tokens).sum().backward()
    model.finish_grad_sync()
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    ok, grad_norm, _ = optimizer.step()
    assert ok
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()])).item()
    assert grad_norm == pytest.approx(expected_norm, rel=1e-5)

    # Without TransformerEngine or Apex megatron steps with torch's AdamW, which is torch's Adam: the reference is
    # therefore Adam's first step written out, in float64, on the same gradients (no weight decay):
    # m = (1 - b1) g and v = (1 - b2) g^2, bias-corrected to g and g^2, give p - lr * g / (sqrt(g^2) + eps).
    assert type(inner[0].optimizer) is torch.optim.AdamW
    b1, b2, eps, lr = opt_config.adam_beta1, opt_config.adam_beta2, opt_config.adam_eps, 0.01
    moved = 0
    for n, p in model.named_parameters():
        g = grads[n].double()
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        ref = before[n].double() - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-7, msg=n)
        moved += int(not torch.equal(p.detach(), before[n]))
    assert moved > 0


# --------------------------------------------------------------------------------------------------------------------
# apply / revert / without / the version check
# --------------------------------------------------------------------------------------------------------------------
def _installed_objects():
    """Every object the adjustments replace, by where megatron (or torch) looks it up."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    return {
        "current_device": torch.cuda.current_device,
        "Stream": torch.cuda.Stream,
        "Event": torch.cuda.Event,
        "current_stream": torch.cuda.current_stream,
        "stream": torch.cuda.stream,
        "synchronize": torch.cuda.synchronize,
        "tracker_cls": mrandom.CudaRNGStatesTracker,
        "get_rng": mrandom._get_cuda_rng_state,
        "set_rng": mrandom._set_cuda_rng_state,
        "te_general_gemm": getattr(moe_utils, "te_general_gemm", "missing"),
        "maybe_move": token_dispatcher.maybe_move_tensor_to_cpu,
        "gather": mappings._gather_along_first_dim,
        "clip": clip_grads.clip_grad_by_total_norm_fp32,
        "clip_in_optimizer": moptimizer.clip_grad_by_total_norm_fp32,
        "distopt_init": distrib_optimizer.DistributedOptimizer.__init__,
    }


def _device_modes():
    cpu_compat = _compat()
    from torch.overrides import _get_current_function_mode_stack

    return [m for m in _get_current_function_mode_stack() if isinstance(m, cpu_compat.CudaToCpuMode)]


def test_apply_is_idempotent():
    cpu_compat = _compat()
    cpu_compat.apply()
    assert sorted(cpu_compat.applied()) == sorted(cpu_compat.needed())
    first = _installed_objects()
    assert len(_device_modes()) == 1
    cpu_compat.apply()
    cpu_compat.apply(["rng", "streams"])
    second = _installed_objects()
    assert all(second[k] is first[k] for k in first), [k for k in first if second[k] is not first[k]]
    assert len(_device_modes()) == 1
    assert sorted(cpu_compat.applied()) == sorted(cpu_compat.needed())


def test_revert_restores_original_objects_and_apply_reinstalls():
    cpu_compat = _compat()
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    cpu_compat.apply()
    adjusted = _installed_objects()
    try:
        cpu_compat.revert()
        assert cpu_compat.applied() == []
        orig = _installed_objects()
        # the originals, recognisable without having seen them before
        assert orig["current_device"].__module__ == "torch.cuda"
        assert orig["current_device"].__qualname__ == "current_device"
        assert orig["synchronize"].__qualname__ == "synchronize" and orig["synchronize"].__module__ == "torch.cuda"
        assert orig["Stream"] is torch.cuda.streams.Stream and orig["Event"] is torch.cuda.streams.Event
        assert orig["tracker_cls"].__module__ == mrandom.__name__
        assert orig["tracker_cls"].__qualname__ == "CudaRNGStatesTracker"
        assert orig["get_rng"].__qualname__ == "_get_cuda_rng_state"
        assert orig["te_general_gemm"] == ("missing" if _series() == "0.16" else None)
        assert orig["maybe_move"] is moe_utils.maybe_move_tensor_to_cpu
        assert orig["gather"].__module__ == mappings.__name__
        assert orig["gather"].__qualname__ == "_gather_along_first_dim"
        assert orig["clip"].__module__ == clip_grads.__name__ and orig["clip_in_optimizer"] is orig["clip"]
        assert orig["distopt_init"].__qualname__ == "DistributedOptimizer.__init__"
        assert orig["distopt_init"].__module__ == distrib_optimizer.__name__
        assert _device_modes() == []
        with pytest.raises(NO_CUDA, match=NO_CUDA_MSG):
            torch.cuda.current_device()
        # every object differs from its stand-in (0.19 keeps its own te_general_gemm)
        replaced = [k for k in orig if k != "te_general_gemm" or "te_names" in cpu_compat.needed()]
        assert all(orig[k] is not adjusted[k] for k in replaced), [k for k in replaced if orig[k] is adjusted[k]]

        cpu_compat.apply()
        assert sorted(cpu_compat.applied()) == sorted(cpu_compat.needed())
        assert torch.cuda.current_device() == torch.device("cpu")
        assert len(_device_modes()) == 1
        reapplied = _installed_objects()
        assert all(reapplied[k] is not orig[k] for k in replaced), [k for k in replaced if reapplied[k] is orig[k]]

        cpu_compat.revert()
        again = _installed_objects()
        assert all(again[k] is orig[k] for k in orig), [k for k in orig if again[k] is not orig[k]]
        assert _device_modes() == []
    finally:
        cpu_compat.apply()


def test_without_removes_one_adjustment_and_restores_it():
    cpu_compat = _compat()
    cpu_compat.apply()
    stand_in = torch.cuda.synchronize
    with cpu_compat.without("streams"):
        assert "streams" not in cpu_compat.applied()
        assert set(cpu_compat.applied()) == set(cpu_compat.needed()) - {"streams"}
        assert torch.cuda.synchronize is not stand_in
    assert set(cpu_compat.applied()) == set(cpu_compat.needed())
    assert torch.cuda.synchronize() is None
    # restored even when the body raises
    with pytest.raises(KeyError):
        with cpu_compat.without("split_sizes"):
            raise KeyError
    assert "split_sizes" in cpu_compat.applied()


def test_apply_refuses_when_cuda_is_available(monkeypatch):
    cpu_compat = _compat()
    with cpu_compat.without("split_sizes"):
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            with pytest.raises(RuntimeError, match="CUDA is available"):
                cpu_compat.apply()
            with pytest.raises(RuntimeError, match="CUDA is available"):
                cpu_compat.apply(["split_sizes"])
            assert "split_sizes" not in cpu_compat.applied()
    assert "split_sizes" in cpu_compat.applied()


def test_needed_by_series_and_unsupported_version_refused(monkeypatch):
    cpu_compat = _compat()
    from megatron.core import package_info

    everything_but_te = sorted(set(cpu_compat.ADJUSTMENTS) - {"te_names"})
    assert sorted(cpu_compat.needed()) == sorted(cpu_compat.ADJUSTMENTS if _series() == "0.16" else everything_but_te)
    with cpu_compat.without("split_sizes"):
        with monkeypatch.context() as m:
            for version, expected in (("0.16.1", sorted(cpu_compat.ADJUSTMENTS)), ("0.19.2", everything_but_te)):
                m.setattr(package_info, "__version__", version)
                assert sorted(cpu_compat.needed()) == expected
            m.setattr(package_info, "__version__", "0.18.2")
            with pytest.raises(RuntimeError, match=r"megatron-core 0\.18\.2 is installed; megamod supports"):
                cpu_compat.apply()
            with pytest.raises(RuntimeError, match="0.18.2"):
                cpu_compat.apply(["split_sizes"])
            assert "split_sizes" not in cpu_compat.applied()
    assert "split_sizes" in cpu_compat.applied()


# --------------------------------------------------------------------------------------------------------------------
# SequenceParallelTorchNorm (megamod/models/specs.py)
# --------------------------------------------------------------------------------------------------------------------
def _norm_config(normalization, sequence_parallel=True):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization=normalization,
                             tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
                             use_cpu_initialization=True)


def _rms_norm_reference(x, weight, eps):
    """RMSNorm by hand, in float64: x / sqrt(mean(x^2) + eps) * weight."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _layer_norm_reference(x, weight, bias, eps):
    """LayerNorm by hand, in float64: (x - mean) / sqrt(var + eps) * weight + bias (biased variance)."""
    x = x.double()
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight.double() + bias.double()


def _assert_matches_reference(norm, reference, x, params):
    """norm's output and gradients (input and parameters) against the float64 reference's, on a weighted sum."""
    xi = x.clone().requires_grad_()
    out = norm(xi)
    assert out.dtype == torch.float32
    w_out = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w_out).sum().backward()
    x64 = x.double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in params]
    ref = reference(x64, *params64)
    (ref * w_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xi.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for p, p64 in zip(params, params64):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-5)


def test_sequence_parallel_torch_norm():
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megamod.models.language import LanguageModelConfig, build_language_model
    from megamod.models.specs import SequenceParallelTorchNorm, decoder_block_spec

    # megatron's torch norm is megatron's own (nothing patched it) and refuses sequence parallelism ...
    assert WrappedTorchNorm.__module__ == torch_norm.__name__ and WrappedTorchNorm.__qualname__ == "WrappedTorchNorm"
    config = _norm_config("RMSNorm")
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config, 8, eps=1e-6)
    # ... so the local spec puts megamod's in its place, for every norm of the block
    spec = decoder_block_spec(_norm_config("RMSNorm", sequence_parallel=False), use_te=False)
    norms = [spec.layer_norm] + [n for layer in spec.layer_specs
                                 for n in (layer.submodules.input_layernorm, layer.submodules.pre_mlp_layernorm)]
    assert norms == [SequenceParallelTorchNorm] * 3, norms

    norm = SequenceParallelTorchNorm(config, 8, eps=1e-6)
    # torch's own RMSNorm, not a subclass or a stand-in: its forward is torch.nn's
    assert type(norm) is torch.nn.RMSNorm and type(norm).forward is torch.nn.modules.normalization.RMSNorm.forward
    assert norm.eps == 1e-6 and norm.normalized_shape == (8,)
    params = list(norm.parameters())
    assert len(params) == 1 and all(getattr(p, "sequence_parallel", None) is True for p in params)

    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(8, generator=gen))
    x = torch.randn(3, 2, 8, generator=gen)
    _assert_matches_reference(norm, lambda x, w: _rms_norm_reference(x, w, 1e-6), x, [norm.weight])
    # eps counts: a row of tiny values normalises to well below 1 with eps=1e-6 (rms 1e-3), to about 1 without it
    tiny = torch.full((1, 8), 1e-3)
    torch.testing.assert_close(norm(tiny).double(), _rms_norm_reference(tiny, norm.weight, 1e-6), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(norm(tiny).double(), _rms_norm_reference(tiny, norm.weight, 0.0), rtol=1e-2)

    layer_norm = SequenceParallelTorchNorm(_norm_config("LayerNorm"), 8, eps=1e-5)
    assert type(layer_norm) is torch.nn.LayerNorm and layer_norm.eps == 1e-5
    assert [getattr(p, "sequence_parallel", None) for p in layer_norm.parameters()] == [True, True]
    with torch.no_grad():
        layer_norm.weight.copy_(1 + 0.3 * torch.randn(8, generator=gen))
        layer_norm.bias.copy_(0.2 * torch.randn(8, generator=gen))
    _assert_matches_reference(layer_norm, lambda x, w, b: _layer_norm_reference(x, w, b, 1e-5), x,
                              [layer_norm.weight, layer_norm.bias])

    off = SequenceParallelTorchNorm(_norm_config("RMSNorm", sequence_parallel=False), 8)
    assert [getattr(p, "sequence_parallel", None) for p in off.parameters()] == [False]

    # and a model built on the local spec has torch's RMSNorm, megamod-marked, where megatron's would be
    cfg = LanguageModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_attention_heads=2, num_query_groups=1,
                              ffn_hidden_size=32, vocab_pad_multiple=8, max_position_embeddings=16)
    model = build_language_model(cfg)
    built = [model.decoder.final_layernorm, model.decoder.layers[0].input_layernorm,
             model.decoder.layers[0].pre_mlp_layernorm]
    assert [type(m) for m in built] == [torch.nn.RMSNorm] * 3, [type(m) for m in built]
    assert all(p.sequence_parallel is False for m in built for p in m.parameters())

    config.normalization = "L2Norm"
    with pytest.raises(ValueError, match="L2Norm"):
        SequenceParallelTorchNorm(config, 8)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--two-rank-worker":
        _two_rank_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(f"usage: {sys.argv[0]} --two-rank-worker RANK WORLD_SIZE PORT OUT_DIR")
