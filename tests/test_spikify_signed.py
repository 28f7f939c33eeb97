"""spikify with the signed multi-level neuron (tiny random models, no download): cached decoding, the packed cache,
save/load (in a fresh process too), and the energy counter against a hand count from the neuron's own spikes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_spikify import CAUSAL, greedy, tiny_llama, token_ids, uncached_greedy
from transformers import AutoModelForCausalLM

import spikelm
from spikelm.conversion import neurons, placement, spikify
from spikelm.conversion.cache import SignedCodeLayer, is_spike_cache
from spikelm.conversion.config import SpikeLMConversionConfig
from spikelm.conversion.recipes import recipe
from spikelm.errors import UserError
from spikelm.nn.neurons.signed import SignedNeuron

OPTIONS = {
    "plain": {},
    "every-option": dict(
        signed_bits=3,
        signed_steps=2,
        signed_group_size=4,
        signed_clip_ratio=0.9,
        signed_dead_zone=0.75,
        signed_salient_bits=6,
        saliency_fraction=0.25,
        signed_site_bits={"down_input": 4, "k": 5},
    ),
}


def signed_model(family="llama", seed=0, **overrides):
    return spikify(
        CAUSAL[family](seed=seed),
        neuron="signed",
        calibration=[token_ids(4, 16, seed=3), token_ids(4, 16, seed=4)],
        **overrides,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_signed_cached_decoding_equals_the_full_forward_and_round_trips(family, options, tmp_path):
    model = signed_model(family, **OPTIONS[options])
    assert all(isinstance(n, SignedNeuron) for _, n in neurons(model))
    ids = token_ids(2, 6)
    out = greedy(model, ids, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, uncached_greedy(model, ids))
    full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["neuron"] == "signed"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(neurons(model), neurons(loaded), strict=True):
        assert torch.equal(a.salient, b.salient), name
        assert (a.bits, a.salient_bits, a.level, a.num_steps) == (b.bits, b.salient_bits, b.level, b.num_steps), name
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(greedy(loaded, ids), out.sequences)


def test_every_option_reaches_the_neurons():
    model = signed_model(**OPTIONS["every-option"])
    for name, neuron in neurons(model):
        expected = 4 if name.endswith("mlp.down_proj.input_neuron") else 5 if name.endswith("key_neuron") else 3
        assert neuron.bits == expected, name
        assert neuron.level == -(-(2 ** (expected - 1) - 1) // 2), name  # L = ceil(Q / T), T = 2
        assert neuron.salient_bits == 6 and neuron.group_size == 4, name
        assert neuron.dead_zone == 0.75 and neuron.clip_ratio == 0.9, name
        assert int(neuron.salient.sum()) > 0, name  # calibrated: the top quarter by saliency


def test_signed_cache_stores_codes_packed_to_their_bit_width_and_one_scale_per_group():
    model = signed_model(signed_group_size=4, signed_bits=4)  # codes -7..7, stored 0..14: 4 bit planes
    batch, length = 3, 5
    cache = model(token_ids(batch, length), use_cache=True).past_key_values
    assert is_spike_cache(cache)
    heads, head_dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    key_neuron = next(n for name, n in neurons(model) if name.endswith("key_neuron"))
    for layer in cache.layers:
        assert isinstance(layer, SignedCodeLayer)
        assert layer.keys.dtype == torch.uint8
        assert tuple(layer.keys.shape) == (batch, heads, length, 4 * -(-head_dim // 8))
        codes = layer.codes("keys")
        assert tuple(codes.shape) == (batch, heads, length, head_dim) and int(codes.abs().max()) <= 7
        assert tuple(layer.key_grid.shape) == (batch, heads, length, key_neuron.groups()[1].numel())
    # the stored codes are the neuron's own codes of K
    stored = cache.layers[0].codes("values")
    assert int((stored < 0).sum()) > 0 and int((stored > 0).sum()) > 0


def test_signed_round_trip_in_a_fresh_process(tmp_path):
    model = signed_model(**OPTIONS["every-option"])
    ids = token_ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "converted")
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import spikelm
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "converted")!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    root = str(Path(spikelm.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_a_large_signed_code_is_close_to_the_real_valued_model():
    ids = token_ids()
    real = tiny_llama()(ids).logits
    fine = spikify(tiny_llama(), neuron="signed", signed_bits=16, signed_group_size=0)(ids).logits
    torch.testing.assert_close(fine, real, rtol=0, atol=2e-3)


@pytest.mark.parametrize("options", list(OPTIONS))
def test_energy_counter_against_a_hand_count_from_the_neurons_own_spikes(options):
    from spikelm.evaluation.energy import measure_energy

    model = signed_model(**OPTIONS[options])
    ids = token_ids(2, 7)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        neuron.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
        for name, neuron in neurons(model)
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    summary = measure_energy(model, [{"input_ids": ids}])
    layers = {entry["name"]: entry for entry in summary["per_layer"]}
    by_name = dict(neurons(model))
    readers = {site.name: site.readers for site in placement(model)}
    sequences = summary["num_sequences"]  # the summary is per sequence
    checked = 0
    for name, xs in inputs.items():
        neuron = by_name[name]
        code = neuron.quantize(xs[0])[0]
        spikes = neuron.spike(xs[0]).spikes.long()
        assert int(spikes.abs().sum()) == int(code.abs().sum())  # sum over steps of |level| == |code|
        assert torch.equal(neuron.step_levels(xs[0]), spikes.abs())
        for reader in readers.get(name, ()):
            out_features = model.get_submodule(reader).out_features
            groups = int(neuron.range_group_counts().max())
            tokens = code.numel() // code.shape[-1]
            assert layers[reader]["acs"] * sequences == int(code.abs().sum()) * out_features, reader
            assert layers[reader]["macs"] * sequences == tokens * out_features * groups, reader  # scale multiplies
            checked += 1
    assert checked == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    # Q K^T and P V read every key's / value's levels once per query attending it (causal: L - j queries for key
    # j), times the query heads sharing its K/V head; one scale multiply per range group per score (pair and head)
    batch, length = ids.shape
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    fan_out = torch.arange(length, 0, -1)  # queries at or after key j
    pairs = batch * length * (length + 1) // 2
    for name, xs in inputs.items():
        if "input_neuron" in name:
            continue
        neuron = by_name[name]
        code = neuron.quantize(xs[0])[0]  # (B, H_kv, L, d)
        product = name.rsplit(".", 1)[0] + (".scores" if name.endswith("key_neuron") else ".context")
        acs = int((code.abs().sum(dim=(0, 1, 3)) * fan_out).sum()) * group
        assert layers[product]["acs"] * sequences == acs, product
        macs = pairs * group * int(neuron.range_group_counts().sum())
        assert layers[product]["macs"] * sequences == macs, product
    assert summary["mean_firing_rate"] is not None


def test_recipe_and_config_checks():
    fields = recipe("signed", num_steps=2)
    assert fields["neuron"] == "signed" and fields["signed_steps"] == 2
    with pytest.raises(ValueError, match="signed_site_bits"):
        SpikeLMConversionConfig(neuron="signed", signed_site_bits={"lm_head": 4})
    with pytest.raises(ValueError, match="bits"):
        SpikeLMConversionConfig(neuron="signed", signed_bits=1)
    with pytest.raises(ValueError, match="dead_zone"):
        SpikeLMConversionConfig(neuron="signed", signed_dead_zone=-0.1)
    with pytest.raises(UserError, match="--neuron"):
        recipe("signet")
    assert spikify(tiny_llama(), neuron="signed") is not None  # no calibration: no saliency, works on first call


def test_learnable_scale_factors_train_save_and_load(tmp_path):
    model = signed_model(signed_learn_scale=True)
    factors = [n.scale_factor for _, n in neurons(model)]
    assert factors and all(f.requires_grad for f in factors)
    ids = token_ids()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert any(float(f.grad.abs().sum()) > 0 for f in factors)  # the loss reaches the scale factors
    with torch.no_grad():
        factors[0].fill_(1.25)
    model.eval()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert float(next(n for _, n in neurons(loaded)).scale_factor[0].detach()) == 1.25
    assert torch.equal(loaded(ids).logits, expected)
