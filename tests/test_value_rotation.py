"""The per-head value/output rotation (``value_rotation``; spikelm.conversion.rotation.rotate_values, QuaRot's V-O
rotation): on a tiny random model of every described family (transformers' own config classes, as
tests/test_architectures.py builds them) the real-valued logits are unchanged after the fold; the folded weights are
the hand-built block-diagonal products; a planted wrong fold (V rotated, the output projection not, or turned the
wrong way) changes the logits, so the check can fail; with the signed recipe the spikify -> save -> fresh-process
from_pretrained round trip gives identical logits and cached greedy decoding equals full forward passes; where the
fold is not exact (no value/output linears described, a clamp of V, a head size with no Hadamard matrix) spikify
drops it in one line and leaves the weights alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers as tf
from test_architectures import CAUSAL, DECODER, _perturb, _relative_error, build
from test_spikify import greedy, token_ids, uncached_greedy

from spikelm.conversion import detach, spikify
from spikelm.conversion.architectures import lookup
from spikelm.conversion.recipes import recipe
from spikelm.conversion.rotation import rotate_values, rotation_matrix, value_rotation_blocker

ROTATED = sorted(CAUSAL)  # every described decoder family: the fold is exact in all of them
HEAD_DIM, KV_HEADS, QUERY_HEADS = DECODER["head_dim"], DECODER["num_key_value_heads"], DECODER["num_attention_heads"]


def signed_vo(**fields):
    """The signed recipe (both residual rotations where the family allows them) with the value/output rotation."""
    return recipe("signed", None, {"value_rotation": True, **fields})


def convert(model, fields):
    """spikify with ``fields`` and two calibration batches; returns (model, spikify notices)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spikify(model, fields, calibration=[token_ids(4, 16, seed=3), token_ids(4, 16, seed=4)])
    return model, [str(w.message) for w in caught if str(w.message).startswith("spikify:")]


def _hadamard(seed=2, size=HEAD_DIM):
    """The head-size rotation the fold uses, checked here to be an orthogonal matrix of entries ±1/sqrt(size)."""
    h, kind = rotation_matrix(size, "hadamard", seed)
    assert kind == "hadamard"
    assert torch.allclose(h.abs(), torch.full_like(h, size**-0.5))
    assert torch.allclose(h @ h.t(), torch.eye(size, dtype=h.dtype), atol=1e-12)
    return h


def _value_output(model, index=0):
    """(value weight, value bias, V's first row, output weight) of block ``index``, by the transformers attributes."""
    attention = model.model.layers[index].self_attn
    if hasattr(attention, "qkv_proj"):  # Phi-3: V is the last rows of the fused projection
        value = attention.qkv_proj
        first = (QUERY_HEADS + KV_HEADS) * HEAD_DIM
    else:
        value, first = attention.v_proj, 0
    return value.weight, value.bias, first, attention.o_proj.weight


@pytest.mark.parametrize("model_type", ROTATED)
def test_the_fold_keeps_the_real_valued_logits(model_type):
    model = build(model_type)
    ids = token_ids(2, 10, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    value_before = _value_output(model)[0].detach().clone()
    summary = rotate_values(model)
    assert summary["head_dim"] == HEAD_DIM and summary["kv_heads"] == KV_HEADS
    assert summary["query_heads"] == QUERY_HEADS and summary["layers"] == DECODER["num_hidden_layers"]
    assert not torch.allclose(_value_output(model)[0], value_before)  # V is rotated
    with torch.no_grad():
        after = model(ids).logits
    assert _relative_error(after, before) <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "starcoder2"])
def test_the_folded_weights_are_the_block_diagonal_products(model_type):
    """Value rows ``blockdiag(H, ..., H) W_v`` (bias too; Q and K rows of a fused projection untouched) and output
    columns ``W_o blockdiag(H, ..., H)^T``, one block per K/V head and per query head, built here by hand."""
    model = build(model_type)
    old = [t.detach().clone().double() if t is not None else None for t in _value_output(model)[:2]]
    first = _value_output(model)[2]
    old_output = _value_output(model)[3].detach().clone().double()
    rotate_values(model)
    weight, bias, _, output = _value_output(model)
    h = _hadamard()
    per_kv = torch.block_diag(*[h] * KV_HEADS)
    per_query = torch.block_diag(*[h] * QUERY_HEADS)
    torch.testing.assert_close(weight.double()[first:], per_kv @ old[0][first:], rtol=0, atol=1e-6)
    assert torch.equal(weight[:first], old[0][:first].float())  # Q and K rows of a fused projection
    if bias is not None:
        torch.testing.assert_close(bias.double()[first:], per_kv @ old[1][first:], rtol=0, atol=1e-6)
    torch.testing.assert_close(output.double(), old_output @ per_query.t(), rtol=0, atol=1e-6)


