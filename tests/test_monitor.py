"""FiringRateMonitor: records on one step in N, logs what the neurons counted, to TensorBoard."""

import pytest
import torch
from conftest import random_batch, tiny_config
from torch.utils.tensorboard import SummaryWriter

from spikelm import SpikeLMForPreTraining, collect_spike_stats
from spikelm.training.monitor import FiringRateMonitor


def train_with_monitor(log_dir, device):
    model = SpikeLMForPreTraining(tiny_config(num_steps=3)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {k: v.to(device) for k, v in random_batch(model.config).items()}
    writer = SummaryWriter(log_dir)
    monitor = FiringRateMonitor(model, writer, every=2)
    recording, expected = [], {}
    for step in range(5):
        with monitor.record(step):
            recording.append(all(n.record_stats for _, n in model.neurons()))
            loss = model(**batch, labels=batch["input_ids"]).loss
        if recording[-1]:  # what the neurons counted on this step, read directly
            stats = collect_spike_stats(model)
            expected[step] = (
                sum(sum(s["spikes"]) for s in stats.values()) / sum(sum(s["slots"]) for s in stats.values()),
                stats.keys(),
            )
        assert not any(n.record_stats for _, n in model.neurons())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    monitor.flush()
    writer.close()
    return monitor, recording, expected


def check_logged(log_dir, monitor, recording, expected):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert recording == [True, False, True, False, True]
    assert monitor.latest["step"] == 4 and monitor.latest["per_neuron"].keys() == expected[4][1]
    events = EventAccumulator(str(log_dir))
    events.Reload()
    means = events.Scalars("firing_rate/mean")
    assert [e.step for e in means] == [0, 2, 4]
    assert [e.value for e in means] == pytest.approx([expected[s][0] for s in (0, 2, 4)])
    assert {"firing_rate/step_0", "firing_rate/step_2", "firing_rate/positive"} <= set(events.Tags()["scalars"])
    assert "firing_rate/neurons" in events.Tags()["histograms"]


def test_monitor_logs_every_n_steps(tmp_path):
    monitor, recording, expected = train_with_monitor(tmp_path, "cpu")
    assert monitor.latest["mean"] == pytest.approx(expected[4][0])  # on the CPU, logged at once
    check_logged(tmp_path, monitor, recording, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_monitor_on_gpu_logs_without_waiting(tmp_path):
    check_logged(tmp_path, *train_with_monitor(tmp_path, "cuda"))


def test_monitor_rejects_bad_interval():
    with pytest.raises(ValueError, match="every must be a positive"):
        FiringRateMonitor(SpikeLMForPreTraining(tiny_config()), every=0)
