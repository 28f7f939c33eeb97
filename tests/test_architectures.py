"""Every described architecture (spikelm.conversion.architectures), on a tiny random config built from transformers'
own config class: the spikify -> save -> fresh-process from_pretrained round trip gives identical logits; cached
greedy decoding equals decoding by full forward passes (token flips counted, 0 expected); the outlier transform
(residual-stream rotation + online rotation of the FFN's last linear input) keeps the real-valued logits where the
description allows it, and is dropped with a one-line notice naming the reason where it does not."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers as tf
from test_spikify import greedy, token_ids, uncached_greedy

from spikelm.conversion import detach, spikify
from spikelm.conversion.architectures import describe, lookup, registered
from spikelm.conversion.recipes import recipe

VOCAB = 64
# a decoder block as small as transformers allows; head_dim 8, two KV heads (grouped-query attention)
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 4  # sliding windows shorter than the decoded sequences (prompt 6 + 8 new tokens)

# model_type -> (config class, model class, config fields beyond DECODER)
CAUSAL = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": WINDOW}),
    "qwen2": (
        tf.Qwen2Config,
        tf.Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    "granite": (
        tf.GraniteConfig,
        tf.GraniteForCausalLM,
        {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3, "logits_scaling": 2.0},
    ),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"sliding_window": WINDOW}),
    "gemma3_text": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, {"sliding_window": WINDOW}),
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, {}),
}
# families whose norms cannot carry a residual-stream rotation, and the word the notice must name
NOT_ROTATABLE = {
    "gemma2": "post_attention_layernorm",
    "gemma3_text": "post_attention_layernorm",
    "olmo2": "post_attention_layernorm",
    "starcoder2": "LayerNorm",
    "olmo": "LayerNorm",
    "gpt2": "LayerNorm",
    "bert": "LayerNorm",
}


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random norm gains and biases (a fresh model has gains of exactly 1, or 0 for Gemma's ``1 + w``, which would
    make a wrong gain fold invisible), and weights large enough for activations of order one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.add_(0.3 * noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def build(model_type: str, seed: int = 0):
    """A tiny random model of ``model_type`` (float32, eval mode)."""
    torch.manual_seed(seed)
    if model_type == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0)
        return _perturb(tf.GPT2LMHeadModel(config), seed)
    if model_type == "bert":
        config = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            num_labels=3,
        )
        return _perturb(tf.BertForSequenceClassification(config), seed)
    config_cls, model_cls, extra = CAUSAL[model_type]
    return _perturb(model_cls(config_cls(**DECODER, **extra)), seed)


ALL = sorted([*CAUSAL, "gpt2", "bert"])


def convert(model, **fields):
    """spikify with the GIF recipe (with the transform) and ``fields``; returns (model, spikify notices). The
    default (signed) recipe on every family: tests/test_value_rotation.py."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spikify(model, recipe("gif", None, fields), calibration=[token_ids(4, 16, seed=3), token_ids(4, 16, seed=4)])
    return model, [str(w.message) for w in caught if str(w.message).startswith("spikify:")]


def test_every_family_is_described():
    assert {a.model_type for a in registered()} >= set(ALL)
    for model_type in ALL:
        assert describe(build(model_type)).model_type == model_type


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Every family converted with the GIF recipe and saved; one fresh process loads them all through
    ``from_pretrained`` and writes its logits. Returns {model_type: (logits here, logits there)}."""
    root = tmp_path_factory.mktemp("families")
    ids = token_ids(2, 10, seed=7)
    here = {}
    for model_type in ALL:
        model, _ = convert(build(model_type))
        with torch.no_grad():
            here[model_type] = model(ids).logits
        model.save_pretrained(root / model_type)
    torch.save(ids, root / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        import spikelm
        root = sys.argv[1]
        ids = torch.load(root + "/ids.pt")
        out = {{}}
        for model_type in {ALL!r}:
            auto = (transformers.AutoModelForSequenceClassification if model_type == "bert"
                    else transformers.AutoModelForCausalLM)
            model = auto.from_pretrained(root + "/" + model_type).eval()
            assert model.hf_quantizer is not None, model_type
            with torch.no_grad():
                out[model_type] = model(ids).logits
        torch.save(out, root + "/loaded.pt")
        """
    )
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, capture_output=True, text=True)
    there = torch.load(root / "loaded.pt")
    return {t: (here[t], there[t]) for t in ALL}


