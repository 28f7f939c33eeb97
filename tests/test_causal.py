"""Causal SpikeLM: cache equivalence, generate(), every decoder option, HF conventions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

from spikelm import (
    ElasticBiSpikingNeuron,
    SpikeLinear,
    SpikeLMCache,
    SpikeLMConfig,
    SpikeLMForCausalLM,
    SpikeLMForMaskedLM,
    collect_spike_stats,
    record_spike_stats,
)


def causal_model(warm_up=True, **overrides):
    """A tiny causal SpikeLM in eval mode, its alphas initialised on a random batch (unless not ``warm_up``)."""
    overrides.setdefault("max_position_embeddings", 48)
    model = SpikeLMForCausalLM(tiny_config(**overrides)).eval()
    if warm_up:
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (4, 24)))
    return model


def decode_step_by_step(model, ids, prefill=0):
    """Logits from feeding ``ids`` to a fresh cache: the first ``prefill`` tokens at once, then one at a time."""
    cache = SpikeLMCache(model.config) if model.config.spiking else DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        if prefill:
            logits.append(model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits)
        for i in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1), cache


CACHE_CASES = [
    dict(num_steps=1),
    dict(num_steps=2),
    dict(num_steps=4),
    dict(num_steps=4, reset="symmetric"),
    dict(num_steps=2, reset="symmetric", position_embedding_type="rotary"),
    dict(num_steps=4, position_embedding_type="rotary"),
    dict(num_steps=3, pre_layer_norm=False),
    dict(num_steps=2, spike_levels="binary"),
    dict(num_steps=2, use_amplitude=False),
    dict(spiking=False),
    dict(spiking=False, position_embedding_type="rotary"),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("overrides", CACHE_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_step_by_step_decoding_equals_full_forward(overrides, seed):
    torch.manual_seed(seed)
    model = causal_model(**overrides)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids, use_cache=True)
    for prefill in (0, 7):
        stepped, cache = decode_step_by_step(model, ids, prefill)
        if model.config.spiking:
            # the one legitimate source of a difference: a last-bit change flipping a K/V spike at the threshold
            flips = sum(
                int((a.keys != b.keys).sum() + (a.values != b.values).sum())
                for a, b in zip(cache.layers, full.past_key_values.layers, strict=True)
            )
            assert flips == 0, f"{flips} K/V spike codes differ between cached and full decoding"
        torch.testing.assert_close(stepped, full.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_steps=1),
        dict(num_steps=4),
        dict(num_steps=4, reset="symmetric"),
        dict(num_steps=2, position_embedding_type="rotary"),
        dict(spiking=False),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_greedy_generation_is_identical_with_and_without_cache(overrides):
    model = causal_model(**overrides)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 22)
    assert torch.equal(with_cache, without)


def test_sampling_is_identical_with_and_without_cache_and_follows_the_seed():
    model = causal_model(num_steps=2)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)
    runs = []
    for use_cache, seed in ((True, 3), (False, 3), (True, 4)):
        torch.manual_seed(seed)
        runs.append(model.generate(prompt, use_cache=use_cache, **kwargs))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_generate_uses_the_packed_spike_cache_with_steps_in_the_head_axis():
    model = causal_model(num_steps=3)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, SpikeLMCache)
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    for layer in cache.layers:
        assert layer.keys.dtype == torch.uint8 and layer.values.dtype == torch.uint8
        # (B, T*H, L, ceil(d / 5)): 5 prompt + 3 fed back, 5 ternary codes per byte
        assert layer.keys.shape == (2, 3 * heads, 8, -(-head_dim // 5))
        assert layer.codes("keys").shape == (2, 3 * heads, 8, head_dim)
        assert set(layer.codes("keys").unique().tolist()) <= {-1, 0, 1}


def test_cached_spikes_decode_exactly_to_the_neurons_output():
    model = causal_model(num_steps=4)
    attention = model.model.layers[1].attention
    seen = {}
    hooks = [
        attention.key_spike.register_forward_hook(lambda m, i, o: seen.__setitem__("key", o)),
        attention.value_spike.register_forward_hook(lambda m, i, o: seen.__setitem__("value", o)),
    ]
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    for hook in hooks:
        hook.remove()
    layer = cache.layers[1]
    for name, codes, scale in (("key", layer.keys, layer.key_scale), ("value", layer.values, layer.value_scale)):
        expected = attention._fold_steps_into_heads(seen[name])
        assert torch.equal(layer._decode(codes, scale), expected)  # bit for bit


def test_a_plain_dynamic_cache_also_works_and_stores_float_spikes():
    model = causal_model(num_steps=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], past_key_values=cache, use_cache=True).logits
        rest = model(ids[:, 6:], past_key_values=cache, use_cache=True).logits
    assert cache.layers[0].keys.dtype == torch.float32
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=0)


def test_spike_cache_refuses_a_real_valued_model():
    model = causal_model(spiking=False)
    with pytest.raises(ValueError, match="real-valued"):
        model(torch.randint(0, 97, (1, 4)), past_key_values=SpikeLMCache(model.config), use_cache=True)


@pytest.mark.parametrize(
    "overrides",
    [dict(num_steps=4), dict(num_steps=2, position_embedding_type="rotary"), dict(spiking=False)],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(overrides):
    model = causal_model(**overrides)
    lengths = (7, 4, 2)
    prompts = [torch.randint(1, model.config.vocab_size, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(batched[row, width:], alone[0, len(p) :]), f"prompt {row} (length {len(p)})"
    # the real tokens' logits do not see the padding either
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(prompts[1][None]).logits
    torch.testing.assert_close(padded[1, width - lengths[1] :], alone[0], atol=1e-5, rtol=0)


def test_beam_search_runs_and_matches_without_cache():
    model = causal_model(num_steps=2)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (4, 13)
    assert torch.equal(with_cache, without)


def test_auto_model_for_causal_lm_and_save_load_roundtrip(tmp_path):
    config = tiny_config(num_steps=2, position_embedding_type="rotary", max_position_embeddings=48)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert type(model) is SpikeLMForCausalLM
    ids = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        before = model(ids).logits  # initialises the alphas, which are saved
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SpikeLMForCausalLM and loaded.alphas_initialized
    assert loaded.config.position_embedding_type == "rotary" and loaded.config.num_steps == 2
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_neuron_placement_matches_the_encoder():
    model = causal_model(warm_up=False, num_steps=3)
    layer = model.model.layers[0]
    spiking = {n for n, m in layer.named_modules() if isinstance(m, SpikeLinear)}
    assert spiking == {"attention.qkv", "attention.dense", "mlp.fc_in", "mlp.fc_out"}
    respike = [layer.attention.key_spike, layer.attention.value_spike]
    assert all(isinstance(n, ElasticBiSpikingNeuron) and not n.membrane for n in respike)
    assert len(model.neurons()) == 6 * model.config.num_hidden_layers
    assert type(model.lm_head) is torch.nn.Linear and model.model.embed_positions is not None
    real = causal_model(warm_up=False, spiking=False)
    assert real.neurons() == [] and not any(isinstance(m, SpikeLinear) for m in real.modules())


def test_lm_head_sees_the_t_average_after_the_final_layer_norm():
    model = causal_model(num_steps=4)
    seen = {}
    model.model.final_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("steps", o))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert seen["steps"].shape == (4, 2, 7, model.config.hidden_size)
    torch.testing.assert_close(out.hidden_states[-1], seen["steps"].mean(0))
    torch.testing.assert_close(out.logits, model.lm_head(seen["steps"].mean(0)))
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_attention_is_causal():
    model = causal_model(num_steps=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=0, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rotary_positions_are_relative_in_the_real_valued_model():
    model = causal_model(spiking=False, position_embedding_type="rotary")
    assert model.model.embed_positions is None
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        at_zero = model(ids).logits
        shifted = model(ids, position_ids=torch.arange(5, 15)[None]).logits
        absolute = causal_model(spiking=False)
        absolute.load_state_dict(model.state_dict(), strict=False)
        shifted_absolute = absolute(ids, position_ids=torch.arange(5, 15)[None]).logits
    torch.testing.assert_close(shifted, at_zero, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted_absolute, absolute(ids).logits, atol=1e-3)


def test_pre_and_post_layer_norm_layouts():
    pre = causal_model(warm_up=False, num_steps=2)
    post = causal_model(warm_up=False, num_steps=2, pre_layer_norm=False)
    assert pre.model.layers[0].pre_layer_norm and pre.model.final_norm is not None
    assert not post.model.layers[0].pre_layer_norm and post.model.final_norm is None
    post.load_state_dict(pre.state_dict(), strict=False)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert not torch.allclose(pre(ids).logits, post(ids).logits, atol=1e-3)


def test_untied_lm_head():
    model = causal_model(warm_up=False, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_loss_is_shifted_cross_entropy_and_gradients_reach_every_parameter():
    model = causal_model(num_steps=2, learn_alpha=True).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_training_with_use_cache_gives_the_same_gradients():
    model = causal_model(num_steps=2).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    grads = []
    for use_cache in (False, True):
        model.zero_grad()
        model(ids, labels=ids, use_cache=use_cache).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=0, rtol=0, msg=name)


def test_fused_and_reference_neurons_agree_in_the_decoder():
    model = causal_model(num_steps=3, position_embedding_type="rotary")
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        fused = model(ids).logits
        model.set_neuron_backend("reference")
        reference = model(ids).logits
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=0)


def test_spike_stats_cover_the_decoder():
    model = causal_model(num_steps=2)
    with torch.no_grad(), record_spike_stats(model):
        model(torch.randint(0, 97, (2, 8)))
    stats = collect_spike_stats(model)
    assert "model.layers.0.attention.key_spike" in stats and "model.layers.1.mlp.fc_out.neuron" in stats
    assert all(0 < sum(s["firing_rate"]) for s in stats.values())


def test_logits_to_keep():
    model = causal_model(num_steps=2)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:])


def test_bad_inputs_and_config():
    model = causal_model(warm_up=False)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 49, dtype=torch.long))
    cache = SpikeLMCache(model.config)
    model(torch.zeros(1, 40, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"49 \(40 cached \+ 9 new"):
        model(torch.zeros(1, 9, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="output_attentions"):
        model(torch.zeros(1, 3, dtype=torch.long), output_attentions=True)
    for kwargs, match in (
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(position_embedding_type="rotary", hidden_size=30, num_attention_heads=2), "even"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(pre_layer_norm="yes"), "pre_layer_norm"),
    ):
        with pytest.raises(ValueError, match=match):
            SpikeLMConfig(**kwargs)
    for kwargs in (dict(position_embedding_type="rotary"), dict(pre_layer_norm=True)):
        with pytest.raises(ValueError, match="SpikeLMForCausalLM"):
            SpikeLMForMaskedLM(tiny_config(**kwargs))


def test_config_roundtrip_keeps_decoder_fields(tmp_path):
    config = tiny_config(position_embedding_type="rotary", rope_theta=500.0, pre_layer_norm=False)
    config.save_pretrained(tmp_path)
    loaded = SpikeLMConfig.from_pretrained(tmp_path)
    assert (loaded.position_embedding_type, loaded.rope_theta, loaded.pre_layer_norm) == ("rotary", 500.0, False)
    default = SpikeLMConfig()
    assert (default.position_embedding_type, default.pre_layer_norm) == ("absolute", None)
