"""megatron-core 0.16 without TransformerEngine: the one name it reads unguarded, on any device (0.19 defines it).

moe_utils imports `te_general_gemm` in a try block that leaves the name undefined when TransformerEngine is missing,
and the router's gating reads it: a NameError at the first MoE forward, on a GPU as on a CPU. Defining it as None
takes megatron's own torch path (an fp32 torch.mm for the router logits). `distributed.initialize` calls `apply()`
(cpu_compat's "te_names" adjustment does the same on CPU).
"""
from __future__ import annotations


def apply() -> bool:
    """Define the missing name if it is missing; returns whether it was."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True
