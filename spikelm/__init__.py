"""spikelm: spike-driven language models (SpikeLM, Xing et al., ICML 2024) for PyTorch and Hugging Face."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
)

from .configuration_spikelm import SpikeLMConfig
from .conversion import SpikeLMConversionConfig, spikify
from .layers import SpikeLinear, SpikeLinearFunction
from .modeling_spikelm import (
    SpikeLMForMaskedLM,
    SpikeLMForPreTraining,
    SpikeLMForPreTrainingOutput,
    SpikeLMForSequenceClassification,
    SpikeLMModel,
    SpikeLMModelOutput,
    SpikeLMPreTrainedModel,
)
from .modeling_spikelm_causal import (
    SpikeKVCacheLayer,
    SpikeLMCache,
    SpikeLMCausalPreTrainedModel,
    SpikeLMDecoderModel,
    SpikeLMForCausalLM,
)
from .neuron import (
    ElasticBiSpikingNeuron,
    MultiStepSpike,
    SpikeStats,
    reference_multistep_spike,
)
from .stats import collect_spike_stats, record_spike_stats

__version__ = "0.1.0"

AutoConfig.register("spikelm", SpikeLMConfig, exist_ok=True)
AutoModel.register(SpikeLMConfig, SpikeLMModel, exist_ok=True)
AutoModelForPreTraining.register(SpikeLMConfig, SpikeLMForPreTraining, exist_ok=True)
AutoModelForMaskedLM.register(SpikeLMConfig, SpikeLMForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(SpikeLMConfig, SpikeLMForSequenceClassification, exist_ok=True)
AutoModelForCausalLM.register(SpikeLMConfig, SpikeLMForCausalLM, exist_ok=True)

__all__ = [
    "ElasticBiSpikingNeuron",
    "MultiStepSpike",
    "SpikeKVCacheLayer",
    "SpikeLMCache",
    "SpikeLMCausalPreTrainedModel",
    "SpikeLMConfig",
    "SpikeLMConversionConfig",
    "SpikeLMDecoderModel",
    "SpikeLMForCausalLM",
    "SpikeLMForMaskedLM",
    "SpikeLMForPreTraining",
    "SpikeLMForPreTrainingOutput",
    "SpikeLMForSequenceClassification",
    "SpikeLMModel",
    "SpikeLMModelOutput",
    "SpikeLMPreTrainedModel",
    "SpikeLinear",
    "SpikeLinearFunction",
    "SpikeStats",
    "collect_spike_stats",
    "record_spike_stats",
    "reference_multistep_spike",
    "spikify",
]
