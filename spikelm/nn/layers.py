"""Spiking layers: a linear layer whose input goes through an elastic bi-spiking neuron."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .neuron import (
    ALPHA_FLOOR,
    ElasticBiSpikingNeuron,
    choose_kernel,
    count_spikes,
    decode_spikes,
    fused_spike_backward,
    fused_spike_forward,
)


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
        y = F.linear(spikes, weight, bias)
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


class SpikeLinear(nn.Linear):
    """``nn.Linear`` whose input is spiked first: ``y_t = W (alpha_t q_t) + b``.

    Input shape ``(T, ..., in_features)`` with T = ``num_steps``; output ``(T, ..., out_features)``.
    The neuron is ``self.neuron`` (an :class:`ElasticBiSpikingNeuron`; ``neuron_options`` are
    passed to it). With every multiplication by a spike being ``+-alpha`` or 0, ``W s_t`` needs only
    additions, plus one multiplication by alpha per output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        num_steps: int = 4,
        device=None,
        dtype=None,
        **neuron_options,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.neuron = ElasticBiSpikingNeuron(num_steps, **neuron_options)

    @property
    def num_steps(self) -> int:
        return self.neuron.num_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neuron = self.neuron
        neuron._check_input(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SpikeLinear expects inputs of shape (T, ..., {self.in_features}); got last dimension "
                f"{x.shape[-1]} (shape {tuple(x.shape)})"
            )
        if neuron.backend == "reference":
            return F.linear(neuron(x), self.weight, self.bias)
        if not neuron.is_initialized():
            neuron.initialize_alpha(x)
        alpha = neuron.alpha.clamp_min(ALPHA_FLOOR)
        options = (neuron.spike_levels, neuron.reset, neuron.use_amplitude, neuron.membrane)
        needs_grad = (
            x.requires_grad
            or alpha.requires_grad
            or self.weight.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        )
        if torch.is_grad_enabled() and needs_grad:
            y, counts = SpikeLinearFunction.apply(
                x, alpha, self.weight, self.bias, *options, neuron.record_stats, neuron.backend
            )
        else:  # no backward: spike and multiply, nothing saved
            spikes, _, _ = fused_spike_forward(x, alpha, *options, False, False, choose_kernel(x, neuron.backend))
            y = F.linear(spikes, self.weight, self.bias)
            counts = count_spikes(spikes) if neuron.record_stats else None
        if neuron.record_stats:
            neuron._record(counts, x)
        return y
