"""Gemma-3 (``gemma3_text``) through spikify on tiny random configs: its RMSNorm gains are ``1 + w`` and sandwich
each branch, two of three layers attend through a sliding window shorter than the test sequences.

The residual-stream rotation is refused in one line naming the post norms; the online rotation of down_proj's input
(not in the residual stream) keeps the real-valued logits; a conversion round-trips through save/from_pretrained and
decodes with its spike-code cache exactly as by full forward passes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from spikelm.conversion import neurons, placement, spikify
from spikelm.conversion.recipes import DEFAULT_RECIPE, RECIPES
from spikelm.conversion.rotation import attach_online_down_proj_rotation, rotate_residual_stream

VOCAB = 96
WINDOW = 6


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # gains away from their init (0: a gain of 1), as a trained Gemma's are
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    return model


def token_ids(batch=2, length=16, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def gemma_recipe(neuron: str) -> dict:
    """The named recipe as `spikelm spikify` applies it to gemma3_text: no residual-stream rotation."""
    return {**RECIPES[neuron], "rotation": "none"}


def test_the_residual_rotation_is_refused_or_dropped_naming_the_post_norms():
    with pytest.raises(ValueError, match="post_attention_layernorm.*cannot be folded") as err:
        rotate_residual_stream(tiny_gemma3())
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="no residual-stream rotation .*post_attention_layernorm") as caught:
        model = spikify(tiny_gemma3(), RECIPES["gif"], calibration=token_ids())
    assert all("\n" not in str(w.message) for w in caught)
    config = model.config.quantization_config
    assert config.rotation == "none" and config.online_down_proj_rotation  # the exact part is kept


def test_the_online_down_proj_rotation_keeps_the_real_valued_logits():
    model, ids = tiny_gemma3(), token_ids()
    with torch.no_grad():
        before = model(ids).logits
        attach_online_down_proj_rotation(model, seed=1)
        after = model(ids).logits
    assert (after - before).norm() / before.norm() <= 1e-4
    assert not torch.equal(
        model.model.layers[0].mlp.down_proj.weight, tiny_gemma3().model.layers[0].mlp.down_proj.weight
    )


@pytest.mark.parametrize("neuron", ["gif", "elastic"])
def test_round_trip_and_cached_decoding(neuron, tmp_path):
    model = spikify(tiny_gemma3(), gemma_recipe(neuron), calibration=token_ids(4, 16, seed=5))
    kinds = [site.kind for site in placement(model)]
    assert len(kinds) == 3 * 6 and set(kinds) == {"qkv_input", "o_input", "gate_up_input", "down_input", "k", "v"}
    ids = token_ids(2, 10)
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert out.sequences.shape[1] > WINDOW + 8  # decoding runs past the sliding window
    # every cached decoding step equals the full forward pass over the generated sequence (no code flips)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    assert torch.equal(torch.stack(out.logits, 1).argmax(-1), full.argmax(-1))
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is Gemma3ForCausalLM and loaded.config.quantization_config.neuron == neuron
    assert [name for name, _ in neurons(loaded)] == [name for name, _ in neurons(model)]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_the_conversion_spikes_and_stays_close_to_the_source():
    """Not the real-valued function (the inputs are spiked), but near it: GIF's 4-5 bit codes on a tiny model."""
    source, ids = tiny_gemma3(), token_ids()
    with torch.no_grad():
        real = source(ids).logits
        converted = spikify(tiny_gemma3(), gemma_recipe("gif"), calibration=token_ids(4, 16, seed=5))(ids).logits
    error = ((converted - real).norm() / real.norm()).item()
    assert 0 < error < 0.5


@pytest.mark.parametrize("neuron", ["gif", DEFAULT_RECIPE])
def test_spikify_command_drops_only_the_residual_rotation_saying_why(capsys, neuron):
    from spikelm.commands.spikify import _fit_transform
    from spikelm.conversion import SpikeLMConversionConfig

    fitted = _fit_transform(SpikeLMConversionConfig(**RECIPES[neuron]), tiny_gemma3())
    assert fitted.rotation == "none" and fitted.online_down_proj_rotation
    assert fitted.value_rotation == RECIPES[neuron].get("value_rotation", False)  # kept where asked (exact here)
    notice = capsys.readouterr().out.strip()
    assert len(notice.splitlines()) == 1 and "gemma3_text" in notice and "post_attention_layernorm" in notice


def test_the_benchmarks_online_input_rotations_keep_the_real_valued_logits():
    """conversion_ladder's default-online-inputs row: an online Hadamard on the q/k/v, o_proj and gate/up inputs,
    folded into their readers, is exact through Gemma-3's post norms (and the bos windows score what they say)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from conversion_ladder import attach_online_input_rotations, bos_windows

    model, ids = tiny_gemma3(), token_ids()
    with torch.no_grad():
        before = model(ids).logits
        assert attach_online_input_rotations(model) == 3 * 3
        after = model(ids).logits
    assert (after - before).norm() / before.norm() <= 1e-4
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, tiny_gemma3().model.layers[0].self_attn.q_proj.weight
    )

    windows = bos_windows(torch.arange(10, 20), bos=2, window=4)  # chunks of 3 after <bos>; the last one dropped
    assert windows.tolist() == [2, 10, 11, 12, 2, 13, 14, 15, 2, 16, 17, 18]
