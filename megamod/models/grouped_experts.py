"""All local experts in two grouped GEMMs, without TransformerEngine.

megatron-core's SequentialMLP runs the experts one after another: per expert, a GEMM for fc1, the activation and a
GEMM for fc2, 3 x E small kernels per layer (and a host sync for the split sizes). `GroupedExperts` is a
SequentialMLP (the same experts, parameters, sharded state dict and checkpoint layout: upcycling, export and
resharding see no difference) whose forward stacks the experts' weights and runs `torch._grouped_mm` over the
permuted rows, grouped by expert: fc1, the activation with the routing probabilities, fc2. Where it does not
apply (a layout or feature it does not cover, a device or dtype without a grouped GEMM) it is SequentialMLP.

Shapes: P permuted rows (grouped by local expert), H hidden, I fc1 outputs (2F for gated units), F ffn, E local
experts.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

CALLS = {"grouped": 0}  # forwards that took the grouped GEMMs (tests check that they ran)


def unsupported_reason(config) -> str | None:
    """Why the grouped path cannot compute this configuration's experts exactly as SequentialMLP, or None."""
    if not hasattr(torch, "_grouped_mm"):
        return "torch has no _grouped_mm"
    checks = {
        "expert tensor parallelism": (config.expert_tensor_parallel_size or 1) != 1,
        "biases": config.add_bias_linear,
        "fp8/fp4": bool(config.fp8) or bool(getattr(config, "fp4", None)),
        "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
        "activation clamping or GLU offset": getattr(config, "activation_func_clamp_value", None) is not None
        or getattr(config, "glu_linear_offset", 0.0) != 0.0,
    }
    found = [name for name, present in checks.items() if present]
    return ", ".join(found) + " not covered" if found else None


def device_runs_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm: CUDA runs it in bf16 on compute capability 9.0 and later; the CPU in any float dtype."""
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


class GroupedExperts(SequentialMLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reason = unsupported_reason(self.config)
        if reason is not None:
            raise ValueError(f"grouped experts: {reason}; use megatron's SequentialMLP (performance.grouped_experts: "
                             f"false)")

    def _applies(self, x_PH: torch.Tensor) -> bool:
        # _grouped_mm wants 16-byte aligned rows in every operand
        fc1, fc2 = self.local_experts[0].linear_fc1.weight, self.local_experts[0].linear_fc2.weight
        widths = (x_PH.shape[-1], fc1.shape[0], fc2.shape[-1])  # H, I, F
        return (self.num_local_experts > 1 and x_PH.dim() == 2 and device_runs_grouped_mm(x_PH.device, x_PH.dtype)
                and all(w * x_PH.element_size() % 16 == 0 for w in widths))

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x_PH = permuted_local_hidden_states
        if not self._applies(x_PH):
            return super().forward(x_PH, tokens_per_expert, permuted_probs)
        CALLS["grouped"] += 1
        offsets_E = torch.cumsum(torch.as_tensor(tokens_per_expert, device=x_PH.device), 0).to(torch.int32)
        w1_EIH = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        w2_EHF = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        h_PI = torch._grouped_mm(x_PH, w1_EIH.transpose(1, 2), offs=offsets_E)
        # As megatron's MLP: act(first half) * second half (its fused SwiGLU computes the same, in one kernel)
        if self.config.gated_linear_unit:
            gate_PF, linear_PF = torch.chunk(h_PI, 2, dim=-1)
            act_PF = self.config.activation_func(gate_PF) * linear_PF
        else:
            act_PF = self.local_experts[0].activation_func(h_PI)
        act_PF = (act_PF * permuted_probs.unsqueeze(-1)).to(h_PI.dtype)
        out_PH = torch._grouped_mm(act_PF, w2_EHF.transpose(1, 2), offs=offsets_E)
        return out_PH, None
