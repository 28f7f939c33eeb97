"""The transformers side of a converted model: *when* the spiking surgery runs on ``from_pretrained``.

``from_pretrained`` finds ``quantization_config.quant_method == "spikelm"`` in ``config.json``, builds this
quantizer and calls it before the weights load (the model skeleton is still on the meta device): it adds the
neurons and hooks (:func:`spikelm.conversion.spikify.attach`, the *how*), so the saved alphas load into them.
Loaded alphas count as initialised (their ``initialized`` flags are saved with them).
"""

from __future__ import annotations

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer
from transformers.quantizers.base import HfQuantizer

from .config import QUANT_METHOD, SpikeLMConversionConfig
from .placement import attach, detach, neurons


class SpikeLMQuantizer(HfQuantizer):
    """Restores a spiking conversion on load; serialisable and trainable (for distillation)."""

    requires_calibration = False

    def __init__(self, quantization_config: SpikeLMConversionConfig, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = SpikeLMConversionConfig(**quantization_config)
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        attach(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for _, neuron in neurons(model):
            if hasattr(neuron, "_known_initialized"):  # re-read the loaded `initialized` flag on first use
                neuron._known_initialized = False
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: the real-valued model again (neurons and hooks removed, weights kept)."""
        return detach(model)

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(SpikeLMQuantizer)
