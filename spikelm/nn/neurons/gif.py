"""SpikeLLM's generalized integrate-and-fire (GIF) neuron with saliency-based extra steps (SPEC section 8).

The neuron spikes the real-valued input ``x`` (..., C) of a linear layer (or the projected K/V) in three moves:

1. **Per-token asymmetric quantisation.** For every token (every vector along the last dimension) a scale and an
   integer zero point come from a min and max, as in SpikeLLM/OmniQuant (over the whole token, or over one channel
   group's channels of it: see 2)::

       top   = 2^a * (2^n - 1)                         # the fine grid of the salient channels
       scale = max((x_max - x_min) / top, SCALE_FLOOR)
       zero  = round(-x_min / scale)                   # an integer, not clamped to [0, top] (as OmniQuant)
       code  = clamp(round(x / scale) + zero, 0, top)
       x_hat = (code - zero) * scale

   ``n`` = ``bits``, ``a`` = ``extra_bits``. The range is ``[0, 2^a * (2^n - 1)]``, exactly the sum that
   ``T = 2^a`` spikes of at most ``2^n - 1`` can reach; SpikeLLM's ``[0, 2^(n+a) - 1]`` is one code too wide per
   extra step (with n=4, a=1 its code 31 spikes 15 + 15 = 30). Rounding is half to even (``torch.round``), and
   as ``round`` is odd-symmetric ``x = x_min`` always gets code 0.

2. **Two channel groups.** Salient channels (a calibrated mask) are quantised on the fine grid (codes
   ``[0, 2^a (2^n - 1)]``), the others on the textbook n-bit grid (codes ``[0, 2^n - 1]``). Each group has its own
   integer zero point, so real zero is exact on both grids (one zero point shared on the fine grid leaves zero
   off the coarse grid whenever it is odd; on outlier-stretched ranges that multiplied the coarse channels' error
   about 8-fold in a check). Where each group's per-token range comes from is the option ``group_range``:

   * ``"group"`` (default): each group takes its min and max over its OWN channels of the token, and has its own
     scale: ``scale_f = (max_f - min_f) / (2^a (2^n - 1))``, ``scale_c = (max_c - min_c) / (2^n - 1)`` (both
     floored at ``SCALE_FLOOR``), ``zero_g = round(-min_g / scale_g)``. The salient outlier channels then no
     longer stretch the coarse grid of the other ~90 %. ``scale`` and ``zero`` are (..., 2) = (fine, coarse).
     A group with no channel in a token (e.g. every channel salient) gets min = max = 0: scale ``SCALE_FLOOR``,
     zero 0, and no code uses them. A group of one channel in a token (min = max) codes it 0 and its zero point
     carries the value (exact up to ``SCALE_FLOOR``), as for a constant token.
   * ``"token"``: both groups take the min and max over the WHOLE token, as SpikeLLM's released code does (its
     pair of per-token quantisers, n bits and n + a bits, with the off-by-one fixed): one fine ``scale`` (..., 1)
     as in step 1, the coarse step exactly ``2^a * scale`` (``= (x_max - x_min) / (2^n - 1)``), coarse zero
     ``round(-x_min / (2^a * scale))``; ``zero`` (..., 2).

   * ``group_size`` G > 0 (with ``"group"``): finer still, each set's channels (in channel order) are cut into
     runs of G, the last run taking what is left, and each run has its own per-token scale and zero point
     (:func:`range_groups`, :func:`quantize_per_group`); ``scale`` and ``zero`` are (..., F + K), F fine and K coarse
     runs. A linear layer then has one integer accumulator, zero-point term and scale multiply per run.

   Perplexity 57.6 with per-group ranges, 467 with whole-token ones, 35.5 real-valued (n=4, a=1, top 10 %, every
   linear input but lm_head), measured on SmolLM2-135M by the lead.
   A neuron without salient channels ("without saliency") has every channel on the coarse grid: the per-token
   n-bit quantiser over the whole token, one step, ``scale`` and ``zero`` (..., 1); both options are then the same.

3. **Multi-level spikes with soft reset.** The membrane starts at the channel's code; at each of ``T = 2^a``
   steps the neuron emits ``s_t = min(mem, 2^n - 1)`` and soft-resets ``mem -= s_t``, so ``sum_t s_t == code``
   exactly (the top code drains in exactly T steps). A coarse code is at most ``2^n - 1``: it fires at step 0
   only. Spikes are integers (uint8 for n <= 8). A linear layer reading the spikes computes, with one zero-point
   term per group (``W_f`` / ``W_c`` the columns of salient / other channels)::

       "group":  y = (sum_t W_f s_t^f - zero_f * W_f.sum(1)) * scale_f + (W_c s^c - zero_c * W_c.sum(1)) * scale_c + b
       "token":  y = (sum_t W (gain * s_t) - zero_f * W_f.sum(1) - zero_c * (2^a W_c).sum(1)) * scale + b

   With ``"token"`` a coarse spike weighs ``gain = 2^a`` fine steps (a shift) and one scale multiplies the whole
   accumulator; with ``"group"`` each group accumulates apart and has its own scale multiply. The per-channel
   ``gain`` (:func:`channel_gain`: 1 salient, 2^a other) also tells the two groups apart.
   :func:`reference_gif_linear` runs the T per-step matrix products, :func:`gif_linear` the summed one.

Saliency (:func:`saliency_scores`): channel c scores ``mean over tokens of x_c * (x W^T W)_c``, with ``W`` the
vertical stack of every weight reading this input (q/k/v, gate/up); the top ``saliency_fraction`` of channels get
the extra steps. Without weights (the K/V neurons) the score is ``mean x_c^2``.

Training: the forward pass returns the dequantised input with a straight-through gradient (identity on x):
with ``clip_ratio=1`` no element lies outside its own group's (or token's) [min, max], so nothing is clipped and
the STE of round and clamp is the identity; with ``clip_ratio < 1`` the gradient still passes unchanged through
the clipped extremes (kept simple: the extremes are few). Scales are dynamic (per token): no step size to learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .. import cpu_kernels, kernels
from .base import SpikingNeuron, register_neuron

SCALE_FLOOR = 1e-5  # a constant token (x_max == x_min) would divide by zero; OmniQuant's floor
GIF_BACKENDS = ("fused", "reference")
GROUP_RANGES = ("group", "token")  # where each channel group's per-token min/max comes from (module docstring)


def check_gif_options(
    bits: int,
    extra_bits: int,
    saliency_fraction: float,
    group_range: str = "group",
    clip_ratio: float = 1.0,
    group_size: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the bad argument if a GIF option is out of range."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 15:
        raise ValueError(f"bits must be an integer in [1, 15] (n, the bits of one spike level), got {bits!r}")
    if isinstance(extra_bits, bool) or not isinstance(extra_bits, int) or not 0 <= extra_bits <= 8:
        raise ValueError(
            f"extra_bits must be an integer in [0, 8] (a; salient channels spike T = 2^a steps), got {extra_bits!r}"
        )
    if bits + extra_bits > 24:
        raise ValueError(
            f"bits + extra_bits must be at most 24 (codes must be exact in float32), got {bits} + {extra_bits}"
        )
    if (
        isinstance(saliency_fraction, bool)
        or not isinstance(saliency_fraction, (int, float))
        or not 0 <= saliency_fraction <= 1
    ):
        raise ValueError(f"saliency_fraction must be a number in [0, 1], got {saliency_fraction!r}")
    _check_group_range(group_range)
    _check_clip_ratio(clip_ratio)
    _check_group_size(group_size, group_range)


def max_code(bits: int, extra_bits: int) -> int:
    """The top of the fine grid, ``2^a * (2^n - 1)``: what ``2^a`` spikes of at most ``2^n - 1`` sum to."""
    return (1 << extra_bits) * ((1 << bits) - 1)


def spike_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Quantiser arithmetic runs in float32 (float64 stays float64); half-precision inputs are upcast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_gain(salient: torch.Tensor | None, extra_bits: int) -> torch.Tensor:
    """int32 weight of one spike level per channel, in fine steps: 1 for salient channels, ``2^a`` for the others.

    ``salient=None`` (no saliency: every channel on the n-bit grid, whose step is then the scale) gives a scalar 1.
    """
    if salient is None:
        return torch.ones((), dtype=torch.int32)
    return torch.where(salient, 1, 1 << extra_bits).to(torch.int32)


def per_token_grid(x: torch.Tensor, top: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)``, each (..., 1) in the compute dtype, for codes 0..``top`` over ``x``'s last dimension.

    ``clip_ratio`` < 1 shrinks the range to ``[clip_ratio * min, clip_ratio * max]``: values beyond it clamp to the
    end codes (a finer grid for the bulk of the channels at the cost of the extremes).
    """
    xc = x.detach().to(_compute_dtype(x.dtype))
    x_min = xc.amin(dim=-1, keepdim=True) * clip_ratio
    x_max = xc.amax(dim=-1, keepdim=True) * clip_ratio
    scale = ((x_max - x_min) / top).clamp_min(SCALE_FLOOR)
    zero = torch.round(-x_min / scale)
    return scale, zero


