"""The elastic bi-spiking neuron of SpikeLM (SPEC section 2), multi-step and time-major.

A neuron turns an input current ``x`` of shape ``(T, ..., D)`` into spikes ``alpha_t * q_t`` with
``q_t`` in {-1, 0, +1} (ternary) or {0, 1} (binary), one amplitude ``alpha_t`` per time step.

Two implementations of the same maths live here:

* :func:`reference_multistep_spike` -- a readable per-step loop recorded by autograd, one small
  straight-through function per step. It is the definition the fast paths are tested against.
* :class:`MultiStepSpike` -- the whole time loop in one autograd function that keeps only int8
  codes (spike sign plus the straight-through window) for backward. Its loop runs as plain
  PyTorch ops, through torch.compile (one vectorised pass on CPU) or as a Triton kernel on CUDA
  (``kernels_triton.py``); every kernel gives the reference path's spikes bit for bit.

Amplitudes are set from the first batch a neuron sees (``alpha_t = 2 * mean|u_t|``), sequentially
over the steps, with the statistic summed across processes under data parallelism.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.distributed as dist
from torch import nn

from .. import cpu_kernels, kernels
from .._constants import ALPHA_FLOOR, LEAK, OUTSIDE
from ..exact import exact_linear
from ..kernels import choose_kernel, run_compiled, spike_linear
from .base import SpikingNeuron, named_neurons, register_neuron  # noqa: F401  (named_neurons: the old import path)

SPIKE_LEVELS = ("ternary", "binary")
RESETS = ("official", "symmetric")
BACKENDS = ("auto", "fused", "compiled", "triton", "reference")


MAX_NUM_STEPS = 64  # T copies of every activation are held: beyond this, memory runs out long before any benefit


def check_neuron_options(
    num_steps: int,
    spike_levels: str = "ternary",
    use_amplitude: bool = True,
    alpha_init: str | float = "mean_abs",
    learn_alpha: bool = False,
    reset: str = "official",
) -> None:
    """Raise ``ValueError`` naming the bad argument if a neuron option is out of range."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(
            f"num_steps must be an integer in [1, {MAX_NUM_STEPS}] (the number of time steps T), got {num_steps!r}"
        )
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
    elif (
        isinstance(alpha_init, bool) or not isinstance(alpha_init, Real) or not alpha_init > 0 or math.isinf(alpha_init)
    ):
        raise ValueError(f"alpha_init must be 'mean_abs' or a positive finite number, got {alpha_init!r}")
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


