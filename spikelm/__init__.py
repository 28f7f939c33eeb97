"""spikelm: spike-driven language models (SpikeLM, Xing et al., ICML 2024) for PyTorch and Hugging Face.

The public names below are imported on first use, so that ``import spikelm`` (and the ``spikelm`` command's
``--help``) stays fast: torch and transformers load only when a name that needs them is used. Using a
model name, or importing :mod:`spikelm.models`, registers model_type ``"spikelm"`` with the transformers
Auto classes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ElasticBiSpikingNeuron": "spikelm.nn.neuron",
    "MultiStepSpike": "spikelm.nn.neuron",
    "SpikeStats": "spikelm.nn.neuron",
    "reference_multistep_spike": "spikelm.nn.neuron",
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