def _planted(model, transpose_output: bool | None):
    """A wrong fold: V rows turned by ``H``; the output columns not at all (None), or by ``H`` instead of ``H^T``."""
    h = _hadamard()
    with torch.no_grad():
        for index in range(len(model.model.layers)):
            weight, bias, first, output = _value_output(model, index)
            weight[first:] = (torch.block_diag(*[h] * KV_HEADS) @ weight[first:].double()).float()
            if bias is not None:
                bias[first:] = (torch.block_diag(*[h] * KV_HEADS) @ bias[first:].double()).float()
            if transpose_output is not None:
                block = torch.block_diag(*[h] * QUERY_HEADS)
                output.copy_((output.double() @ (block if transpose_output else block.t())).float())


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
@pytest.mark.parametrize("transpose_output", [None, True])
def test_a_planted_wrong_fold_changes_the_logits(model_type, transpose_output):
    model = build(model_type)
    ids = token_ids(2, 10, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    _planted(model, transpose_output)
    with torch.no_grad():
        assert _relative_error(model(ids).logits, before) > 1e-2  # what the exactness check would catch


@pytest.mark.parametrize("model_type", ROTATED)
def test_spikify_with_the_signed_recipe_keeps_the_real_valued_logits(model_type):
    """The whole transform (residual rotation where the norms allow it, online rotation, value/output rotation)
    then the neurons detached: the real-valued model computes the same function."""
    model = build(model_type)
    ids = token_ids(2, 10, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    value_before = _value_output(model)[0].detach().clone()
    model, notices = convert(model, signed_vo())
    assert model.config.quantization_config.value_rotation is True
    assert all("no per-head value/output rotation" not in n for n in notices), notices
    assert not torch.allclose(_value_output(model)[0], value_before)
    detach(model)
    with torch.no_grad():
        assert _relative_error(model(ids).logits, before) <= 1e-4


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Every family converted with the signed recipe + value_rotation and saved; one fresh process loads them all
    through ``from_pretrained``. Returns {model_type: (logits here, logits there, saved config)}."""
    root = tmp_path_factory.mktemp("value_rotation")
    ids = token_ids(2, 10, seed=7)
    here = {}
    for model_type in ROTATED:
        model, _ = convert(build(model_type), signed_vo())
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
        for model_type in {ROTATED!r}:
            model = transformers.AutoModelForCausalLM.from_pretrained(root + "/" + model_type).eval()
            assert model.hf_quantizer is not None, model_type
            with torch.no_grad():
                out[model_type] = model(ids).logits
        torch.save(out, root + "/loaded.pt")
        """
    )
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, capture_output=True, text=True)
    there = torch.load(root / "loaded.pt")
    configs = {t: json.loads((root / t / "config.json").read_text())["quantization_config"] for t in ROTATED}
    return {t: (here[t], there[t], configs[t]) for t in ROTATED}


@pytest.mark.parametrize("model_type", ROTATED)
def test_signed_value_rotation_round_trip_in_a_fresh_process_is_identical(model_type, round_trip):
    here, there, saved = round_trip[model_type]
    assert saved["value_rotation"] is True
    assert torch.equal(here, there)


@pytest.mark.parametrize("model_type", ROTATED)
def test_cached_decoding_equals_full_forward_passes_with_value_rotation(model_type):
    model, _ = convert(build(model_type), signed_vo())
    ids = token_ids(2, 6)
    cached, uncached = greedy(model, ids), uncached_greedy(model, ids)
    flips = int((cached != uncached).sum())
    assert flips == 0, f"{model_type}: {flips} of {cached[:, 6:].numel()} generated tokens differ"


def _llama(**fields):
    return _perturb(tf.LlamaForCausalLM(tf.LlamaConfig(**{**DECODER, **fields})), 0)