@pytest.mark.parametrize("model_type", ALL)
def test_round_trip_in_a_fresh_process_is_identical(model_type, round_trip):
    here, there = round_trip[model_type]
    assert torch.equal(here, there)


@pytest.mark.parametrize("model_type", [*CAUSAL, "gpt2"])
@pytest.mark.parametrize("neuron", ["gif", pytest.param("elastic", marks=pytest.mark.slow)])
def test_cached_decoding_equals_full_forward_passes(model_type, neuron):
    fields = {"num_steps": 2} if neuron == "elastic" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spikify(build(model_type), recipe(neuron, None, fields), calibration=token_ids(4, 16, seed=3))
    ids = token_ids(2, 6)
    cached, uncached = greedy(model, ids), uncached_greedy(model, ids)
    flips = int((cached != uncached).sum())
    assert flips == 0, f"{model_type}: {flips} of {cached[:, 6:].numel()} generated tokens differ"


def _relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("model_type", ALL)
def test_the_transform_keeps_the_real_valued_logits_or_says_why_not(model_type):
    model = build(model_type)
    ids = token_ids(2, 10, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    embeddings = model.get_input_embeddings().weight.detach().clone()
    model, notices = convert(model, rotation="hadamard", online_down_proj_rotation=True)
    config = model.config.quantization_config
    architecture = lookup(model_type)
    if model_type in NOT_ROTATABLE:
        assert len(notices) == 1 and NOT_ROTATABLE[model_type] in notices[0], notices
        assert "\n" not in notices[0]
        assert config.rotation == "none"
        assert config.online_down_proj_rotation == architecture.online_rotation
        assert torch.equal(model.get_input_embeddings().weight, embeddings)  # the residual stream is not rotated
    else:
        assert notices == []
        assert config.rotation == "hadamard" and config.online_down_proj_rotation
        assert not torch.allclose(model.get_input_embeddings().weight, embeddings)  # it is rotated
    detach(model)  # the real-valued model, with whatever transform was folded into it
    with torch.no_grad():
        after = model(ids).logits
    assert _relative_error(after, before) <= 1e-4


@pytest.mark.parametrize("model_type", ["gemma", "gemma3_text"])
def test_a_one_plus_w_gain_folds_to_zero_and_smoothing_keeps_the_logits(model_type):
    """Gemma's RMSNorm computes ``x * (1 + w)``: a folded gain stores w = 0 (where a rotation applies), and a
    smoothing factor ``s`` gives ``(1 + w) / s - 1``; both keep the real-valued logits."""
    model = build(model_type)
    ids = token_ids(2, 10, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    model, _ = convert(model, smoothing_alpha=0.5)
    if model_type == "gemma":
        assert torch.equal(model.model.norm.weight, torch.zeros_like(model.model.norm.weight))
    detach(model)
    with torch.no_grad():
        assert _relative_error(model(ids).logits, before) <= 1e-4


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_the_sliding_window_is_in_force_in_the_converted_model(model_type):
    """Converted with a window of 4 and with none (same weights): the positions that see fewer than 4 tokens get
    identical logits, the later ones do not (the spiking attention applies the window). No salient channels, so
    that calibration, which sees the window too, picks the same codes for both."""
    ids = token_ids(2, 10, seed=9)
    out = []
    for window in (WINDOW, 64):
        model = build(model_type)
        model.config.sliding_window = window
        model, _ = convert(model, saliency_fraction=0.0)
        with torch.no_grad():
            out.append(model(ids).logits)
    assert torch.equal(out[0][:, :WINDOW], out[1][:, :WINDOW])
    assert not torch.allclose(out[0][:, WINDOW:], out[1][:, WINDOW:])


def test_sliding_window_layers_come_from_the_config():
    gemma3 = build("gemma3_text").config
    assert lookup("gemma3_text").sliding_layers(gemma3) == (0,)
    assert lookup("mistral").sliding_layers(build("mistral").config) == (0, 1)
    assert lookup("llama").sliding_layers(build("llama").config) == ()


def test_the_model_card_names_the_architecture_and_why_no_rotation(tmp_path):
    from spikelm.conversion import write_model_card

    model, _ = convert(build("gemma3_text"))
    text = write_model_card(tmp_path, model.config.quantization_config, "tiny", model_type="gemma3_text").read_text()
    assert "model_type` 'gemma3_text'" in text and "No residual-stream rotation" in text
    assert "online rotation of the FFN's last linear input: yes" in text
    saved = json.loads(json.dumps(model.config.quantization_config.to_dict()))
    assert saved["rotation"] == "none"
