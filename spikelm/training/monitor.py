"""Firing rates logged to TensorBoard during training, from the neurons' own spike counters."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from spikelm.nn.neurons import named_neurons
from spikelm.nn.stats import record_spike_stats


class FiringRateMonitor:
    """Records the firing rates of every neuron of ``model`` on one training step in ``every`` and logs them.

    ::

        writer = torch.utils.tensorboard.SummaryWriter(log_dir)
        monitor = FiringRateMonitor(model, writer, every=100)
        for step, batch in enumerate(loader):
            with monitor.record(step):
                loss = model(**batch).loss
            loss.backward()
            ...
        monitor.flush()

    On a recorded step the neurons count their spikes while they run (``record_stats``: a few
    reductions per neuron and step, no extra pass). The counts are gathered into one tensor and, on a
    GPU, copied to the host without waiting; they are logged by a later call once the copy is done
    (``flush()`` waits for what is left), so monitoring never stalls the training step on a host sync.
    Other steps cost nothing. The neurons do not see the attention mask, so the counts include padding
    positions (``spikelm energy`` counts real tokens only).

    Logged at ``step``: ``firing_rate/mean`` (nonzero spikes / slots over every neuron),
    ``firing_rate/positive`` and ``firing_rate/negative`` (fraction of slots per sign),
    ``firing_rate/step_<t>`` (per time step), ``firing_rate_by_neuron/<name>`` (each neuron, over its
    steps) and the histogram ``firing_rate/neurons``. The last figures logged are kept in
    :attr:`latest`; ``writer`` may be None to keep them only there.
    """

    def __init__(self, model: nn.Module, writer=None, every: int = 100):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        self.model = model
        self.writer = writer
        self.every = every
        self.neurons = named_neurons(model)
        self.latest: dict | None = None
        self._pending = []  # (step, neuron names, (neurons, 3, T) counts on the host, CUDA event or None)

    @contextmanager
    def record(self, step: int):
        """Wrap the forward pass of training step ``step``: recorded if ``step % every == 0``."""
        self.flush(wait=False)
        if step % self.every or not self.neurons:
            yield
            return
        with record_spike_stats(self.model):
            yield
        self._snapshot(step)
        self.flush(wait=False)

    def _snapshot(self, step: int) -> None:
        counted = [(name, c) for name, n in self.neurons if (c := n.step_counts()) is not None]
        if not counted:
            return
        counts = torch.stack([c for _, c in counted])
        event = None
        if counts.is_cuda:
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            counts = host
        self._pending.append((step, [name for name, _ in counted], counts, event))

    def flush(self, wait: bool = True) -> None:
        """Log the recorded steps whose counts have reached the host (all of them if ``wait``)."""
        while self._pending:
            step, names, counts, event = self._pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self._pending.pop(0)
            self.latest = self._log(step, names, counts.double())

    def _log(self, step: int, names: list[str], counts: torch.Tensor) -> dict:
        positive, negative, slots = counts.unbind(1)  # each (neurons, T)
        spikes = positive + negative
        per_neuron = spikes.sum(1) / slots.sum(1)
        figures = {
            "step": step,
            "mean": (spikes.sum() / slots.sum()).item(),
            "positive": (positive.sum() / slots.sum()).item(),
            "negative": (negative.sum() / slots.sum()).item(),
            "per_step": (spikes.sum(0) / slots.sum(0)).tolist(),
            "per_neuron": dict(zip(names, per_neuron.tolist(), strict=True)),
        }
        if self.writer is not None:
            for key in ("mean", "positive", "negative"):
                self.writer.add_scalar(f"firing_rate/{key}", figures[key], step)
            for t, rate in enumerate(figures["per_step"]):
                self.writer.add_scalar(f"firing_rate/step_{t}", rate, step)
            for name, rate in figures["per_neuron"].items():
                self.writer.add_scalar(f"firing_rate_by_neuron/{name}", rate, step)
            self.writer.add_histogram("firing_rate/neurons", per_neuron, step)
        return figures
