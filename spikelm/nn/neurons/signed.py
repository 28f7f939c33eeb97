"""The signed multi-level neuron: SpikeLM's bi-directional spikes with L levels per sign (docs/CONVERSION.md, "Signed
spikes and energy").

SpikeLLM's GIF code is asymmetric per token (real zero sits mid-range of 0..2^n - 1), so an average channel fires
about half the top level and a reader re-accumulates the zero point. This neuron codes each token symmetrically
around zero, with SpikeLM's elastic amplitude (a per-token scale, here per channel group) as the spike's weight:

1. **Per-token, per-group symmetric quantisation.** The channels are cut into range groups (:func:`range_groups` of
   the GIF module: runs of ``group_size`` consecutive channels inside each channel set, salient and other; 0 means
   one group per set). For each token and group g::

       Q_g     = 2^(b_g - 1) - 1                     # b_g = bits (salient channels: salient_bits)
       scale_g = max(clip_ratio * max_c |x_c| / Q_g, SCALE_FLOOR)      (times a learned factor, see 4)
       u       = x / scale_g
       code    = clamp(round(u), -Q_g, Q_g), and 0 where |u| < dead_zone
       x_hat   = code * scale_g

   ``bits`` counts the sign: 4 bits give codes -7..7, 2 bits the ternary -1..1. Rounding is half to even
   (``torch.round``). There is no zero point: real zero fires nothing. ``dead_zone`` is in units of the step:
   values whose magnitude is below ``dead_zone`` steps code 0 (at most 0.5 changes nothing: ``round`` already
   codes them 0).

2. **Signed multi-level spikes, soft reset.** The membrane starts at the code; at each step the neuron emits
   ``s_t = sign(m) * min(|m|, L)`` and soft-resets ``m -= s_t``, so ``sum_t s_t == code`` exactly. ``L`` is the
   per-step cap ``ceil(Q / T)`` (``T = num_steps``); the neuron runs ``ceil(max Q_g / L)`` steps (T without
   saliency; more for the salient channels' wider codes, as GIF's extra steps). In closed form step t emits
   ``sign(code) * clamp(|code| - t L, 0, L)`` (:func:`signed_spikes`; :func:`reference_signed_spikes` runs the
   membrane).

3. **A linear layer on the spikes** computes, per token, ``y = sum_g scale_g * (sum_t W_g s_t) + b`` (``W_g`` the
   columns of group g): integer levels are added (one accumulate per unit of ``|s_t|`` per fan-out), then one scale
   multiply per output and group (:func:`reference_signed_linear` per step, :func:`signed_linear` on the summed
   code). The energy counter reads the same spikes (:meth:`SignedNeuron.step_levels`).

4. **Learnable scale factors** (``learn_scale``, for distillation): a factor per channel set (other, salient),
   initialised to 1, multiplies every scale of that set; its gradient is the straight-through estimate
   ``code * scale / factor`` (LSQ without its gradient scale); the input's gradient is the identity.

Saliency (SpikeLLM's score, :func:`spikelm.nn.gif.saliency_scores`) marks the top ``saliency_fraction`` of channels;
they take ``salient_bits`` (more levels, and so more steps at the same cap L). The code of a token depends on that
token alone (a max over its channels, divisions and rounding in float32), so every path (prefill, decoding step,
kernels on or off) gives it the same codes given the same input (docs/CONVERSION.md, "One model whatever the path").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .. import cpu_kernels, kernels
from .base import SpikingNeuron, global_hooks, register_neuron
from .gif import SCALE_FLOOR, SaliencyRecorder, range_groups, saliency_scores, top_fraction_mask

SIGNED_BACKENDS = ("fused", "reference")
SITE_KINDS = ("qkv_input", "o_input", "gate_up_input", "down_input", "k", "v")  # placement.SITE_KINDS


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _integer(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def check_signed_options(
    bits: int,
    num_steps: int = 1,
    group_size: int = 0,
    clip_ratio: float = 1.0,
    dead_zone: float = 0.0,
    salient_bits: int | None = None,
    saliency_fraction: float = 0.0,
    outlier_ratio: float = 0.0,
) -> None:
    """Raise ``ValueError`` naming the bad argument if a signed-neuron option is out of range."""
    if not _integer(bits) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16] (sign included: 4 bits code -7..7), got {bits!r}")
    if not _integer(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer (T, the steps of the widest code), got {num_steps!r}")
    if not _integer(group_size) or group_size < 0:
        raise ValueError(f"group_size must be 0 (one range per channel set) or a positive integer, got {group_size!r}")
    if not _number(clip_ratio) or not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}")
    if not _number(dead_zone) or not 0 <= dead_zone < 1 or math.isnan(dead_zone):
        raise ValueError(f"dead_zone must be a number in [0, 1) (in quantisation steps), got {dead_zone!r}")
    if salient_bits is not None and (not _integer(salient_bits) or not bits <= salient_bits <= 16):
        raise ValueError(f"salient_bits must be None or an integer in [bits={bits}, 16], got {salient_bits!r}")
    if not _number(saliency_fraction) or not 0 <= saliency_fraction <= 1:
        raise ValueError(f"saliency_fraction must be a number in [0, 1], got {saliency_fraction!r}")
    if not _number(outlier_ratio) or not 0 <= outlier_ratio < math.inf:
        raise ValueError(
            f"outlier_ratio must be 0 (off) or a positive number (x the calibration median of a token's max |x|), "
            f"got {outlier_ratio!r}"
        )


def top_code(bits: int) -> int:
    """Q = 2^(bits - 1) - 1, the largest magnitude of a signed code of ``bits`` bits (sign included)."""
    return (1 << (bits - 1)) - 1


def level_cap(bits: int, num_steps: int) -> int:
    """L = ceil(Q / T): the largest level one spike carries, so that T spikes drain the top code."""
    return -(-top_code(bits) // num_steps)


def spike_dtype(level: int) -> torch.dtype:
    return torch.int8 if level <= 127 else torch.int16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize_signed(
    x: torch.Tensor,
    group: torch.Tensor,
    top: torch.Tensor,
    clip_ratio: float = 1.0,
    dead_zone: float = 0.0,
    factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-shot quantiser: ``(code, scale)``; ``code`` int32 like ``x``, ``scale`` (..., G) in the compute dtype.

    ``group``: int64 per channel (broadcastable to ``x``, values 0..G-1), ``top``: Q of each group (G,) integers,
    ``factor``: an optional multiplier per group (G,) (the learned scale factors). A group with no channel, or
    all-zero channels, gets ``SCALE_FLOOR`` (its codes are 0).
    """
    xc = x.detach().to(_compute_dtype(x.dtype))
    index = torch.broadcast_to(group.to(device=xc.device, dtype=torch.int64), xc.shape)
    width = top.shape[0]
    absmax = xc.new_zeros((*xc.shape[:-1], width)).scatter_reduce(-1, index, xc.abs(), "amax")
    top_f = top.to(device=xc.device, dtype=xc.dtype)
    scale = (absmax * clip_ratio / top_f).clamp_min(SCALE_FLOOR)
    if factor is not None:
        scale = scale * factor.detach().to(device=xc.device, dtype=xc.dtype)
    ratio = xc / scale.gather(-1, index)
    channel_top = top_f[group.to(xc.device)]
    code = torch.minimum(torch.maximum(torch.round(ratio), -channel_top), channel_top)
    if dead_zone > 0:
        code = torch.where(ratio.abs() < dead_zone, 0.0, code)
    return code.to(torch.int32), scale