def test_a_head_size_of_a_paley_order_folds_exactly():
    model = _llama(head_dim=12)  # 12 = Paley I (q = 11): no power of two
    ids = token_ids(2, 10, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    assert rotate_values(model)["head_dim"] == 12
    with torch.no_grad():
        assert _relative_error(model(ids).logits, before) <= 1e-4


def _olmo_clipped():
    return _perturb(tf.OlmoForCausalLM(tf.OlmoConfig(**DECODER, clip_qkv=0.5)), 0)


@pytest.mark.parametrize(
    "make,word",
    [
        (lambda: build("gpt2"), "value and output"),
        (lambda: build("bert"), "value and output"),
        (_olmo_clipped, "clip_qkv"),
        (lambda: _llama(head_dim=10), "order 10"),
    ],
    ids=["gpt2", "bert", "olmo-clip_qkv", "head_dim-10"],
)
def test_where_the_fold_is_not_exact_spikify_drops_it_in_one_line(make, word):
    model = make()
    reason = value_rotation_blocker(model)
    assert reason is not None and word in reason
    with pytest.raises(ValueError, match="no per-head value/output rotation"):
        rotate_values(make())
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    fields = {"value_rotation": True, "rotation": "none", "online_down_proj_rotation": False}
    if lookup(model.config.model_type).causal:
        fields = recipe("gif", None, fields)
    else:
        fields = {"neuron": "gif", **fields}
    model, notices = convert(model, fields)
    assert len(notices) == 1 and "\n" not in notices[0], notices
    assert "no per-head value/output rotation" in notices[0] and word in notices[0]
    assert model.config.quantization_config.value_rotation is False
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name]), name


def test_on_in_the_signed_recipe_only_and_a_config_without_the_field_loads_with_it_off():
    """The signed recipe (the default) turns it on; the GIF and elastic recipes stay as they were (off); a config
    written before the field existed loads with it off."""
    from spikelm.conversion import SpikeLMConversionConfig
    from spikelm.conversion.recipes import DEFAULT_RECIPE, RECIPES

    assert DEFAULT_RECIPE == "signed"
    assert recipe("signed")["value_rotation"] is True and RECIPES["signed"]["value_rotation"] is True
    assert SpikeLMConversionConfig(**recipe("signed")).value_rotation is True
    assert recipe("signed", None, {"value_rotation": False})["value_rotation"] is False  # --set turns it off
    for name in ("gif", "elastic"):
        assert recipe(name).get("value_rotation", False) is False
        assert RECIPES[name].get("value_rotation", False) is False
        assert SpikeLMConversionConfig(**recipe(name)).value_rotation is False
    saved = SpikeLMConversionConfig(**recipe("signed")).to_dict()
    saved.pop("value_rotation")  # a config.json written before the field existed
    assert SpikeLMConversionConfig(**saved).value_rotation is False
    with pytest.raises(ValueError, match="value_rotation must be True or False"):
        SpikeLMConversionConfig(value_rotation="yes")


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_the_default_recipe_converts_families_it_cannot_rotate_with_one_line(model_type):
    """GPT-2 and BERT (LayerNorms, no per-head value/output linears described) take the default recipe: every
    rotation it asks for is dropped in the one line spikify gives anyway for the residual-stream rotation, the
    weights stay the source's, and the neurons are the recipe's (signed)."""
    from spikelm.conversion import neurons
    from spikelm.conversion.recipes import DEFAULT_RECIPE
    from spikelm.nn.neurons.signed import SignedNeuron

    model = build(model_type)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    model, notices = convert(model, recipe(DEFAULT_RECIPE))
    assert len(notices) == 1 and "\n" not in notices[0], notices
    assert "no residual-stream rotation" in notices[0] and "no per-head value/output rotation" in notices[0]
    config = model.config.quantization_config
    assert config.value_rotation is False and config.rotation == "none" and not config.online_down_proj_rotation
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name]), name
    placed = [n for _, n in neurons(model)]
    assert placed and all(isinstance(n, SignedNeuron) for n in placed)


def test_the_model_card_says_the_values_are_rotated(tmp_path):
    from spikelm.conversion import write_model_card

    model, _ = convert(build("llama"), signed_vo())
    text = write_model_card(tmp_path, model.config.quantization_config, "tiny", model_type="llama").read_text()
    assert "per-head rotation of the attention's values and output: yes" in text
