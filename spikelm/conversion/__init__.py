"""Checkpoints from elsewhere turned into spiking models: the authors' released checkpoints (``official``), and the
spiking conversion of pretrained transformers models (issue 13): ``spikify``, exact weight transforms, calibration.

``import spikelm`` registers the ``"spikelm"`` quantization method with transformers (through its public
``register_quantization_config`` / ``register_quantizer``; see ``spikelm/__init__.py``), so that ``from_pretrained``
restores a saved conversion with :class:`SpikeLMConversionConfig` and :class:`SpikeLMQuantizer`.
"""

from .attention import NAME as SPIKING_ATTENTION
from .cache import GIFCodeLayer, SpikeCodeCache, SpikeCodeLayer, TransientSpikeKV, spike_code_cache
from .config import FORMAT_VERSION, SpikeLMConversionConfig
from .model_card import write_model_card
from .placement import FAMILIES, SITE_KINDS, PlacedNeuron, attach, detach, is_spiking, make_neuron, neurons, placement
from .quantizer import SpikeLMQuantizer
from .spikify import calibrate, spikify

__all__ = [
    "FAMILIES",
    "FORMAT_VERSION",
    "GIFCodeLayer",
    "PlacedNeuron",
    "SITE_KINDS",
    "SPIKING_ATTENTION",
    "SpikeCodeCache",
    "SpikeCodeLayer",
    "SpikeLMConversionConfig",
    "SpikeLMQuantizer",
    "TransientSpikeKV",
    "attach",
    "calibrate",
    "detach",
    "is_spiking",
    "make_neuron",
    "neurons",
    "placement",
    "spike_code_cache",
    "spikify",
    "write_model_card",
]
