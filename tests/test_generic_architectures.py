"""The generic path: decoder-only architectures with no description of their own convert from a traced forward
(tiny random models built with transformers' own config classes, offline)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import tiny_llama_model
from torch import nn

import spikelm
from spikelm.conversion import neurons, placement, spikify

architectures_base = importlib.import_module("spikelm.conversion.architectures.base")

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.3,  # far from uniform logits: greedy decoding takes varied tokens
)


def _build(config_cls, model_cls, **fields):
    def build(seed=0, **extra):
        torch.manual_seed(seed)
        return model_cls(config_cls(**{**fields, **extra})).eval()

    return build


# model_type -> (builder, path of the blocks, attention module in a block, the linears sharing each spiked input).
# The reader lists are written from transformers' modeling files (5.23), not from the discovery:
ARCHITECTURES = {
    # PhiDecoderLayer: one input_layernorm; self_attn and mlp both read its output (parallel block); attention
    # q_proj/k_proj/v_proj -> dense; PhiMLP fc1 -> fc2
    "phi": (
        _build(tf.PhiConfig, tf.PhiForCausalLM, **COMMON, num_key_value_heads=2),
        "model.layers",
        "self_attn",
        [
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),
            ("self_attn.dense",),
            ("mlp.fc2",),
        ],
    ),
    # CohereDecoderLayer: hidden_states = input_layernorm(x); self_attn(hidden_states) + mlp(hidden_states); the MLP
    # is gate_proj/up_proj -> down_proj
    "cohere": (
        _build(tf.CohereConfig, tf.CohereForCausalLM, **COMMON, num_key_value_heads=2),
        "model.layers",
        "self_attn",
        [
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
            ("self_attn.o_proj",),
            ("mlp.down_proj",),
        ],
    ),
    # GPTNeoXLayer: attention(input_layernorm(x)) and mlp(post_attention_layernorm(x)) (parallel residual, two norms:
    # two inputs); fused query_key_value -> dense; dense_h_to_4h -> dense_4h_to_h; the cache comes as `layer_past`
    "gpt_neox": (
        _build(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, **COMMON),
        "gpt_neox.layers",
        "attention",
        [
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ],
    ),
    # Cohere2DecoderLayer: as Cohere's (one input_layernorm, self_attn and mlp in parallel), with grouped-query
    # attention; layer_types given: layer 0 attends through a window of 4 (shorter than the test sequences)
    "cohere2": (
        _build(
            tf.Cohere2Config,
            tf.Cohere2ForCausalLM,
            **COMMON,
            num_key_value_heads=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "model.layers",
        "self_attn",
        [
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
            ("self_attn.o_proj",),
            ("mlp.down_proj",),
        ],
    ),
    # OPTForCausalLM runs model.decoder directly (not its base model); OPTDecoderLayer: self_attn q/k/v -> out_proj,
    # then fc1 -> fc2 on the block itself
    "opt": (
        _build(
            tf.OPTConfig,
            tf.OPTForCausalLM,
            **{k: v for k, v in COMMON.items() if k not in ("intermediate_size", "initializer_range")},
            ffn_dim=64,
            word_embed_proj_dim=32,
            init_std=0.3,
        ),
        "model.decoder.layers",
        "self_attn",
        [
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ],
    ),
}


def token_ids(batch=2, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def convert(model_type, seed=0, fields=None, **settings):
    """spikify a tiny model of ``model_type`` (``fields``: its config's, ``settings``: spikify's); returns the model
    and the generic-path notices it gave."""
    source = ARCHITECTURES[model_type][0](seed, **(fields or {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = spikify(source, calibration=token_ids(4, 16, seed=5 + seed), **{"num_steps": 2, **settings})
    notices = [str(w.message) for w in caught if "generic path" in str(w.message)]
    return model, notices


def greedy(model, ids, new_tokens=8):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


def uncached_greedy(model, ids, new_tokens=8, eos=2, pad=0):
    """Greedy decoding by full forward passes (no cache), finished rows padded as generate() does."""
    seq, done = ids, torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        token = model(seq, use_cache=False).logits[:, -1].argmax(-1)
        token = torch.where(done, pad, token)
        done |= token == eos
        seq = torch.cat([seq, token[:, None]], dim=1)
    return seq


# ----------------------------------------------------------------------------------------------
# Placement: the neurons the architecture calls for, and the one-line notice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_generic_placement_matches_the_architecture(model_type):
    assert architectures_base.lookup(model_type) is None, f"{model_type} is now described: test another one here"
    model, notices = convert(model_type)
    assert model.config.model_type == model_type
    assert len(notices) == 1 and "\n" not in notices[0]
    assert f"model_type {model_type!r}" in notices[0] and "no rotation" in notices[0]
    _, blocks, attention, inputs = ARCHITECTURES[model_type]
    sites = placement(model)
    for index in range(model.config.num_hidden_layers):
        block = f"{blocks}.{index}"
        found = sorted(tuple(sorted(s.readers)) for s in sites if s.kind not in ("k", "v") and f"{block}." in s.name)
        expected = sorted(tuple(sorted(f"{block}.{r}" for r in readers)) for readers in inputs)
        assert found == expected
        kv = sorted(s.name for s in sites if s.kind in ("k", "v") and s.name.startswith(f"{block}."))
        assert kv == [f"{block}.{attention}.key_neuron", f"{block}.{attention}.value_neuron"]
    # every linear of the blocks reads spikes; nothing outside the blocks is touched (the LM head stays real)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    readers = {r for s in sites for r in s.readers}
    assert readers == {n for n in linears if n.startswith(blocks + ".")}
    assert "lm_head" in linears - readers and not hasattr(model.lm_head, "input_neuron")
    assert len(neurons(model)) == len(sites) == model.config.num_hidden_layers * (len(inputs) + 2)


def test_a_shared_input_is_spiked_once_per_forward():
    """Phi's q/k/v and fc1 read one tensor: its neuron runs once, and each reader gets the same spikes."""
    model, _ = convert("phi")
    layer = model.model.layers[0]
    calls, inputs = [], {}
    layer.input_neuron.register_forward_hook(lambda module, args, output: calls.append(output))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"):
        layer.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: inputs.__setitem__(name, args[0])
        )
    model(token_ids(), use_cache=False)
    assert len(calls) == 1
    spikes = calls[0].reshape(-1, calls[0].shape[-1])
    for name, x in inputs.items():
        assert torch.equal(x.reshape(-1, x.shape[-1]), spikes), name
    assert layer.input_neuron is not None and layer.get_submodule("self_attn.q_proj")._forward_pre_hooks