def dequantize_signed(code: torch.Tensor, scale: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``code * scale[group]`` in ``scale``'s dtype: the real values of codes (or of summed spikes)."""
    index = torch.broadcast_to(group.to(device=code.device, dtype=torch.int64), code.shape)
    return code.to(scale.dtype) * scale.gather(-1, index)


def reference_signed_spikes(code: torch.Tensor, level: int, num_steps: int) -> torch.Tensor:
    """Spikes (T, ...) from the codes, step by step: ``s = sign(m) * min(|m|, L); m -= s`` (soft reset)."""
    mem = code.to(torch.int32).clone()
    spikes = []
    for _ in range(num_steps):
        s = torch.sign(mem) * torch.clamp(mem.abs(), max=level)
        mem -= s
        spikes.append(s)
    return torch.stack(spikes).to(spike_dtype(level))


def signed_spikes(code: torch.Tensor, level: int, num_steps: int) -> torch.Tensor:
    """The same spikes in closed form: step t emits ``sign(code) * clamp(|code| - t L, 0, L)``."""
    code = code.to(torch.int32)
    offsets = (torch.arange(num_steps, device=code.device, dtype=torch.int32) * level).view(-1, *([1] * code.dim()))
    magnitude = (code.abs().unsqueeze(0) - offsets).clamp_(0, level)
    return (torch.sign(code).unsqueeze(0) * magnitude).to(spike_dtype(level))


def signed_linear(
    spikes: torch.Tensor, scale: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias=None
) -> torch.Tensor:
    """A linear layer on signed spikes, summed path: ``dequantize(sum_t s_t) W^T + b`` (float32; float64 stays)."""
    dtype = _compute_dtype(weight.dtype)
    x_hat = dequantize_signed(spikes.to(torch.int32).sum(0), scale.to(dtype), group)
    y = x_hat @ weight.to(dtype).t()
    return (y if bias is None else y + bias.to(dtype)).to(weight.dtype)


def reference_signed_linear(
    spikes: torch.Tensor, scale: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias=None
) -> torch.Tensor:
    """The same as the hardware runs it: per step and group g, the integer levels of g's channels times ``W_g``
    (additions only), accumulated over T; then one multiply by ``scale_g`` per output and group, summed."""
    if group.dim() != 1:
        raise ValueError(f"a linear layer reads one channel dimension; got range groups of shape {tuple(group.shape)}")
    dtype = _compute_dtype(weight.dtype)
    member = torch.nn.functional.one_hot(group.to(weight.device), scale.shape[-1]).to(dtype)  # (C, G)
    w_groups = weight.to(dtype).t().unsqueeze(0) * member.t().unsqueeze(-1)  # (G, C, O)
    acc = None
    for s_t in spikes:
        step = torch.einsum("...c,gco->...go", s_t.to(torch.int32).to(dtype), w_groups)
        acc = step if acc is None else acc + step
    y = (acc * scale.to(dtype).unsqueeze(-1)).sum(-2)
    return (y if bias is None else y + bias.to(dtype)).to(weight.dtype)


class SignedSpikes(NamedTuple):
    """What a signed neuron emits: integer spikes (T, ..., C) in [-L, L], the per-token scales (..., G) and each
    channel's range group (int64, the channel shape)."""

    spikes: torch.Tensor
    scale: torch.Tensor
    group: torch.Tensor

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None, per_step: bool = False) -> torch.Tensor:
        fn = reference_signed_linear if per_step else signed_linear
        return fn(self.spikes, self.scale, self.group, weight, bias)


