"""spikelm: spike-driven language models (SpikeLM, Xing et al., ICML 2024) for PyTorch and Hugging Face.

The public names below are imported on first use, so that ``import spikelm`` (and the ``spikelm`` command's
``--help``) stays fast: torch and transformers load only when a name that needs them is used. Using a
model name, or importing :mod:`spikelm.models`, registers model_type ``"spikelm"`` with the transformers
Auto classes.

``import spikelm`` also makes the ``"spikelm"`` quantization method known to transformers (a spiking conversion
saved by :func:`spikify`), without importing transformers: when transformers' quantizer registry is first
imported, stand-ins for the method are put in it, and their first use imports :mod:`spikelm.conversion`, which
registers the real config and quantizer. So ``import spikelm`` then ``AutoModelForCausalLM.from_pretrained`` of a
converted directory gives the spiking model.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ElasticBiSpikingNeuron": "spikelm.nn.neurons.elastic",
    "MultiStepSpike": "spikelm.nn.neurons.elastic",
    "SpikeStats": "spikelm.nn.neurons.elastic",
    "reference_multistep_spike": "spikelm.nn.neurons.elastic",
    "SpikingNeuron": "spikelm.nn.neurons",
    "register_neuron": "spikelm.nn.neurons",
    "SpikeLinear": "spikelm.nn.layers",
    "SpikeLinearFunction": "spikelm.nn.layers",
    "collect_spike_stats": "spikelm.nn.stats",
    "record_spike_stats": "spikelm.nn.stats",
    "SpikeLMConfig": "spikelm.models.configuration_spikelm",
    "SpikeLMForMaskedLM": "spikelm.models.modeling_spikelm",
    "SpikeLMForPreTraining": "spikelm.models.modeling_spikelm",
    "SpikeLMForPreTrainingOutput": "spikelm.models.modeling_spikelm",
    "SpikeLMForSequenceClassification": "spikelm.models.modeling_spikelm",
    "SpikeLMModel": "spikelm.models.modeling_spikelm",
    "SpikeLMModelOutput": "spikelm.models.modeling_spikelm",
    "SpikeLMPreTrainedModel": "spikelm.models.modeling_spikelm",
    "SpikeKVCacheLayer": "spikelm.models.modeling_spikelm_causal",
    "SpikeLMCache": "spikelm.models.modeling_spikelm_causal",
    "SpikeLMCausalPreTrainedModel": "spikelm.models.modeling_spikelm_causal",
    "SpikeLMDecoderModel": "spikelm.models.modeling_spikelm_causal",
    "SpikeLMForCausalLM": "spikelm.models.modeling_spikelm_causal",
    "SpikeLMConversionConfig": "spikelm.conversion.config",
    "spikify": "spikelm.conversion.spikify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spikelm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# --- the "spikelm" quantization method, known to transformers from `import spikelm` on -----------------------------

_QUANT_METHOD = "spikelm"  # spikelm.conversion.config.QUANT_METHOD
_QUANTIZER_REGISTRY = "transformers.quantizers.auto"


class _LazyConversionConfig:
    """Stands in for SpikeLMConversionConfig in transformers' registry until spikelm.conversion is imported."""

    @staticmethod
    def from_dict(config_dict, **kwargs):
        from spikelm.conversion import SpikeLMConversionConfig

        return SpikeLMConversionConfig.from_dict(config_dict, **kwargs)


def _lazy_quantizer(quantization_config, **kwargs):
    """Stands in for SpikeLMQuantizer in transformers' registry until spikelm.conversion is imported."""
    from spikelm.conversion import SpikeLMQuantizer

    return SpikeLMQuantizer(quantization_config, **kwargs)


def _register_quantization_method(registry) -> None:
    # setdefault: the real classes, once spikelm.conversion has registered them, stay
    registry.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(_QUANT_METHOD, _LazyConversionConfig)
    registry.AUTO_QUANTIZER_MAPPING.setdefault(_QUANT_METHOD, _lazy_quantizer)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the quantization method right after transformers imports its quantizer registry."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _QUANTIZER_REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _RegisterOnImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_quantization_method(module)

        spec.loader.exec_module = exec_and_register
        return spec


if _QUANTIZER_REGISTRY in sys.modules:
    _register_quantization_method(sys.modules[_QUANTIZER_REGISTRY])
elif not any(type(finder).__name__ == "_RegisterOnImport" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())