def per_group_grid(
    x: torch.Tensor, member: torch.Tensor, top: int, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_token_grid` over the channels where ``member`` (a bool mask broadcastable to ``x``) is True.

    A token with no member channel gets ``min = max = 0``: scale ``SCALE_FLOOR``, zero 0 (finite, and unused).
    """
    xc = x.detach().to(_compute_dtype(x.dtype))
    member = torch.broadcast_to(member.to(device=xc.device, dtype=torch.bool), xc.shape)
    present = member.any(dim=-1, keepdim=True)
    x_min = torch.where(member, xc, float("inf")).amin(dim=-1, keepdim=True)
    x_max = torch.where(member, xc, float("-inf")).amax(dim=-1, keepdim=True)
    x_min = torch.where(present, x_min, 0.0) * clip_ratio
    x_max = torch.where(present, x_max, 0.0) * clip_ratio
    scale = ((x_max - x_min) / top).clamp_min(SCALE_FLOOR)
    zero = torch.round(-x_min / scale)
    return scale, zero


def _check_clip_ratio(clip_ratio: float) -> None:
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}")


def _check_group_range(group_range: str) -> None:
    if group_range not in GROUP_RANGES:
        raise ValueError(f"group_range must be one of {GROUP_RANGES}, got {group_range!r}")


def _check_group_size(group_size: int | None, group_range: str = "group") -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(
            f"group_size must be 0 or None (one range per channel set) or a positive integer (channels per range "
            f"group), got {group_size!r}"
        )
    if group_size and group_range != "group":
        raise ValueError(f"group_size {group_size} needs group_range='group' (per-group ranges), got {group_range!r}")


def range_groups(
    salient: torch.Tensor | None, channel_shape: Sequence[int], group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group, top_is_fine)`` for ranges per ``group_size`` channels inside each channel set (module docstring).

    ``group``: int64 of ``channel_shape``, each channel's range group. Within one row of the channel shape (e.g.
    one K/V head), the salient channels in channel order are cut into groups of ``group_size`` consecutive members
    (the last one may be smaller), then the other channels likewise. Groups ``0 .. F - 1`` are the fine (salient)
    ones, ``F .. F + K - 1`` the coarse ones, ``F`` / ``K`` the most any row needs (a row with fewer leaves its
    last groups empty). ``top_is_fine``: bool (F + K,), True for the fine groups. ``salient=None``: no saliency,
    every channel in the coarse set.
    """
    shape = tuple(channel_shape)
    if salient is None:
        salient = torch.zeros(shape, dtype=torch.bool)
    salient = torch.broadcast_to(salient.to(torch.bool), shape)
    rank_f = salient.long().cumsum(-1) - 1
    rank_c = (~salient).long().cumsum(-1) - 1
    count_f = int(salient.sum(-1).max()) if salient.numel() else 0
    count_c = int((~salient).sum(-1).max()) if salient.numel() else 0
    fine_groups = -(-count_f // group_size)
    coarse_groups = -(-count_c // group_size)
    group = torch.where(salient, rank_f // group_size, fine_groups + rank_c // group_size)
    top_is_fine = torch.arange(fine_groups + coarse_groups, device=salient.device) < fine_groups
    return group, top_is_fine


def per_range_group_grid(
    x: torch.Tensor, group: torch.Tensor, top: torch.Tensor, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)``, each (..., G) in the compute dtype: :func:`per_token_grid` over each range group's channels.

    ``group``: int64 per channel (broadcastable to ``x``) in ``0 .. G - 1``, ``top``: the top code of each group
    (G,). A group with no channel gets ``min = max = 0``: scale ``SCALE_FLOOR``, zero 0 (unused).
    """
    xc = x.detach().to(_compute_dtype(x.dtype))
    index = torch.broadcast_to(group.to(device=xc.device, dtype=torch.int64), xc.shape)
    width = top.shape[0]
    out_shape = (*xc.shape[:-1], width)
    x_min = xc.new_full(out_shape, float("inf")).scatter_reduce(-1, index, xc, "amin")
    x_max = xc.new_full(out_shape, float("-inf")).scatter_reduce(-1, index, xc, "amax")
    present = torch.isfinite(x_min)
    x_min = torch.where(present, x_min, 0.0) * clip_ratio
    x_max = torch.where(present, x_max, 0.0) * clip_ratio
    scale = ((x_max - x_min) / top.to(device=xc.device, dtype=xc.dtype)).clamp_min(SCALE_FLOOR)
    zero = torch.round(-x_min / scale)
    return scale, zero


def quantize_per_group(
    x: torch.Tensor,
    bits: int,
    extra_bits: int,
    salient: torch.Tensor | None,
    group_size: int,
    clip_ratio: float = 1.0,
    channel_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-shot quantiser with a range per ``group_size`` channels of each set: ``(code, scale, zero, group)``.

    ``code`` int32 on each channel's grid (fine ``[0, 2^a (2^n - 1)]`` for salient channels, ``[0, 2^n - 1]`` for
    the others), ``scale`` / ``zero`` (..., G) per range group, ``group`` int64 (``channel_shape``, default
    ``(C,)``) from :func:`range_groups`: :func:`dequantize` takes it as ``group=``. With ``group_size`` at least
    the size of each set, this is :func:`quantize_per_token` with ``group_range="group"`` (one range per set).
    """
    _check_clip_ratio(clip_ratio)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer here, got {group_size!r}")
    if salient is not None and extra_bits == 0:
        raise ValueError("salient channels need extra_bits > 0; pass salient=None for the plain n-bit quantiser")
    shape = tuple(channel_shape) if channel_shape is not None else (x.shape[-1],)
    group, top_is_fine = range_groups(salient.cpu() if salient is not None else None, shape, group_size)
    group, top_is_fine = group.to(x.device), top_is_fine.to(x.device)
    code, scale, zero = _quantize_on_range_groups(x, bits, extra_bits, group, top_is_fine, clip_ratio)
    return code, scale, zero, group


def _quantize_on_range_groups(x, bits, extra_bits, group, top_is_fine, clip_ratio):
    """``(code, scale, zero)`` for the range groups ``group`` (int64 per channel) whose tops are fine or coarse."""
    top = torch.where(top_is_fine, max_code(bits, extra_bits), (1 << bits) - 1)
    xc = x.detach().to(_compute_dtype(x.dtype))
    scale, zero = per_range_group_grid(xc, group, top, clip_ratio)
    index = torch.broadcast_to(group, xc.shape)
    code = torch.round(xc / scale.gather(-1, index)) + zero.gather(-1, index)
    channel_top = top[group].to(code.dtype)  # each channel's top code, the channel shape
    return torch.minimum(code, channel_top).clamp_(min=0).to(torch.int32), scale, zero


def quantize_per_token(
    x: torch.Tensor,
    bits: int,
    extra_bits: int,
    salient: torch.Tensor | None = None,
    group_range: str = "group",
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-shot quantiser: ``(code, scale, zero)``, ``code`` int32 on each channel's own grid.

    ``salient``: a bool mask broadcastable to ``x`` (over its channels), or None for no saliency. Without it every
    channel is on the n-bit grid of the whole token: ``scale`` is its step, ``zero`` (..., 1) (``group_range`` makes
    no difference). With it salient codes lie in ``[0, 2^a (2^n - 1)]``, the others in ``[0, 2^n - 1]``, and
    ``zero`` is (..., 2): the fine group's and the coarse group's zero points. ``group_range="group"``: each group's
    range is the min/max over its own channels, ``scale`` (..., 2) = (fine step, coarse step); ``"token"``: both
    over the whole token (SpikeLLM's code), ``scale`` (..., 1) the fine step, the coarse step ``2^a * scale``.
    ``clip_ratio``: every range is ``clip_ratio`` times the min/max (see :func:`per_token_grid`). See
    :func:`dequantize`.
    """
    _check_group_range(group_range)
    _check_clip_ratio(clip_ratio)
    level = (1 << bits) - 1
    xc = x.detach().to(_compute_dtype(x.dtype))
    if salient is None:
        scale, zero = per_token_grid(xc, level, clip_ratio)
        code = (torch.round(xc / scale) + zero).clamp_(0, level)
        return code.to(torch.int32), scale, zero
    top = max_code(bits, extra_bits)
    salient = salient.to(device=xc.device, dtype=torch.bool)
    if group_range == "group":
        if extra_bits == 0:
            raise ValueError(
                "group_range='group' with salient channels needs extra_bits > 0 (the channel gain "
                "tells the groups apart); pass salient=None for the plain n-bit quantiser"
            )
        scale_f, zero_f = per_group_grid(xc, salient, top, clip_ratio)
        scale_c, zero_c = per_group_grid(xc, ~salient, level, clip_ratio)
        fine = (torch.round(xc / scale_f) + zero_f).clamp_(0, top)
        coarse = (torch.round(xc / scale_c) + zero_c).clamp_(0, level)
        code = torch.where(salient, fine, coarse).to(torch.int32)
        return code, torch.cat([scale_f, scale_c], dim=-1), torch.cat([zero_f, zero_c], dim=-1)
    scale, zero_f = per_token_grid(xc, top, clip_ratio)
    ratio = xc / scale
    fine = (torch.round(ratio) + zero_f).clamp_(0, top)
    # dividing by 2^a is exact: the coarse group is bit for bit the saliency-free n-bit quantiser of this token
    step = 1 << extra_bits
    zero_c = torch.round(-xc.amin(dim=-1, keepdim=True) * clip_ratio / scale / step)
    coarse = (torch.round(ratio / step) + zero_c).clamp_(0, level)
    return torch.where(salient, fine, coarse).to(torch.int32), scale, torch.cat([zero_f, zero_c], dim=-1)


def _zero_per_channel(zero: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Each channel's zero point in fine steps: the fine zero, or ``2^a`` times the coarse one."""
    if zero.shape[-1] == 1:
        return zero
    return torch.where(gain == 1, zero[..., :1], zero[..., 1:] * gain)


def _fine_channels(gain: torch.Tensor | None) -> torch.Tensor:
    """Bool per channel: in the salient (fine) group. Per-group scales need the gain to tell the groups apart."""
    if gain is None:
        raise ValueError("per-group scales (fine, coarse) need the channel gain to tell the groups apart")
    return gain == 1


def dequantize(
    code: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    gain: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """The real values of :func:`quantize_per_token`'s output (or summed spikes), in ``scale``'s dtype.

    ``gain`` from :func:`channel_gain` (None: 1). ``scale`` (..., 2) (``group_range="group"``):
    ``x_hat = (code - zero_g) * scale_g`` with g the channel's group (gain 1: fine); ``scale`` (..., 1):
    ``x_hat = (gain * code - gain * zero_g) * scale``. ``group`` (from :func:`quantize_per_group`, ranges per
    ``group_size`` channels): ``x_hat = (code - zero[group]) * scale[group]``, ``gain`` unused.
    """
    if group is not None:
        index = torch.broadcast_to(group.to(code.device), code.shape)
        return (code - zero.gather(-1, index)) * scale.gather(-1, index)
    if scale.shape[-1] == 2:
        fine = _fine_channels(gain).to(code.device)
        step = torch.where(fine, scale[..., :1], scale[..., 1:])
        return (code - torch.where(fine, zero[..., :1], zero[..., 1:])) * step
    gain = (torch.ones((), dtype=torch.int32) if gain is None else gain).to(code.device)
    return (code * gain - _zero_per_channel(zero, gain)) * scale


def pack_grid(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """One tensor (..., 2), (..., 3) or (..., 4) holding a token's scale(s) and zero point(s) (a cache), in the
    quantiser's compute dtype (float32; float64 for float64 inputs), so cached tokens decode as the neuron does."""
    return torch.cat([scale, zero], dim=-1)


def unpack_grid(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` from :func:`pack_grid`: widths 2, 3, 4 are (1 + 1), (1 + 2), (2 + 2) entries; with ranges
    per ``group_size`` channels, 2G is (G + G)."""
    width = grid.shape[-1] // 2
    return grid[..., :width], grid[..., width:]


def reference_gif_spikes(membrane: torch.Tensor, bits: int, num_steps: int) -> torch.Tensor:
    """Spikes (T, ...) from integer start potentials, step by step: ``s = min(mem, 2^n - 1); mem -= s``."""
    level = (1 << bits) - 1
    mem = membrane.to(torch.int32).clone()
    spikes = []
    for _ in range(num_steps):
        s = torch.clamp(mem, max=level)
        mem -= s  # soft reset: the part not yet emitted stays
        spikes.append(s)
    return torch.stack(spikes).to(spike_dtype(bits))


def gif_spikes(membrane: torch.Tensor, bits: int, num_steps: int) -> torch.Tensor:
    """The same spikes in closed form: step t emits ``clamp(mem_0 - t (2^n - 1), 0, 2^n - 1)``."""
    level = (1 << bits) - 1
    offsets = torch.arange(num_steps, device=membrane.device, dtype=torch.int32) * level
    offsets = offsets.view(-1, *([1] * membrane.dim()))
    return (membrane.to(torch.int32).unsqueeze(0) - offsets).clamp_(0, level).to(spike_dtype(bits))


def _summed_codes(spikes: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    total = spikes.to(torch.int32).sum(0)
    return total if gain is None else total * gain.to(total.device)


def _zero_term(zero: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """``W Z`` for the per-channel zero points Z (in fine steps): one row-sum per channel group, (..., O)."""
    if zero.shape[-1] == 1:
        return zero * weight.sum(1)
    if gain is None:
        raise ValueError("two zero points (fine, coarse) need the channel gain to tell the groups apart")
    gain = gain.to(weight.device)
    fine = (gain == 1).to(weight.dtype)
    rows_fine = weight @ fine
    rows_coarse = weight @ (gain.to(weight.dtype) * (1 - fine))
    return zero[..., :1] * rows_fine + zero[..., 1:] * rows_coarse


def _linear_out(acc, scale, zero, weight, bias, gain, dtype):
    y = (acc - _zero_term(zero.to(dtype), weight.to(dtype), gain)) * scale.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(weight.dtype)


def _group_weights(weight: torch.Tensor, gain: torch.Tensor | None, dtype: torch.dtype):
    """``(W_f, W_c)``: ``weight`` (O, C) in ``dtype`` with the other group's columns zeroed."""
    fine = _fine_channels(gain).to(weight.device)
    w = weight.to(dtype)
    return w * fine.to(dtype), w * (~fine).to(dtype)


def _group_linear_out(acc_f, acc_c, scale, zero, w_f, w_c, weight, bias, dtype):
    """``(acc_f - zero_f W_f.sum(1)) * scale_f + (acc_c - zero_c W_c.sum(1)) * scale_c + bias``."""
    scale, zero = scale.to(dtype), zero.to(dtype)
    y = (acc_f - zero[..., :1] * w_f.sum(1)) * scale[..., :1] + (acc_c - zero[..., 1:] * w_c.sum(1)) * scale[..., 1:]
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(weight.dtype)


def gif_linear(
    spikes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer on GIF spikes, summed path.

    ``spikes`` (T, ..., C) integers, ``scale`` (..., 1) or (..., 2), ``zero`` (..., 1) or (..., 2) (fine, coarse),
    ``weight`` (O, C), ``gain`` (C,) from :func:`channel_gain` (None: 1; needed with two groups). With one scale
    (``group_range="token"``, or no saliency): ``((sum_t gain * s_t) W^T - W Z) * scale + bias``, ``W Z`` one
    zero-point term per group, ``zero_f * W_f.sum(1) + zero_c * (2^a W_c).sum(1)``. With two scales
    (``"group"``): ``(sum_t s_t W_f^T - zero_f W_f.sum(1)) * scale_f + (sum_t s_t W_c^T - zero_c W_c.sum(1)) *
    scale_c + bias`` (``W_f`` / ``W_c``: the salient / other columns). The integer sums are exact, so this equals
    :func:`reference_gif_linear` up to float summation order. Computes in float32 (float64 stays float64);
    returns ``weight``'s dtype. ``group`` (ranges per ``group_size`` channels, :func:`quantize_per_group`): one
    integer accumulator, zero-point term and scale multiply per range group g, ``sum_g (sum_t s_t W_g^T -
    zero_g W_g.sum(1)) * scale_g + bias``; the summed path computes it as ``dequantize(sum_t s_t) W^T + bias``.
    """
    dtype = _compute_dtype(weight.dtype)
    if group is not None:
        x_hat = dequantize(spikes.to(torch.int32).sum(0).to(dtype), scale.to(dtype), zero.to(dtype), group=group)
        y = x_hat @ weight.to(dtype).t()
        return (y if bias is None else y + bias.to(dtype)).to(weight.dtype)
    if scale.shape[-1] == 2:
        w_f, w_c = _group_weights(weight, gain, dtype)
        total = spikes.to(torch.int32).sum(0).to(dtype)
        return _group_linear_out(total @ w_f.t(), total @ w_c.t(), scale, zero, w_f, w_c, weight, bias, dtype)
    acc = _summed_codes(spikes, gain).to(dtype) @ weight.to(dtype).t()
    return _linear_out(acc, scale, zero, weight, bias, gain, dtype)


def reference_gif_linear(
    spikes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`gif_linear` as the spiking hardware runs it: one matrix product per step (per channel group with two
    scales; per range group with ``group``), accumulated over T."""
    dtype = _compute_dtype(weight.dtype)
    if group is not None:
        return _reference_range_group_linear(spikes, scale, zero, weight, bias, group, dtype)
    if scale.shape[-1] == 2:
        w_f, w_c = _group_weights(weight, gain, dtype)
        acc_f = acc_c = None
        for s_t in spikes:
            levels = s_t.to(torch.int32).to(dtype)  # integer levels: additions only
            step_f, step_c = levels @ w_f.t(), levels @ w_c.t()
            acc_f = step_f if acc_f is None else acc_f + step_f
            acc_c = step_c if acc_c is None else acc_c + step_c
        return _group_linear_out(acc_f, acc_c, scale, zero, w_f, w_c, weight, bias, dtype)
    w = weight.to(dtype).t()
    acc = None
    for s_t in spikes:
        levels = s_t.to(torch.int32) if gain is None else s_t.to(torch.int32) * gain.to(s_t.device)
        step = levels.to(dtype) @ w  # integer levels: additions only (a coarse spike's 2^a is a shift)
        acc = step if acc is None else acc + step
    return _linear_out(acc, scale, zero, weight, bias, gain, dtype)


def _reference_range_group_linear(spikes, scale, zero, weight, bias, group, dtype):
    """Per step and range group g, the integer levels of g's channels times ``W_g``, accumulated over T; then per
    group ``(acc_g - zero_g * W_g.sum(1)) * scale_g``, summed over the groups, plus the bias."""
    if group.dim() != 1:
        raise ValueError(f"a linear layer reads one channel dimension; got range groups of shape {tuple(group.shape)}")
    groups = scale.shape[-1]
    member = torch.nn.functional.one_hot(group.to(weight.device), groups).to(dtype)  # (C, G)
    w = weight.to(dtype)
    w_groups = w.t().unsqueeze(0) * member.t().unsqueeze(-1)  # (G, C, O): W_g^T, the other columns zeroed
    acc = None
    for s_t in spikes:
        levels = s_t.to(torch.int32).to(dtype)  # integer levels: additions only
        step = torch.einsum("...c,gco->...go", levels, w_groups)
        acc = step if acc is None else acc + step
    rows = (w @ member).t()  # (G, O): each group's row sums of W
    scale, zero = scale.to(dtype).unsqueeze(-1), zero.to(dtype).unsqueeze(-1)
    y = ((acc - zero * rows) * scale).sum(-2)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Saliency from calibration.
# ----------------------------------------------------------------------------------------------


def _as_list(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, (torch.Tensor, nn.Module)) else list(x)


def _weight_of(item) -> torch.Tensor:
    return item.weight if isinstance(item, nn.Module) else item


def saliency_scores(
    x: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | nn.Module | Sequence[torch.Tensor | nn.Module] | None = None,
    channel_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-channel saliency of a neuron's input, float64, of shape ``channel_shape`` (default ``(C,)``).

    ``x``: the calibration inputs (..., C), one tensor or a list of batches (all tokens count equally).
    ``weights``: every weight (O_i, C) reading this input (e.g. q/k/v; tensors or ``nn.Linear`` modules), stacked
    vertically into ``W``; the score is SpikeLLM's ``mean over tokens of x_c * (x W^T W)_c`` (signed: channels are
    ranked by it as it is). It is computed as ``sum_d (X^T X)_{cd} (W^T W)_{dc} / N``, accumulating the C x C
    matrix ``X^T X`` over the batches.
    ``weights=None`` (K and V after projection: nothing but attention reads them) scores ``mean x_c^2``; then
    ``channel_shape`` may span several trailing dimensions, broadcast against ``x`` (e.g. ``(H, 1, d)`` for
    (B, H, L, d) keys: one score per head-channel), every other dimension averaged.
    """
    xs = _as_list(x)
    if weights is None:
        shape = tuple(channel_shape) if channel_shape is not None else (xs[0].shape[-1],)
        total = torch.zeros(shape, dtype=torch.float64, device=xs[0].device)
        count = 0
        for xb in xs:
            sq = xb.detach().double().pow(2)
            lead = sq.dim() - len(shape)
            dims = tuple(range(lead)) + tuple(lead + i for i, size in enumerate(shape) if size == 1)
            total += sq.sum(dim=dims, keepdim=True).reshape(shape)
            count += sq.numel() // total.numel()
        return total / max(count, 1)
    if channel_shape is not None and len(tuple(channel_shape)) != 1:
        raise ValueError(
            f"saliency_scores with weights needs one channel dimension, got channel_shape={tuple(channel_shape)}"
        )
    w = torch.cat([_weight_of(wi).detach() for wi in _as_list(weights)], dim=0).double()
    channels = w.shape[1]
    gram_x = torch.zeros(channels, channels, dtype=torch.float64, device=w.device)
    count = 0
    for xb in xs:
        if xb.shape[-1] != channels:
            raise ValueError(f"calibration input has {xb.shape[-1]} channels, the weights read {channels}")
        rows = xb.detach().reshape(-1, channels).double().to(w.device)
        gram_x += rows.t() @ rows
        count += rows.shape[0]
    return (gram_x * (w.t() @ w)).sum(0) / max(count, 1)


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of ``scores``' shape: True on the highest ``numel - int((1 - fraction) * numel)`` scores.

    That count is SpikeLLM's (it keeps the lowest ``int(low_p * C)`` channels at n bits, ``low_p = 1 - fraction``):
    58 of 576 channels at 10 %, 29 at 5 %.
    """
    k = scores.numel() - int((1 - fraction) * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k).indices] = True
    return mask.view(scores.shape)


# ----------------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------------


class GIFSpikes(NamedTuple):
    """What :meth:`GIFNeuron.spike` emits: integer ``spikes`` (T, ..., C), the per-token ``scale`` ((..., 2) with
    saliency and ``group_range="group"``: fine step, coarse step; else (..., 1): the fine step), the integer zero
    points ``zero`` ((..., 2): salient group, other group; (..., 1) without saliency) and the per-channel ``gain``
    (int32: 1 on salient channels, 2^a on the one-step ones; it tells the groups apart, and with one scale it is
    the fine steps per level of a one-step channel). With ranges per ``group_size`` channels, ``scale`` and
    ``zero`` are (..., G), one per range group, and ``group`` (int64, the channel shape) is each channel's range
    group (:func:`range_groups`); else ``group`` is None."""

    spikes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    gain: torch.Tensor
    group: torch.Tensor | None = None

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None, per_step: bool = False) -> torch.Tensor:
        """A linear layer on these spikes: :func:`gif_linear` (or, ``per_step``, :func:`reference_gif_linear`)."""
        fn = reference_gif_linear if per_step else gif_linear
        return fn(self.spikes, self.scale, self.zero, weight, bias, self.gain, self.group)