class SignedStats:
    """Spike counts accumulated while ``record_stats`` is on, per step: ``positive`` / ``negative`` spikes, ``levels``
    (sum of |s_t|: the accumulates per fan-out), ``slots`` (channel-steps that could fire); ``tokens`` quantised
    vectors, each costing one scale multiply per output and range group (``scales``)."""

    def __init__(self, num_steps: int, device=None):
        zeros = lambda: torch.zeros(num_steps, dtype=torch.int64, device=device)  # noqa: E731
        self.positive, self.negative, self.levels, self.slots = zeros(), zeros(), zeros(), zeros()
        self.tokens = 0
        self.scales = 1

    def add(self, spikes: torch.Tensor, slots: torch.Tensor, tokens: int, scales: int) -> None:
        flat = spikes.reshape(spikes.shape[0], -1)
        self.positive += (flat > 0).sum(1).to(self.positive.device)
        self.negative += (flat < 0).sum(1).to(self.negative.device)
        self.levels += flat.to(torch.int64).abs().sum(1).to(self.levels.device)
        self.slots += slots.to(self.slots.device)
        self.tokens += tokens
        self.scales = scales

    @property
    def events(self) -> torch.Tensor:
        return self.positive + self.negative

    def firing_rate(self) -> torch.Tensor:
        return self.events.double() / self.slots.clamp_min(1).double()

    def as_dict(self) -> dict:
        return {
            "firing_rate": self.firing_rate().tolist(),
            "positive": self.positive.tolist(),
            "negative": self.negative.tolist(),
            "levels": self.levels.tolist(),
            "slots": self.slots.tolist(),
            "tokens": self.tokens,
            "scales": self.scales,
        }


