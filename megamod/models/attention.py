"""Core attention through torch's scaled_dot_product_attention, for the local (non-TransformerEngine) specs.

megatron-core's local DotProductAttention materialises the [b, np, sq, sk] scores, repeats the key/value groups,
masks with masked_fill and runs a separate softmax: on CPU it was ~40 % of a demo training step. torch's SDPA does
the same product in one fused kernel (flash attention on CPU, efficient attention on GPU) and takes grouped-query
key/values as they are. Same inputs, outputs and head layout as megatron's module (it is a subclass), so
checkpoints and tensor parallelism are unchanged; the cases SDPA does not express the same way (sliding windows, a
softmax offset, attention bias, packed sequences, query-key layer scaling, attention dropout while training) run
megatron's path.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def _sdpa_applies(self, attention_bias, packed_seq_params) -> bool:
        cfg = self.config
        return (attention_bias is None and packed_seq_params is None and self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None and not cfg.apply_query_key_layer_scaling
                and not (self.training and self.attention_dropout.p > 0))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]. `attention_mask` is
        megatron's: bool, True where a query must not see a key (broadcast to [b, np, sq, sk])."""
        if not self._sdpa_applies(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, sk = query.shape[0], key.shape[0]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != sk:  # megatron's softmax refuses this too
            raise ValueError(f"causal self-attention needs as many queries as keys, got {sq} and {sk}")
        allowed = None if attention_mask is None else ~attention_mask
        context_BNSD = torch.nn.functional.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), attn_mask=allowed,
            is_causal=causal, scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return context_BNSD.permute(2, 0, 1, 3).reshape(sq, query.shape[1], self.hidden_size_per_partition)
