"""``spikelm spikify`` end to end on models a user saves with the public transformers API (no download)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_llama
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, T5Config

from spikelm.commands.main import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_tiny_llama(d, sorted(set(TEXT.replace(".", " .").split())), max_position_embeddings=128)
    return d


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.txt"
    path.write_text(TEXT)
    return path


def _spikify(args, capsys):
    code = main(["spikify", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("neuron", ["gif", "elastic"])
def test_spikify_saves_a_model_that_from_pretrained_loads_spiking(
    llama_dir, calibration_file, tmp_path, neuron, capsys
):
    out = tmp_path / "out"
    code, stdout, err = _spikify(
        [
            "--model",
            str(llama_dir),
            "--neuron",
            neuron,
            "--calibration-text",
            str(calibration_file),
            "--calibration-sequences",
            "2",
            "--calibration-length",
            "16",
            "--eval-tokens",
            "0",
            "--output-dir",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"  # the original architecture, plus the spiking section
    assert config["quantization_config"]["quant_method"] == "spikelm"
    assert config["quantization_config"]["neuron"] == neuron
    card = (out / "README.md").read_text()
    assert "cal.txt" in card
    # the card's recipe is the config as applied (e.g. untied by the rotation), without the other neuron's fields
    recipe = json.loads(card.split("```json\n", 1)[1].split("```", 1)[0])
    saved = config["quantization_config"]
    assert recipe == {k: v for k, v in saved.items() if k in recipe} and len(recipe) >= 10
    assert ("num_steps" in recipe) == (neuron == "elastic") and ("gif_bits" in recipe) == (neuron == "gif")
    # a fresh process: `import spikelm` alone is enough for from_pretrained to restore the spiking model
    script = (
        "import sys, torch, spikelm\n"
        "from transformers import AutoModelForCausalLM\n"
        "from spikelm.conversion import is_spiking\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(is_spiking(m))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True"


def _convert_tiny(llama_dir, calibration_file, out, capsys, *extra):
    args = ["--model", str(llama_dir), "--calibration-text", str(calibration_file), "--calibration-sequences", "1"]
    code, stdout, err = _spikify(
        [*args, "--calibration-length", "16", "--eval-tokens", "0", *extra, "--output-dir", str(out)], capsys
    )
    assert code == 0, err
    return json.loads((out / "config.json").read_text())["quantization_config"], stdout


def test_spikify_defaults_are_the_signed_recipe_with_the_value_rotation(llama_dir, calibration_file, tmp_path, capsys):
    """No --neuron: the signed recipe (docs/CONVERSION.md): 4-bit codes per 64 channels, unclipped, the top 10 % of
    channels at 5 bits, both residual-stream rotations and the per-head value/output rotation, all applied to a
    LLaMA (nothing dropped, so no notice line); the saved neurons are signed ones with those settings."""
    from spikelm.conversion import neurons
    from spikelm.nn.neurons.signed import SignedNeuron

    quant, stdout = _convert_tiny(llama_dir, calibration_file, tmp_path / "out", capsys)
    assert quant["neuron"] == "signed"
    assert (quant["signed_bits"], quant["signed_group_size"], quant["signed_clip_ratio"]) == (4, 64, 1.0)
    assert (quant["signed_salient_bits"], quant["saliency_fraction"], quant["signed_steps"]) == (5, 0.1, 1)
    assert quant["rotation"] == "hadamard" and quant["online_down_proj_rotation"] is True
    assert quant["value_rotation"] is True and quant["signed_outlier_ratio"] == 2.0
    assert "dropped" not in stdout and "no per-head" not in stdout
    source = AutoModelForCausalLM.from_pretrained(llama_dir)
    spiking = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    placed = [n for _, n in neurons(spiking)]
    assert placed and all(isinstance(n, SignedNeuron) for n in placed)
    inputs = [n for name, n in neurons(spiking) if name.endswith("input_neuron")]
    assert inputs and all(float(n.outlier_threshold) > 0 for n in inputs)  # calibrated outlier-token thresholds
    assert not torch.allclose(
        source.model.layers[0].self_attn.v_proj.weight, spiking.model.layers[0].self_attn.v_proj.weight
    )


def test_set_turns_the_default_recipes_parts_off(llama_dir, calibration_file, tmp_path, capsys):
    sets = ["rotation=none", "online_down_proj_rotation=false", "value_rotation=false", "saliency_fraction=0"]
    sets += ["signed_group_size=0"]
    quant, _ = _convert_tiny(
        llama_dir, calibration_file, tmp_path / "out", capsys, *(a for s in sets for a in ("--set", s))
    )
    assert (quant["neuron"], quant["signed_bits"]) == ("signed", 4)
    assert quant["rotation"] == "none" and quant["online_down_proj_rotation"] is False
    assert quant["value_rotation"] is False
    assert quant["saliency_fraction"] == 0 and quant["signed_group_size"] == 0
    # without any rotation the weights are the source's, untouched
    source = AutoModelForCausalLM.from_pretrained(llama_dir)
    spiking = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name in ("mlp.down_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert torch.equal(
            source.model.layers[0].get_submodule(name).weight, spiking.model.layers[0].get_submodule(name).weight
        ), name


def test_neuron_gif_is_the_gif_recipe_and_set_turns_parts_off(llama_dir, calibration_file, tmp_path, capsys):
    sets = ["rotation=none", "online_down_proj_rotation=false", "saliency_fraction=0", "gif_group_size=0"]
    quant, _ = _convert_tiny(
        llama_dir,
        calibration_file,
        tmp_path / "out",
        capsys,
        "--neuron",
        "gif",
        *(a for s in sets for a in ("--set", s)),
    )
    assert (quant["neuron"], quant["gif_bits"], quant["gif_extra_bits"]) == ("gif", 4, 1)
    assert quant["rotation"] == "none" and quant["online_down_proj_rotation"] is False
    assert quant["value_rotation"] is False  # the GIF recipe has no value rotation
    assert quant["saliency_fraction"] == 0 and quant["gif_group_size"] == 0
    # without the rotation the weights are the source's, untouched
    source = AutoModelForCausalLM.from_pretrained(llama_dir)
    spiking = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(source.model.layers[0].mlp.down_proj.weight, spiking.model.layers[0].mlp.down_proj.weight)


def test_spikify_help_states_the_default_rule(capsys):
    """``spikify --help`` names the default (signed) and the rule that picked it: the frontier's best point meeting
    both targets (1.38x perplexity, 0.6x compute energy inside the blocks, SmolLM2-135M, 32,768 Brown tokens), else
    the lowest-perplexity point within the energy target, with the pointer to docs/CONVERSION.md."""
    assert main(["spikify", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for phrase in (
        "Default recipe (--neuron signed)",
        "best point that meets both targets",
        "at most 1.38x the real model's perplexity",
        "at most 0.6x its compute energy inside the blocks",
        "SmolLM2-135M, Brown, first 32,768 tokens",
        "where no point meets both, the lowest-perplexity point within the energy target",
        "docs/CONVERSION.md",
        "value_rotation",
        "--neuron gif",
    ):
        assert phrase in text, phrase
    assert "default signed" in text  # --neuron's own help


def test_spikify_set_value_rotation_turns_the_values_and_keeps_the_real_valued_model(
    llama_dir, calibration_file, tmp_path, capsys
):
    """``--set value_rotation=true`` (in the signed recipe already; here with the residual rotations off): saved in
    config.json, the value rows turned (nothing else rotated here), and the saved model with its neurons detached
    computes the source's logits."""
    from spikelm.conversion import detach

    out = tmp_path / "out"
    args = ["--model", str(llama_dir), "--calibration-text", str(calibration_file), "--calibration-sequences", "1"]
    args += ["--calibration-length", "16", "--eval-tokens", "0", "--neuron", "signed", "--set", "rotation=none"]
    args += ["--set", "online_down_proj_rotation=false", "--set", "value_rotation=true", "--output-dir", str(out)]
    code, _, err = _spikify(args, capsys)
    assert code == 0, err
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["value_rotation"] is True and quant["rotation"] == "none"
    source = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    spiking = AutoModelForCausalLM.from_pretrained(out).eval()
    first, loaded = source.model.layers[0].self_attn, spiking.model.layers[0].self_attn
    assert not torch.allclose(first.v_proj.weight, loaded.v_proj.weight)
    assert torch.equal(first.q_proj.weight, loaded.q_proj.weight)
    detach(spiking)
    ids = torch.randint(3, source.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = source(ids).logits.double(), spiking(ids).logits.double()
    assert float((got - expected).norm() / expected.norm()) <= 1e-4


def _bad(args, capsys, tmp_path):
    out = tmp_path / "never"
    code, _, err = _spikify([*args, "--output-dir", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("spikelm spikify: error:"), err
    assert "Traceback" not in err
    assert not out.exists()
    return lines[0]


def test_bad_inputs_get_one_clear_line_before_any_output(llama_dir, calibration_file, tmp_path, capsys):
    assert "--calibration-text" in _bad(
        ["--model", str(llama_dir), "--calibration-text", str(tmp_path / "nope.txt")], capsys, tmp_path
    )
    assert "--num-steps" in _bad(
        ["--model", str(llama_dir), "--neuron", "elastic", "--num-steps", "0"], capsys, tmp_path
    )
    assert "power of two" in _bad(["--model", str(llama_dir), "--neuron", "gif", "--num-steps", "3"], capsys, tmp_path)
    assert "unknown_field" in _bad(["--model", str(llama_dir), "--set", "unknown_field=1"], capsys, tmp_path)
    assert "nope" in _bad(["--model", str(tmp_path / "nope")], capsys, tmp_path)
    t5 = tmp_path / "t5"
    from transformers import T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        t5
    )
    (t5 / "tokenizer.json").write_text((llama_dir / "tokenizer.json").read_text())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (llama_dir / name).is_file():
            (t5 / name).write_text((llama_dir / name).read_text())
    capsys.readouterr()  # the save's progress bar
    assert "t5" in _bad(["--model", str(t5), "--eval-tokens", "0"], capsys, tmp_path).lower()
    bad_text = tmp_path / "latin1.txt"
    bad_text.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    assert "UTF-8" in _bad(["--model", str(llama_dir), "--calibration-text", str(bad_text)], capsys, tmp_path)


def test_an_already_spiking_model_is_refused(llama_dir, calibration_file, tmp_path, capsys):
    out = tmp_path / "spiking"
    assert (
        _spikify(
            [
                "--model",
                str(llama_dir),
                "--calibration-text",
                str(calibration_file),
                "--calibration-sequences",
                "1",
                "--calibration-length",
                "16",
                "--eval-tokens",
                "0",
                "--set",
                "rotation=none",
                "--set",
                "online_down_proj_rotation=false",
                "--output-dir",
                str(out),
            ],
            capsys,
        )[0]
        == 0
    )
    capsys.readouterr()
    assert "already spiking" in _bad(["--model", str(out)], capsys, tmp_path)


def test_gpt2_converts_too(calibration_file, tmp_path, capsys, llama_dir):
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama_dir / name).is_file():
            (d / name).write_text((llama_dir / name).read_text())
    code, _, err = _spikify(
        [
            "--model",
            str(d),
            "--neuron",
            "elastic",
            "--calibration-text",
            str(calibration_file),
            "--calibration-sequences",
            "1",
            "--calibration-length",
            "16",
            "--eval-tokens",
            "0",
            "--set",
            "rotation=none",
            "--set",
            "online_down_proj_rotation=false",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, err


def test_gpt2_takes_the_default_recipe_saying_what_it_drops_in_one_line(calibration_file, tmp_path, capsys, llama_dir):
    """GPT-2 (LayerNorms, no per-head value/output linears described) with no recipe flag: one printed line names
    every rotation of the default it drops, nothing else is said about them (no warning on stderr), and the saved
    config records them off with the signed neuron kept."""
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama_dir / name).is_file():
            (d / name).write_text((llama_dir / name).read_text())
    capsys.readouterr()
    args = ["--model", str(d), "--calibration-text", str(calibration_file), "--calibration-sequences", "1"]
    args += ["--calibration-length", "16", "--eval-tokens", "0", "--output-dir", str(tmp_path / "out")]
    code, stdout, err = _spikify(args, capsys)
    assert code == 0, err
    said = [line for line in (stdout + err).splitlines() if "rotation" in line]
    assert len(said) == 1 and said[0].startswith("spikelm spikify: model_type 'gpt2'"), said
    assert "no residual-stream rotation" in said[0] and "no per-head value/output rotation" in said[0]
    assert "Warning" not in err
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert quant["neuron"] == "signed" and quant["value_rotation"] is False and quant["rotation"] == "none"


def test_set_gif_group_size_reaches_the_saved_model_and_its_card(llama_dir, calibration_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(llama_dir), "--calibration-text", str(calibration_file), "--calibration-sequences", "1"]
    args += ["--calibration-length", "16", "--eval-tokens", "0", "--neuron", "gif", "--set", "gif_group_size=4"]
    args += ["--output-dir", str(out)]
    code, _, err = _spikify(args, capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["gif_group_size"] == 4
    assert "per 4 consecutive channels" in (out / "README.md").read_text()
    from spikelm.conversion import neurons

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert {n.group_size for _, n in neurons(loaded)} == {4}


def test_the_gif_recipe_has_ranges_per_64_channels_and_set_turns_them_off():
    from spikelm.conversion import SpikeLMConversionConfig
    from spikelm.conversion.recipes import recipe

    assert recipe("gif")["gif_group_size"] == 64
    assert recipe("gif", overrides={"gif_group_size": 0})["gif_group_size"] == 0
    whole_token = recipe("gif", overrides={"gif_group_range": "token"})  # SpikeLLM's ranges: no groups to cut
    assert whole_token["gif_group_size"] == 0
    SpikeLMConversionConfig(**whole_token)
    with pytest.raises(ValueError, match="gif_group_size=64 needs gif_group_range='group'"):
        SpikeLMConversionConfig(**recipe("gif", overrides={"gif_group_range": "token", "gif_group_size": 64}))
