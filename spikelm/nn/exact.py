"""Exact accumulation: the products that feed a spiking neuron, computed so that every code path gives the same bits.

A neuron turns its input into integer codes by rounding (GIF: ``round(x / scale) + zero``; elastic: a threshold on a
membrane). Rounding is discontinuous: two implementations of the same linear layer that sum in another order (a GEMM
for many rows, a matrix-vector product for one, the C++ few-row kernel, the same token in a prefill of 7 or of 9)
differ in the last bits, and where a value sits at a rounding boundary the code flips. Boundaries are not rare: a
token whose attention falls on one cached token re-quantises that token's dequantised V, whose values lie exactly on
a grid, so exact ties occur and the last bit decides them. One flip perturbs the next layers, which flips more, and a
converted SmolLM2-135M gave logits 4-13 apart between paths (docs/CONVERSION.md, "One model whatever the path").

The cure is to make every path compute the same numbers, whatever its summation order: in inference (no autograd)
the dot products of a spiking model's linear layers and of its attention are accumulated in float64 and rounded
once to the model's dtype. A float32 x float32 product is exact in float64, and a sum of a few thousand of them is
within ~1e-13 (relative) of the exact sum in any order, so the rounded result is the correctly rounded exact value
except when that lies within ~1e-13 (relative, more where a sum cancels) of a float32 rounding midpoint: the paths
then agree bit for bit but for rare values, and a differing value must also sit at a code boundary to flip a code
(the tests count flips on real-sized models: none; the kernel equals the float64 GEMM bit for bit on SmolLM2's
shapes). The readable path (PyTorch float64), the C++ few-row kernel (float64
lanes) and the cached decoding all follow this one definition.

The forward value is the same with autograd recording or not (the gradient of a linear is computed in the model's
dtype: it needs no exact bits); attention with dropout (training) is PyTorch's kernel. Cost: float64 matrix
products run at about half the float32 rate on a CPU (prefill and evaluation); a decoding step reads the same
float32 weights and is bound by that, not by the arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACCUMULATE = torch.float64
# the float64 scores of one attention chunk stay under this many elements (queries are cut into chunks; rows are
# independent, so chunking changes no bit)
ATTENTION_CHUNK_ELEMENTS = 1 << 23


def _exact_linear_value(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = F.linear(x.to(ACCUMULATE), weight.to(ACCUMULATE), None if bias is None else bias.to(ACCUMULATE))
    return out.to(x.dtype)


class _ExactLinear(torch.autograd.Function):
    """The exact forward value; the gradient of ``F.linear`` in the input's dtype (training needs no exact bits)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _exact_linear_value(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(grad.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(grad.dtype))
            grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def exact_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` accumulated in float64 and rounded once to ``x``'s dtype (see the module
    docstring): the readable definition every fast linear of a spiking model is tested against. Differentiable
    (the gradient is ``F.linear``'s, in the input's dtype), so a forward pass gives the same values with autograd
    recording or not."""
    if _recording(x, weight, bias):
        return _ExactLinear.apply(x, weight, bias)
    return _exact_linear_value(x, weight, bias)


def _mask_view(mask: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """A (B|1, H|1, q, L) mask as (B|1, Hkv|1, g|1, q, L) to broadcast against grouped scores."""
    if mask.dim() != 4:
        raise ValueError(f"attention mask must be 4-D (batch, heads, queries, keys), got shape {tuple(mask.shape)}")
    batch, heads = mask.shape[:2]
    if heads == 1:
        return mask.view(batch, 1, 1, *mask.shape[2:])
    return mask.view(batch, kv_heads, groups, *mask.shape[2:])


class _ExactAttention(torch.autograd.Function):
    """The exact forward value, saving nothing in float64; the gradient by recomputing the same attention in the
    inputs' dtype (training needs no exact bits, and float64 probabilities of every layer would not fit)."""

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, scaling, is_causal, softcap):
        ctx.save_for_backward(query, key, value)
        ctx.options = (attention_mask, scaling, is_causal, softcap)
        return _attention(query, key, value, attention_mask, scaling, is_causal, softcap, ACCUMULATE)

    @staticmethod
    def backward(ctx, grad):
        inputs = [
            t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], strict=True)
        ]
        with torch.enable_grad():
            out = _attention(*inputs, *ctx.options, inputs[0].dtype)
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(found) if t.requires_grad else None for t in inputs), None, None, None, None)


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention in float64, rounded once to ``query``'s dtype: ``softmax(q k^T * scaling [+ mask]) v``.

    ``query`` (B, H, q, d), ``key`` / ``value`` (B, Hkv, L, d) with H a multiple of Hkv (grouped-query attention:
    head h reads K/V head ``h // (H / Hkv)``). ``attention_mask``: bool (True = attend) or additive float,
    broadcastable as (B|1, H|1, q, L). ``is_causal`` (with no mask): query i attends keys 0..i (upper-left, as
    ``F.scaled_dot_product_attention``; longer keys are cut to the queries, as transformers does for an empty static
    cache). ``softcap``: scores -> ``softcap * tanh(scores / softcap)`` before the mask. A query with no key to attend
    (a padding row) gets zeros, not NaN. Returns (B, H, q, d_v). Differentiable: the same forward value with
    autograd recording, the gradient of the same attention computed in the inputs' dtype.
    """
    if _recording(query, key, value):
        return _ExactAttention.apply(query, key, value, attention_mask, scaling, is_causal, softcap)
    return _attention(query, key, value, attention_mask, scaling, is_causal, softcap, ACCUMULATE)


def _attention(query, key, value, attention_mask, scaling, is_causal, softcap, dtype: torch.dtype) -> torch.Tensor:
    """:func:`exact_attention`'s arithmetic, accumulating in ``dtype``."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads")
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    if is_causal and attention_mask is None and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    kv_len = key.shape[2]
    if q_len == 1:  # a decoding step: the g query heads of a K/V head as g rows, K and V read in place
        return _one_query_attention(query, key, value, attention_mask, scale, is_causal, softcap, dtype)
    k = key.to(dtype).unsqueeze(2)  # (B, Hkv, 1, L, d)
    v = value.to(dtype).unsqueeze(2)
    q = query.to(dtype).view(batch, kv_heads, groups, q_len, head_dim)
    mask = None if attention_mask is None else _mask_view(attention_mask, kv_heads, groups)
    chunk = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
    inplace = not torch.is_grad_enabled()
    parts = []
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        # outside autograd the elementwise steps run in place (the same operations, the same values; a long
        # prompt's float64 scores are tens of MB a chunk, whose fresh copies cost more than the arithmetic)
        scores = q[:, :, :, start:stop] @ k.transpose(-1, -2)
        scores = scores.mul_(scale) if inplace else scores * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            part = mask[..., start:stop, :] if mask.shape[-2] == q_len else mask
            if part.dtype == torch.bool:
                scores = scores.masked_fill_(~part, -math.inf) if inplace else scores.masked_fill(~part, -math.inf)
            else:
                scores = scores.add_(part.to(dtype)) if inplace else scores + part.to(dtype)
        elif is_causal:
            rows = torch.arange(start, stop, device=query.device).view(-1, 1)
            future = torch.arange(kv_len, device=query.device) > rows
            scores = scores.masked_fill_(future, -math.inf) if inplace else scores.masked_fill(future, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        probs = probs.nan_to_num_(0.0) if inplace else probs.nan_to_num(0.0)  # a row with every key masked: zeros
        parts.append(probs @ v)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
    return out.reshape(batch, heads, q_len, -1).to(query.dtype)


def _one_query_attention(query, key, value, attention_mask, scale, is_causal, softcap, dtype) -> torch.Tensor:
    """:func:`_attention` for one query per head: the same operations on (B, Hkv, g, L) scores (the grouped query
    heads as rows of one product per K/V head, so K and V are not broadcast to every query head)."""
    batch, heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query.to(dtype).view(batch, kv_heads, groups, head_dim)
    scores = (q @ key.to(dtype).transpose(-1, -2)) * scale  # (B, Hkv, g, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = _mask_view(attention_mask, kv_heads, groups).squeeze(-2)  # (B|1, Hkv|1, g|1, L)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(dtype)
    elif is_causal:
        scores = scores.masked_fill(torch.arange(kv_len, device=query.device) > 0, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with every key masked: zeros
    out = probs @ value.to(dtype)  # (B, Hkv, g, d)
    return out.reshape(batch, heads, 1, -1).to(query.dtype)


def _recording(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def spiking_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature for a spiking model's attention: :func:`exact_attention` (the
    same bits whether a token comes in a prefill, a decoding step or a longer batch, with autograd recording or
    not); with dropout (training), PyTorch's own kernel."""
    if dropout_p > 0:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    return exact_attention(query, key, value, attn_mask, scale, is_causal)
