"""Firing-rate statistics gathered by the neurons themselves while a model runs."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .neurons import named_neurons


@contextmanager
def record_spike_stats(model: nn.Module):
    """Within the block every neuron of ``model`` counts its spikes (per step and sign).

    Counts start from zero on entry and stay readable after exit via :func:`collect_spike_stats`.
    """
    neurons = named_neurons(model)
    previous = [n.record_stats for _, n in neurons]
    for _, neuron in neurons:
        neuron.reset_stats()
        neuron.record_stats = True
    try:
        yield model
    finally:
        for (_, neuron), flag in zip(neurons, previous, strict=True):
            neuron.record_stats = flag


def collect_spike_stats(model: nn.Module) -> dict[str, dict]:
    """``{neuron name: the neuron's spike_stats()}`` for every neuron that recorded something
    (:meth:`~spikelm.nn.neurons.base.SpikingNeuron.spike_stats`): ``"firing_rate"``, ``"spikes"`` and ``"slots"``
    per step for every neuron, and each neuron's own entries (the elastic neuron: ``"positive_rate"``,
    ``"negative_rate"``, ``"alpha"``; GIF: ``"levels"``, ``"tokens"``, ``"groups"``, ``"scales"``).

    Neuron names are module paths (e.g. ``bert.encoder.layer.0.attention.self.qkv.neuron``); the
    K/V re-spiking neurons are ``...attention.self.key_spike`` / ``value_spike``.
    """
    out = {}
    for name, neuron in named_neurons(model):
        entry = neuron.spike_stats()
        if entry is not None:
            out[name] = entry
    return out
