"""Exact accumulation (spikelm/nn/exact.py) against PyTorch's own operations, and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spikelm.nn.exact import exact_attention, exact_linear


def test_exact_linear_is_the_float64_sum_rounded_once_with_f_linear_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=gen, requires_grad=True)
    w = torch.randn(7, 40, generator=gen, requires_grad=True)
    b = torch.randn(7, generator=gen, requires_grad=True)
    y = exact_linear(x, w, b)
    assert y.dtype == torch.float32
    assert torch.equal(y.detach(), F.linear(x.double(), w.double(), b.double()).float())
    with torch.no_grad():
        assert torch.equal(exact_linear(x, w, b), y.detach())  # the same value with and without autograd
    grad = torch.randn(3, 5, 7, generator=gen)
    got = torch.autograd.grad(y, (x, w, b), grad)
    want = torch.autograd.grad(F.linear(x, w, b), (x, w, b), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _grouped_reference(q, k, v, mask, scale, causal):
    """PyTorch's sdpa on repeated K/V heads, in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_exact_attention_equals_sdpa_in_float64_with_gqa_and_masks(mask_kind):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 5, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
        mask[..., 0] = True  # every query attends at least one key
    elif mask_kind == "additive":
        mask = torch.randn(2, 6, 5, 5, generator=gen, dtype=torch.float64)
    causal = mask_kind == "causal"
    got = exact_attention(q, k, v, mask, 0.3, causal)
    torch.testing.assert_close(got, _grouped_reference(q, k, v, mask, 0.3, causal), rtol=1e-12, atol=1e-12)


def test_a_query_with_every_key_masked_gets_zeros_and_rows_do_not_depend_on_the_chunking(monkeypatch):
    import spikelm.nn.exact as exact

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen) for _ in range(3))
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    mask[0, 0, 3] = False  # a padding row
    whole = exact_attention(q, k, v, mask)
    assert torch.equal(whole[:, :, 3], torch.zeros_like(whole[:, :, 3]))
    assert not bool(whole.isnan().any())
    monkeypatch.setattr(exact, "ATTENTION_CHUNK_ELEMENTS", 1)  # one query per chunk
    assert torch.equal(exact_attention(q, k, v, mask), whole)
    for i in range(9):  # each query alone: the same bits (no dependence on how many queries come together)
        assert torch.equal(exact_attention(q[:, :, i : i + 1], k, v, mask[..., i : i + 1, :]), whole[:, :, i : i + 1])


def test_exact_attention_gradients_are_sdpas():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen, requires_grad=True) for _ in range(3))
    out = exact_attention(q, k, v, None, None, True)
    with torch.no_grad():
        assert torch.equal(exact_attention(q, k, v, None, None, True), out.detach())
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "softcap"])
def test_one_query_attention_gives_each_query_the_bits_of_the_full_attention(mask_kind):
    """A decoding step's attention (one query per head: the grouped query heads as rows, K and V read in place)
    against the same query inside a prefill of many, at SmolLM2-135M's shapes (9 query heads on 3 K/V heads of 64),
    bit for bit in float32; and against PyTorch's sdpa in float64."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 9, 12, 64, generator=gen)
    k, v = torch.randn(2, 3, 40, 64, generator=gen), torch.randn(2, 3, 40, 64, generator=gen)
    mask, softcap = None, None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 12, 40, generator=gen) > 0.3
        mask[1, 0, 5] = False  # a padding row: zeros
    elif mask_kind == "additive":
        mask = torch.randn(2, 9, 12, 40, generator=gen)
    elif mask_kind == "softcap":
        softcap = 2.0
    whole = exact_attention(q, k, v, mask, 0.125, softcap=softcap)
    for i in range(12):
        row_mask = None if mask is None else mask[..., i : i + 1, :]
        alone = exact_attention(q[:, :, i : i + 1], k, v, row_mask, 0.125, softcap=softcap)
        assert torch.equal(alone, whole[:, :, i : i + 1]), i
    if softcap is None:
        q64, k64, v64 = q[:, :, :1].double(), k.double(), v.double()
        m64 = None if mask is None else mask[..., :1, :] if mask.dtype == torch.bool else mask[..., :1, :].double()
        got = exact_attention(q64, k64, v64, m64, 0.125)
        want = _grouped_reference(q64, k64, v64, m64, 0.125, False).nan_to_num(0.0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
