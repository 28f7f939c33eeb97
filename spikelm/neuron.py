"""The elastic bi-spiking neuron of SpikeLM (SPEC section 2), multi-step and time-major.

A neuron turns an input current ``x`` of shape ``(T, ..., D)`` into spikes ``alpha_t * q_t`` with
``q_t`` in {-1, 0, +1} (ternary) or {0, 1} (binary), one amplitude ``alpha_t`` per time step.

Two implementations of the same maths live here:

* :func:`reference_multistep_spike` -- a readable per-step loop recorded by autograd, one small
  straight-through function per step. It is the definition the fast paths are tested against.
* :class:`MultiStepSpike` -- the whole time loop in one autograd function that keeps only int8
  codes (spike sign plus the straight-through window) for backward.

Amplitudes are set from the first batch a neuron sees (``alpha_t = 2 * mean|u_t|``), sequentially
over the steps, with the statistic summed across processes under data parallelism.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.distributed as dist
from torch import nn

SPIKE_LEVELS = ("ternary", "binary")
RESETS = ("official", "symmetric")
BACKENDS = ("auto", "fused", "reference")

ALPHA_FLOOR = 1e-5  # alpha is floored here where it divides or scales; the stored value is untouched
LEAK = 0.25  # membrane decay of the released code

# int8 codes saved for backward: the spike q in {-1, 0, 1}, plus OUTSIDE when the straight-through
# window |u / alpha| <= 1 is left (no gradient passes there).
OUTSIDE = 4


def check_neuron_options(
    num_steps: int,
    spike_levels: str = "ternary",
    use_amplitude: bool = True,
    alpha_init: str | float = "mean_abs",
    learn_alpha: bool = False,
    reset: str = "official",
) -> None:
    """Raise ``ValueError`` naming the bad argument if a neuron option is out of range."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer (the number of time steps T), got {num_steps!r}")
    if spike_levels not in SPIKE_LEVELS:
        raise ValueError(f"spike_levels must be one of {SPIKE_LEVELS}, got {spike_levels!r}")
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    if not isinstance(use_amplitude, bool):
        raise ValueError(f"use_amplitude must be True or False, got {use_amplitude!r}")
    if not isinstance(learn_alpha, bool):
        raise ValueError(f"learn_alpha must be True or False, got {learn_alpha!r}")
    if isinstance(alpha_init, str):
        if alpha_init != "mean_abs":
            raise ValueError(f"alpha_init must be 'mean_abs' or a positive number, got {alpha_init!r}")
    elif isinstance(alpha_init, bool) or not isinstance(alpha_init, Real) or not alpha_init > 0:
        raise ValueError(f"alpha_init must be 'mean_abs' or a positive number, got {alpha_init!r}")
    if learn_alpha and not use_amplitude:
        raise ValueError(
            "learn_alpha=True needs use_amplitude=True: the LSQ gradient is defined for the spike alpha * q; "
            "without amplitude alpha only sets the threshold"
        )


def _levels_low(spike_levels: str) -> int:
    return -1 if spike_levels == "ternary" else 0


def _lsq_slope(ratio: torch.Tensor, low: int) -> torch.Tensor:
    """LSQ d s / d alpha: the clamped level outside [low, 1], round(u/alpha) - u/alpha inside."""
    rounded = torch.round(ratio)
    return torch.where((ratio >= low) & (ratio <= 1), rounded - ratio, rounded.clamp(low, 1))


def _carry(alpha_t: torch.Tensor, q: torch.Tensor, spike_levels: str, reset: str) -> torch.Tensor:
    """The factor that multiplies ``0.25 * u_{t-1}`` in the membrane update (a constant for autograd).

    official (ternary): alpha - s, i.e. 0 after +alpha, alpha after silence, 2*alpha after -alpha.
    symmetric, and every binary neuron: 1 - |q|, a leaky hard reset on either spike.
    """
    if spike_levels == "ternary" and reset == "official":
        return alpha_t - alpha_t * q
    return 1.0 - q.abs()


# ----------------------------------------------------------------------------------------------
# The readable reference path: one straight-through function per step, the loop in Python.
# ----------------------------------------------------------------------------------------------


