"""The spiking neurons, each a plug-in of one interface (:class:`~spikelm.nn.neurons.base.SpikingNeuron`), and
their registry by the conversion config's ``neuron`` name (docs/CONVERSION.md, "Adding a neuron").

* :mod:`.elastic`: SpikeLM's elastic bi-spiking neuron (``"elastic"``) and its kernels' dispatch;
* :mod:`.gif`: SpikeLLM's generalized integrate-and-fire neuron with saliency-based extra steps;
* :mod:`.signed`: the signed multi-level neuron (SpikeLM's bi-directional spikes with L levels per sign).

A new neuron is one module here (a :class:`SpikingNeuron` subclass decorated with :func:`register_neuron`) imported
below, plus its tests. ``spikelm.nn.neuron`` and ``spikelm.nn.gif``, the modules' old paths, stay importable: they
are the same module objects (:mod:`spikelm.nn`).
"""

from __future__ import annotations

from . import elastic, gif, signed
from .base import (
    SpikingNeuron,
    named_neurons,
    neuron_class,
    neuron_classes,
    neuron_names,
    register_neuron,
)

# the default of `spikify --neuron` and of the demo: the perplexity-energy frontier's best point that meets both targets
# (at most 1.38x the real-valued perplexity, at most 0.6x its compute energy inside the blocks; the rule is in
# spikelm.conversion.recipes and docs/CONVERSION.md, "Signed spikes and energy")
DEFAULT_NEURON = "signed"

__all__ = [
    "DEFAULT_NEURON",
    "SpikingNeuron",
    "elastic",
    "gif",
    "named_neurons",
    "signed",
    "neuron_class",
    "neuron_classes",
    "neuron_names",
    "register_neuron",
]
