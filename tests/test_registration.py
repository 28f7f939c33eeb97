"""The "spikelm" quantization method is registered with transformers through its public register_quantization_config /
register_quantizer (spikelm/__init__.py), whichever of spikelm and transformers is imported first; a converted
directory loaded without ``import spikelm`` loads as transformers loads any unknown quantization method. Each case in
a fresh interpreter (tests/test_spikify.py checks the logits of the two import orders)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_model

import spikelm
from spikelm.conversion import spikify
from spikelm.conversion.config import QUANT_METHOD

ROOT = str(Path(spikelm.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("registration") / "converted"
    calibration = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    spikify(tiny_llama_model(), num_steps=2, calibration=calibration).save_pretrained(path)
    return path


def run_fresh(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done


def test_the_method_name_has_one_value():
    assert spikelm._QUANT_METHOD == QUANT_METHOD


def test_transformers_first_registers_through_the_public_functions(converted):
    """transformers' registry imported before spikelm: ``import spikelm`` calls register_quantization_config and
    register_quantizer (wrapped here to record their calls; they refuse a class of the wrong base), and loading
    gives the spiking model."""
    run_fresh(
        f"""
        import transformers.quantizers.auto as auto
        calls = []
        for name in ("register_quantization_config", "register_quantizer"):
            def record(method, _real=getattr(auto, name), _name=name):
                calls.append((_name, method))
                return _real(method)
            setattr(auto, name, record)
        import spikelm
        assert calls == [("register_quantization_config", "spikelm"), ("register_quantizer", "spikelm")], calls
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(converted)!r})
        from spikelm.conversion import SpikeLMConversionConfig, SpikeLMQuantizer, neurons
        assert type(model.config.quantization_config) is SpikeLMConversionConfig
        assert type(model.hf_quantizer) is SpikeLMQuantizer
        assert len(neurons(model)) == 12
        """
    )


def test_spikelm_first_registers_when_transformers_is_imported_and_the_hook_leaves(converted):
    run_fresh(
        f"""
        import sys
        import spikelm
        assert "transformers" not in sys.modules and "torch" not in sys.modules  # import spikelm stays light
        hooks = [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterImport"]
        assert len(hooks) == 1
        import importlib
        importlib.reload(spikelm)  # a reload installs no second hook
        assert len([f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterImport"]) == 1
        from transformers import AutoModelForCausalLM
        from transformers.quantizers import auto
        assert "spikelm.conversion" not in sys.modules  # registered, nothing imported yet
        assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["spikelm"].__name__ == "SpikeLMConversionConfigDelegate"
        assert auto.AUTO_QUANTIZER_MAPPING["spikelm"].__name__ == "SpikeLMQuantizerDelegate"
        assert not [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterImport"]  # used once, gone
        importlib.reload(spikelm)  # registered already: no "already registered" refusal, no new hook
        assert not [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterImport"]
        model = AutoModelForCausalLM.from_pretrained({str(converted)!r})
        from spikelm.conversion import neurons
        assert len(neurons(model)) == 12 and all(n.is_initialized() for _, n in neurons(model))
        """
    )


def test_without_import_spikelm_transformers_skips_the_unknown_method(converted):
    """Never importing spikelm: transformers' own behaviour for an unknown quantization method (a warning naming it,
    the real-valued architecture, the neuron tensors left unused), as before the registration moved."""
    done = run_fresh(
        f"""
        import sys
        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(converted)!r})
        assert type(model) is LlamaForCausalLM
        assert not [name for name, _ in model.named_modules() if "neuron" in name]
        assert not [name for name in sys.modules if name == "spikelm" or name.startswith("spikelm.")]
        """
    )
    assert "Unknown quantization type, got spikelm" in done.stderr
    assert "input_neuron.alpha" in done.stderr  # reported as unexpected keys