class GIFStats:
    """Spike counts a GIF neuron accumulates while ``record_stats`` is on.

    Per step t: ``events[t]`` nonzero spikes, ``levels[t]`` the sum of their levels (integers >= 0; a spike of
    level k costs k accumulates per fan-out), ``slots[t]`` the channel-steps that could fire (every channel at
    t = 0, salient ones after). ``tokens`` counts quantised vectors: each costs, per output, ``scales`` multiplies
    by a scale (2 with saliency and per-group ranges, else 1) and one zero-point multiply-accumulate per channel
    group (``groups``: 2 with saliency, 1 without; W's row sums are constants), plus ``scales - 1`` additions of the
    groups' partial outputs. With one scale a coarse spike's weight 2^a is a shift.
    """

    def __init__(self, num_steps: int, device=None):
        self.events = torch.zeros(num_steps, dtype=torch.int64, device=device)
        self.levels = torch.zeros(num_steps, dtype=torch.int64, device=device)
        self.slots = torch.zeros(num_steps, dtype=torch.int64, device=device)
        self.tokens = 0
        self.groups = 1
        self.scales = 1
        self.calls = 0

    def add(self, spikes: torch.Tensor, slots: torch.Tensor, tokens: int, groups: int, scales: int = 1) -> None:
        flat = spikes.reshape(spikes.shape[0], -1)
        steps = flat.shape[0]
        self.events[:steps] += (flat > 0).sum(1).to(self.events.device)
        self.levels[:steps] += flat.to(torch.int64).sum(1).to(self.levels.device)
        self.slots[:steps] += slots.to(self.slots.device)
        self.tokens += tokens
        self.groups = groups
        self.scales = scales
        self.calls += 1

    def firing_rate(self) -> torch.Tensor:
        return self.events.double() / self.slots.clamp_min(1).double()

    def as_dict(self) -> dict:
        return {
            "firing_rate": self.firing_rate().tolist(),
            "spikes": self.events.tolist(),
            "levels": self.levels.tolist(),
            "slots": self.slots.tolist(),
            "tokens": self.tokens,
            "groups": self.groups,
            "scales": self.scales,
        }


