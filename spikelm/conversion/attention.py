"""The attention of a converted model: transformers' attention interface, computed as :mod:`spikelm.nn.exact` says.

A converted model's attention reads the spiked K and V (from the spike-code cache or :class:`~spikelm.conversion.
cache.TransientSpikeKV`) and its output is the input of the output projection's neuron, which rounds it to codes.
PyTorch's ``scaled_dot_product_attention`` sums in an order that depends on the number of queries and keys (a
prefill, a decoding step, a longer prompt), so the same token got different bits, and the output projection's codes
flipped at ties (a token attending one cached token re-quantises that token's dequantised V, whose values lie on a
grid). :func:`attach`
(placement) therefore sets the model's attention implementation to :data:`NAME`, registered here with transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` (its masks are sdpa's): the attention runs in
float64 and rounds once (:func:`spikelm.nn.exact.exact_attention`, differentiable); with dropout (training) it is
transformers' sdpa function.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..nn import cpu_kernels, kernels
from ..nn.exact import exact_attention

NAME = "spikelm"
# keyword arguments a model's attention may pass that change what it computes and that this function does not do
UNSUPPORTED = ("s_aux", "sinks", "position_bias", "cache")


def unsupported(kwargs: dict) -> list[str]:
    """The keyword arguments in ``kwargs`` that this attention does not implement (:data:`UNSUPPORTED`, given)."""
    return [name for name in UNSUPPORTED if kwargs.get(name) is not None]


def decoding_attention(query, key, value, attention_mask, scaling, softcap, order) -> torch.Tensor:
    """:func:`spiking_attention` where :func:`~spikelm.nn.kernels.attention_kernel` takes the C++ call (one query per
    head on the cache's decoded float64 K/V): ``order``, :func:`~spikelm.nn.kernels.attention_order`'s answer for
    these shapes (a caller may keep it: a block's planned decoding step)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    order, block = (0, None) if order is None else order
    return cpu_kernels.one_query_attention(query, key, value, attention_mask, scale, softcap, order=order, block=block)


def spiking_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: (B, H, q, d) queries, (B, Hkv, L, d) spiked keys and values -> the
    (B, q, H, d) output, as transformers' sdpa function lays it out (sliding windows come in the mask)."""
    if dropout > 0:  # training with dropout: transformers' sdpa function
        if softcap is not None:
            kwargs["softcap"] = softcap
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    given = unsupported(kwargs)
    if given:
        raise NotImplementedError(f"spikelm's attention does not implement {', '.join(given)}")
    if kernels.attention_kernel(query, key, value) == kernels.CPP:  # a fast decoding step on the decoded cache
        order = kernels.attention_order(query, key, value)  # its own loops for the products, or ATen's
        return decoding_attention(query, key, value, attention_mask, scaling, softcap, order), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = exact_attention(query, key, value, attention_mask, scaling, causal, softcap)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, spiking_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
