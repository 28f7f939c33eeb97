"""spikify with SpikeLLM's GIF neuron and with the residual-stream rotation (tiny random models, no download)."""

from __future__ import annotations

import json

import pytest
import torch
from test_spikify import CAUSAL, greedy, tiny_bert, tiny_llama, token_ids, uncached_greedy
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from spikelm.conversion import calibrate as spikelm_calibrate
from spikelm.conversion import neurons, spikify, write_model_card
from spikelm.conversion.cache import GIFCodeLayer, is_spike_cache
from spikelm.nn.gif import GIFNeuron


def gif_model(family="llama", seed=0, **overrides):
    make = CAUSAL[family] if family != "bert" else tiny_bert
    return spikify(
        make(seed=seed), neuron="gif", calibration=[token_ids(4, 16, seed=3), token_ids(4, 16, seed=4)], **overrides
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_gif_round_trip_and_cached_decoding(family, tmp_path):
    model = gif_model(family)
    ids = token_ids(2, 6)
    out = greedy(model, ids, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, uncached_greedy(model, ids))
    full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["neuron"] == "gif"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(neurons(model), neurons(loaded), strict=True):
        assert torch.equal(a.salient, b.salient), name
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(greedy(loaded, ids), out.sequences)


def test_gif_bert_round_trip(tmp_path):
    model = gif_model("bert")
    ids = token_ids()
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()(ids).logits, logits)


def test_gif_calibration_marks_the_salient_fraction():
    model = gif_model(saliency_fraction=0.25)
    for name, neuron in neurons(model):
        assert isinstance(neuron, GIFNeuron)
        channels = neuron.salient.numel()
        assert int(neuron.salient.sum()) == channels - int(0.75 * channels), name  # SpikeLLM's count
    uncalibrated = spikify(tiny_llama(), neuron="gif")
    assert not any(bool(n.salient.any()) for _, n in neurons(uncalibrated))  # no saliency: n bits, one step


def test_gif_saliency_uses_the_stacked_reader_weights_even_on_a_copy():
    import copy

    source = spikify(tiny_llama(), neuron="gif")
    copied = copy.deepcopy(source)
    calibration = [token_ids(4, 16, seed=3)]
    spikelm_calibrate(source, calibration)
    spikelm_calibrate(copied, calibration)
    for (name, a), (_, b) in zip(neurons(source), neurons(copied), strict=True):
        assert torch.equal(a.salient, b.salient), name


@pytest.mark.parametrize("group_range,width", [("group", 4), ("token", 3)])
def test_gif_cache_stores_integer_codes_and_a_grid_per_token(group_range, width):
    model = gif_model(gif_group_range=group_range)
    batch, length = 3, 5
    cache = model(token_ids(batch, length), use_cache=True).past_key_values
    assert is_spike_cache(cache)
    heads, head_dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    for layer in cache.layers:
        assert isinstance(layer, GIFCodeLayer)
        # packed to their bit width: 5 bit planes (codes up to 30) of ceil(d / 8) bytes
        assert layer.keys.dtype == torch.uint8 and tuple(layer.keys.shape) == (batch, heads, length, 5 * head_dim // 8)
        codes = layer.codes("keys")
        assert codes.dtype == torch.uint8 and tuple(codes.shape) == (batch, heads, length, head_dim)
        assert int(codes.max()) <= (1 << 1) * 15  # codes on [0, 2^a (2^n - 1)]
        assert tuple(layer.key_grid.shape) == (batch, heads, length, width)  # scale(s) and zero points
    ids = token_ids(2, 6)
    out = greedy(model, ids, return_dict_in_generate=True, output_logits=True)
    full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)


def test_gif_ignores_num_steps():
    ids = token_ids()
    one = gif_model(num_steps=1)(ids).logits
    four = gif_model(num_steps=4)(ids).logits  # GIF's steps are inside the neuron: no copies of the network
    assert torch.equal(one, four)


