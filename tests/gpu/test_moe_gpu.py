"""The sparse student on a GPU in bf16 against the same weights in fp32: the MoE layer (megamod's CUDA permute
kernels in its dispatcher) and a whole tiny sparse LLaVA, forward and backward."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MIN_COSINE = 0.99
# A routing decision that flips between fp32 and bf16 (two experts' scores within rounding) changes that token's
# output and its router gradient outright, so a single small tensor may fall below MIN_COSINE while the whole
# gradient does not; a tensor whose gradient is wrong or missing falls far below this.
MIN_TENSOR_COSINE = 0.95


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def bf16_twin(build, fp32_model):
    """The same architecture in bf16, holding fp32_model's weights rounded to bf16."""
    model = build(torch.bfloat16)
    model.load_state_dict(fp32_model.state_dict(), strict=True)
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in model.parameters())
    return model


def assert_grads_close(fp32_model, bf16_model):
    fp32 = {n: p.grad for n, p in fp32_model.named_parameters() if p.grad is not None}
    bf16 = {n: p.grad for n, p in bf16_model.named_parameters() if p.grad is not None}
    assert fp32 and fp32.keys() == bf16.keys()
    for name in fp32:
        assert cosine(bf16[name], fp32[name]) >= MIN_TENSOR_COSINE, name
    whole = cosine(torch.cat([bf16[n].flatten().float() for n in fp32]), torch.cat([g.flatten() for g in fp32.values()]))
    assert whole >= MIN_COSINE


def test_moe_layer_bf16_matches_fp32(world1):
    from megamod import ops
    from megamod.models.language import LanguageModelConfig, build_language_model
    from megamod.models.moe import AlltoAllTokenDispatcher, MegamodMoELayer

    cfg = LanguageModelConfig(vocab_size=251, hidden_size=256, num_layers=1, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=512, num_experts=4, moe_router_topk=2)

    def build(dtype):
        return build_language_model(cfg, params_dtype=dtype, init_weights=dtype == torch.float32).decoder.layers[0].mlp

    torch.manual_seed(0)
    fp32 = build(torch.float32)
    bf16 = bf16_twin(build, fp32)
    assert ops.extension_available()
    assert isinstance(fp32, MegamodMoELayer) and type(bf16.token_dispatcher) is AlltoAllTokenDispatcher
    x_SBH = torch.randn(256, 2, 256, device="cuda")
    grad_SBH = torch.randn_like(x_SBH)
    outputs = {}
    for name, layer in (("fp32", fp32), ("bf16", bf16)):
        dtype = next(layer.parameters()).dtype
        xi = x_SBH.to(dtype).detach().requires_grad_()  # a leaf of its own in both dtypes
        out_SBH, _ = layer(xi)
        assert out_SBH.is_cuda and out_SBH.dtype == dtype
        out_SBH.backward(grad_SBH.to(dtype))
        outputs[name] = (out_SBH.float(), xi.grad.float())
    assert cosine(outputs["bf16"][0], outputs["fp32"][0]) >= MIN_COSINE
    assert cosine(outputs["bf16"][1], outputs["fp32"][1]) >= MIN_COSINE
    assert not torch.equal(outputs["bf16"][0], outputs["fp32"][0])  # the bf16 layer really ran in bf16
    assert_grads_close(fp32, bf16)


def test_sparse_llava_student_bf16_matches_fp32(world1):
    from megamod.losses.ce import cross_entropy_BS, masked_mean
    from megamod.families.factory import build_model
    from tests.training_setup import STUDENT_LM, llava_config

    vocab, image_id = 251, 250
    cfg = llava_config(vocab, image_id, **STUDENT_LM, num_experts=4, moe_router_topk=2, moe_layer_pattern=[1, 0, 1, 0])

    def build(dtype):
        return build_model(cfg, dtype, init_weights=dtype == torch.float32)

    torch.manual_seed(0)
    fp32 = build(torch.float32)
    bf16 = bf16_twin(build, fp32)
    B, S, n_img = 2, 64, cfg.vision.num_image_tokens
    gen = torch.Generator().manual_seed(1)
    tokens_BS = torch.randint(0, image_id, (B, S), generator=gen)
    tokens_BS[:, 1:1 + n_img] = image_id  # one image per sample
    labels_BS = torch.randint(0, image_id, (B, S), generator=gen)
    loss_mask_BS = torch.ones(B, S)
    loss_mask_BS[:, : 1 + n_img] = 0
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    tokens_BS, labels_BS, loss_mask_BS, images = (t.cuda() for t in (tokens_BS, labels_BS, loss_mask_BS, images))
    position_ids_BS = torch.arange(S, device="cuda").expand(B, S)
    logits = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        logits_BSv = model(tokens_BS, position_ids_BS, images)  # the vision tower casts them, as in training
        masked_mean(cross_entropy_BS(logits_BSv, labels_BS, vocab), loss_mask_BS).backward()
        logits[name] = logits_BSv.detach().float()[..., :vocab]
    ref_BSV, got_BSV = logits["fp32"], logits["bf16"]
    assert cosine(got_BSV, ref_BSV) >= MIN_COSINE
    # Argmax: wherever fp32's top-1 leads its runner-up by more than twice that position's largest bf16 error, no
    # rounding can swap them, so the argmax must agree; such positions must be most of the batch for this to
    # mean anything (a random tiny model has close logits).
    top2_BS2 = ref_BSV.topk(2, dim=-1).values
    margin_BS = top2_BS2[..., 0] - top2_BS2[..., 1]
    decided_BS = margin_BS > 2 * (got_BSV - ref_BSV).abs().amax(dim=-1)
    assert decided_BS.float().mean().item() >= 0.5
    assert torch.equal(got_BSV.argmax(-1)[decided_BS], ref_BSV.argmax(-1)[decided_BS])
    assert_grads_close(fp32, bf16)


def test_grouped_experts_bf16_match_megatrons_loop(world1):
    from megamod import performance
    from megamod.models import grouped_experts
    from megamod.models.language import LanguageModelConfig, build_language_model

    if not grouped_experts.device_runs_grouped_mm(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs compute capability >= 9.0")
    cfg = LanguageModelConfig(vocab_size=251, hidden_size=256, num_layers=1, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=512, num_experts=4, moe_router_topk=2)

    def build(grouped):
        performance.configure(performance.PerformanceConfig(grouped_experts=grouped))
        torch.manual_seed(0)
        return build_language_model(cfg, params_dtype=torch.bfloat16).decoder.layers[0].mlp

    try:
        loop, fast = build(False), build(True)
    finally:
        performance.configure(performance.PerformanceConfig())
    fast.load_state_dict(loop.state_dict())
    x_SBH = torch.randn(256, 2, 256, device="cuda", dtype=torch.bfloat16)
    grad_SBH = torch.randn_like(x_SBH)
    outputs = {}
    for name, layer in (("loop", loop), ("grouped", fast)):
        before = grouped_experts.CALLS["grouped"]
        xi = x_SBH.detach().requires_grad_()
        out_SBH, _ = layer(xi)
        out_SBH.backward(grad_SBH)
        assert grouped_experts.CALLS["grouped"] - before == (name == "grouped")
        outputs[name] = (out_SBH.float(), xi.grad.float())
    assert cosine(outputs["grouped"][0], outputs["loop"][0]) >= 0.999
    assert cosine(outputs["grouped"][1], outputs["loop"][1]) >= 0.999
    for (name, p), (_, q) in zip(loop.named_parameters(), fast.named_parameters()):
        assert cosine(q.grad, p.grad) >= 0.999, name
