"""The signed neuron's outlier tokens (``signed_outlier_ratio``): a token whose max |x| at a linear input exceeds the
calibrated threshold passes real-valued there. Hand-computed codes, the calibration's threshold against
``torch.median``, cached == uncached decoding, save/load, and the energy counter against a hand count (the passing
tokens' readers multiply: fan-in x fan-out MACs, no accumulates)."""

from __future__ import annotations

import math

import pytest
import torch
from test_spikify import greedy, token_ids, uncached_greedy
from test_spikify_signed import signed_model
from transformers import AutoModelForCausalLM

from spikelm.conversion import neurons, placement
from spikelm.conversion.config import SpikeLMConversionConfig
from spikelm.nn.neurons.signed import SignedNeuron


def hand_signed(row: list[float], group: int, top: int) -> list[float]:
    """Per group of ``group`` channels: scale = max |x| / Q in float32, code = round half to even, x_hat = code x
    scale (the module docstring's formula, written out)."""
    out = []
    for start in range(0, len(row), group):
        part = torch.tensor(row[start : start + group], dtype=torch.float32)
        scale = part.abs().max() / top
        for value in part:
            code = round(float(value / scale))  # Python's round: half to even, as torch.round
            code = max(-top, min(top, code))
            out.append(float(torch.tensor(code, dtype=torch.float32) * scale))
    return out