@register_neuron
class GIFNeuron(SpikingNeuron):
    """SpikeLLM's GIF neuron on a real-valued input (..., C); see the module docstring for the maths.

    Args:
        channels: C, or a channel shape broadcast against the input's trailing dimensions (e.g. ``(H, 1, d)`` for
            (B, H, L, d) keys: one salient flag per head-channel). The per-token range is always taken over the
            last dimension.
        bits: n, the bits of one spike level (levels 0..2^n - 1).
        extra_bits: a; salient channels spike over ``T = 2^a`` steps (the fine grid), the others in one step.
        saliency_fraction: the share of channels :meth:`calibrate` marks salient (SpikeLLM: 0.1 with a=1, 0.05
            with a=2). 0, or never calibrating, means no saliency: every channel n bits in one step.
        backend: ``"fused"`` (the one-shot quantiser, default) or ``"reference"`` (runs the spikes step by step
            and sums them); not saved with the model.
        group_range: ``"group"`` (default): each channel group's per-token scale and zero point from the min/max
            over its own channels; ``"token"``: over the whole token, as SpikeLLM's released code (see the module
            docstring). No difference without saliency. Not in the state dict: the conversion config carries it.
        clip_ratio: each per-token range is ``clip_ratio`` times the min/max (1: no clipping); values beyond it
            take the end codes. Not in the state dict either.
        group_size: 0 or None (default): one range per channel set (salient, other) and token; G > 0: one range
            (scale and zero point) per G consecutive channels of each set (in channel order; a set's last group may
            be smaller), per token (group-wise activation quantisation; needs ``group_range="group"``). Without
            saliency, one range per G consecutive channels. Not in the state dict (the conversion config carries it).

    ``salient`` is a bool buffer of shape ``channels`` saved in the state dict.

    As a plug-in (:class:`~spikelm.nn.neurons.base.SpikingNeuron`), ``neuron="gif"``: the network runs once (the
    steps are internal to the neuron). Its conversion-config fields:

    * ``gif_bits`` (int): n, the base bit-width: one multi-level spike carries at most 2^n - 1.
    * ``gif_extra_bits`` (int): a, the extra bits of the salient channels: they run over T = 2^a steps.
    * ``saliency_fraction`` (float): the fraction of input channels (by calibration saliency) that get the extra
      steps; 0 gives every channel n bits in one step.
    * ``gif_group_range`` (str): ``"group"``: each channel group (salient, other) takes its per-token scale and zero
      point from its own channels' min/max, so outlier channels do not stretch the others' grid (the default: far
      better on real LLMs); ``"token"``: both groups over the whole token's range, as SpikeLLM's code.
    * ``gif_clip_ratio`` (float): each per-token range is this fraction of the min/max (1: no clipping; 0.9 is
      QuaRot's activation clip ratio); values beyond it take the end codes.
    * ``gif_group_size`` (int): 0 (default): one per-token range per channel group (salient, other); G > 0: one
      range (scale and zero point) per G consecutive channels inside each group (group-wise activation
      quantisation, as Atom/QuaRot's group variants; a group's last range may cover fewer than G channels). Needs
      ``gif_group_range="group"``.
    """

    name = "gif"
    display_name = "GIF"
    config_fields = {
        "gif_bits": 4,
        "gif_extra_bits": 1,
        "saliency_fraction": 0.1,
        "gif_group_range": "group",
        "gif_clip_ratio": 1.0,
        "gif_group_size": 0,
    }
    # the named recipe (spikify --neuron gif; the default before the signed recipe): T = 2 (n = 4, a = 1, the top
    # 10 % of channels), per-token ranges per 64 consecutive channels of each channel group, clipped to 0.9 of the
    # min/max (docs/CONVERSION.md, the ladder)
    recipe_defaults = {
        "neuron": "gif",
        "gif_bits": 4,
        "gif_extra_bits": 1,
        "saliency_fraction": 0.1,
        "gif_group_range": "group",
        "gif_clip_ratio": 0.9,
        "gif_group_size": 64,
    }
    cache_layout = "token_codes"
    traceless_fields = ("gif_bits", "gif_extra_bits", "gif_group_range", "gif_clip_ratio", "gif_group_size")

    def __init__(
        self,
        channels: int | Sequence[int],
        bits: int = 4,
        extra_bits: int = 1,
        saliency_fraction: float = 0.1,
        backend: str = "fused",
        group_range: str = "group",
        clip_ratio: float = 1.0,
        group_size: int | None = None,
    ):
        super().__init__()
        check_gif_options(bits, extra_bits, saliency_fraction, group_range, clip_ratio, group_size)
        self.group_size = group_size or 0
        self.channel_shape = (channels,) if isinstance(channels, int) else tuple(channels)
        self.bits = bits
        self.extra_bits = extra_bits
        self.saliency_fraction = float(saliency_fraction)
        self.backend = backend
        self.group_range = group_range
        self.clip_ratio = clip_ratio
        self.register_buffer("salient", torch.zeros(self.channel_shape, dtype=torch.bool))
        self.record_stats = False
        self.stats: GIFStats | None = None
        self._has_salient: bool | None = None  # cache of salient.any(): no host sync per call
        self._range_groups: tuple[torch.Tensor, torch.Tensor] | None = None  # cache of range_groups()
        self._code_plan: tuple | None = None  # cache of code_plan()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in GIF_BACKENDS:
            raise ValueError(f"backend must be one of {GIF_BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def num_steps(self) -> int:
        """T: 2^a with salient channels, 1 without."""
        return 1 << self.extra_bits if self.has_saliency() else 1

    @property
    def max_level(self) -> int:
        return (1 << self.bits) - 1

    def extra_repr(self) -> str:
        return (
            f"channels={self.channel_shape}, bits={self.bits}, extra_bits={self.extra_bits}, "
            f"saliency_fraction={self.saliency_fraction}, group_range={self.group_range!r}, "
            f"clip_ratio={self.clip_ratio}" + (f", group_size={self.group_size}" if self.group_size else "")
        )

    def has_saliency(self) -> bool:
        if self._has_salient is None:
            self._has_salient = bool(self.salient.any()) and self.extra_bits > 0
        return self._has_salient

    def _load_from_state_dict(self, *args, **kwargs):
        self._has_salient = None
        self._range_groups = None
        self._code_plan = None
        super()._load_from_state_dict(*args, **kwargs)

    def range_groups(self, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(group, top_is_fine)`` of :func:`range_groups` for this neuron's mask (None when ``group_size`` is 0)."""
        if not self.group_size:
            return None
        if self._range_groups is None:
            salient = self.salient.cpu() if self.has_saliency() else None
            self._range_groups = range_groups(salient, self.channel_shape, self.group_size)
        group, fine = self._range_groups
        return (group.to(device), fine.to(device)) if device is not None else (group, fine)

    def range_group_counts(self) -> torch.Tensor:
        """int64 per row of the channel shape (one entry for a linear input, one per K/V head): the range groups
        (scale and zero point pairs) of one token, counting only groups with channels: 2 with saliency (1
        without) and ``group_size`` 0 or None; else ``ceil(salient / G) + ceil(others / G)`` in that row."""
        salient = self.salient if self.has_saliency() else torch.zeros_like(self.salient)
        rows = salient.reshape(-1, salient.shape[-1])
        if not self.group_size:
            return torch.full((rows.shape[0],), 2 if self.has_saliency() else 1, dtype=torch.int64)
        fine = rows.sum(-1).long()
        coarse = rows.shape[-1] - fine
        size = self.group_size
        return (fine + size - 1) // size + (coarse + size - 1) // size

    def reset_stats(self) -> None:
        self.stats = None

    @torch.no_grad()
    def set_salient(self, mask: torch.Tensor) -> None:
        """Mark channels salient (bool, shape ``channels``)."""
        if tuple(mask.shape) != self.channel_shape:
            raise ValueError(f"salient mask must have shape {self.channel_shape}, got {tuple(mask.shape)}")
        self.salient.copy_(mask.to(torch.bool))
        self._has_salient = None
        self._range_groups = None
        self._code_plan = None

    @torch.no_grad()
    def calibrate(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | nn.Module | Sequence[torch.Tensor | nn.Module] | None = None,
    ) -> torch.Tensor:
        """Set the salient mask from calibration inputs: the top ``saliency_fraction`` of :func:`saliency_scores`.

        ``weights``: every weight reading this input (None for K/V: ``mean x_c^2``). Returns the scores.
        """
        scores = saliency_scores(x, weights, None if weights is not None else self.channel_shape)
        if tuple(scores.shape) != self.channel_shape:
            raise ValueError(f"scores of shape {tuple(scores.shape)} do not match channels {self.channel_shape}")
        fraction = self.saliency_fraction if self.extra_bits > 0 else 0.0
        self.set_salient(top_fraction_mask(scores, fraction).to(self.salient.device))
        return scores

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        trailing = tuple(x.shape[x.dim() - len(self.channel_shape) :]) if x.dim() >= len(self.channel_shape) else ()
        if (
            len(trailing) != len(self.channel_shape)
            or any(c not in (1, t) for c, t in zip(self.channel_shape, trailing, strict=True))
            or x.shape[-1] != self.channel_shape[-1]
        ):
            raise ValueError(
                f"{type(self).__name__} was built for channels {self.channel_shape}; got an input of "
                f"shape {tuple(x.shape)}"
            )

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.has_saliency():
            return None
        return self.salient.to(x.device)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one-shot quantiser: ``(code, scale, zero)``, see :func:`quantize_per_token` (with ``group_size``:
        :func:`quantize_per_group`, ``scale``/``zero`` (..., G) per range group, see :meth:`range_groups`)."""
        self._check_input(x)
        if self.group_size:
            return self._quantize_groups(x)
        return quantize_per_token(x, self.bits, self.extra_bits, self._mask(x), self.group_range, self.clip_ratio)

    def _quantize_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        group, top_is_fine = self.range_groups(x.device)
        return _quantize_on_range_groups(x, self.bits, self.extra_bits, group, top_is_fine, self.clip_ratio)

    def dequantize(self, code: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The real values of :meth:`quantize`'s codes (or of summed spikes): :func:`dequantize` with this neuron's
        channel gain and range groups."""
        groups = self.range_groups(code.device)
        return dequantize(code, scale, zero, self.gain(code.device), groups[0] if groups is not None else None)

    def gain(self, device=None) -> torch.Tensor:
        """The int32 channel gain (1 salient, 2^a one-step channels; scalar 1 without saliency), see
        :class:`GIFSpikes`."""
        gain = channel_gain(self.salient if self.has_saliency() else None, self.extra_bits)
        return gain.to(device if device is not None else self.salient.device)

    def spike(self, x: torch.Tensor) -> GIFSpikes:
        """Run the neuron: integer spikes (T, ..., C), the per-token scale and zero points, the channel gain."""
        code, scale, zero = self.quantize(x)
        make = reference_gif_spikes if self.backend == "reference" else gif_spikes
        spikes = make(code, self.bits, self.num_steps)  # the membrane starts at the code
        if self.record_stats:
            self._record(spikes, x)
        groups = self.range_groups(x.device)
        return GIFSpikes(spikes, scale, zero, self.gain(x.device), groups[0] if groups is not None else None)

    def code_plan(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(group, top)`` for the C++ pass (:func:`spikelm.nn.cpu_kernels.token_codes`): each channel's range group
        (int32, (rows of the channel shape, C)) and each group's top code (float32 (G,)), the quantiser of
        :meth:`quantize` written as range groups: ranges per ``group_size`` channels (:func:`range_groups`), or one
        per channel set (salient, other: the same min, max, scale and zero as :func:`per_group_grid`), or one per
        token without saliency (:func:`per_token_grid`). None for whole-token ranges with saliency (another
        formula: the PyTorch path)."""
        if self._code_plan is None:
            level, fine_top = self.max_level, max_code(self.bits, self.extra_bits)
            plan = None
            if self.group_size:
                group, fine = self.range_groups()
                plan = group, torch.where(fine, fine_top, level)
            elif not self.has_saliency():
                plan = torch.zeros(self.channel_shape, dtype=torch.int64), torch.tensor([level])
            elif self.group_range == "group":
                plan = torch.where(self.salient.cpu(), 0, 1), torch.tensor([fine_top, level])
            if plan is not None:
                group, top = plan
                plan = group.reshape(-1, group.shape[-1]).to(torch.int32).contiguous(), top.to(torch.float32)
            self._code_plan = (plan,)
        return self._code_plan[0]

    def fused_codes(self, x: torch.Tensor, want_code: bool = False, pack_bits: int = 0, code_offset: int = 0):
        """:class:`~spikelm.nn.cpu_kernels.TokenCodes` ``(x_hat, code, scale, zero, grid)`` of ``x`` in one C++ pass
        where the dispatcher takes it (:func:`spikelm.nn.kernels.token_code_kernel`: CPU float32 outside autograd)
        and the layout is one it knows; else None. ``x_hat`` is :meth:`forward`'s value, ``code`` / ``scale`` /
        ``zero`` :meth:`quantize`'s (``code`` None unless ``want_code``; with ``pack_bits``, the codes plus
        ``code_offset`` as bit planes), ``grid`` :func:`pack_grid` of them, bit for bit."""
        if self.backend != "fused" or kernels.token_code_kernel(x) != kernels.CPP:
            return None
        plan = self.code_plan()
        rows = cpu_kernels.code_rows(self.channel_shape, x.shape)
        if plan is None or rows is None or x.shape[-1] != self.channel_shape[-1]:
            return None
        group, top = plan
        return cpu_kernels.token_codes(
            x,
            group,
            top,
            rows[1],
            self.clip_ratio,
            floor=SCALE_FLOOR,
            want_code=want_code,
            pack_bits=pack_bits,
            code_offset=code_offset,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantised input (x's shape and dtype): hooking this onto a linear layer's input is
        :func:`gif_linear` on :meth:`spike`. Straight-through gradient (identity) to ``x``."""
        if not self.record_stats:
            fast = self.fused_codes(x)  # the C++ pass where it runs (CPU float32 outside autograd): the same bits
            if fast is not None:
                return fast[0]
        with torch.no_grad():
            if self.backend == "reference":
                spikes, scale, zero, _, _ = self.spike(x)
                code = spikes.to(torch.int32).sum(0)
            else:
                code, scale, zero = self.quantize(x)
                if self.record_stats:
                    self._record(gif_spikes(code, self.bits, self.num_steps), x)
            out = self.dequantize(code, scale, zero).to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            out = out + (x - x.detach())  # value exactly `out`, gradient the identity
        return out

    def _record(self, spikes: torch.Tensor, x: torch.Tensor) -> None:
        steps = spikes.shape[0]
        if self.stats is None:
            self.stats = GIFStats(1 << self.extra_bits, device=x.device)
        per_token = spikes[0].numel() // max(x.shape[-1], 1)
        mask = self._mask(x)
        channel_slots = spikes[0].numel()
        salient_slots = int(torch.broadcast_to(mask, x.shape).sum()) if mask is not None else 0
        slots = torch.tensor([channel_slots] + [salient_slots] * (steps - 1), dtype=torch.int64)
        groups = 2 if mask is not None else 1
        scales = groups if self.group_range == "group" else 1
        if self.group_size:
            groups = scales = int(self.range_group_counts().max())
        self.stats.add(spikes, slots, per_token, groups, scales)

    # -- the plug-in interface (spikelm.nn.neurons.base.SpikingNeuron) ----------------------------------------------

    @classmethod
    def config_values(cls, given: dict) -> dict:
        values = super().config_values(given)
        if values["gif_group_size"] is None:
            values["gif_group_size"] = 0
        return values

    @classmethod
    def check_config(cls, fields) -> None:
        size, group_range = cls.field(fields, "gif_group_size"), cls.field(fields, "gif_group_range")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(
                f"gif_group_size must be 0 (one range per channel group) or a positive integer (channels per range), "
                f"got {size!r}"
            )
        if size and group_range != "group":
            raise ValueError(f"gif_group_size={size} needs gif_group_range='group', got {group_range!r}")
        check_gif_options(
            cls.field(fields, "gif_bits"),
            cls.field(fields, "gif_extra_bits"),
            cls.field(fields, "saliency_fraction"),
            group_range,
            cls.field(fields, "gif_clip_ratio"),
            size,
        )

    @classmethod
    def time_steps(cls, fields) -> int:
        """T = 2^a (the salient channels' steps)."""
        return 2 ** cls.field(fields, "gif_extra_bits")

    @classmethod
    def recipe(cls, num_steps: int | None = None) -> dict:
        """``num_steps`` T = 2^a (a power of two) sets ``gif_extra_bits``."""
        fields = dict(cls.recipe_defaults)
        if num_steps is not None:
            extra = int(math.log2(num_steps))
            if 2**extra != num_steps:
                raise ValueError(f"--num-steps with --neuron gif must be a power of two (T = 2^a), got {num_steps}")
            fields["gif_extra_bits"] = extra
        return fields

    @classmethod
    def finish_recipe(cls, fields: dict, overrides: dict) -> dict:
        """Whole-token ranges have no channel groups to cut: the recipe's group size is dropped (unless given)."""
        if fields.get("gif_group_range") == "token" and "gif_group_size" not in overrides:
            fields["gif_group_size"] = 0
        return fields

    @classmethod
    def from_config(cls, fields, channels, per_step: bool) -> GIFNeuron:
        return cls(
            channels,
            bits=cls.field(fields, "gif_bits"),
            extra_bits=cls.field(fields, "gif_extra_bits"),
            saliency_fraction=cls.field(fields, "saliency_fraction"),
            group_range=cls.field(fields, "gif_group_range"),
            clip_ratio=cls.field(fields, "gif_clip_ratio"),
            group_size=cls.field(fields, "gif_group_size"),
        )

    @classmethod
    def describe(cls, fields) -> str:
        f = {name: cls.field(fields, name) for name in cls.config_fields}
        if f["gif_group_range"] == "token":
            ranges = "over the whole token (SpikeLLM's code)"
        elif f["gif_group_size"]:
            ranges = f"per {f['gif_group_size']} consecutive channels of each channel group (salient, other)"
        else:
            ranges = "per channel group (salient, other)"
        return (
            f"SpikeLLM's GIF neuron: n = {f['gif_bits']} base bits, a = {f['gif_extra_bits']} extra bits "
            f"(T = {2 ** f['gif_extra_bits']} steps) for the top {f['saliency_fraction']:.0%} of channels by "
            f"calibration saliency; per-token ranges {ranges}, clipped to {f['gif_clip_ratio']:g} of the min/max"
        )

    @classmethod
    def summary(cls, fields) -> str:
        extra, saliency = cls.field(fields, "gif_extra_bits"), cls.field(fields, "saliency_fraction")
        return f"GIF neuron n={cls.field(fields, 'gif_bits')}, a={extra} (T={2**extra}), saliency {saliency}"

    @classmethod
    def steps_summary(cls, fields) -> str:
        extra = cls.field(fields, "gif_extra_bits")
        return f"GIF neuron, T = {2**extra} steps, {cls.field(fields, 'gif_bits')}-bit spike levels"

    def step_spikes(self, x: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The spikes of the neuron's own quantiser on ``x`` (its output is their dequantised sum), levels
        0..2^n - 1."""
        with torch.no_grad():
            code = self.quantize(x)[0]
            spikes = gif_spikes(code, self.bits, self.num_steps).long()
        return spikes, (spikes > 0).long()

    def step_counts(self) -> torch.Tensor | None:
        """Spikes (levels >= 0: all counted positive) and slots per step."""
        if self.stats is None:
            return None
        events = self.stats.events
        return torch.stack([events, torch.zeros_like(events), self.stats.slots.to(events.device)])

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`gif_linear` on :meth:`spike`: the integer spikes accumulated once, a zero-point term and a scale
        multiply per range group."""
        return self.spike(x).linear(weight, bias)

    def reset_calibration(self) -> None:
        self.set_salient(torch.zeros_like(self.salient))

    def calibration_recorder(self, reader_weights):
        """A :class:`SaliencyRecorder`: the neuron passes its input through while calibrating, and its salient
        channels are set from every batch by ``finish()``."""
        return SaliencyRecorder(self, reader_weights)

    def reader_terms(self) -> torch.Tensor:
        """Scale multiplies plus zero-point terms per token and output of this neuron's reader, per row of its channel
        shape (one entry for a linear input, one per K/V head): one scale multiply per range (2 with saliency and
        per-group ranges, else 1) and one zero-point term per channel group (2 with saliency, else 1); with
        ``group_size`` G, one of each per range group, ``ceil(salient / G) + ceil(others / G)`` of them."""
        if getattr(self, "group_size", 0):
            return 2 * self.range_group_counts()
        salient = self.has_saliency()
        terms = (2 if salient and self.group_range == "group" else 1) + (2 if salient else 1)
        rows = self.salient.numel() // self.salient.shape[-1]
        return torch.full((rows,), terms, dtype=torch.int64)

    def reader_weight_reads(self) -> int:
        """The row sums of W the zero-point terms ``zero_g x rowsum_g(W)`` need, one per zero-point group and output:
        2 with saliency, else 1; with ``group_size`` G, one per range group of a linear input's channels."""
        if getattr(self, "group_size", 0):
            return int(self.range_group_counts()[0])
        return 2 if self.has_saliency() else 1

    def slots(self, steps: int, rows: int, width: int) -> torch.Tensor:
        """Every channel at step 0, the salient ones after (the others' codes fit one spike)."""
        slots = torch.full((steps,), rows * width, dtype=torch.int64)
        if steps > 1:
            salient = int(self.salient.sum()) if self.has_saliency() else 0
            slots[1:] = rows * salient
        return slots

    def reader_macs(self, steps: int, outputs: int) -> torch.Tensor:
        """Per output one multiply per scale and one per zero point (:meth:`reader_terms`), once."""
        macs = torch.zeros(steps, dtype=torch.int64)
        macs[0] = outputs * int(self.reader_terms().sum())
        return macs

    def attention_ops(
        self, product: str, steps: int, pairs: int, heads: int, head_dim: int, queries: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per score (Q K^T) and per query-key pair and head (P V, where P is first scaled by each key's scale) one
        multiply per scale and one per zero point of the K/V head (read by the ``heads // kv_heads`` query heads
        sharing it); the zero-point term of Q K^T needs each query's row sums: ``head_dim`` accumulates per head."""
        terms = self.reader_terms()
        macs = torch.zeros(steps, dtype=torch.int64)
        macs[0] = pairs * (heads // terms.numel()) * int(terms.sum())
        extra = torch.zeros(steps, dtype=torch.int64)
        if product == "scores":
            extra[0] = queries * heads * head_dim
        return macs, extra


class SaliencyRecorder:
    """While calibrating, a GIF neuron passes its input through unchanged and its saliency statistic is summed
    (SpikeLLM's score, :func:`saliency_scores`, a per-token mean: batches combine by token count); ``finish()``
    marks the top ``saliency_fraction`` salient and removes the hooks."""

    def __init__(self, neuron: GIFNeuron, weights: Sequence[torch.Tensor] | None):
        self.neuron, self.total, self.count = neuron, None, 0
        self.weights = list(weights) if weights else None
        self.handles = [
            neuron.register_forward_pre_hook(self._record),
            neuron.register_forward_hook(lambda module, args, output: args[0]),
        ]

    def _record(self, module, args):
        x = args[0]
        shape = module.channel_shape
        scores = saliency_scores(x, self.weights, None if self.weights else shape)
        tokens = x.numel() // (shape[-1] if self.weights else max(1, torch.Size(shape).numel()))
        self.total = scores * tokens if self.total is None else self.total + scores * tokens
        self.count += tokens

    def finish(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.total is not None:
            fraction = self.neuron.saliency_fraction if self.neuron.extra_bits > 0 else 0.0
            self.neuron.set_salient(top_fraction_mask(self.total / self.count, fraction).to(self.neuron.salient.device))
