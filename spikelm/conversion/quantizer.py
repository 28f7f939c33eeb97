"""The transformers side of a converted model: *when* the spiking surgery runs on ``from_pretrained``.

``from_pretrained`` finds ``quantization_config.quant_method == "spikelm"`` in ``config.json``, builds this
quantizer and calls it before the weights load (the model skeleton is still on the meta device): it adds the
neurons and hooks (:func:`spikelm.conversion.placement.attach`, the *how*), so the saved alphas load into them.
Loaded alphas count as initialised (their ``initialized`` flags are saved with them).

``from_pretrained(real_valued_dir, quantization_config=SpikeLMConversionConfig(...))`` converts on load: the same
surgery, with every neuron left uninitialised (alphas from the first batch, no GIF saliency) as ``spikify``
without calibration leaves it.
"""

from __future__ import annotations

import json

from transformers.quantizers.base import HfQuantizer

from ..nn.neurons import neuron_classes
from .config import SpikeLMConversionConfig
from .placement import attach, detach, neurons

NEURON_KEYS = r"\.(input|key|value)_neuron\."  # the state-dict keys spikify adds
RECIPE_METADATA = "spikelm_recipe"  # safetensors metadata key: the settings below, as saved


def _traceless_names() -> tuple[str, ...]:
    """Recipe fields with no trace in the tensors (a rotation folded into the weights, an online rotation rebuilt
    from its seed, the neurons' ``traceless_fields``, e.g. the quantiser's grid): an edit of one of them in
    config.json would load silently as another model."""
    neuron_fields = [name for cls in neuron_classes() for name in cls.traceless_fields]
    return (
        "neuron",
        *neuron_fields,
        "rotation",
        "rotation_seed",
        "online_down_proj_rotation",
        "value_rotation",
        "smoothing_alpha",
    )


TRACELESS_FIELDS = _traceless_names()  # as of this import (traceless_fields() asks the registry each time)


def traceless_fields(config: SpikeLMConversionConfig) -> dict:
    """The recipe's traceless fields (:func:`_traceless_names`) with their values."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {name: fields.get(name) for name in _traceless_names()}


class SpikeLMQuantizer(HfQuantizer):
    """Restores a spiking conversion on load; serialisable and trainable (for distillation)."""

    requires_calibration = False

    def __init__(self, quantization_config: SpikeLMConversionConfig, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = SpikeLMConversionConfig(**quantization_config)
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        attach(model, self.quantization_config)
        if not self.pre_quantized:  # spikify on load: a real-valued checkpoint has no alphas; they are new
            ignored = list(model._keys_to_ignore_on_load_missing or [])
            model._keys_to_ignore_on_load_missing = [*ignored, NEURON_KEYS]
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for _, neuron in neurons(model):
            if not self.pre_quantized:  # nothing was loaded into it: not initialised (alphas come from data)
                neuron.reset_calibration()
            else:
                neuron.state_loaded()
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: the real-valued model again (neurons and hooks removed, weights kept)."""
        return detach(model)

    def get_state_dict_and_metadata(self, model):
        """The weights as they are, and the recipe's settings that leave no trace in the tensors, in the safetensors
        metadata (:data:`RECIPE_METADATA`): a ``config.json`` edited after saving no longer matches them."""
        return None, {RECIPE_METADATA: json.dumps(traceless_fields(self.quantization_config), sort_keys=True)}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True
