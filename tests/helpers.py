"""Shared test helpers: tiny random HF models, torchrun launches with hang protection, gradient snapshots."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from megamod.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = int(os.environ.get("MEGAMOD_TEST_LAUNCH_TIMEOUT", "420"))


def tiny_qwen2(out_dir: str, seed: int = 0, **overrides) -> "torch.nn.Module":
    """A random Qwen2ForCausalLM saved with save_pretrained. Norm weights and biases are randomised too, so that a
    conversion that drops or swaps them shows in the logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(vocab_size=251, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()
    _randomise_norms_and_biases(model)
    model.save_pretrained(out_dir)
    return model


def _randomise_norms_and_biases(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name or "layrnorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))


def tiny_llava(out_dir: str, seed: int = 0, image_token_index: int = 250, vision_feature_layer: int = -2,
               **text_overrides):
    """A random LlavaForConditionalGeneration (Qwen2 text, CLIP vision: 32 px images, 8 px patches -> 16 image
    tokens) saved with save_pretrained."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    text = dict(vocab_size=251, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=False)
    text.update(text_overrides)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    config = LlavaConfig(text_config=Qwen2Config(**text), vision_config=vision, image_token_index=image_token_index,
                         vision_feature_layer=vision_feature_layer)
    model = LlavaForConditionalGeneration(config).eval()
    _randomise_norms_and_biases(model)
    model.save_pretrained(out_dir)
    return model


def torchrun(nproc: int, args: list[str], timeout_s: int = LAUNCH_TIMEOUT_S) -> str:
    """Run `torchrun --nproc-per-node nproc args...` and return its output; a hang or failure fails the test with
    the output (workers dump their tracebacks before the timeout kills them)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--tee=3", *args]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "MEGAMOD_WORKER_TIMEOUT": str(timeout_s - 20),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"torchrun timed out after {timeout_s}s: {' '.join(cmd)}\n{out[-8000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


def run_jobs(nproc: int, jobs: list[dict], tmp_dir: str) -> None:
    """Run many checks in one launch (start-up costs ~10 s per launch on 2 cores)."""
    path = os.path.join(tmp_dir, f"jobs-{nproc}.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    torchrun(nproc, [os.path.join(REPO, "tests", "distributed", "worker.py"), path])


def grads_sharded_state_dict(model) -> dict:
    """The model's sharded state dict with each parameter's main_grad in place of its data, so that megatron's
    dist checkpointing assembles gradients from any layout into the canonical unsharded form."""
    params = dict(model.named_parameters())
    out = {}
    for key, sharded in model.sharded_state_dict().items():
        if key not in params:
            continue  # _extra_state objects, not parameters
        param = params[key]
        grad = param.main_grad if hasattr(param, "main_grad") else param.grad
        if grad is None:
            grad = torch.zeros_like(param)
        sharded.data = grad.detach().to(param.dtype).view_as(sharded.data)
        out[key] = sharded
    return out


def swap_token_ids(tokenizer_dir: str, out_dir: str, a: int = 100, b: int = 101) -> str:
    """A copy of an HF tokenizer (tokenizer.json) with ordinary tokens `a` and `b` trading ids: another tokenizer of
    the same size, as two BPE vocabularies of one size are. Returns out_dir."""
    import shutil

    shutil.copytree(tokenizer_dir, out_dir)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    with open(path, "w") as f:
        json.dump(tok, f)
    return out_dir


PERMUTE_KERNELS = ("build_row_id_map", "permute_fwd", "permute_bwd", "unpermute_fwd", "unpermute_bwd")


class PermuteCalls:
    """Counts the calls into megamod._C's permute kernels (eager and custom-op paths both look them up on the module)
    and into megatron-core's torch permute/unpermute (moe_utils and the names its token dispatchers imported), so that a
    test comparing the two can show which path each side took. Use as `with PermuteCalls() as calls:`, then
    `calls.kernels()` / `calls.megatron()` (total counts) or `calls.counts` (per name), and `calls.reset()`.
    `extension`: the megamod._C module to watch (for a test that hides it from imports); by default it is imported,
    and where it cannot be, no kernel can run and none is counted."""

    def __init__(self, extension=None):
        import collections

        self.counts = collections.Counter()
        self._extension = extension
        self._undo = []

    def _wrap(self, owner, attr, key):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            self.counts[key] += 1
            return original(*args, **kwargs)

        setattr(owner, attr, counted)
        self._undo.append(lambda: setattr(owner, attr, original))

    def __enter__(self):
        import importlib

        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        permute_module = importlib.import_module("megamod.ops.permute")  # `megamod.ops.permute` is also the function
        extension = self._extension
        if extension is None:
            try:
                extension = importlib.import_module("megamod._C")
            except ImportError:
                pass
        try:
            for name in PERMUTE_KERNELS if extension is not None else ():
                self._wrap(extension, name, name)
            for owner in (moe_utils, token_dispatcher):
                for name in ("permute", "unpermute"):
                    self._wrap(owner, name, f"megatron.{name}")
            # the oracle's permute calls moe_utils.permute through its module; its unpermute is the function itself
            self._wrap(permute_module.MEGATRON_TORCH_PATH, "unpermute", "megatron.unpermute")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False

    def kernels(self) -> int:
        return sum(self.counts[name] for name in PERMUTE_KERNELS)

    def megatron(self) -> int:
        return self.counts["megatron.permute"] + self.counts["megatron.unpermute"]

    def reset(self) -> None:
        self.counts.clear()