def test_dequantize_gives_the_real_valued_model_back():
    ids = token_ids()
    expected = ARCHITECTURES["phi"][0]()(ids).logits
    model, _ = convert("phi")
    assert not torch.equal(model(ids).logits, expected)
    real = model.dequantize()
    assert not neurons(real) and torch.equal(real(ids).logits, expected)


def test_llama_through_the_generic_path_equals_its_family(monkeypatch):
    """A LLaMA model converted with its table family removed goes the generic way: the same neurons (same names and
    readers) and bit-identical logits as through the llama family (which test_spikify checks by hand)."""
    table = spikify(tiny_llama_model(vocab_size=VOCAB), num_steps=2, calibration=token_ids(4, 16, seed=5))
    monkeypatch.delitem(architectures_base._REGISTRY, "llama")
    with pytest.warns(UserWarning, match="model_type 'llama' has no architecture description"):
        generic = spikify(tiny_llama_model(vocab_size=VOCAB), num_steps=2, calibration=token_ids(4, 16, seed=5))
    assert generic._spikelm.family.generic and not table._spikelm.family.generic
    assert [(s.name, s.kind, s.readers) for s in placement(generic)] == [
        (s.name, s.kind, s.readers) for s in placement(table)
    ]
    ids = token_ids()
    assert torch.equal(generic(ids).logits, table(ids).logits)
    assert torch.equal(greedy(generic, ids), greedy(table, ids))


