"""The conversion recipe: every setting of ``spikify`` as a field of one quantization config.

``SpikeLMConversionConfig`` is the quantization method ``"spikelm"`` of transformers (registered by ``import
spikelm``, see ``spikelm/__init__.py``). A converted model carries it as ``model.config.quantization_config``;
``save_pretrained`` writes it into ``config.json`` next to the original architecture's fields, and
``from_pretrained`` (after ``import spikelm``) rebuilds the spiking model from it before the weights and alphas load.
"""

from __future__ import annotations

import copy

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..nn.neurons import neuron_class, neuron_classes, neuron_names

QUANT_METHOD = "spikelm"
FORMAT_VERSION = 1  # bump when a saved model of the previous version would load differently
NEURONS = neuron_names()  # the registered neurons (spikelm.nn.neurons), as of this import
ROTATIONS = ("none", "hadamard", "random")


class SpikeLMConversionConfig(QuantizationConfigMixin):
    r"""How a pretrained model is made to spike (SPEC sections 2, 3 and 8).

    Neuron:
        neuron (str): the registered neuron (:mod:`spikelm.nn.neurons`) that spikes every linear input and K/V:
            ``"elastic"``, SpikeLM's elastic bi-spiking neuron (the network runs as T copies folded into the batch
            axis), or SpikeLLM's GIF neuron, whose steps are internal to the neuron (the network runs once).
        Every registered neuron's own fields (its ``config_fields``, documented on its class) are fields of this
        config, whichever neuron is chosen (a saved config holds them all; only the chosen neuron's are used):
        the elastic neuron's ``num_steps`` (T), ``spike_levels``, ``use_amplitude``, ``alpha_init``,
        ``learn_alpha``, ``reset`` (as in :class:`~spikelm.SpikeLMConfig`); the GIF neuron's ``gif_bits``,
        ``gif_extra_bits``, ``saliency_fraction``, ``gif_group_range``, ``gif_clip_ratio``, ``gif_group_size``.

    Outlier handling (equivalence transforms folded into the weights before spiking):
        rotation (str): ``"none"``, ``"hadamard"`` or ``"random"``: an orthogonal rotation of the residual stream
            (architectures with pre RMSNorms only; their gains folded in first, see :mod:`spikelm.conversion.rotation`;
            elsewhere spikify drops it, saying why).
        rotation_seed (int): seed of the rotation's random signs (or matrix); the online rotation uses seed + 1.
        online_down_proj_rotation (bool): also rotate the FFN's last linear input at run time (a Hadamard rebuilt
            from its size and seed on load, so nothing extra is saved). The name is kept from saved configs.
        value_rotation (bool): rotate the attention's values and output per head by a randomised Hadamard of order
            ``head_dim`` (seed ``rotation_seed + 2``; QuaRot's V-O rotation), folded into the linears that make V
            and read the attention output, so V's codes and the output projection's input codes see no raw
            outliers; exact for the real-valued model, whatever the norms (:mod:`spikelm.conversion.rotation`;
            where the description does not offer it, spikify drops it, saying why). The saved weights hold it:
            nothing is re-applied on load. Default False (configs saved before it load as before).
        smoothing_alpha (float or None): None (default): off; a number in [0, 1]: SmoothQuant per-channel factors
            ``max|X_c|^alpha / max|W_c|^(1 - alpha)`` from the calibration text, folded into every block's RMSNorm
            gains and the weights reading them after the rotation (needs pre RMSNorms and calibration; exact for the
            real-valued model, see :mod:`spikelm.conversion.smoothing`). The saved weights carry it.
        untied_embeddings (bool): the LM head was untied from the input embeddings (a transform needed it).

    Placement:
        modules_to_not_convert (list[str]): module names whose input is not spiked (matched as a full name, a
            prefix ``name.`` or a suffix ``.name``); default ``["lm_head"]``.

    Bookkeeping: ``quant_method`` is always ``"spikelm"``; ``format_version`` is the version of this layout that
    wrote the config (a newer one than this library knows is refused on load).
    """

    def __init__(
        self,
        neuron: str = "elastic",
        rotation: str = "none",
        rotation_seed: int = 0,
        online_down_proj_rotation: bool = False,
        value_rotation: bool = False,
        smoothing_alpha: float | None = None,
        untied_embeddings: bool = False,
        modules_to_not_convert: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **neuron_fields,
    ):
        """``neuron_fields``: the fields of the registered neurons (each neuron's ``config_fields``)."""
        values = {}
        for cls in neuron_classes():
            values.update(cls.config_values(neuron_fields))
        if neuron_fields:
            raise ValueError(
                f"unknown spikelm conversion field(s) {sorted(neuron_fields)}; the fields are "
                f"{sorted(self.field_names())}"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.neuron = neuron
        for name, value in values.items():
            setattr(self, name, value)
        self.rotation = rotation
        self.rotation_seed = rotation_seed
        self.online_down_proj_rotation = online_down_proj_rotation
        self.value_rotation = value_rotation
        self.smoothing_alpha = smoothing_alpha
        self.untied_embeddings = untied_embeddings
        self.modules_to_not_convert = (
            ["lm_head"]
            if modules_to_not_convert is None
            else list(modules_to_not_convert)
            if isinstance(modules_to_not_convert, (list, tuple))
            else modules_to_not_convert  # refused by check(), naming the field
        )
        self.check()

    @staticmethod
    def field_names() -> tuple[str, ...]:
        neuron_fields = [name for cls in neuron_classes() for name in cls.config_fields]
        return (
            "neuron",
            *neuron_fields,
            "rotation",
            "rotation_seed",
            "online_down_proj_rotation",
            "value_rotation",
            "smoothing_alpha",
            "untied_embeddings",
            "modules_to_not_convert",
            "format_version",
        )

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        if not isinstance(self.format_version, int) or not 1 <= self.format_version <= FORMAT_VERSION:
            newer = isinstance(self.format_version, int) and self.format_version > FORMAT_VERSION
            raise ValueError(
                f"format_version {self.format_version!r}: this spikelm reads spiking conversions of format versions "
                f"1..{FORMAT_VERSION}; "
                + ("a newer spikelm wrote this model, upgrade spikelm to load it" if newer else "no spikelm writes it")
            )
        neuron_class(self.neuron)  # ValueError naming the registered neurons
        fields = self.to_dict()
        for cls in neuron_classes():  # every neuron's fields, whichever is chosen
            cls.check_config(fields)
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int):
            raise ValueError(f"rotation_seed must be an integer, got {self.rotation_seed!r}")  # noqa: TRY004
        alpha = self.smoothing_alpha
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1
        ):
            raise ValueError(f"smoothing_alpha must be None (off) or a number in [0, 1], got {alpha!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        for name in ("online_down_proj_rotation", "value_rotation", "untied_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")  # noqa: TRY004  (a field out of range)
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(m, str) and m for m in self.modules_to_not_convert
        ):
            raise ValueError(
                f"modules_to_not_convert must be a list of module names, got {self.modules_to_not_convert!r}"
            )

    @property
    def model_steps(self) -> int:
        """How many copies of the network run: T for the elastic neuron, 1 for GIF (its steps are internal)."""
        return neuron_class(self.neuron).model_steps(self.to_dict())

    def to_dict(self) -> dict:
        return copy.deepcopy({name: getattr(self, name) for name in ("quant_method", *self.field_names())})
