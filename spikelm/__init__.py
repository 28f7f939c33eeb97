"""spikelm: spike-driven language models (SpikeLM, Xing et al., ICML 2024) for PyTorch and Hugging Face.

The public names below are imported on first use, so that ``import spikelm`` (and the ``spikelm`` command's
``--help``) stays fast: torch and transformers load only when a name that needs them is used. Using a
model name, or importing :mod:`spikelm.models`, registers model_type ``"spikelm"`` with the transformers
Auto classes.

``import spikelm`` also registers the ``"spikelm"`` quantization method (a spiking conversion saved by
:func:`spikify`) with transformers, through its public ``register_quantization_config`` / ``register_quantizer``,
without importing transformers: at once if transformers' quantizer registry is already imported, else right after
it is (whichever is imported first). What is registered are two delegates that import :mod:`spikelm.conversion` on
first use and hand over to :class:`SpikeLMConversionConfig` and :class:`~spikelm.conversion.SpikeLMQuantizer`. So
``import spikelm`` then ``AutoModelForCausalLM.from_pretrained`` of a converted directory gives the spiking model;
without ``import spikelm`` transformers loads the directory as it would any unknown quantization method (its
warning, the real-valued architecture).
"""

from __future__ import annotations

import contextlib
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


# --- the "spikelm" quantization method, registered with transformers' public API from `import spikelm` on -----------

_QUANT_METHOD = "spikelm"  # spikelm.conversion.config.QUANT_METHOD
_QUANTIZER_REGISTRY = "transformers.quantizers.auto"  # where register_quantization_config / register_quantizer live


def _register_quantization_method(registry) -> None:
    """Register ``"spikelm"`` through ``registry.register_quantization_config`` and ``registry.register_quantizer``.

    The registered classes delegate: importing spikelm.conversion here (models, placement, transformers' modeling
    code) could run while transformers is still importing itself, and would make ``import spikelm`` slow."""
    from transformers.quantizers.base import HfQuantizer  # (imported by the registry itself)
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class SpikeLMConversionConfigDelegate(QuantizationConfigMixin):
        """``from_dict`` gives a :class:`spikelm.conversion.SpikeLMConversionConfig`."""

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            from spikelm.conversion import SpikeLMConversionConfig

            return SpikeLMConversionConfig.from_dict(config_dict, **kwargs)

    class SpikeLMQuantizerDelegate(HfQuantizer):
        """Constructing it gives a :class:`spikelm.conversion.SpikeLMQuantizer`."""

        def __new__(cls, quantization_config, **kwargs):
            from spikelm.conversion import SpikeLMQuantizer

            return SpikeLMQuantizer(quantization_config, **kwargs)

    # once per process (a reload of spikelm must not meet the registry's "already registered" refusal)
    if _QUANT_METHOD not in registry.AUTO_QUANTIZATION_CONFIG_MAPPING:
        registry.register_quantization_config(_QUANT_METHOD)(SpikeLMConversionConfigDelegate)
    if _QUANT_METHOD not in registry.AUTO_QUANTIZER_MAPPING:
        registry.register_quantizer(_QUANT_METHOD)(SpikeLMQuantizerDelegate)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Calls :func:`_register_quantization_method` right after transformers has imported its quantizer registry (the
    import itself is left to the other finders), then leaves ``sys.meta_path``. Python has no other way to act after
    a module's import; importing transformers here instead would cost seconds on every ``import spikelm``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _QUANTIZER_REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _RegisterAfterImport) or not hasattr(finder, "find_spec"):
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
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            _register_quantization_method(module)

        spec.loader.exec_module = exec_and_register
        return spec


if _QUANTIZER_REGISTRY in sys.modules:
    _register_quantization_method(sys.modules[_QUANTIZER_REGISTRY])
elif not any(type(finder).__name__ == "_RegisterAfterImport" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