class _SpikeStep(torch.autograd.Function):
    """One step of the spike function with the clipped straight-through and LSQ gradients."""

    @staticmethod
    def forward(ctx, u, alpha_t, low, use_amplitude):
        ratio = u / alpha_t
        q = torch.round(ratio).clamp_(low, 1)
        ctx.save_for_backward(ratio, q)
        ctx.low = low
        ctx.use_amplitude = use_amplitude
        ctx.alpha_needs_grad = alpha_t.requires_grad
        return q * alpha_t if use_amplitude else q

    @staticmethod
    def backward(ctx, grad_s):
        ratio, q = ctx.saved_tensors
        inside = ratio.abs() <= 1
        grad_u = grad_s * inside
        grad_alpha = None
        if ctx.alpha_needs_grad:
            grad_alpha = (grad_s * _lsq_slope(ratio, ctx.low)).sum() / math.sqrt(ratio.numel())
        return grad_u, grad_alpha, None, None


def reference_multistep_spike(
    x: torch.Tensor,
    alpha: torch.Tensor,
    spike_levels: str = "ternary",
    reset: str = "official",
    use_amplitude: bool = True,
    membrane: bool = True,
) -> torch.Tensor:
    """Spikes for time-major ``x`` (T, ...) with the given per-step ``alpha`` (T,), step by step.

    ``alpha`` must already be floored (see :data:`ALPHA_FLOOR`). With ``membrane=False`` every
    step is spiked on its own (the K/V re-spiking of SPEC section 3).
    """
    low = _levels_low(spike_levels)
    spikes = []
    u = carry = None
    for t in range(x.shape[0]):
        alpha_t = alpha[t]
        if t == 0 or not membrane:
            u = x[t]
        else:
            u = (u * LEAK) * carry + x[t]
        s = _SpikeStep.apply(u, alpha_t, low, use_amplitude)
        with torch.no_grad():
            q = s / alpha_t if use_amplitude else s
            carry = _carry(alpha_t.detach(), q, spike_levels, reset)
        spikes.append(s)
    return torch.stack(spikes)


# ----------------------------------------------------------------------------------------------
# The fused path: the time loop inside one autograd function, int8 codes saved for backward.
# ----------------------------------------------------------------------------------------------


def fused_spike_forward(x, alpha, spike_levels, reset, use_amplitude, membrane, keep_ratio, count):
    """Run the neuron over all steps without autograd.

    Returns ``(spikes, codes, ratio, counts)``: ``codes`` int8 (q plus :data:`OUTSIDE` where the
    straight-through window is left), ``ratio`` = u/alpha (only if ``keep_ratio``, for the LSQ
    gradient), ``counts`` a (T, 2) int64 tensor of positive and negative spikes (only if ``count``).
    """
    low = _levels_low(spike_levels)
    steps = x.shape[0]
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    alpha = alpha.to(compute_dtype)
    spikes = torch.empty_like(x)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    ratio_all = torch.empty(x.shape, dtype=compute_dtype, device=x.device) if keep_ratio else None
    counts = torch.zeros(steps, 2, dtype=torch.int64, device=x.device) if count else None
    u = carry = None
    for t in range(steps):
        alpha_t = alpha[t]
        xt = x[t].to(compute_dtype)
        if t == 0 or not membrane:
            u = xt
        else:
            u = (u * LEAK) * carry + xt
        ratio = u / alpha_t
        q = torch.round(ratio).clamp_(low, 1)
        spikes[t] = q * alpha_t if use_amplitude else q
        code = codes[t]
        code.copy_(q)
        code.add_((ratio.abs() > 1).to(torch.int8), alpha=OUTSIDE)
        if keep_ratio:
            ratio_all[t] = ratio
        if count:
            counts[t, 0] = (q > 0).sum()
            counts[t, 1] = (q < 0).sum()
        if membrane and t + 1 < steps:
            carry = _carry(alpha_t, q, spike_levels, reset)
    return spikes, codes, ratio_all, counts


def decode_spikes(codes: torch.Tensor) -> torch.Tensor:
    """The spike levels q in {-1, 0, 1} (int8) stored in ``codes``."""
    return codes - OUTSIDE * (codes > 1).to(torch.int8)


def fused_spike_backward(grad_s, codes, ratio, alpha, spike_levels, reset, use_amplitude, membrane, alpha_grad):
    """Gradients w.r.t. the input current and (if ``alpha_grad``) alpha, from the saved codes."""
    low = _levels_low(spike_levels)
    steps = codes.shape[0]
    compute_dtype = torch.float32 if grad_s.dtype in (torch.float16, torch.bfloat16) else grad_s.dtype
    alpha = alpha.to(compute_dtype)
    grad_x = torch.empty_like(grad_s)
    grad_alpha = torch.zeros(steps, dtype=compute_dtype, device=grad_s.device) if alpha_grad else None
    g_next = None
    for t in reversed(range(steps)):
        code = codes[t]
        gs = grad_s[t].to(compute_dtype)
        g = gs * (code <= 1)
        if g_next is not None:
            q = decode_spikes(code).to(compute_dtype)
            g = g + (g_next * LEAK) * _carry(alpha[t], q, spike_levels, reset)
        grad_x[t] = g
        if membrane:
            g_next = g
        if alpha_grad:
            grad_alpha[t] = (gs * _lsq_slope(ratio[t], low)).sum() / math.sqrt(ratio[t].numel())
    return grad_x, grad_alpha