def membrane_update(u: torch.Tensor | None, carry: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor:
    """The membrane potential u_t: ``x_t`` at the first step (``u`` None), else ``(LEAK * u_{t-1}) * carry + x_t``.

    ``carry`` is what the previous step's spike left (:func:`_carry`). Every PyTorch path (the reference
    loop, alpha initialisation, the fused loop) updates the membrane here; the Triton kernels are tested
    against it.
    """
    return x_t if u is None else (u * LEAK) * carry + x_t


def reference_step(u: torch.Tensor, alpha_t: torch.Tensor, spike_levels: str, reset: str, use_amplitude: bool):
    """One step of the readable path on the membrane potential ``u``: ``(spike, carry for the next step)``.

    The spike is recorded by autograd (straight-through and LSQ gradients); the carry is a constant.
    """
    low = _levels_low(spike_levels)
    s = _SpikeStep.apply(u, alpha_t, low, use_amplitude)
    with torch.no_grad():
        q = torch.round(u / alpha_t).clamp_(low, 1)
        carry = _carry(alpha_t.detach(), q, spike_levels, reset)
    return s, carry


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

    Numerics: as the fused paths, the membrane arithmetic runs in float32 (float64 stays float64): a
    bfloat16/float16 input is upcast, and the spikes are returned in the input's dtype. So every path gives
    the same spikes bit for bit for half-precision inputs too.
    """
    dtype = x.dtype
    compute = _compute_dtype(dtype)
    x, alpha = x.to(compute), alpha.to(compute)
    spikes = []
    u = carry = None
    for t in range(x.shape[0]):
        u = membrane_update(u if membrane else None, carry, x[t])
        s, carry = reference_step(u, alpha[t], spike_levels, reset, use_amplitude)
        spikes.append(s)
    return torch.stack(spikes).to(dtype)


# ----------------------------------------------------------------------------------------------
# The fused path: the whole time loop in one autograd function, int8 codes saved for backward.
#
# `spike_steps` and `spike_steps_backward` write the loop once, on whole tensors, in the reference
# path's float32 arithmetic. Run as they are (kernel "fused") each step is a few PyTorch ops; through
# torch.compile (kernel "compiled", the CPU default for large inputs) the loop becomes one
# vectorised pass over the elements with the membrane in registers; on CUDA a Triton kernel
# (kernels_triton.py) does the same.
# ----------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Membrane arithmetic runs in float32 (float64 stays float64); half-precision inputs are upcast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def spike_steps(x, alpha, spike_levels, reset, use_amplitude, membrane, keep_codes, keep_ratio):
    """The neuron over all steps of ``x`` (T, ...) without autograd.

    Returns ``(spikes, codes, ratio)``: spikes in ``x``'s dtype; ``codes`` int8 (q plus
    :data:`OUTSIDE` where the straight-through window is left; None unless ``keep_codes``);
    ``ratio`` = u/alpha (None unless ``keep_ratio``; the LSQ gradient needs it).
    """
    low = _levels_low(spike_levels)
    dtype = _compute_dtype(x.dtype)
    spikes, codes, ratios = [], [], []
    u = carry = None
    for t in range(x.shape[0]):
        alpha_t = alpha[t].to(dtype)
        xt = x[t].to(dtype)
        u = membrane_update(u if membrane else None, carry, xt)
        ratio = u / alpha_t
        q = torch.round(ratio).clamp(low, 1)
        spikes.append((q * alpha_t if use_amplitude else q).to(x.dtype))
        if keep_codes:
            codes.append(torch.where(ratio.abs() > 1, q + OUTSIDE, q).to(torch.int8))
        if keep_ratio:
            ratios.append(ratio)
        carry = _carry(alpha_t, q, spike_levels, reset)
    return torch.stack(spikes), torch.stack(codes) if codes else None, torch.stack(ratios) if ratios else None


def spike_steps_backward(grad_s, codes, alpha, spike_levels, reset, use_amplitude, membrane, grad_dtype, spike_dtype):
    """The input gradient from the saved codes, backwards over the steps; see :func:`fused_spike_backward`."""
    dtype = _compute_dtype(grad_s.dtype)
    grads, spikes = [None] * codes.shape[0], [None] * codes.shape[0]
    g_next = None
    for t in reversed(range(codes.shape[0])):
        alpha_t = alpha[t].to(dtype)
        code = codes[t].to(dtype)
        q = torch.where(code > 1, code - OUTSIDE, code)
        g = torch.where(code <= 1, grad_s[t].to(dtype), 0.0)
        if g_next is not None:
            g = g + (g_next * LEAK) * _carry(alpha_t, q, spike_levels, reset)
        grads[t] = g.to(grad_dtype)
        if membrane:
            g_next = g
        if spike_dtype is not None:
            spikes[t] = (q * alpha_t if use_amplitude else q).to(spike_dtype)
    return torch.stack(grads), torch.stack(spikes) if spike_dtype is not None else None


def spike_steps_inference(x, alpha, spike_levels, reset, use_amplitude, membrane):
    """The spikes of :func:`spike_steps` (no codes, no ratio) with fewer, in-place operations: the path of
    inference on small inputs (a decoding step), where the cost is the number of operations, not their size.

    Bit for bit the same arithmetic: ``u = (LEAK * u) * carry + x_t``, ``q = clamp(round(u / alpha_t))``,
    ``s = q * alpha_t``; without a membrane every step at once (each element's operations are the same).
    """
    low = _levels_low(spike_levels)
    dtype = _compute_dtype(x.dtype)
    a = alpha.to(dtype)
    xs = x if x.dtype == dtype else x.to(dtype)
    if not membrane:
        scale = a.view(-1, *([1] * (x.dim() - 1)))
        q = torch.div(xs, scale).round_().clamp_(low, 1)
        out = q.mul_(scale) if use_amplitude else q
        return out if out.dtype == x.dtype else out.to(x.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    official = spike_levels == "ternary" and reset == "official"
    u = carry = None
    for t, alpha_t in enumerate(a.unbind(0)):
        u = xs[t] if u is None else torch.mul(u, LEAK).mul_(carry).add_(xs[t])
        q = torch.div(u, alpha_t).round_().clamp_(low, 1)
        s = torch.mul(q, alpha_t, out=out[t]) if use_amplitude else out[t].copy_(q)
        if t + 1 < x.shape[0]:
            if official:  # alpha_t - alpha_t * q, and alpha_t * q == q * alpha_t exactly
                carry = torch.sub(alpha_t, s if use_amplitude else torch.mul(alpha_t, q))
            else:
                carry = q.abs_().neg_().add_(1.0)  # 1 - |q| (exact: q is -1, 0 or 1)
    return out if dtype == x.dtype else out.to(x.dtype)


def _as_steps_rows_cols(x: torch.Tensor) -> torch.Tensor:
    """A (T, rows, cols) view of ``x`` (T, ..., D) without copying where its strides allow."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    try:
        return x.view(x.shape[0], -1, x.shape[-1])
    except RuntimeError:
        return x.reshape(x.shape[0], -1, x.shape[-1])


def fused_spike_forward(
    x, alpha, spike_levels, reset, use_amplitude, membrane, keep_codes=True, keep_ratio=False, kernel="fused"
):
    """:func:`spike_steps` on the chosen kernel; ``alpha`` already floored. Returns (spikes, codes, ratio)."""
    shape = x.shape
    x3 = _as_steps_rows_cols(x.detach())
    args = (x3, alpha.detach(), spike_levels, reset, use_amplitude, membrane, keep_codes, keep_ratio)
    if kernel == "triton":
        from ..kernels_triton import triton_spike_forward

        out = triton_spike_forward(*args)
    elif kernel == "compiled":
        out = run_compiled(spike_steps, *args)
    else:
        out = spike_steps(*args)
    return tuple(t.view(shape) if t is not None else None for t in out)


def fused_spike_backward(
    grad_s,
    codes,
    ratio,
    alpha,
    spike_levels,
    reset,
    use_amplitude,
    membrane,
    alpha_grad,
    grad_dtype=None,
    spike_dtype=None,
    kernel="fused",
):
    """Gradients from the saved codes: ``(grad_x, grad_alpha, spikes)``.

    ``grad_alpha`` (the LSQ gradient, from ``ratio``) only if ``alpha_grad``; ``spikes`` rebuilt in
    ``spike_dtype`` (for a weight gradient) only if that is given, in the same pass.
    """
    shape = codes.shape
    grad_dtype = grad_s.dtype if grad_dtype is None else grad_dtype
    g3 = _as_steps_rows_cols(grad_s.contiguous())
    c3 = _as_steps_rows_cols(codes)
    args = (g3, c3, alpha.detach(), spike_levels, reset, use_amplitude, membrane, grad_dtype, spike_dtype)
    if kernel == "triton":
        from ..kernels_triton import triton_spike_backward

        grad_x, spikes = triton_spike_backward(*args)
    elif kernel == "compiled":
        grad_x, spikes = run_compiled(spike_steps_backward, *args)
    else:
        grad_x, spikes = spike_steps_backward(*args)
    grad_alpha = None
    if alpha_grad:
        slope = _lsq_slope(ratio, _levels_low(spike_levels))
        per_step = (grad_s.to(slope.dtype) * slope).reshape(shape[0], -1).sum(1)
        grad_alpha = per_step / math.sqrt(ratio[0].numel())
    return grad_x.view(shape), grad_alpha, spikes.view(shape) if spikes is not None else None


def decode_spikes(codes: torch.Tensor, alpha: torch.Tensor, use_amplitude: bool, dtype: torch.dtype) -> torch.Tensor:
    """The spikes stored in ``codes``: ``alpha_t * q`` (or ``q``) in ``dtype``."""
    q = codes - OUTSIDE * (codes > 1).to(torch.int8)
    q = q.to(dtype)
    return q * alpha.to(dtype).view(-1, *([1] * (q.dim() - 1))) if use_amplitude else q


def count_spikes(spikes: torch.Tensor) -> torch.Tensor:
    """(T, 2) int64: positive and negative spikes per step."""
    flat = spikes.detach().reshape(spikes.shape[0], -1)
    return torch.stack([(flat > 0).sum(1), (flat < 0).sum(1)], dim=1)


class MultiStepSpike(torch.autograd.Function):
    """The fused neuron as one autograd function.

    ``spikes, counts = MultiStepSpike.apply(x, alpha, spike_levels, reset, use_amplitude, membrane, count[, backend])``

    ``counts`` is a (T, 2) tensor of positive/negative spike counts (empty unless ``count``).
    Saves int8 codes (and u/alpha only when alpha learns). ``backend`` is "auto" (default),
    "fused", "compiled" or "triton" (see :func:`choose_kernel`).
    """

    @staticmethod
    def forward(ctx, x, alpha, spike_levels, reset, use_amplitude, membrane, count, backend="auto"):
        kernel = choose_kernel(x, backend)
        spikes, codes, ratio = fused_spike_forward(
            x, alpha, spike_levels, reset, use_amplitude, membrane, True, alpha.requires_grad, kernel
        )
        ctx.save_for_backward(codes, alpha, ratio)
        ctx.options = (spike_levels, reset, use_amplitude, membrane)
        ctx.kernel = kernel
        ctx.x_dtype = x.dtype
        counts = count_spikes(spikes) if count else torch.zeros(0, 2, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(counts)
        return spikes, counts

    @staticmethod
    def backward(ctx, grad_s, _grad_counts):
        codes, alpha, ratio = ctx.saved_tensors
        grad_x, grad_alpha, _ = fused_spike_backward(
            grad_s,
            codes,
            ratio,
            alpha,
            *ctx.options,
            alpha_grad=ctx.needs_input_grad[1],
            grad_dtype=ctx.x_dtype,
            kernel=ctx.kernel,
        )
        if grad_alpha is not None:
            grad_alpha = grad_alpha.to(alpha.dtype)
        return (grad_x, grad_alpha) + (None,) * (len(ctx.needs_input_grad) - 2)


class SpikeLinearFunction(torch.autograd.Function):
    """Neuron then ``F.linear`` in one autograd node.

    Only the int8 spike codes are kept for backward (the float spikes that ``F.linear`` would save
    are rebuilt from them in the same pass that computes the input gradient), so the layer's saved
    state is a quarter of a float32 copy of its input.
    """

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, spike_levels, reset, use_amplitude, membrane, count, backend="auto"):
        kernel = choose_kernel(x, backend)
        spikes, codes, ratio = fused_spike_forward(
            x, alpha, spike_levels, reset, use_amplitude, membrane, True, alpha.requires_grad, kernel
        )
        y = exact_linear(spikes, weight, bias)  # the inference value (spikelm.nn.exact); backward below
        ctx.save_for_backward(codes, alpha, ratio, weight)
        ctx.options = (spike_levels, reset, use_amplitude, membrane)
        ctx.kernel = kernel
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        counts = count_spikes(spikes) if count else torch.zeros(0, 2, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(counts)
        return y, counts

    @staticmethod
    def backward(ctx, grad_y, _grad_counts):
        codes, alpha, ratio, weight = ctx.saved_tensors
        spike_levels, reset, use_amplitude, membrane = ctx.options
        need_x, need_alpha, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_x = grad_alpha = grad_weight = grad_bias = spikes = None
        if need_x or need_alpha:
            grad_s = grad_y.matmul(weight.to(grad_y.dtype))
            grad_x, grad_alpha, spikes = fused_spike_backward(
                grad_s,
                codes,
                ratio,
                alpha,
                spike_levels,
                reset,
                use_amplitude,
                membrane,
                alpha_grad=need_alpha,
                grad_dtype=ctx.x_dtype,
                spike_dtype=grad_y.dtype if need_weight else None,
                kernel=ctx.kernel,
            )
            if grad_alpha is not None:
                grad_alpha = grad_alpha.to(alpha.dtype)
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        if need_weight:
            if spikes is None:
                spikes = decode_spikes(codes, alpha, use_amplitude, grad_y.dtype)
            grad_weight = flat_grad.t().mm(spikes.reshape(-1, spikes.shape[-1])).to(weight.dtype)
        if ctx.has_bias and need_bias:
            grad_bias = flat_grad.sum(0).to(weight.dtype)
        return grad_x, grad_alpha, grad_weight, grad_bias, None, None, None, None, None, None


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


@register_neuron
class ElasticBiSpikingNeuron(SpikingNeuron):
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
        backend: how the loop runs (not saved with the model). ``"reference"``: the readable per-step
            path, as autograd records it. The others run it in one autograd function that saves int8
            codes: ``"fused"`` (a plain PyTorch loop), ``"compiled"`` (the same loop through
            torch.compile: one vectorised pass), ``"triton"`` (a Triton kernel, CUDA only) and
            ``"auto"`` (default: Triton on CUDA, compiled on CPU for inputs of at least
            :data:`spikelm.nn.kernels.COMPILE_MIN_ELEMENTS` elements, else fused; :mod:`spikelm.nn.kernels` decides,
            with its switch).

    ``alpha`` is an ``nn.Parameter`` of shape (T,) (``requires_grad=learn_alpha``);
    ``initialized`` a bool buffer saved with it. An alpha that has not been initialised is set
    from the first input, sequentially over steps, on every call mode (train or eval).

    As a plug-in (:class:`~spikelm.nn.neurons.base.SpikingNeuron`), ``neuron="elastic"``: the network runs as T
    copies folded into the batch axis, the conversion-config fields are ``num_steps`` and the options above.
    """

    name = "elastic"
    config_fields = {
        "num_steps": 4,
        "spike_levels": "ternary",
        "use_amplitude": True,
        "alpha_init": "mean_abs",
        "learn_alpha": False,
        "reset": "official",
    }
    # the named recipe: T = 4, symmetric reset (far better than the official reset on a pretrained LLM)
    recipe_defaults = {"neuron": "elastic", "num_steps": 4, "reset": "symmetric"}
    cache_layout = "step_codes"
    traceless_fields = ("num_steps", "spike_levels", "use_amplitude", "reset")
    counting_backend = "reference"  # the per-step path returns the spikes to the energy counter's hooks

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
        alpha = self.alpha.detach().clone()
        u = carry = None
        for t in range(self.num_steps):
            u = membrane_update(u if self.membrane else None, carry, x[t].float())
            if _data_parallel():
                local = torch.stack(
                    [
                        u.abs().sum(dtype=torch.float64),
                        torch.tensor(float(u.numel()), dtype=torch.float64, device=u.device),
                    ]
                )
                total = _all_reduce_sum(local)
                alpha[t] = (2 * total[0] / total[1]).to(alpha.dtype)
            else:
                # the authors' float32 statistic, bit for bit
                alpha[t] = 2 * u.abs().mean()
            _, carry = reference_step(u, alpha[t].clamp_min(ALPHA_FLOOR), self.spike_levels, self.reset, True)
        self.alpha.copy_(alpha)
        self.initialized.fill_(True)
        self._known_initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``exact_linear(self(x), weight, bias)`` (:mod:`spikelm.nn.exact`: float64 accumulation, one rounding); on
        the fused backends in one autograd node that saves int8 codes (not the spikes). On ``"reference"`` it is
        exactly that: the module is called, so its hooks see the spikes."""
        if self.backend == "reference":
            return exact_linear(self(x), weight, bias)
        return self._run(x, weight, bias)

    def _run(self, x, weight=None, bias=None):
        """The one dispatch: spikes of ``x`` (then ``F.linear`` if ``weight`` is given) on ``self.backend``."""
        self._check_input(x)
        if not self.is_initialized():
            self.initialize_alpha(x)
        alpha = self.alpha.clamp_min(ALPHA_FLOOR)
        options = (self.spike_levels, self.reset, self.use_amplitude, self.membrane)
        linear = weight is not None
        params = (alpha, weight, bias) if linear else (alpha,)
        counts = None
        if self.backend == "reference":  # (linear() never gets here: it calls the module)
            out = reference_multistep_spike(x, alpha, *options)
            if self.record_stats:
                counts = count_spikes(out)
        elif torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
            if linear:
                out, counts = SpikeLinearFunction.apply(
                    x, alpha, weight, bias, *options, self.record_stats, self.backend
                )
            else:
                out, counts = MultiStepSpike.apply(x, alpha, *options, self.record_stats, self.backend)
        else:  # no backward: nothing to save
            kernel = kernels.neuron_kernel(x, self.backend)  # spikelm.nn.kernels decides
            if kernel == kernels.CPP:  # one C++ pass (same spikes, bit for bit)
                low = _levels_low(self.spike_levels)
                official = self.spike_levels == "ternary" and self.reset == "official"
                a = alpha.detach().float()  # the PyTorch loop computes float32 input in float32, whatever alpha's dtype
                out = cpu_kernels.elastic_spikes(x, a, low, official, self.use_amplitude, self.membrane)
            elif kernel == "fused":
                out = spike_steps_inference(x.detach(), alpha.detach(), *options)
            else:
                out, _, _ = fused_spike_forward(x, alpha, *options, False, False, kernel)
            if self.record_stats:
                counts = count_spikes(out)
            if linear:  # the few-row kernel for a few rows of spikes on CPU (decoding), else the GEMM
                out = spike_linear(out, weight, bias)
        if self.record_stats:
            self._record(counts, x)
        return out

    def _record(self, counts: torch.Tensor, x: torch.Tensor) -> None:
        if self.stats is None:
            self.stats = SpikeStats(self.num_steps, device=x.device)
        self.stats.add(counts, x[0].numel())

    # -- the plug-in interface (spikelm.nn.neurons.base.SpikingNeuron) ----------------------------------------------

    @classmethod
    def options(cls, fields) -> dict:
        """The neuron's keyword arguments (all but ``num_steps``) from conversion-config ``fields``."""
        return {name: cls.field(fields, name) for name in cls.config_fields if name != "num_steps"}

    @classmethod
    def check_config(cls, fields) -> None:
        check_neuron_options(cls.field(fields, "num_steps"), **cls.options(fields))

    @classmethod
    def model_steps(cls, fields) -> int:
        return cls.field(fields, "num_steps")

    @classmethod
    def recipe(cls, num_steps: int | None = None) -> dict:
        fields = dict(cls.recipe_defaults)
        if num_steps is not None:
            fields["num_steps"] = num_steps
        return fields

    @classmethod
    def from_config(cls, fields, channels, per_step: bool) -> ElasticBiSpikingNeuron:
        neuron = cls(cls.field(fields, "num_steps"), membrane=not per_step, **cls.options(fields))
        return neuron.float()  # alphas stay float32 in a bfloat16 model (and load as such): the membrane is float32

    @classmethod
    def describe(cls, fields) -> str:
        f = {name: cls.field(fields, name) for name in cls.config_fields}
        return (
            f"SpikeLM's elastic bi-spiking neuron ({f['spike_levels']} spikes, T = {f['num_steps']}, "
            f"{f['reset']} reset, amplitude {'on' if f['use_amplitude'] else 'off'}, alpha "
            f"{'learned' if f['learn_alpha'] else 'frozen'} after initialisation from data)"
        )

    @classmethod
    def summary(cls, fields) -> str:
        return f"elastic neuron T={cls.field(fields, 'num_steps')}, {cls.field(fields, 'spike_levels')} spikes"

    def spike_folded(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """Time-major over the copies: a linear input (T*B, ..., C) runs as (T, rows, C); K/V (T*B, H, L, d) as
        (T, B, H, L, d)."""
        if x.dim() > 3:
            return self(x.reshape(steps, -1, *x.shape[1:])).view(x.shape)
        return self(x.reshape(steps, -1, x.shape[-1])).view(x.shape)

    def initialize_parameters(self, init) -> None:
        """Not yet initialised (alpha == 1, the authors' marker) unless ``alpha_init`` is a number."""
        numeric = not isinstance(self.alpha_init, str)
        init.constant_(self.alpha, float(self.alpha_init) if numeric else 1.0)
        init.constant_(self.initialized, numeric)
        self._known_initialized = False

    def step_spikes(self, x: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output time-major, on the reference backend: level 1 wherever the output is nonzero."""
        fired = (output.detach() != 0).long()
        return fired, fired

    def reset_calibration(self) -> None:
        self.reset_alpha()

    def state_loaded(self) -> None:
        self._known_initialized = False  # re-read the loaded `initialized` flag on first use

    def calibration_flag(self) -> bool:
        return bool(self.initialized)

    def state_problem(self) -> str | None:
        if bool(self.initialized) and not bool((self.alpha > 0).all()):
            alpha = [round(a, 4) for a in self.alpha.detach().tolist()]
            return f".alpha {alpha} is not positive; a calibrated spike amplitude is > 0 (the model was edited)"
        return None

    def spike_stats(self) -> dict | None:
        """:class:`SpikeStats` as a dict, plus ``alpha`` (per step)."""
        if self.stats is None:
            return None
        entry = self.stats.as_dict()
        entry["alpha"] = self.alpha.detach().float().cpu().tolist()
        return entry

    def step_counts(self) -> torch.Tensor | None:
        if self.stats is None:
            return None
        return torch.stack([self.stats.positive, self.stats.negative, self.stats.slots])

    def reader_macs(self, steps: int, outputs: int) -> torch.Tensor:
        """One alpha multiply per output and step (none without amplitude: the spikes are then +-1)."""
        macs = torch.zeros(steps, dtype=torch.int64)
        if self.use_amplitude:
            macs[:] = outputs
        return macs

    def attention_ops(
        self, product: str, steps: int, pairs: int, heads: int, head_dim: int, queries: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One alpha multiply per score (Q K^T) or per context output (P V) and step; no extra accumulates."""
        per_step = heads * pairs if product == "scores" else heads * head_dim * queries
        macs = torch.full((steps,), per_step if self.use_amplitude else 0, dtype=torch.int64)
        return macs, torch.zeros(steps, dtype=torch.int64)

    def packs_kv_on_cpu(self) -> bool:
        """Plain elastic K/V neurons without membrane, statistics or hooks, on ``"auto"``, calibrated."""
        return (
            type(self) is ElasticBiSpikingNeuron
            and not self.membrane
            and self.backend == "auto"
            and not self.record_stats
            and self.is_initialized()
            and not self._forward_hooks
            and not self._forward_pre_hooks
        )