# ----------------------------------------------------------------------------------------------
# Cached decoding equals full forward passes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_generic_cached_decoding_equals_full_forward(model_type):
    flips, varied = 0, set()
    for seed in range(2):
        model, _ = convert(model_type, seed=seed)
        ids = token_ids(2, 6, seed=seed)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        uncached = uncached_greedy(model, ids)[:, : out.sequences.shape[1]]  # generate() stops when all rows ended
        flips += int((out.sequences != uncached).sum())
        varied |= set(out.sequences[:, ids.shape[1] :].flatten().tolist())
        full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
        torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
    assert flips == 0
    assert len(varied) > 2  # the decoding is not stuck on one token (the comparison would say little)


def test_generic_gif_cached_decoding_equals_full_forward():
    model, _ = convert("phi", neuron="gif")
    ids = token_ids(2, 6)
    assert torch.equal(greedy(model, ids), uncached_greedy(model, ids))


def test_sliding_window_reaches_the_spiking_attention():
    """Cohere2's layer 0 with a window of 4, and with a window longer than the text (the same weights and neurons):
    the first 4 positions see the same keys, later ones do not."""
    windowed, _ = convert("cohere2")
    full, _ = convert("cohere2", fields={"sliding_window": 64})
    full.load_state_dict(windowed.state_dict())
    ids = token_ids(2, 10)
    a, b = windowed(ids, use_cache=False).logits, full(ids, use_cache=False).logits
    assert torch.equal(a[:, :4], b[:, :4])
    assert (a[:, 4:] - b[:, 4:]).abs().amax(-1).min() > 0