def test_an_outlier_token_passes_real_valued_and_fires_nothing():
    neuron = SignedNeuron(8, bits=4, group_size=4, outlier_ratio=2.0)
    rows = [[1.0, -2.0, 0.5, 0.1, 3.0, -1.0, 0.2, 0.7], [50.0, 1.0, -2.0, 3.0, 0.5, 0.5, 0.5, 0.5]]
    x = torch.tensor(rows)
    # uncalibrated (threshold 0): every token spikes
    assert neuron.real_rows(x) is None
    assert neuron(x).tolist() == [hand_signed(r, 4, 7) for r in rows]
    neuron.outlier_threshold.fill_(10.0)  # row 1's max 50 > 10, row 0's 3 is not
    assert neuron.real_rows(x).tolist() == [False, True]
    out = neuron(x)
    assert out[0].tolist() == hand_signed(rows[0], 4, 7)
    assert torch.equal(out[1], x[1])
    levels = neuron.step_levels(x)  # (T, rows, C)
    assert int(levels[:, 1].sum()) == 0
    scales = [torch.tensor(2.0) / 7, torch.tensor(3.0) / 7]  # float32, as the neuron computes them
    hand = [abs(round(float(torch.tensor(v) / scales[i // 4]))) for i, v in enumerate(rows[0])]
    assert levels[:, 0].sum(0).tolist() == hand
    # the same value with autograd recording; the input's gradient is the identity
    y = x.clone().requires_grad_()
    out2 = neuron(y)
    assert torch.equal(out2.detach(), out)
    out2.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(x))


def test_the_neurons_linear_multiplies_an_outlier_token_as_its_forward_passes_it():
    neuron = SignedNeuron(8, bits=4, group_size=4, outlier_ratio=2.0)
    rows = [[1.0, -2.0, 0.5, 0.1, 3.0, -1.0, 0.2, 0.7], [50.0, 1.0, -2.0, 3.0, 0.5, 0.5, 0.5, 0.5]]
    x = torch.tensor(rows)
    weight = torch.linspace(-1, 1, 24).view(3, 8)
    bias = torch.tensor([0.5, -0.25, 0.0])
    neuron.outlier_threshold.fill_(10.0)
    out = neuron.linear(x, weight, bias)
    # row 1 passes real-valued: its own values times the weights (float64, as the hand sum is)
    hand = [sum(float(w) * v for w, v in zip(weight[j], rows[1], strict=True)) + float(bias[j]) for j in range(3)]
    torch.testing.assert_close(out[1], torch.tensor(hand), rtol=1e-6, atol=1e-6)
    # row 0 spikes: the linear of its dequantised codes
    spiked = torch.tensor(hand_signed(rows[0], 4, 7))
    hand0 = [
        sum(float(w) * float(v) for w, v in zip(weight[j], spiked, strict=True)) + float(bias[j]) for j in range(3)
    ]
    torch.testing.assert_close(out[0], torch.tensor(hand0), rtol=1e-5, atol=1e-5)


def test_calibration_sets_the_threshold_to_ratio_times_the_median_token_max():
    neuron = SignedNeuron(6, bits=4, group_size=3, outlier_ratio=1.5)
    recorder = neuron.calibration_recorder(None)
    batches = [torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for batch in batches:
        assert torch.equal(neuron(batch), batch)  # calibrating: the input passes through
    recorder.finish()
    maxima = torch.cat([b.abs().amax(-1).reshape(-1) for b in batches])
    assert float(neuron.outlier_threshold) == pytest.approx(1.5 * float(maxima.median()), rel=1e-6)
    assert not torch.equal(neuron(batches[0]), batches[0])  # calibrated: spiking again
    neuron.reset_calibration()
    assert float(neuron.outlier_threshold) == 0.0


def test_options_are_checked():
    for bad in (-1.0, math.nan, math.inf, "4"):
        with pytest.raises(ValueError, match="signed_outlier_ratio"):
            SpikeLMConversionConfig(neuron="signed", signed_outlier_ratio=bad)
    neuron = SignedNeuron(4, outlier_ratio=2.0)
    neuron.outlier_threshold.fill_(-1.0)
    assert "outlier_threshold" in neuron.state_problem()


def _inputs_of(model, ids):
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        neuron.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
        for name, neuron in neurons(model)
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return inputs


def test_a_converted_model_with_outlier_tokens_decodes_round_trips_and_counts_energy(tmp_path):
    from spikelm.evaluation.energy import measure_energy

    model = signed_model(signed_group_size=4, signed_salient_bits=5, saliency_fraction=0.25, signed_outlier_ratio=1.1)
    ids = token_ids(2, 7)
    inputs = _inputs_of(model, ids)
    by_name = dict(neurons(model))
    passing_total = spiking_total = 0
    for name, neuron in by_name.items():
        if name.endswith(("key_neuron", "value_neuron")):
            assert neuron.outlier_ratio == 0 and "outlier_threshold" not in neuron.state_dict(), name
            continue
        threshold = float(neuron.outlier_threshold)
        assert threshold > 0, name
        passing = inputs[name].abs().amax(-1) > threshold  # by hand
        passing_total += int(passing.sum())
        spiking_total += int((~passing).sum())
    assert passing_total > 0 and spiking_total > 0  # the test exercises both kinds of token

    # cached decoding == the full forward, and a save/load keeps the thresholds and the logits
    out = greedy(model, ids)
    assert torch.equal(out, uncached_greedy(model, ids))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(neurons(model), neurons(loaded), strict=True):
        if a.outlier_ratio:
            assert torch.equal(a.outlier_threshold, b.outlier_threshold), name
    assert torch.equal(loaded(ids).logits, model(ids).logits)

    # energy: the spiking tokens' accumulates, plus fan-in x fan-out MACs per passing token, plus the scale multiplies
    summary = measure_energy(model, [{"input_ids": ids}])
    layers = {entry["name"]: entry for entry in summary["per_layer"]}
    sequences = summary["num_sequences"]
    readers = {site.name: site.readers for site in placement(model)}
    checked = 0
    for name, x in inputs.items():
        if name not in readers or not readers[name]:
            continue
        neuron = by_name[name]
        passing = x.abs().amax(-1) > float(neuron.outlier_threshold)
        code = neuron.quantize(x)[0].masked_fill(passing.unsqueeze(-1), 0)
        width, tokens = x.shape[-1], passing.numel()
        for reader in readers[name]:
            out_features = model.get_submodule(reader).out_features
            groups = int(neuron.range_group_counts().max())
            assert layers[reader]["acs"] * sequences == int(code.abs().sum()) * out_features, reader
            macs = tokens * out_features * groups + int(passing.sum()) * width * out_features
            assert layers[reader]["macs"] * sequences == macs, reader
            checked += 1
    assert checked == 2 * 7
