"""Spiking layers: a linear layer whose input goes through an elastic bi-spiking neuron."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .neuron import (
    ALPHA_FLOOR,
    ElasticBiSpikingNeuron,
    decode_spikes,
    fused_spike_backward,
    fused_spike_forward,
)


class SpikeLinearFunction(torch.autograd.Function):
    """Neuron then ``F.linear`` in one autograd node.

    Only the int8 spike codes are kept for backward (the float spikes that ``F.linear`` would save
    are rebuilt from them), so the layer's saved state is a quarter of a float32 copy of its input.
    """

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, spike_levels, reset, use_amplitude, membrane, count):
        keep_ratio = alpha.requires_grad
        spikes, codes, ratio, counts = fused_spike_forward(
            x, alpha, spike_levels, reset, use_amplitude, membrane, keep_ratio, count
        )
        y = F.linear(spikes, weight, bias)
        ctx.save_for_backward(codes, alpha, ratio, weight)
        ctx.options = (spike_levels, reset, use_amplitude, membrane)
        ctx.has_bias = bias is not None
        ctx.spike_dtype = spikes.dtype
        if counts is None:
            counts = torch.zeros(0, 2, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(counts)
        return y, counts

    @staticmethod
    def backward(ctx, grad_y, _grad_counts):
        codes, alpha, ratio, weight = ctx.saved_tensors
        spike_levels, reset, use_amplitude, membrane = ctx.options
        grad_x = grad_alpha = grad_weight = grad_bias = None
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[2]:
            q = decode_spikes(codes).to(ctx.spike_dtype)
            spikes = q * alpha.to(q.dtype).view(-1, *([1] * (q.dim() - 1))) if use_amplitude else q
            grad_weight = flat_grad.t().mm(spikes.reshape(-1, spikes.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat_grad.sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_s = grad_y.matmul(weight.to(grad_y.dtype))
            grad_x, grad_alpha = fused_spike_backward(
                grad_s, codes, ratio, alpha, spike_levels, reset, use_amplitude, membrane,
                alpha_grad=ctx.needs_input_grad[1],
            )
            if grad_alpha is not None:
                grad_alpha = grad_alpha.to(alpha.dtype)
        return grad_x, grad_alpha, grad_weight, grad_bias, None, None, None, None, None


class SpikeLinear(nn.Linear):
    """``nn.Linear`` whose input is spiked first: ``y_t = W (alpha_t q_t) + b``.

    Input shape ``(T, ..., in_features)`` with T = ``num_steps``; output ``(T, ..., out_features)``.
    The neuron is ``self.neuron`` (an :class:`ElasticBiSpikingNeuron`; ``neuron_options`` are
    passed to it). With every multiplication by a spike being ``+-alpha`` or 0, ``W s_t`` needs only
    additions, plus one multiplication by alpha per output.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_steps: int = 4,
                 device=None, dtype=None, **neuron_options):
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
        y, counts = SpikeLinearFunction.apply(
            x, alpha, self.weight, self.bias, neuron.spike_levels, neuron.reset, neuron.use_amplitude,
            neuron.membrane, neuron.record_stats,
        )
        if neuron.record_stats:
            neuron._record(counts, x)
        return y
