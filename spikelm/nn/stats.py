"""Firing-rate statistics gathered by the neurons themselves while a model runs."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .neuron import named_neurons


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
    """``{neuron name: {"firing_rate": [per step], "positive_rate", "negative_rate", "spikes", "slots", "alpha"}}``.

    Neuron names are module paths (e.g. ``bert.encoder.layer.0.attention.self.qkv.neuron``); the
    K/V re-spiking neurons are ``...attention.self.key_spike`` / ``value_spike``.
    """
    out = {}
    for name, neuron in named_neurons(model):
        if neuron.stats is None:
            continue
        entry = neuron.stats.as_dict()
        entry["alpha"] = neuron.alpha.detach().float().cpu().tolist()
        out[name] = entry
    return out