@register_neuron
class SignedNeuron(SpikingNeuron):
    """The signed multi-level neuron on a real-valued input (..., C); see the module docstring for the maths.

    Args:
        channels: C, or a channel shape broadcast against the input's trailing dimensions (``(H, 1, d)`` for
            (B, H, L, d) keys); ranges are taken along the last dimension.
        bits: bits of a code, sign included (codes -Q..Q, Q = 2^(bits-1) - 1).
        num_steps: T; one spike carries at most L = ceil(Q / T) levels. Changes the spikes, not the code.
        group_size: channels per range group inside each channel set (0: one range per set and token).
        clip_ratio: each range is this fraction of the group's max |x| (values beyond take +-Q).
        dead_zone: inputs below this many steps in magnitude fire nothing.
        salient_bits: bits of the salient channels' codes (None: ``bits``, no saliency).
        saliency_fraction: the share of channels :meth:`calibrate` (or spikify's calibration) marks salient.
        learn_scale: a learnable scale factor per channel set (in the state dict as ``scale_factor``).
        outlier_ratio: 0 (off), or outlier tokens: a token (a row of the input) whose max |x| exceeds the
            ``outlier_threshold`` buffer passes real-valued (its reader multiplies, and the energy counter counts
            fan-in x fan-out MACs for it); calibration sets the threshold to ``outlier_ratio`` x the median over
            the calibration tokens of a token's max |x|. Uncalibrated (threshold 0): no token passes.
        backend: ``"fused"`` (one-shot code) or ``"reference"`` (runs the spikes and sums them); not saved.

    ``salient`` is a bool buffer of shape ``channels`` in the state dict, as GIF's.

    As a plug-in (:class:`~spikelm.nn.neurons.base.SpikingNeuron`), ``neuron="signed"``: the network runs once (the
    steps are internal to the neuron). Its conversion-config fields:

    * ``signed_bits`` (int): bits of a code, sign included: codes -Q..Q, Q = 2^(bits-1) - 1 (4 bits: -7..7).
    * ``signed_steps`` (int): T; one spike carries at most ceil(Q / T) levels (the spikes change, not the code).
    * ``signed_group_size`` (int): channels per per-token range (scale) inside each channel set; 0: one per set.
    * ``signed_clip_ratio`` (float): each range is this fraction of the group's max |x|.
    * ``signed_dead_zone`` (float): inputs below this many quantisation steps in magnitude fire nothing.
    * ``signed_salient_bits`` (int or None): bits of the salient channels' codes (the top ``saliency_fraction``,
      GIF's field, by calibration saliency); None: no saliency.
    * ``signed_site_bits`` (dict or None): bits per placement site kind (``qkv_input``, ``o_input``,
      ``gate_up_input``, ``down_input``, ``k``, ``v``), overriding ``signed_bits`` there.
    * ``signed_learn_scale`` (bool): a learnable scale factor per channel set (for distillation).
    * ``signed_outlier_ratio`` (float): 0 (off), or the outlier-token rule of the linear inputs (not K/V): a token
      whose max |x| at a site exceeds this multiple of the site's calibration median passes real-valued there
      (docs/CONVERSION.md, "Outlier tokens").
    """

    name = "signed"
    display_name = "signed"
    config_fields = {
        "signed_bits": 4,
        "signed_steps": 1,
        "signed_group_size": 64,
        "signed_clip_ratio": 1.0,
        "signed_dead_zone": 0.0,
        "signed_salient_bits": None,
        "signed_site_bits": None,
        "signed_learn_scale": False,
        "signed_outlier_ratio": 0.0,
    }
    # the named recipe (spikify --neuron signed, the default recipe), the perplexity-energy frontier's best point
    # within the targets (docs/CONVERSION.md, "Signed spikes and energy"): 4-bit codes (-7..7) per token and 64
    # channels, unclipped (1.0), the top 10 % of channels by saliency at 5 bits (-15..15, 3 spikes at T = 1), and
    # the per-head value/output rotation (a conversion field, not the neuron's: this recipe's only, where the shared
    # residual-stream rotations come from spikelm.conversion.recipes; spikify drops it where the fold is not exact),
    # and outlier tokens above 2 x the calibration median at a linear input real-valued (on 32,768 Brown tokens: 53.62,
    # 1.373x the real-valued model, at 0.599x its compute energy inside the blocks; 54.29 at 4 x, 54.94 without)
    recipe_defaults = {
        "neuron": "signed",
        "signed_bits": 4,
        "signed_steps": 1,
        "signed_group_size": 64,
        "signed_clip_ratio": 1.0,
        "signed_salient_bits": 5,
        "saliency_fraction": 0.1,
        "value_rotation": True,
        "signed_outlier_ratio": 2.0,
    }
    shared_fields = ("saliency_fraction",)  # the GIF neuron's field: the share of salient channels
    cache_layout = "signed_codes"
    # settings with no trace in the saved tensors (the quantiser's grid): recorded with the weights on save
    traceless_fields = (
        "signed_bits",
        "signed_steps",
        "signed_group_size",
        "signed_clip_ratio",
        "signed_dead_zone",
        "signed_salient_bits",
        "signed_site_bits",
        "signed_outlier_ratio",
    )

    def __init__(
        self,
        channels: int | Sequence[int],
        bits: int = 4,
        num_steps: int = 1,
        group_size: int = 0,
        clip_ratio: float = 1.0,
        dead_zone: float = 0.0,
        salient_bits: int | None = None,
        saliency_fraction: float = 0.0,
        learn_scale: bool = False,
        outlier_ratio: float = 0.0,
        backend: str = "fused",
    ):
        super().__init__()
        check_signed_options(
            bits, num_steps, group_size, clip_ratio, dead_zone, salient_bits, saliency_fraction, outlier_ratio
        )
        self.channel_shape = (channels,) if isinstance(channels, int) else tuple(channels)
        self.bits, self.steps_per_code, self.group_size = bits, num_steps, group_size
        self.clip_ratio, self.dead_zone = float(clip_ratio), float(dead_zone)
        self.salient_bits = bits if salient_bits is None else salient_bits
        self.saliency_fraction = float(saliency_fraction)
        self.backend = backend
        self.level = level_cap(bits, num_steps)
        self.register_buffer("salient", torch.zeros(self.channel_shape, dtype=torch.bool))
        self.scale_factor = nn.Parameter(torch.ones(2)) if learn_scale else None
        self.outlier_ratio = float(outlier_ratio)
        if self.outlier_ratio > 0:  # in the state dict only where the rule is on (older saved models load as before)
            self.register_buffer("outlier_threshold", torch.zeros((), dtype=torch.float32))
        self.record_stats = False
        self.stats: SignedStats | None = None
        self._groups: tuple[torch.Tensor, torch.Tensor] | None = None
        self._plan: tuple | None = None  # (the groups() it was made from, code_plan())
        self._threshold_seen: tuple = (None, -1, 0.0)  # (outlier_threshold, its version, its value) last read

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in SIGNED_BACKENDS:
            raise ValueError(f"backend must be one of {SIGNED_BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def extra_bits(self) -> int:
        """Bits the salient channels have beyond ``bits`` (0: no saliency; the calibration reads it, as GIF's)."""
        return self.salient_bits - self.bits

    def has_saliency(self) -> bool:
        return self.extra_bits > 0 and bool(self.salient.any())

    @property
    def num_steps(self) -> int:
        """The steps the widest code needs at L levels per spike: T, or more for the salient channels."""
        widest = top_code(self.salient_bits if self.has_saliency() else self.bits)
        return -(-widest // self.level)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channel_shape}, bits={self.bits}, num_steps={self.steps_per_code}, level={self.level}, "
            f"group_size={self.group_size}, clip_ratio={self.clip_ratio}, dead_zone={self.dead_zone}, "
            f"salient_bits={self.salient_bits}, saliency_fraction={self.saliency_fraction}"
            + (f", outlier_ratio={self.outlier_ratio}" if self.outlier_ratio > 0 else "")
        )

    def _load_from_state_dict(self, *args, **kwargs):
        self._groups = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def set_salient(self, mask: torch.Tensor) -> None:
        if tuple(mask.shape) != self.channel_shape:
            raise ValueError(f"salient mask must have shape {self.channel_shape}, got {tuple(mask.shape)}")
        self.salient.copy_(mask.to(torch.bool))
        self._groups = None

    @torch.no_grad()
    def calibrate(self, x, weights=None) -> torch.Tensor:
        """Mark the top ``saliency_fraction`` of channels by SpikeLLM's score (``weights``: the readers; None for
        K/V). Returns the scores."""
        scores = saliency_scores(x, weights, None if weights is not None else self.channel_shape)
        fraction = self.saliency_fraction if self.extra_bits > 0 else 0.0
        self.set_salient(top_fraction_mask(scores, fraction).to(self.salient.device))
        return scores

    def groups(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(group, top)``: each channel's range group (int64, the channel shape) and each group's Q (int64)."""
        if self._groups is None:
            salient = self.salient.cpu() if self.has_saliency() else None
            size = self.group_size or max(1, self.channel_shape[-1])
            group, fine = range_groups(salient, self.channel_shape, size)
            top = torch.where(fine, top_code(self.salient_bits), top_code(self.bits)).to(torch.int64)
            self._groups = (group, top)
        group, top = self._groups
        return (group.to(device), top.to(device)) if device is not None else (group, top)

    def range_group_counts(self) -> torch.Tensor:
        """Range groups with channels, per row of the channel shape: the scale multiplies per output of a reader."""
        group, top = self.groups()
        rows = group.reshape(-1, group.shape[-1])
        present = torch.nn.functional.one_hot(rows, top.shape[0]).amax(1)
        return present.sum(-1).to(torch.int64)

    def _factor(self, top: torch.Tensor) -> torch.Tensor | None:
        if self.scale_factor is None:
            return None
        return self.scale_factor[(top != top_code(self.bits)).long().to(self.scale_factor.device)]

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point tensor, got {type(x).__name__}")
        shape = self.channel_shape
        trailing = tuple(x.shape[x.dim() - len(shape) :]) if x.dim() >= len(shape) else ()
        if (
            len(trailing) != len(shape)
            or any(c not in (1, t) for c, t in zip(shape, trailing, strict=True))
            or (x.shape[-1] != shape[-1])
        ):
            raise ValueError(f"{type(self).__name__} was built for channels {shape}; got an input {tuple(x.shape)}")

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-shot code: ``(code, scale)`` (:func:`quantize_signed` on this neuron's range groups)."""
        self._check_input(x)
        group, top = self.groups(x.device)
        return quantize_signed(x, group, top, self.clip_ratio, self.dead_zone, self._factor(top))

    def dequantize(self, code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_signed(code, scale, self.groups(code.device)[0])

    def spike(self, x: torch.Tensor) -> SignedSpikes:
        """Run the neuron: integer spikes (T, ..., C), the per-token scales, the range groups."""
        code, scale = self.quantize(x)
        make = reference_signed_spikes if self.backend == "reference" else signed_spikes
        spikes = make(code, self.level, self.num_steps)
        if self.record_stats:
            self._record(spikes)
        return SignedSpikes(spikes, scale, self.groups(x.device)[0])

    def step_levels(self, x: torch.Tensor) -> torch.Tensor:
        """|s_t| per step (T, ..., C), int64: the accumulates per fan-out each input channel costs at each step."""
        with torch.no_grad():
            code, _ = self.quantize(x)
            passing = self.real_rows(x)
            if passing is not None:
                code = code.masked_fill(passing.unsqueeze(-1), 0)  # an outlier token fires nothing: it is multiplied
            return signed_spikes(code, self.level, self.num_steps).to(torch.int64).abs()

    def real_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The outlier tokens of ``x`` (bool, ``x.shape[:-1]``): rows whose max |x| exceeds the calibrated
        ``outlier_threshold`` and so pass real-valued; None when the rule is off or uncalibrated. A token's own
        values decide (a max and a comparison: exact), so every path agrees."""
        threshold = self._threshold()  # 0.0 where the rule is off
        if threshold <= 0:
            return None
        return x.detach().abs().amax(-1) > threshold

    def _pass_outliers(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        passing = self.real_rows(x)
        if passing is None or not bool(passing.any()):
            return out
        return torch.where(passing.unsqueeze(-1), x.detach().to(out.dtype), out)

    def step_slots(self) -> torch.Tensor:
        """Channel-steps that could fire per token (T,): a channel whose top code fits t spikes is silent after."""
        _, top = self.groups()
        group = self.groups()[0].reshape(-1)
        channel_top = top[group]
        steps = torch.arange(self.num_steps).view(-1, 1)
        return (channel_top.view(1, -1) > steps * self.level).sum(1).to(torch.int64)

    def code_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(group, top)`` for the C++ pass (:func:`spikelm.nn.cpu_kernels.token_codes`): :meth:`groups` as int32
        (rows of the channel shape, C) and float32 (G,)."""
        self.groups()
        groups = self._groups  # the cached pair itself (groups() returns a new tuple each call)
        plan = self._plan
        if plan is None or plan[0] is not groups:
            group, top = groups
            plan = (groups, (group.reshape(-1, group.shape[-1]).to(torch.int32).contiguous(), top.to(torch.float32)))
            self._plan = plan
        return plan[1]

    def fused_codes(
        self,
        x: torch.Tensor,
        want_code: bool = False,
        pack_bits: int = 0,
        code_offset: int = 0,
        outliers: bool = False,
    ):
        """:class:`~spikelm.nn.cpu_kernels.TokenCodes` ``(x_hat, code, scale, None, grid)`` of ``x`` in one C++ pass
        where the dispatcher takes it (:func:`spikelm.nn.kernels.token_code_kernel`: CPU float32 outside autograd)
        and the layout is one it knows; else None. ``x_hat`` is the dequantised code (with ``outliers``, the outlier
        tokens of :meth:`real_rows` passed real-valued in the same pass: :meth:`forward`'s value), ``code`` /
        ``scale`` :meth:`quantize`'s (``code`` None unless ``want_code``; with ``pack_bits``, the codes plus
        ``code_offset`` as bit planes), ``grid`` the scales again, bit for bit."""
        if self.backend != "fused" or kernels.token_code_kernel(x) != kernels.CPP:
            return None
        factor = None
        if self.scale_factor is not None:
            if torch.is_grad_enabled() and self.scale_factor.requires_grad:
                return None  # the scale factors' gradient: the PyTorch path
            factor = self._factor(self.groups()[1]).detach()
            if factor.dtype is not torch.float32 or factor.device.type != "cpu":
                return None
        rows = cpu_kernels.code_rows(self.channel_shape, x.shape)
        if rows is None or x.shape[-1] != self.channel_shape[-1]:
            return None
        group, top = self.code_plan()
        return cpu_kernels.token_codes(
            x,
            group,
            top,
            rows[1],
            self.clip_ratio,
            signed=True,
            dead_zone=self.dead_zone,
            floor=SCALE_FLOOR,
            factor=factor,
            want_code=want_code,
            pack_bits=pack_bits,
            code_offset=code_offset,
            outlier_threshold=self._threshold() if outliers else 0.0,
        )

    def _lean_plan(self, x: torch.Tensor) -> tuple | None:
        """:func:`~spikelm.nn.cpu_kernels.token_values`' arguments for ``x`` where the forward value is that one pass
        (fused_codes' value with the outlier rule, fewer Python steps): a linear input (one channel row), no scale
        factors, the fused backend, the C++ pass taken; else None."""
        if (
            self.scale_factor is None
            and self._backend == "fused"
            and len(self.channel_shape) == 1
            and x.shape[-1] == self.channel_shape[0]
            and kernels.token_code_kernel(x) == kernels.CPP
        ):
            group, top = self.code_plan()
            return group, top, 1, self.clip_ratio, self.dead_zone, SCALE_FLOOR, True, self._threshold()
        return None

    def _runs_alone(self) -> bool:
        """Whether calling the neuron would run its value and nothing else: no statistics, no hooks of its own or
        registered for every module (a fused path that skips the call must not skip them)."""
        return not (self.record_stats or self._forward_hooks or self._forward_pre_hooks or global_hooks())

    def value_plan(self, x: torch.Tensor) -> tuple | None:
        """:meth:`_lean_plan` where calling the neuron would run nothing else (:meth:`_runs_alone`)."""
        return self._lean_plan(x) if self._runs_alone() else None

    def kv_plan(self, states: torch.Tensor) -> tuple | None:
        """``(group, top, inner, clip_ratio, dead_zone)`` for :func:`~spikelm.nn.cpu_kernels.kv_codes_append` (the
        cache's fused K/V step: :meth:`fused_codes`' pass on ``states``) where that pass runs alone (fused backend,
        no scale factors, nothing else on the call (:meth:`_runs_alone`), the C++ pass taken, a layout it knows);
        else None."""
        if (
            not self._runs_alone()
            or self.scale_factor is not None
            or self._backend != "fused"
            or kernels.token_code_kernel(states) != kernels.CPP
        ):
            return None
        rows = cpu_kernels.code_rows(self.channel_shape, states.shape)
        if rows is None or states.shape[-1] != self.channel_shape[-1]:
            return None
        group, top = self.code_plan()
        return group, top, rows[1], self.clip_ratio, self.dead_zone

    def plan_stamp(self) -> float:
        """The outlier threshold :meth:`value_plan` passes (its buffer may change in place, not by assignment)."""
        return self._threshold()

    def _threshold(self) -> float:
        """``float(outlier_threshold)`` (0.0 where the rule is off), read again only when the buffer changes (a
        decoding step asks at every linear input)."""
        if self.outlier_ratio <= 0:
            return 0.0
        buffer = self.outlier_threshold
        if buffer.is_inference():  # an inference tensor keeps no version counter: read it each time
            return float(buffer)
        seen = self._threshold_seen  # (the buffer itself, held so its id is not reused; its version; its value)
        if seen[0] is not buffer or seen[1] != buffer._version:
            self._threshold_seen = seen = (buffer, buffer._version, float(buffer))
        return seen[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantised input (x's shape and dtype); straight-through gradient to ``x`` (and, with
        ``learn_scale``, to the scale factors)."""
        if not self.record_stats:
            # the C++ pass where it runs (CPU float32 outside autograd), outlier tokens included: the same bits
            plan = self._lean_plan(x)
            if plan is not None:  # a linear input without scale factors (a decoding step's common case)
                return cpu_kernels.token_values(x, *plan)
            fast = self.fused_codes(x, outliers=True)
            if fast is not None:
                return fast[0]
        with torch.no_grad():
            if self.backend == "reference":
                spikes, scale, group = self.spike(x)
                code = spikes.to(torch.int32).sum(0)
            else:
                code, scale = self.quantize(x)
                group = self.groups(x.device)[0]
                if self.record_stats:
                    passing = self.real_rows(x)
                    counted = code if passing is None else code.masked_fill(passing.unsqueeze(-1), 0)
                    self._record(signed_spikes(counted, self.level, self.num_steps))
            out = self._pass_outliers(x, dequantize_signed(code, scale, group).to(x.dtype))
        if torch.is_grad_enabled() and self.scale_factor is not None and self.scale_factor.requires_grad:
            _, top = self.groups(x.device)
            factor = self._factor(top).to(device=x.device, dtype=out.dtype)
            relative = factor / factor.detach()  # exactly 1: the value is unchanged, the gradient 1 / factor
            out = out * relative[torch.broadcast_to(self.groups(x.device)[0], x.shape)]
        if torch.is_grad_enabled() and x.requires_grad:
            out = out + (x - x.detach())
        return out

    def _record(self, spikes: torch.Tensor) -> None:
        if self.stats is None:
            self.stats = SignedStats(spikes.shape[0], device=spikes.device)
        tokens = spikes[0].numel() // max(1, torch.Size(self.channel_shape).numel())
        slots = self.step_slots()[: spikes.shape[0]] * tokens
        self.stats.add(spikes, slots, tokens, int(self.range_group_counts().max()))

    # -- the plug-in interface (spikelm.nn.neurons.base.SpikingNeuron) ----------------------------------------------

    @classmethod
    def config_values(cls, given: dict) -> dict:
        values = super().config_values(given)
        if isinstance(values["signed_site_bits"], dict):
            values["signed_site_bits"] = dict(values["signed_site_bits"])
        return values

    @classmethod
    def check_config(cls, fields) -> None:
        sites = cls.field(fields, "signed_site_bits")
        if sites is not None and (
            not isinstance(sites, dict)
            or any(k not in SITE_KINDS for k in sites)
            or any(not _integer(b) for b in sites.values())
        ):
            raise ValueError(
                f"signed_site_bits must be None or a dict of site kind ({', '.join(SITE_KINDS)}) to integer bits, "
                f"got {sites!r}"
            )
        if not isinstance(cls.field(fields, "signed_learn_scale"), bool):
            raise ValueError(
                f"signed_learn_scale must be True or False, got {cls.field(fields, 'signed_learn_scale')!r}"
            )
        salient = cls.field(fields, "signed_salient_bits")
        if salient is not None and not _integer(salient):
            raise ValueError(f"signed_salient_bits must be None or an integer, got {salient!r}")
        for kind in (None, *(sites or {})):
            options = cls._options(fields, kind)
            options.pop("learn_scale")
            try:
                check_signed_options(**options)
            except ValueError as err:
                raise ValueError(f"signed_{err}") from None

    @classmethod
    def _options(cls, fields, kind: str | None) -> dict:
        bits = (cls.field(fields, "signed_site_bits") or {}).get(kind, cls.field(fields, "signed_bits"))
        salient = cls.field(fields, "signed_salient_bits")
        if salient is not None and _integer(salient) and _integer(bits):
            salient = max(salient, bits)  # salient channels never get fewer bits than the site's others
        return {
            "bits": bits,
            "num_steps": cls.field(fields, "signed_steps"),
            "group_size": cls.field(fields, "signed_group_size"),
            "clip_ratio": cls.field(fields, "signed_clip_ratio"),
            "dead_zone": cls.field(fields, "signed_dead_zone"),
            "salient_bits": salient,
            "saliency_fraction": fields.get("saliency_fraction", 0.0) if salient is not None else 0.0,
            "learn_scale": cls.field(fields, "signed_learn_scale"),
            "outlier_ratio": cls.field(fields, "signed_outlier_ratio"),
        }

    @classmethod
    def recipe(cls, num_steps: int | None = None) -> dict:
        """``num_steps`` sets ``signed_steps`` (T: at most ceil(Q / T) levels per spike)."""
        fields = dict(cls.recipe_defaults)
        if num_steps is not None:
            fields["signed_steps"] = num_steps
        return fields

    @classmethod
    def site_fields(cls, fields, kind: str) -> dict:
        """``signed_site_bits[kind]``, if given, becomes the site's ``signed_bits``."""
        sites = cls.field(fields, "signed_site_bits") or {}
        return {**fields, "signed_bits": sites[kind]} if kind in sites else dict(fields)

    @classmethod
    def from_config(cls, fields, channels, per_step: bool) -> SignedNeuron:
        options = cls._options(fields, None)
        if per_step:  # K and V: the outlier-token rule is for the linear inputs (a cached token stays codes)
            options["outlier_ratio"] = 0.0
        return cls(channels, **options)

    @classmethod
    def describe(cls, fields) -> str:
        f = {name: cls.field(fields, name) for name in cls.config_fields}
        salient = (
            f"; the top {fields.get('saliency_fraction', 0):.0%} of channels by calibration saliency at "
            f"{f['signed_salient_bits']} bits"
            if f["signed_salient_bits"] is not None
            else ""
        )
        return (
            f"the signed multi-level neuron: {f['signed_bits']}-bit signed codes (sign included) per token and "
            f"{f['signed_group_size'] or 'channel-set'} channels, clipped to {f['signed_clip_ratio']:g} of the "
            "max |x|, "
            f"dead zone {f['signed_dead_zone']:g} steps, T = {f['signed_steps']}"
            + (f", per-site bits {f['signed_site_bits']}" if f["signed_site_bits"] else "")
            + salient
            + (
                f"; outlier tokens (max |x| above {f['signed_outlier_ratio']:g} x the calibration median at a linear "
                "input) pass real-valued"
                if f["signed_outlier_ratio"]
                else ""
            )
        )

    @classmethod
    def summary(cls, fields) -> str:
        salient = cls.field(fields, "signed_salient_bits")
        salient = (
            f", the top {fields['saliency_fraction']:.0%} salient at {salient} bits"
            if salient is not None and fields.get("saliency_fraction", 0)
            else ""
        )
        group = cls.field(fields, "signed_group_size")
        group = f"{group} channels" if group else "channel set"
        return (
            f"signed neuron, {cls.field(fields, 'signed_bits')}-bit codes per {group}{salient}, "
            f"T={cls.field(fields, 'signed_steps')}"
        )

    @classmethod
    def steps_summary(cls, fields) -> str:
        return (
            f"signed neuron, {cls.field(fields, 'signed_bits')}-bit codes over T = {cls.field(fields, 'signed_steps')} "
            "steps"
        )

    @classmethod
    def time_steps(cls, fields) -> int:
        """T (the salient channels' wider codes may need more steps at the same per-spike cap)."""
        return cls.field(fields, "signed_steps")

    def reset_calibration(self) -> None:
        self.set_salient(torch.zeros_like(self.salient))
        if self.outlier_ratio > 0:
            self.outlier_threshold.zero_()

    def state_problem(self) -> str | None:
        if self.outlier_ratio > 0:
            threshold = float(self.outlier_threshold)
            if not math.isfinite(threshold) or threshold < 0:
                return f"has outlier_threshold {threshold} (expected a finite number >= 0)"
        return None

    def state_loaded(self) -> None:
        self._groups = None

    def step_counts(self) -> torch.Tensor | None:
        """Positive spikes, negative spikes and slots per step (signed levels: both signs counted)."""
        if self.stats is None:
            return None
        return torch.stack([self.stats.positive, self.stats.negative, self.stats.slots.to(self.stats.positive.device)])

    def step_spikes(self, x: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """|s_t| of the neuron's own spikes on ``x`` (its output is their dequantised sum), and 1 where one fired
        (either sign)."""
        levels = self.step_levels(x)
        return levels, (levels > 0).long()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`signed_linear` on :meth:`spike`: the integer spikes accumulated, one scale multiply per group; an
        outlier token (:meth:`real_rows`) passes real-valued, as in ``forward``, so its rows are the exact linear of
        its own values."""
        out = self.spike(x).linear(weight, bias)
        passing = self.real_rows(x)
        if passing is None or not bool(passing.any()):
            return out
        from ..exact import exact_linear

        out = out.clone()
        out[passing] = exact_linear(x[passing], weight, bias).to(out.dtype)
        return out

    def calibration_recorder(self, reader_weights):
        """GIF's saliency recorder: the neuron passes its input through while calibrating; ``finish()`` marks the
        top ``saliency_fraction`` salient (nothing without ``salient_bits`` above ``bits``) and, with the
        outlier-token rule, sets ``outlier_threshold`` (:class:`OutlierRecorder`)."""
        if self.outlier_ratio > 0:
            return OutlierRecorder(self, reader_weights)
        return SaliencyRecorder(self, reader_weights)

    def spike_stats(self) -> dict | None:
        if self.stats is None:
            return None
        out = self.stats.as_dict()
        out["spikes"] = self.stats.events.tolist()
        return out

    def slots(self, steps: int, rows: int, width: int) -> torch.Tensor:
        """A channel can fire while its top code is not drained: every channel for ceil(Q / L) steps, the salient
        ones after."""
        return self.step_slots()[:steps] * rows

    def reader_weight_reads(self) -> int:
        """Numbers a reader reads per output and token besides its weight rows: none (no zero point, so no row
        sums of W; the energy report's memory-inclusive figure)."""
        return 0

    def reader_macs(self, steps: int, outputs: int) -> torch.Tensor:
        """One scale multiply per output and range group, once (no zero point)."""
        macs = torch.zeros(steps, dtype=torch.int64)
        macs[0] = outputs * int(self.range_group_counts().max())
        return macs

    def attention_ops(
        self, product: str, steps: int, pairs: int, heads: int, head_dim: int, queries: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per score (Q K^T: sum over the key's groups of scale_g * (q_g . code_g)) and per query-key pair and head
        (P V, P scaled by each key's scale per group) one multiply per range group of the K/V head (read by the
        ``heads // kv_heads`` query heads sharing it); no zero-point term."""
        groups = self.range_group_counts()
        macs = torch.zeros(steps, dtype=torch.int64)
        macs[0] = pairs * (heads // groups.numel()) * int(groups.sum())
        return macs, torch.zeros(steps, dtype=torch.int64)


class OutlierRecorder(SaliencyRecorder):
    """The saliency recorder plus each calibration token's max |x|: ``finish()`` also sets the neuron's
    ``outlier_threshold`` to ``outlier_ratio`` x their median (``torch.median``: the lower of the two middle values
    for an even count)."""

    def __init__(self, neuron: SignedNeuron, weights):
        super().__init__(neuron, weights)
        self.maxima: list[torch.Tensor] = []
        self.handles.append(neuron.register_forward_pre_hook(self._record_max))

    def _record_max(self, module, args):
        self.maxima.append(args[0].detach().abs().amax(-1).reshape(-1).float().cpu())

    def finish(self) -> None:
        super().finish()
        if self.maxima:
            median = torch.cat(self.maxima).median()
            self.neuron.outlier_threshold.fill_(float(median) * self.neuron.outlier_ratio)
