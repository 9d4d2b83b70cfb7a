"""The student's MoE layer: megatron-core's MoELayer whose token dispatcher permutes with megamod's kernels.

The seam is the dispatcher's permutation phases (alltoall: dispatch_preprocess / combine_postprocess; allgather:
dispatch_postprocess / combine_preprocess). megamod's dispatchers handle the dropless routing LLaVA-MoD uses;
features the kernels do not cover (drop-and-pad to capacity, routing-map padding for quantisation, shared experts)
go to megatron-core's own implementation, as does everything when the megamod._C extension is missing.
The layer is selected through the layer spec (`models.specs`), never by patching megatron-core. (megatron-core's
TransformerLayer logs "Unknown MLP type" for any MoE class but its own and builds it without a pg_collection; the
layer then takes the default process groups, the same ones megatron-core would have passed.)
"""
from __future__ import annotations

import logging

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

from megamod import ops

log = logging.getLogger(__name__)


def _kernels_cover(dispatcher) -> bool:
    config = dispatcher.config
    return not (dispatcher.drop_and_pad if hasattr(dispatcher, "drop_and_pad") else False) and not (
        config.moe_router_padding_for_quantization or dispatcher.shared_experts is not None
    )


class AlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        if not _kernels_cover(self):
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        self.hidden_shape = hidden_states.shape
        self.probs, self.routing_map = probs, routing_map
        tokens_TH = hidden_states.view(-1, self.hidden_shape[-1])
        # preprocess() sets the all-to-all split sizes and num_out_tokens from the routing map.
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1",
                                                                  self.preprocess(routing_map))
        self.hidden_shape_before_permute = tokens_TH.shape
        permuted_PH, permuted_probs_P, self.reversed_local_input_permutation_mapping = ops.permute(
            tokens_TH, routing_map, probs=probs, num_out_tokens=self.num_out_tokens
        )
        return permuted_PH, permuted_probs_P

    def combine_postprocess(self, permuted_PH):
        if not _kernels_cover(self):
            return super().combine_postprocess(permuted_PH)
        # The routing probabilities were applied by the experts (on the permuted rows), so none here.
        tokens_TH = ops.unpermute(permuted_PH, self.reversed_local_input_permutation_mapping,
                                  restore_shape=self.hidden_shape_before_permute, routing_map=self.routing_map)
        return tokens_TH.view(self.hidden_shape)


class AllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    def dispatch_postprocess(self, hidden_states, probs):
        if not _kernels_cover(self):
            return super().dispatch_postprocess(hidden_states, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        experts = slice(self.local_expert_indices[0], self.local_expert_indices[-1] + 1)
        self.local_map = self.routing_map[:, experts].contiguous()
        local_probs_TE = probs[:, experts].contiguous()
        tokens_per_expert = self.local_map.sum(dim=0).long().cpu()
        permuted_PH, permuted_probs_P, self.reversed_local_input_permutation_mapping = ops.permute(
            hidden_states, self.local_map, probs=local_probs_TE, num_out_tokens=int(tokens_per_expert.sum())
        )
        self.local_probs = permuted_probs_P
        self.routing_map = None
        return permuted_PH, tokens_per_expert, permuted_probs_P

    def combine_preprocess(self, hidden_states):
        if not _kernels_cover(self):
            return super().combine_preprocess(hidden_states)
        return ops.unpermute(hidden_states, self.reversed_local_input_permutation_mapping,
                             restore_shape=self.hidden_shape_before_permute, routing_map=self.local_map)


_DISPATCHERS = {"alltoall": AlltoAllTokenDispatcher, "allgather": AllGatherTokenDispatcher}
_announced = False


class MegamodMoELayer(MoELayer):
    """megatron-core's MoELayer with megamod's permute/unpermute in the token dispatcher."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

        global _announced
        pg_collection = pg_collection or get_default_pg_collection()
        # kwargs: what megatron-core 0.19's TransformerLayer passes on (is_mtp_layer, name); 0.16 passes none
        super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        cls = _DISPATCHERS.get(config.moe_token_dispatcher_type)
        if cls is None or not ops.extension_available():
            if not _announced:
                log.info("MoE permute/unpermute: megatron-core's torch path (%s)",
                         "megamod._C missing" if cls else f"{config.moe_token_dispatcher_type} dispatcher")
                _announced = True
            return
        self.token_dispatcher = cls(self.num_local_experts, self.local_expert_indices, config=self.config,
                                    pg_collection=pg_collection)