# ----------------------------------------------------------------------------------------------
# save_pretrained -> from_pretrained in a fresh process: the discovery runs again on the loaded model
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 40 s on the shared machine (a fresh interpreter loading five models)
def test_generic_round_trip_in_a_fresh_process(tmp_path):
    ids = token_ids()
    expected = {}
    for model_type in sorted(ARCHITECTURES):
        model, _ = convert(model_type)
        with torch.no_grad():
            expected[model_type] = (model(ids).logits, greedy(model, ids), len(neurons(model)))
        model.save_pretrained(tmp_path / model_type)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import spikelm
        from transformers import AutoModelForCausalLM
        from spikelm.conversion import neurons
        ids, out = torch.load({str(tmp_path / "ids.pt")!r}), {{}}
        for model_type in {sorted(ARCHITECTURES)!r}:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + model_type).eval()
            assert model.config.model_type == model_type and model._spikelm.family.generic
            assert all(n.is_initialized() for _, n in neurons(model))
            with torch.no_grad():
                generated = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
                )
                out[model_type] = (model(ids).logits, generated, len(neurons(model)))
        torch.save(out, {str(tmp_path / "loaded.pt")!r})
        """
    )
    root = str(Path(spikelm.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    for model_type, (logits, generated, count) in expected.items():
        again = loaded[model_type]
        assert torch.equal(again[0], logits), model_type
        assert torch.equal(again[1], generated), model_type
        assert again[2] == count, model_type


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming the model_type and why
# ----------------------------------------------------------------------------------------------


class NoLinearConfig(tf.PretrainedConfig):
    model_type = "nolinear"

    def __init__(self, vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class NoLinearBlock(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size, size))

    def forward(self, x, past_key_values=None):
        return x + torch.tanh(x @ self.weight)


class NoLinearModel(tf.PreTrainedModel):
    """A decoder whose blocks multiply by parameters directly (no nn.Linear)."""

    config_class = NoLinearConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NoLinearBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, past_key_values=past_key_values)
        return x


REFUSED = {
    "t5": (
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
        ),
        "encoder-decoder",
    ),
    "mamba": (
        lambda: tf.MambaForCausalLM(
            tf.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=4)
        ),
        "past_key_values",
    ),
    "recurrent_gemma": (
        lambda: tf.RecurrentGemmaForCausalLM(
            tf.RecurrentGemmaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                intermediate_size=64,
                lru_width=32,
                attention_window_size=8,
            )
        ),
        "cache's update",
    ),
    "nolinear": (lambda: NoLinearModel(NoLinearConfig()), "no nn.Linear"),
    "mixtral": (
        lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4)),
        "mixture-of-experts",
    ),
    "gptj": (
        lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
        "AttentionInterface",
    ),
}


def test_experts_are_refused_from_the_modules_too():
    """A mixture-of-experts model whose config does not say so (the count edited away) is refused by its modules."""
    model = REFUSED["mixtral"][0]()
    model.config.num_local_experts = model.config.num_experts_per_tok = 1
    with pytest.raises(ValueError, match="model_type 'mixtral'.*mixture-of-experts blocks \\(MixtralSparseMoeBlock\\)"):
        spikify(model, num_steps=2)


def test_composite_models_are_refused():
    config = tf.LlavaConfig(
        text_config=tf.LlamaConfig(**{k: v for k, v in COMMON.items()}, num_key_value_heads=2),
        vision_config=tf.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
        ),
    )
    model = tf.LlavaForConditionalGeneration(config)
    with pytest.raises(ValueError, match="model_type 'llava'.*composite.*'llama'"):
        spikify(model, num_steps=2)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_unconvertible_models_are_refused_in_one_line(model_type):
    build, why = REFUSED[model_type]
    model = build()
    assert model.config.model_type == model_type
    with pytest.raises(ValueError) as refused:
        spikify(model, num_steps=2)
    message = str(refused.value)
    assert "\n" not in message and f"model_type {model_type!r}" in message and why in message
    assert not any(True for _ in neurons(model))  # refused before anything was changed


@pytest.mark.parametrize(
    "field,value", [("rotation", "hadamard"), ("online_down_proj_rotation", True), ("value_rotation", True)]
)
def test_rotations_are_dropped_on_the_generic_path_in_the_one_line(field, value):
    source = ARCHITECTURES["phi"][0]()
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    model, notices = convert("phi", **{field: value})
    assert len(notices) == 1 and "no rotation" in notices[0]
    config = model.config.quantization_config
    assert config.rotation == "none" and config.online_down_proj_rotation is False and config.value_rotation is False
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if k in weights)  # nothing folded


def test_smoothing_is_refused_on_the_generic_path():
    model = ARCHITECTURES["phi"][0]()
    with pytest.raises(ValueError, match="smoothing_alpha=0.5: model_type 'phi' converts through the generic path"):
        spikify(model, num_steps=2, calibration=token_ids(4, 16), smoothing_alpha=0.5)
    assert not neurons(model)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def test_spikify_command_converts_through_the_generic_path(tmp_path, capsys):
    from conftest import word_tokenizer

    from spikelm.commands.main import main

    text = "The quick brown fox jumps over the lazy dog. " * 50
    (tmp_path / "cal.txt").write_text(text)
    tokenizer = word_tokenizer(sorted(set(text.replace(".", " .").split())))
    fields = {**COMMON, "vocab_size": len(tokenizer.get_vocab()), "bos_token_id": 1, "eos_token_id": 2}
    ARCHITECTURES["phi"][0](**fields).save_pretrained(tmp_path / "phi")
    tokenizer.save_pretrained(tmp_path / "phi")
    args = ["--calibration-sequences", "2", "--calibration-length", "16", "--eval-tokens", "0"]
    code = main(
        ["spikify", "--model", str(tmp_path / "phi"), "--calibration-text", str(tmp_path / "cal.txt"), *args]
        + ["--output-dir", str(tmp_path / "out")]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    said = [line for line in (captured.out + captured.err).splitlines() if "generic path" in line]
    assert len(said) == 1 and "model_type 'phi'" in said[0] and "no rotation" in said[0]
    assert main(["generate", "--model", str(tmp_path / "out"), "--prompt", "the quick", "--max-new-tokens", "3"]) == 0
    assert "converted spiking model" in capsys.readouterr().out
