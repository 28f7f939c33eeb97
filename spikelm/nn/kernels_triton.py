"""Triton kernels for the fused neuron on CUDA: the whole time loop of a block of neurons in registers.

One program loads a block of BLOCK neurons, runs the T steps on them (membrane and carry stay in
registers) and writes spikes in the input's dtype plus one int8 code per element; the backward
kernel walks the steps in reverse from the codes and, for a linear layer's weight gradient,
rebuilds the spikes in the same pass. bf16/fp16 inputs are upcast: membrane arithmetic is float32.

The spikes equal the reference path's bit for bit:
* products and sums use round-to-nearest intrinsics (``mul.rn`` / ``add.rn``), which the compiler
  never contracts into a fused multiply-add, so ``(u * 0.25) * carry + x`` rounds as PyTorch does;
* ``u / alpha`` is the correctly rounded division (``div.rn``), not the approximate one;
* ``clamp(round_half_even(r), -1, 1)`` is computed as ``(r > 0.5) - (r < -0.5)``, which is that
  function exactly (r = +-0.5 rounds to 0; anything beyond +-1.5 clamps to +-1).
  The one difference: a NaN input gives a 0 spike here and NaN on the PyTorch paths.

Alpha initialisation is not here: it needs a global mean per step and runs on the readable path.
Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, numpy arithmetic: IEEE, never contracted)
plain ``*`` and ``+`` are used, so the kernels' logic can be checked without a GPU (float32 only:
the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even, as PyTorch does).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._constants import LEAK, OUTSIDE

if os.environ.get("TRITON_INTERPRET") == "1":

    @triton.jit
    def _mul(a, b):
        return a * b

    @triton.jit
    def _add(a, b):
        return a + b

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _mul(a, b):
        return libdevice.mul_rn(a, b)

    @triton.jit
    def _add(a, b):
        return libdevice.add_rn(a, b)


_LEAK = tl.constexpr(LEAK)
_OUTSIDE = tl.constexpr(float(OUTSIDE))
BLOCK = 1024


@triton.jit
def _carry(alpha, q, OFFICIAL: tl.constexpr):
    # the factor on 0.25 * u_{t-1}: alpha - s (official ternary reset) or 1 - |q| (leaky hard reset)
    if OFFICIAL:
        return _add(alpha, -_mul(alpha, q))
    else:
        return 1.0 - tl.abs(q)


@triton.jit
def _spike_forward_kernel(
    x_ptr,
    alpha_ptr,
    spikes_ptr,
    codes_ptr,
    ratio_ptr,
    n,
    cols,
    stride_t,
    stride_row,
    stride_col,
    STEPS: tl.constexpr,
    TERNARY: tl.constexpr,
    OFFICIAL: tl.constexpr,
    AMPLITUDE: tl.constexpr,
    MEMBRANE: tl.constexpr,
    KEEP_CODES: tl.constexpr,
    KEEP_RATIO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = (offs // cols) * stride_row + (offs % cols) * stride_col  # x may be a strided view
    u = tl.zeros([BLOCK], dtype=tl.float32)
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(STEPS):
        alpha = tl.load(alpha_ptr + t)
        xt = tl.load(x_ptr + t * stride_t + src, mask=mask, other=0.0).to(tl.float32)
        if t == 0 or not MEMBRANE:
            u = xt
        else:
            u = _add(_mul(_mul(u, _LEAK), carry), xt)
        ratio = tl.math.div_rn(u, tl.broadcast_to(alpha, [BLOCK]))
        q = (ratio > 0.5).to(tl.float32)
        if TERNARY:
            q = q - (ratio < -0.5).to(tl.float32)
        if AMPLITUDE:
            spike = q * alpha  # exact: q is -1, 0 or 1
        else:
            spike = q
        tl.store(spikes_ptr + t * n + offs, spike.to(spikes_ptr.dtype.element_ty), mask=mask)
        if KEEP_CODES:
            code = tl.where(tl.abs(ratio) > 1.0, q + _OUTSIDE, q)
            tl.store(codes_ptr + t * n + offs, code.to(tl.int8), mask=mask)
        if KEEP_RATIO:
            tl.store(ratio_ptr + t * n + offs, ratio, mask=mask)
        carry = _carry(alpha, q, OFFICIAL)


@triton.jit
def _spike_backward_kernel(
    grad_s_ptr,
    codes_ptr,
    alpha_ptr,
    grad_x_ptr,
    spikes_ptr,
    n,
    STEPS: tl.constexpr,
    OFFICIAL: tl.constexpr,
    AMPLITUDE: tl.constexpr,
    MEMBRANE: tl.constexpr,
    EMIT_SPIKES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g_next = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(STEPS):
        t = STEPS - 1 - i
        alpha = tl.load(alpha_ptr + t)
        code = tl.load(codes_ptr + t * n + offs, mask=mask, other=0).to(tl.float32)
        q = tl.where(code > 1.0, code - _OUTSIDE, code)
        grad_s = tl.load(grad_s_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(code <= 1.0, grad_s, 0.0)  # straight-through window
        if MEMBRANE and i > 0:
            g = _add(g, _mul(_mul(g_next, _LEAK), _carry(alpha, q, OFFICIAL)))
        tl.store(grad_x_ptr + t * n + offs, g.to(grad_x_ptr.dtype.element_ty), mask=mask)
        g_next = g
        if EMIT_SPIKES:
            if AMPLITUDE:
                spike = q * alpha
            else:
                spike = q
            tl.store(spikes_ptr + t * n + offs, spike.to(spikes_ptr.dtype.element_ty), mask=mask)


def triton_spike_forward(x, alpha, spike_levels, reset, use_amplitude, membrane, keep_codes, keep_ratio):
    """Like :func:`spikelm.nn.neuron.spike_steps` for ``x`` of shape (T, rows, cols), any strides."""
    steps, rows, cols = x.shape
    n = rows * cols
    spikes = torch.empty((steps, rows, cols), dtype=x.dtype, device=x.device)
    codes = torch.empty((steps, rows, cols), dtype=torch.int8, device=x.device) if keep_codes else None
    ratio = torch.empty((steps, rows, cols), dtype=torch.float32, device=x.device) if keep_ratio else None
    if n:
        _spike_forward_kernel[(triton.cdiv(n, BLOCK),)](
            x,
            alpha.float().contiguous(),
            spikes,
            codes if keep_codes else spikes,
            ratio if keep_ratio else spikes,
            n,
            cols,
            *x.stride(),
            STEPS=steps,
            TERNARY=spike_levels == "ternary",
            AMPLITUDE=use_amplitude,
            MEMBRANE=membrane,
            KEEP_CODES=keep_codes,
            KEEP_RATIO=keep_ratio,
            BLOCK=BLOCK,
            OFFICIAL=spike_levels == "ternary" and reset == "official",
        )
    return spikes, codes, ratio


def triton_spike_backward(grad_s, codes, alpha, spike_levels, reset, use_amplitude, membrane, grad_dtype, spike_dtype):
    """Like :func:`spikelm.nn.neuron.spike_steps_backward`; ``grad_s`` and ``codes`` contiguous (T, rows, cols)."""
    n = codes[0].numel()
    grad_x = torch.empty(codes.shape, dtype=grad_dtype, device=codes.device)
    spikes = torch.empty(codes.shape, dtype=spike_dtype, device=codes.device) if spike_dtype is not None else None
    if n:
        _spike_backward_kernel[(triton.cdiv(n, BLOCK),)](
            grad_s,
            codes,
            alpha.float().contiguous(),
            grad_x,
            spikes if spikes is not None else grad_x,
            n,
            STEPS=codes.shape[0],
            AMPLITUDE=use_amplitude,
            MEMBRANE=membrane,
            EMIT_SPIKES=spikes is not None,
            BLOCK=BLOCK,
            OFFICIAL=spike_levels == "ternary" and reset == "official",
        )
    return grad_x, spikes
