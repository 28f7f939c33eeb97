"""The SpikeLM models, as transformers models: the config, the encoder (BERT-shaped) and the causal decoder.

Importing this package registers model_type ``"spikelm"`` with the transformers Auto classes, so that
``AutoModel*.from_pretrained`` loads a saved SpikeLM directory.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
)

from .configuration_spikelm import SpikeLMConfig
from .modeling_spikelm import (
    SpikeLMForMaskedLM,
    SpikeLMForPreTraining,
    SpikeLMForSequenceClassification,
    SpikeLMModel,
)
from .modeling_spikelm_causal import SpikeLMForCausalLM

AutoConfig.register("spikelm", SpikeLMConfig, exist_ok=True)
AutoModel.register(SpikeLMConfig, SpikeLMModel, exist_ok=True)
AutoModelForPreTraining.register(SpikeLMConfig, SpikeLMForPreTraining, exist_ok=True)
AutoModelForMaskedLM.register(SpikeLMConfig, SpikeLMForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(SpikeLMConfig, SpikeLMForSequenceClassification, exist_ok=True)
AutoModelForCausalLM.register(SpikeLMConfig, SpikeLMForCausalLM, exist_ok=True)
