"""Spiking layers: a linear layer whose input goes through an elastic bi-spiking neuron."""

from __future__ import annotations

import torch
from torch import nn

from .neurons import neuron_class
from .neurons.elastic import SpikeLinearFunction

__all__ = ["SpikeLinear", "SpikeLinearFunction"]


class SpikeLinear(nn.Linear):
    """``nn.Linear`` whose input is spiked first: ``y_t = W (alpha_t q_t) + b``.

    Input shape ``(T, ..., in_features)`` with T = ``num_steps``; output ``(T, ..., out_features)``.
    The neuron is ``self.neuron`` (an elastic bi-spiking neuron, :mod:`spikelm.nn.neurons.elastic`;
    ``neuron_options`` are passed to it). With every multiplication by a spike being ``+-alpha`` or 0, ``W s_t``
    needs only additions, plus one multiplication by alpha per output.
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
        self.neuron = neuron_class("elastic")(num_steps, **neuron_options)

    @property
    def num_steps(self) -> int:
        return self.neuron.num_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.neuron._check_input(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SpikeLinear expects inputs of shape (T, ..., {self.in_features}); got last dimension "
                f"{x.shape[-1]} (shape {tuple(x.shape)})"
            )
        return self.neuron.linear(x, self.weight, self.bias)