class MultiStepSpike(torch.autograd.Function):
    """``spikes = MultiStepSpike.apply(x, alpha, spike_levels, reset, use_amplitude, membrane, count)``.

    Returns the spikes and a (T, 2) tensor of positive/negative spike counts (empty unless
    ``count``). Saves int8 codes (and u/alpha only when alpha learns).
    """

    @staticmethod
    def forward(ctx, x, alpha, spike_levels, reset, use_amplitude, membrane, count):
        keep_ratio = alpha.requires_grad
        spikes, codes, ratio, counts = fused_spike_forward(
            x, alpha, spike_levels, reset, use_amplitude, membrane, keep_ratio, count
        )
        ctx.save_for_backward(codes, alpha, ratio)
        ctx.options = (spike_levels, reset, use_amplitude, membrane)
        if counts is None:
            counts = torch.zeros(0, 2, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(counts)
        return spikes, counts

    @staticmethod
    def backward(ctx, grad_s, _grad_counts):
        codes, alpha, ratio = ctx.saved_tensors
        grad_x, grad_alpha = fused_spike_backward(
            grad_s, codes, ratio, alpha, *ctx.options, alpha_grad=ctx.needs_input_grad[1]
        )
        if grad_alpha is not None:
            grad_alpha = grad_alpha.to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------------


class SpikeStats:
    """Spike counts a neuron accumulates while ``record_stats`` is on (no extra passes).

    ``positive[t]`` / ``negative[t]`` count spikes of each sign at step t, ``slots[t]`` the number of
    neuron-steps that could have fired. Tensors stay on the neuron's device (no host sync).
    """

    def __init__(self, num_steps: int, device=None):
        self.positive = torch.zeros(num_steps, dtype=torch.int64, device=device)
        self.negative = torch.zeros(num_steps, dtype=torch.int64, device=device)
        self.slots = torch.zeros(num_steps, dtype=torch.int64, device=device)
        self.calls = 0

    def add(self, counts: torch.Tensor, slots_per_step: int) -> None:
        if self.positive.device != counts.device:
            self.positive, self.negative, self.slots = (
                t.to(counts.device) for t in (self.positive, self.negative, self.slots)
            )
        self.positive += counts[:, 0]
        self.negative += counts[:, 1]
        self.slots += slots_per_step
        self.calls += 1

    def firing_rate(self) -> torch.Tensor:
        """Nonzero spikes / slots, per step (float64)."""
        return (self.positive + self.negative).double() / self.slots.clamp_min(1).double()

    def as_dict(self) -> dict:
        slots = self.slots.clamp_min(1).double()
        return {
            "firing_rate": ((self.positive + self.negative).double() / slots).tolist(),
            "positive_rate": (self.positive.double() / slots).tolist(),
            "negative_rate": (self.negative.double() / slots).tolist(),
            "spikes": (self.positive + self.negative).tolist(),
            "slots": self.slots.tolist(),
        }


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ElasticBiSpikingNeuron(nn.Module):
    """SpikeLM's multi-step neuron. Input and output are time-major: ``(T, ..., D)``.

    Args:
        num_steps: T, the number of time steps; the input's first dimension must equal it.
        spike_levels: ``"ternary"`` ({-1, 0, +1}, SpikeLM) or ``"binary"`` ({0, 1}, the LIF baseline).
        use_amplitude: emit ``alpha_t * q_t`` (True) or ``q_t`` (False; alpha then only sets the
            threshold).
        alpha_init: ``"mean_abs"`` (``alpha_t = 2 * mean|u_t|`` on the first batch) or a positive number.
        learn_alpha: train alpha with the LSQ gradient (False: frozen, as released).
        reset: ``"official"`` (the released update, ternary only) or ``"symmetric"``
            (leaky hard reset on either sign). Binary neurons always use the leaky hard reset.
        membrane: carry the membrane potential across steps (False: each step is spiked on its
            own, as for the K/V re-spiking inside attention).
        backend: ``"auto"``/``"fused"`` (one autograd function for the loop) or ``"reference"``
            (the readable per-step path). Not saved with the model.

    ``alpha`` is an ``nn.Parameter`` of shape (T,) (``requires_grad=learn_alpha``);
    ``initialized`` a bool buffer saved with it. An alpha that has not been initialised is set
    from the first input, sequentially over steps, on every call mode (train or eval).
    """

    def __init__(
        self,
        num_steps: int = 4,
        spike_levels: str = "ternary",
        use_amplitude: bool = True,
        alpha_init: str | float = "mean_abs",
        learn_alpha: bool = False,
        reset: str = "official",
        membrane: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        check_neuron_options(num_steps, spike_levels, use_amplitude, alpha_init, learn_alpha, reset)
        self.num_steps = num_steps
        self.spike_levels = spike_levels
        self.use_amplitude = use_amplitude
        self.alpha_init = alpha_init
        self.learn_alpha = learn_alpha
        self.reset = reset
        self.membrane = membrane
        self.backend = backend
        self.alpha = nn.Parameter(torch.ones(num_steps), requires_grad=learn_alpha)
        self.register_buffer("initialized", torch.tensor(False))
        self.record_stats = False
        self.stats: SpikeStats | None = None
        self._known_initialized = False  # a cache of `initialized`, trusted only when True
        self.reset_alpha()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, spike_levels={self.spike_levels!r}, reset={self.reset!r}, "
            f"use_amplitude={self.use_amplitude}, alpha_init={self.alpha_init!r}, learn_alpha={self.learn_alpha}, "
            f"membrane={self.membrane}"
        )

    @torch.no_grad()
    def reset_alpha(self) -> None:
        """Forget alpha: a numeric ``alpha_init`` sets it now, ``"mean_abs"`` on the next input."""
        if isinstance(self.alpha_init, str):
            self.alpha.fill_(1.0)
            self.initialized.fill_(False)
        else:
            self.alpha.fill_(float(self.alpha_init))
            self.initialized.fill_(True)
        self._known_initialized = False

    def is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def reset_stats(self) -> None:
        self.stats = None

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expects a time-major input of shape (T, ..., features) with T="
                f"{self.num_steps}; got a tensor of shape {tuple(x.shape)}"
            )
        if x.shape[0] != self.num_steps:
            raise ValueError(
                f"{type(self).__name__} was built for num_steps={self.num_steps} but the input's first (time) "
                f"dimension is {x.shape[0]} (shape {tuple(x.shape)}); inputs are time-major (T, ..., features)"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")

    @torch.no_grad()
    def initialize_alpha(self, x: torch.Tensor) -> None:
        """Set alpha_t = 2 * mean|u_t| from ``x``, step by step (u_t needs alpha_{t-1}).

        Under ``torch.distributed`` the sum of |u_t| and the element count are all-reduced at
        every step, so every process ends with the same alpha (that of the global batch).
        """
        self._check_input(x)
        low = _levels_low(self.spike_levels)
        alpha = self.alpha.detach().clone()
        u = carry = None
        for t in range(self.num_steps):
            xt = x[t].float()
            u = xt if t == 0 or not self.membrane else (u * LEAK) * carry + xt
            if _data_parallel():
                local = torch.stack([u.abs().sum(dtype=torch.float64), torch.tensor(float(u.numel()), dtype=torch.float64, device=u.device)])
                total = _all_reduce_sum(local)
                alpha[t] = (2 * total[0] / total[1]).to(alpha.dtype)
            else:
                # the authors' float32 statistic, bit for bit
                alpha[t] = 2 * u.abs().mean()
            alpha_t = alpha[t].clamp_min(ALPHA_FLOOR)
            q = torch.round(u / alpha_t).clamp_(low, 1)
            carry = _carry(alpha_t, q, self.spike_levels, self.reset)
        self.alpha.copy_(alpha)
        self.initialized.fill_(True)
        self._known_initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.is_initialized():
            self.initialize_alpha(x)
        alpha = self.alpha.clamp_min(ALPHA_FLOOR)
        if self.backend == "reference":
            spikes = reference_multistep_spike(
                x, alpha, self.spike_levels, self.reset, self.use_amplitude, self.membrane
            )
            if self.record_stats:
                self._record(self._count(spikes, alpha), x)
            return spikes
        spikes, counts = MultiStepSpike.apply(
            x, alpha, self.spike_levels, self.reset, self.use_amplitude, self.membrane, self.record_stats
        )
        if self.record_stats:
            self._record(counts, x)
        return spikes

    def _count(self, spikes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = spikes.detach().reshape(spikes.shape[0], -1)
            return torch.stack([(flat > 0).sum(1), (flat < 0).sum(1)], dim=1)

    def _record(self, counts: torch.Tensor, x: torch.Tensor) -> None:
        if self.stats is None:
            self.stats = SpikeStats(self.num_steps, device=x.device)
        self.stats.add(counts, x[0].numel())
