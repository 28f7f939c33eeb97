"""The spiking neurons, each a plug-in of one interface (:class:`~spikelm.nn.neurons.base.SpikingNeuron`), and
their registry by the conversion config's ``neuron`` name (docs/CONVERSION.md, "Adding a neuron").

* :mod:`.elastic`: SpikeLM's elastic bi-spiking neuron (``"elastic"``) and its kernels' dispatch;
* :mod:`.gif`: SpikeLLM's generalized integrate-and-fire neuron with saliency-based extra steps.

A new neuron is one module here (a :class:`SpikingNeuron` subclass decorated with :func:`register_neuron`) imported
below, plus its tests. ``spikelm.nn.neuron`` and ``spikelm.nn.gif``, the modules' old paths, stay importable: they
are the same module objects (:mod:`spikelm.nn`).
"""

from __future__ import annotations

from . import elastic, gif
from .base import (
    SpikingNeuron,
    named_neurons,
    neuron_class,
    neuron_classes,
    neuron_names,
    register_neuron,
)

# the default of `spikify --neuron` and of the demo: the best training-free recipe (docs/CONVERSION.md, the ladder)
DEFAULT_NEURON = "gif"

__all__ = [
    "DEFAULT_NEURON",
    "SpikingNeuron",
    "elastic",
    "gif",
    "named_neurons",
    "neuron_class",
    "neuron_classes",
    "neuron_names",
    "register_neuron",
]
