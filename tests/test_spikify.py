"""spikify: placement, the spike-code cache, save/load through the quantizer, errors (tiny random models, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_model
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import spikelm
from spikelm.conversion import SpikeCodeCache, SpikeLMConversionConfig, neurons, placement, spike_code_cache, spikify
from spikelm.conversion.cache import is_spike_cache

VOCAB = 64


def tiny_llama(cls=LlamaForCausalLM, config_cls=LlamaConfig, seed=0, **extra):
    return tiny_llama_model(cls, config_cls, seed, vocab_size=VOCAB, **extra)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert_config():
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=3,
    )


def tiny_bert(cls=BertForSequenceClassification, seed=0):
    torch.manual_seed(seed)
    return cls(tiny_bert_config()).eval()


CAUSAL = {
    "llama": tiny_llama,
    "mistral": lambda seed=0: tiny_llama(MistralForCausalLM, MistralConfig, seed, sliding_window=None),
    "qwen2": lambda seed=0: tiny_llama(Qwen2ForCausalLM, Qwen2Config, seed),
    "gpt2": tiny_gpt2,
}


def token_ids(batch=2, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def greedy(model, ids, new_tokens=8, **kwargs):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
    )


# ----------------------------------------------------------------------------------------------
# Round trip through save_pretrained / from_pretrained
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_causal_round_trip_identical(family, tmp_path):
    model = spikify(CAUSAL[family](), num_steps=2, calibration=token_ids(4, 16, seed=5))
    ids = token_ids()
    logits = model(ids).logits
    generated = greedy(model, ids)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model.config.model_type  # the original architecture ...
    section = saved["quantization_config"]  # ... plus the spiking section
    assert section["quant_method"] == "spikelm" and section["format_version"] == 1 and section["num_steps"] == 2
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    alphas = [k for k in names if k.endswith("neuron.alpha")]
    assert len(alphas) == 2 * 6  # per block: qkv, o, gate/up, down inputs, K, V

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert all(n.is_initialized() for _, n in neurons(loaded))
    for (name, a), (_, b) in zip(neurons(model), neurons(loaded), strict=True):
        assert torch.equal(a.alpha, b.alpha), name
    assert torch.equal(loaded(ids).logits, logits)
    assert torch.equal(greedy(loaded, ids), generated)


@pytest.mark.parametrize("first", ["spikelm", "transformers"])
def test_import_spikelm_alone_lets_from_pretrained_restore_a_conversion(first, tmp_path):
    """A fresh interpreter: ``import spikelm`` (lazy: no model name used) then from_pretrained gives a spiking model,
    whether transformers' quantizer registry is imported after spikelm or was already imported before it."""
    model = spikify(tiny_llama(), num_steps=2, calibration=token_ids(4, 16, seed=5))
    ids = token_ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "converted")
    torch.save(ids, tmp_path / "ids.pt")
    imports = {
        "spikelm": "import spikelm\nfrom transformers import AutoModelForCausalLM\n",
        "transformers": "import transformers.quantizers.auto\nfrom transformers import AutoModelForCausalLM\n"
        "import spikelm\n",
    }[first]
    script = imports + textwrap.dedent(
        f"""
        import sys
        import torch
        assert "spikelm.conversion" not in sys.modules  # nothing but `import spikelm` so far
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "converted")!r}).eval()
        from spikelm.conversion import neurons
        assert len(neurons(model)) == 12 and all(n.is_initialized() for _, n in neurons(model))
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    root = str(Path(spikelm.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.parametrize(
    "cls,auto", [(BertForSequenceClassification, AutoModelForSequenceClassification), (BertModel, AutoModel)]
)
def test_bert_round_trip_identical(cls, auto, tmp_path):
    model = spikify(tiny_bert(cls), num_steps=2, calibration=token_ids(4, 16, seed=5))
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    out = model(ids, attention_mask=mask)
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path).eval()
    again = loaded(ids, attention_mask=mask)
    key = "logits" if cls is BertForSequenceClassification else "last_hidden_state"
    assert torch.equal(out[key], again[key])
    assert out[key].shape[0] == 2


@pytest.mark.parametrize("neuron", ["elastic", "gif"])
def test_from_pretrained_with_a_conversion_config_converts_on_load(neuron, tmp_path):
    tiny_llama().save_pretrained(tmp_path)  # a real-valued checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=SpikeLMConversionConfig(neuron=neuron, num_steps=2)
    ).eval()
    assert not any(n.is_initialized() for _, n in neurons(loaded) if hasattr(n, "alpha"))
    assert not any(bool(n.salient.any()) for _, n in neurons(loaded) if hasattr(n, "salient"))
    ids = token_ids()
    assert torch.equal(loaded(ids).logits, spikify(tiny_llama(), neuron=neuron, num_steps=2)(ids).logits)


def test_model_card(tmp_path):
    config = SpikeLMConversionConfig(num_steps=4, untied_embeddings=True)
    path = spikelm.conversion.write_model_card(
        tmp_path,
        config,
        source="smollm2-135m",
        calibration="32 sequences of 512 tokens of the pypi corpus",
        perplexity={"source": 15.1, "this model": 70.2},
        evaluation="Brown, 32,768 tokens, windows of 512",
    )
    text = path.read_text()
    for expected in ("smollm2-135m", "T = 4", "32 sequences", "| this model | 70.2 |", "untied", '"quant_method"'):
        assert expected in text


# ----------------------------------------------------------------------------------------------
# The spike-code cache: cached decoding equals a full forward pass
# ----------------------------------------------------------------------------------------------


def uncached_greedy(model, ids, new_tokens=8, eos=2, pad=0):
    """Greedy decoding by full forward passes (no cache), finished rows padded as generate() does."""
    seq, done = ids, torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        token = model(seq, use_cache=False).logits[:, -1].argmax(-1)
        token = torch.where(done, pad, token)
        done |= token == eos
        seq = torch.cat([seq, token[:, None]], dim=1)
    return seq


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("reset", ["official", "symmetric"])
def test_cached_decoding_equals_full_forward(family, steps, reset):
    flips = 0
    for seed in range(2):
        model = spikify(
            CAUSAL[family](seed=seed), num_steps=steps, reset=reset, calibration=token_ids(4, 16, seed=10 + seed)
        )
        ids = token_ids(2, 6, seed=seed)
        out = greedy(model, ids, return_dict_in_generate=True, output_logits=True)
        flips += int((out.sequences != uncached_greedy(model, ids)).sum())
        # the logits of every cached decoding step equal the full forward pass over the generated sequence
        full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
        torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
    assert flips == 0


@pytest.mark.parametrize("packing", [None, 4, 5])
def test_cache_stores_ternary_codes_with_steps_on_the_head_axis(packing):
    steps, batch, length = 4, 3, 7
    model = spikify(tiny_llama(), num_steps=steps, calibration=token_ids(4, 16))
    made = model(token_ids(batch, length), use_cache=True).past_key_values  # the model's own: the default packing
    assert made.layers[0].packing == 5
    cache = spike_code_cache(model, packing=packing)
    model(token_ids(batch, length), past_key_values=cache, use_cache=True)
    assert isinstance(cache, SpikeCodeCache)
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    # 4 per byte: words of 16 values (4 bytes); 5 per byte: ceil(d / 5) bytes
    stored_width = {None: head_dim, 4: -(-head_dim // 16) * 4, 5: -(-head_dim // 5)}[packing]
    for layer in cache.layers:
        for stored, name in ((layer.keys, "keys"), (layer.values, "values")):
            assert stored.dtype == (torch.int8 if packing is None else torch.uint8)
            assert tuple(stored.shape) == (batch, steps * kv_heads, length, stored_width)
            codes = layer.codes(name)
            assert tuple(codes.shape) == (batch, steps * kv_heads, length, head_dim)
            assert set(codes.unique().tolist()) <= {-1, 0, 1}
        # decoded, the codes are the K spikes the attention used: alpha_t * q per step
        alpha = layer.key_neuron.alpha
        decoded = layer.codes("keys").view(batch, steps, kv_heads, length, head_dim).float()
        decoded = decoded * alpha.view(1, steps, 1, 1, 1)
        assert set(decoded[:, 1].abs().unique().tolist()) <= {0.0, float(alpha[1])}


def test_generate_makes_the_spike_cache_itself():
    model = spikify(tiny_llama(), num_steps=2, calibration=token_ids(4, 16))
    out = model.generate(
        token_ids(),
        attention_mask=torch.ones_like(token_ids()),
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert is_spike_cache(out.past_key_values)  # generate's DynamicCache, its layers made spike-code layers
    assert out.past_key_values.layers[0].keys.dtype == torch.uint8  # packed codes, the default
    # an empty DynamicCache passed by hand becomes a spike-code cache in place
    cache = DynamicCache()
    model(token_ids(), past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.dtype == torch.uint8 and cache.layers[0].packing == 5


def test_float_cache_with_content_is_refused():
    model = spikify(tiny_llama(), num_steps=2, calibration=token_ids(4, 16))
    cache = DynamicCache()
    cache.update(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="spike codes"):
        model(token_ids(), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_left_padded_generation_equals_per_prompt(family):
    model = spikify(CAUSAL[family](), num_steps=2, calibration=token_ids(4, 16, seed=3))
    prompts = [token_ids(1, n, seed=n)[0] for n in (5, 9, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = greedy(model, p[None], new_tokens=6)
        assert torch.equal(batched[i, width:], alone[0, len(p) :]), f"prompt {i}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_and_sampling_run(family):
    model = spikify(CAUSAL[family](), num_steps=2, calibration=token_ids(4, 16))
    ids = token_ids()
    beams = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=0,
    )
    assert beams.shape == (4, ids.shape[1] + 5)
    torch.manual_seed(0)
    sampled = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0
    )
    assert sampled.shape == (2, ids.shape[1] + 5)


def test_use_cache_off_spikes_k_and_v_identically():
    model = spikify(tiny_llama(), num_steps=2, calibration=token_ids(4, 16))
    ids = token_ids()
    assert torch.equal(model(ids, use_cache=False).logits, model(ids, use_cache=True).logits)


# ----------------------------------------------------------------------------------------------
# Placement: a hand-written reference of SPEC section 8 on a tiny LLaMA
# ----------------------------------------------------------------------------------------------


def reference_llama_logits(model, ids, steps):
    """A plain loop over the decoder layers and the T steps, calling spikify's neurons at the documented places."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    base, cfg = model.model, model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    batch, length = ids.shape
    embedded = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(embedded, torch.arange(length)[None])
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
    hidden = [embedded] * steps  # the embedding output repeated T times

    def plain(module, x):  # the module's own forward, without spikify's hooks on it
        return type(module).forward(module, x)

    def spike(neuron, per_step):  # a multi-step neuron sees all T steps at once (the membrane runs over t)
        return list(neuron(torch.stack(per_step)).unbind(0))

    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = spike(attn.input_neuron, [layer.input_layernorm(h) for h in hidden])  # shared q/k/v input
        queries, keys, values = [], [], []
        for t in range(steps):
            q = attn.q_proj(x[t]).view(batch, length, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(x[t]).view(batch, length, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(x[t]).view(batch, length, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            queries.append(q), keys.append(k), values.append(v)
        keys, values = spike(attn.key_neuron, keys), spike(attn.value_neuron, values)  # K after rotary, V: per step
        context = []
        for t in range(steps):
            k, v = repeat_kv(keys[t], heads // kv_heads), repeat_kv(values[t], heads // kv_heads)
            scores = torch.softmax(queries[t] @ k.transpose(2, 3) * head_dim**-0.5 + mask, dim=-1)
            context.append((scores @ v).transpose(1, 2).reshape(batch, length, -1))
        context = spike(attn.o_proj.input_neuron, context)
        hidden = [hidden[t] + plain(attn.o_proj, context[t]) for t in range(steps)]
        x = spike(mlp.input_neuron, [layer.post_attention_layernorm(h) for h in hidden])  # shared gate/up input
        inner = spike(
            mlp.down_proj.input_neuron, [mlp.act_fn(mlp.gate_proj(x[t])) * mlp.up_proj(x[t]) for t in range(steps)]
        )
        hidden = [hidden[t] + plain(mlp.down_proj, inner[t]) for t in range(steps)]
    final = torch.stack([plain(base.norm, h) for h in hidden]).mean(0)  # T copies averaged after the final norm
    return model.lm_head(final)  # real-valued head


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("reset", ["official", "symmetric"])
def test_placement_matches_hand_written_reference(steps, reset):
    model = tiny_llama(attn_implementation="eager")
    spikify(model, num_steps=steps, reset=reset, calibration=token_ids(4, 16, seed=7))
    ids = token_ids(2, 10)
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        reference = reference_llama_logits(model, ids, steps)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_placement_differs_from_the_real_valued_model_and_between_steps():
    ids = token_ids()
    real = tiny_llama()(ids).logits
    one = spikify(tiny_llama(), num_steps=1, calibration=token_ids(4, 16))(ids).logits
    four = spikify(tiny_llama(), num_steps=4, calibration=token_ids(4, 16))(ids).logits
    assert not torch.allclose(real, one) and not torch.allclose(one, four)


# ----------------------------------------------------------------------------------------------
# Options with observable consequences
# ----------------------------------------------------------------------------------------------


def test_placement_lists_every_neuron_with_its_readers():
    model = spikify(tiny_llama(), num_steps=2)
    placed = placement(model)
    assert {p.name for p in placed} == {name for name, _ in neurons(model)}
    assert [p.kind for p in placed[:6]] == ["qkv_input", "o_input", "gate_up_input", "down_input", "k", "v"]
    assert placed[0].readers == tuple(f"model.layers.0.self_attn.{x}_proj" for x in "qkv")


def test_modules_to_not_convert_skips_those_inputs():
    model = spikify(tiny_llama(), num_steps=2, modules_to_not_convert=["lm_head", "down_proj"])
    names = [name for name, _ in neurons(model)]
    assert not any("down_proj" in name for name in names)
    assert any("o_proj.input_neuron" in name for name in names)
    assert not hasattr(model.lm_head, "input_neuron")


def test_modules_to_not_convert_is_a_list_and_never_the_attention_module():
    """Refused, naming the field: a bare string (once split into characters that silently matched nothing), a
    number; and the attention module, whose K and V always spike, is a UserError (one line from `spikelm spikify`)."""
    from spikelm.errors import UserError

    for value in ("down_proj", 5, [""]):
        with pytest.raises(ValueError, match="modules_to_not_convert must be a list of module names"):
            SpikeLMConversionConfig(modules_to_not_convert=value)
    with pytest.raises(UserError, match="names the attention module 'self_attn'"):
        spikify(tiny_llama(), num_steps=2, modules_to_not_convert=["lm_head", "model.layers.0.self_attn"])


def test_calibration_initialises_alphas_without_calibration_first_forward_does():
    ids = token_ids(4, 16)
    calibrated = spikify(tiny_llama(), num_steps=2, calibration=[ids, token_ids(4, 16, seed=9)])
    lazy = spikify(tiny_llama(), num_steps=2)
    assert not any(n.is_initialized() for _, n in neurons(lazy))
    assert all(n.is_initialized() for _, n in neurons(calibrated))
    lazy.model(input_ids=ids, use_cache=False)  # the neuron's own rule: the first batch it sees
    for (_, a), (_, b) in zip(neurons(calibrated), neurons(lazy), strict=True):
        assert torch.equal(a.alpha, b.alpha)  # the second calibration batch changed nothing


def test_learn_alpha_gives_alpha_a_gradient():
    model = spikify(tiny_llama(), num_steps=2, learn_alpha=True, calibration=token_ids(4, 16))
    model.train()
    ids = token_ids()
    model(ids, labels=ids, use_cache=False).loss.backward()
    grads = [n.alpha.grad for _, n in neurons(model)]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None  # weights train too (distillation)


def test_hidden_states_are_averaged_over_the_copies():
    model = spikify(tiny_llama(), num_steps=4, calibration=token_ids(4, 16))
    out = model(token_ids(3, 5), output_hidden_states=True)
    assert out.logits.shape[0] == 3
    assert all(h.shape[0] == 3 for h in out.hidden_states)


def test_dequantize_gives_the_real_valued_model_back():
    ids = token_ids()
    real = tiny_llama()(ids).logits
    model = spikify(tiny_llama(), num_steps=2, calibration=token_ids(4, 16))
    assert not torch.equal(model(ids).logits, real)
    model.dequantize()
    assert not neurons(model) and getattr(model.config, "quantization_config", None) is None
    assert torch.equal(model(ids).logits, real)
    spikify(model, num_steps=1)  # and it can be converted again


def test_trainer_accepts_a_converted_model():
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(spikify(tiny_llama(), num_steps=2))  # raises for untrainable quantizers


def test_there_is_no_spiking_switch():
    # a converted model is spiking; the real-valued model is its source, not a config flag
    with pytest.raises(ValueError, match="unknown spikelm conversion field"):
        SpikeLMConversionConfig(spiking=False)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ----------------------------------------------------------------------------------------------


def test_unsupported_architectures_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="model_type 't5'"):
        spikify(t5)
    with pytest.raises(ValueError, match="PreTrainedModel"):
        spikify(nn.Linear(4, 4))


def test_already_spiking_models_are_refused():
    model = spikify(tiny_llama(), num_steps=2)
    with pytest.raises(ValueError, match="already spiking"):
        spikify(model)
    native = spikelm.SpikeLMForCausalLM(
        spikelm.SpikeLMConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    )
    with pytest.raises(ValueError, match="model_type 'spikelm'"):
        spikify(native)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": -2}, "num_steps"),
        ({"reset": "soft"}, "reset"),
        ({"neuron": "lif"}, "neuron"),
        ({"format_version": 99}, "newer spikelm"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        spikify(tiny_llama(), **bad)


# ----------------------------------------------------------------------------------------------
# The native SpikeLM-BERT import path gives the same model
# ----------------------------------------------------------------------------------------------


def test_bert_spikify_equals_native_spikelm_bert():
    from spikelm.conversion.official import bert_to_spikelm_state_dict
    from spikelm.evaluation.glue.models import spikelm_config_from_bert

    steps = 2
    bert = tiny_bert()
    native = spikelm.SpikeLMForSequenceClassification(
        spikelm_config_from_bert(bert.config, num_steps=steps, num_labels=3)
    ).eval()
    missing, unexpected = native.load_state_dict(bert_to_spikelm_state_dict(bert.state_dict()), strict=False)
    assert not unexpected and all(k.endswith((".alpha", ".initialized")) for k in missing)
    spikify(bert, num_steps=steps, calibration=token_ids(4, 16))
    with torch.no_grad():  # the same alphas, neuron by neuron
        for i, layer in enumerate(bert.bert.encoder.layer):
            mine = native.bert.encoder.layer[i]
            pairs = [
                (mine.attention.self.qkv.neuron, layer.attention.self.input_neuron),
                (mine.attention.self.key_spike, layer.attention.self.key_neuron),
                (mine.attention.self.value_spike, layer.attention.self.value_neuron),
                (mine.attention.output.dense.neuron, layer.attention.output.dense.input_neuron),
                (mine.intermediate.dense.neuron, layer.intermediate.dense.input_neuron),
                (mine.output.dense.neuron, layer.output.dense.input_neuron),
            ]
            for theirs, ours in pairs:
                theirs.alpha.copy_(ours.alpha)
                theirs.initialized.fill_(True)
                theirs._known_initialized = False
    ids = token_ids(3, 12)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with torch.no_grad():
        ours = bert(ids, attention_mask=mask).logits
        theirs = native(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