def test_gif_at_many_bits_is_close_to_the_real_valued_model():
    ids = token_ids()
    real = tiny_llama()(ids).logits
    fine = gif_model(gif_bits=14, gif_extra_bits=0)(ids).logits
    coarse = gif_model(gif_bits=2, gif_extra_bits=0)(ids).logits
    assert (fine - real).abs().max() < 1e-3 < (coarse - real).abs().max()


def test_rotation_round_trip_untied_and_said_so(tmp_path):
    source = tiny_llama(tie_word_embeddings=True)
    assert source.lm_head.weight is source.model.embed_tokens.weight
    model = spikify(
        source, num_steps=2, rotation="hadamard", online_down_proj_rotation=True, calibration=token_ids(4, 16)
    )
    config = model.config.quantization_config
    assert config.untied_embeddings and not model.config.tie_word_embeddings
    ids = token_ids()
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path, config, source="tiny-llama")
    assert "untied" in (tmp_path / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hasattr(loaded.model.layers[0].mlp.down_proj, "online_rotation")
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def test_a_rotation_gpt2_cannot_fold_is_dropped_with_a_notice():
    """GPT-2's LayerNorms subtract the mean: no rotation commutes with them. spikify says so in one line and converts
    without it (the saved config records rotation none), as if none had been asked."""
    with pytest.warns(UserWarning, match="'gpt2': no residual-stream rotation .*LayerNorm") as caught:
        model = spikify(CAUSAL["gpt2"](), rotation="hadamard", online_down_proj_rotation=True)
    assert len([w for w in caught if "spikify" in str(w.message)]) == 1
    config = model.config.quantization_config
    assert config.rotation == "none" and not config.online_down_proj_rotation
    plain = spikify(CAUSAL["gpt2"]())
    ids = token_ids()
    assert torch.equal(model(ids).logits, plain(ids).logits)


def test_gif_range_groups_round_trip_and_cached_decoding(tmp_path):
    model = gif_model(gif_group_size=4)
    assert {n.group_size for _, n in neurons(model)} == {4}
    ids = token_ids(2, 6)
    out = greedy(model, ids, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, uncached_greedy(model, ids))
    full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
    # the cache keeps one scale and one zero point per range group of each K/V head, per token
    cache = model(ids, use_cache=True).past_key_values
    key_neuron = next(n for name, n in neurons(model) if name.endswith("key_neuron"))
    groups = key_neuron.range_groups()[1].numel()
    assert cache.layers[0].key_grid.shape[-1] == 2 * groups
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["gif_group_size"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {n.group_size for _, n in neurons(loaded)} == {4}
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(greedy(loaded, ids), out.sequences)
    # a group size as large as every channel set is the same model as one range per set
    plain = gif_model()
    wide = gif_model(gif_group_size=10_000)
    assert torch.equal(plain(ids).logits, wide(ids).logits)


def test_smoothing_after_the_rotation_keeps_the_real_valued_function_and_round_trips(tmp_path):
    ids = token_ids(2, 7)
    source = CAUSAL["llama"](seed=0)
    real = source(ids).logits
    calibration = [token_ids(4, 16, seed=3), token_ids(4, 16, seed=4)]
    rotated = gif_model(rotation="hadamard", online_down_proj_rotation=True)
    model = gif_model(rotation="hadamard", online_down_proj_rotation=True, smoothing_alpha=0.5)
    gains = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(gains, torch.ones_like(gains))  # the rotation leaves gains of 1; smoothing moved them
    assert not torch.equal(model(ids).logits, rotated(ids).logits)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["smoothing_alpha"] == 0.5
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    model.dequantize()  # the real-valued model, with both transforms folded in: the source's function
    assert float((model(ids).logits - real).detach().norm() / real.detach().norm()) <= 1e-4
    with pytest.raises(ValueError, match="smoothing_alpha needs calibration"):
        spikify(CAUSAL["llama"](), neuron="gif", smoothing_alpha=0.5)
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="smoothing_alpha"):
            spikify(CAUSAL["llama"](), neuron="gif", smoothing_alpha=bad, calibration=calibration)
