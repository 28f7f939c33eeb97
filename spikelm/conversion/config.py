"""The conversion recipe: every setting of ``spikify`` as a field of one quantization config.

``SpikeLMConversionConfig`` is registered with transformers as the quantization method ``"spikelm"``. A converted
model carries it as ``model.config.quantization_config``; ``save_pretrained`` writes it into ``config.json`` next to
the original architecture's fields, and ``from_pretrained`` (after ``import spikelm``) rebuilds the spiking model
from it before the weights and alphas load.
"""

from __future__ import annotations

import copy

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..nn.gif import check_gif_options
from ..nn.neuron import check_neuron_options

QUANT_METHOD = "spikelm"
FORMAT_VERSION = 1  # bump when a saved model of the previous version would load differently
NEURONS = ("elastic", "gif")
ROTATIONS = ("none", "hadamard", "random")


class SpikeLMConversionConfig(QuantizationConfigMixin):
    r"""How a pretrained model is made to spike (SPEC sections 2, 3 and 8).

    Neuron:
        neuron (str): ``"elastic"``: SpikeLM's elastic bi-spiking neuron, the network runs as T copies (T folded into
            the batch axis); ``"gif"``: SpikeLLM's GIF neuron, whose steps are internal to the neuron (the network
            runs once; ``num_steps`` is then not used).
        num_steps (int): T for ``"elastic"``: the time steps every neuron runs over.
        spike_levels, use_amplitude, alpha_init, learn_alpha, reset: the elastic neuron's options, as in
            :class:`~spikelm.SpikeLMConfig`.

    GIF neuron (``neuron="gif"``):
        gif_bits (int): n, the base bit-width: one multi-level spike carries at most 2^n - 1.
        gif_extra_bits (int): a, the extra bits of the salient channels: they run over T = 2^a steps.
        saliency_fraction (float): the fraction of input channels (by calibration saliency) that get the extra
            steps; 0 gives every channel n bits in one step.
        gif_group_range (str): ``"group"``: each channel group (salient, other) takes its per-token scale and zero
            point from its own channels' min/max, so outlier channels do not stretch the others' grid (the default:
            far better on real LLMs); ``"token"``: both groups over the whole token's range, as SpikeLLM's code.
        gif_clip_ratio (float): each per-token range is this fraction of the min/max (1: no clipping; 0.9 is
            QuaRot's activation clip ratio); values beyond it take the end codes.
        gif_group_size (int): 0 (default): one per-token range per channel group (salient, other); G > 0: one
            range (scale and zero point) per G consecutive channels inside each group (group-wise activation
            quantisation, as Atom/QuaRot's group variants; a group's last range may cover fewer than G channels).
            Needs ``gif_group_range="group"``.

    Outlier handling (equivalence transforms folded into the weights before spiking):
        rotation (str): ``"none"``, ``"hadamard"`` or ``"random"``: an orthogonal rotation of the residual stream
            (architectures with pre RMSNorms only; their gains folded in first, see :mod:`spikelm.conversion.rotation`;
            elsewhere spikify drops it, saying why).
        rotation_seed (int): seed of the rotation's random signs (or matrix); the online rotation uses seed + 1.
        online_down_proj_rotation (bool): also rotate the FFN's last linear input at run time (a Hadamard rebuilt
            from its size and seed on load, so nothing extra is saved). The name is kept from saved configs.
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
        num_steps: int = 4,
        spike_levels: str = "ternary",
        use_amplitude: bool = True,
        alpha_init: str | float = "mean_abs",
        learn_alpha: bool = False,
        reset: str = "official",
        gif_bits: int = 4,
        gif_extra_bits: int = 1,
        saliency_fraction: float = 0.1,
        gif_group_range: str = "group",
        gif_clip_ratio: float = 1.0,
        gif_group_size: int | None = 0,
        rotation: str = "none",
        rotation_seed: int = 0,
        online_down_proj_rotation: bool = False,
        smoothing_alpha: float | None = None,
        untied_embeddings: bool = False,
        modules_to_not_convert: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown,
    ):
        if unknown:
            raise ValueError(
                f"unknown spikelm conversion field(s) {sorted(unknown)}; the fields are {sorted(self.field_names())}"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.neuron = neuron
        self.num_steps = num_steps
        self.spike_levels = spike_levels
        self.use_amplitude = use_amplitude
        self.alpha_init = alpha_init
        self.learn_alpha = learn_alpha
        self.reset = reset
        self.gif_bits = gif_bits
        self.gif_extra_bits = gif_extra_bits
        self.saliency_fraction = saliency_fraction
        self.gif_group_range = gif_group_range
        self.gif_clip_ratio = gif_clip_ratio
        self.gif_group_size = 0 if gif_group_size is None else gif_group_size
        self.rotation = rotation
        self.rotation_seed = rotation_seed
        self.online_down_proj_rotation = online_down_proj_rotation
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
        return (
            "neuron",
            "num_steps",
            "spike_levels",
            "use_amplitude",
            "alpha_init",
            "learn_alpha",
            "reset",
            "gif_bits",
            "gif_extra_bits",
            "saliency_fraction",
            "gif_group_range",
            "gif_clip_ratio",
            "gif_group_size",
            "rotation",
            "rotation_seed",
            "online_down_proj_rotation",
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
        if self.neuron not in NEURONS:
            raise ValueError(f"neuron must be one of {NEURONS}, got {self.neuron!r}")
        check_neuron_options(
            self.num_steps, self.spike_levels, self.use_amplitude, self.alpha_init, self.learn_alpha, self.reset
        )
        if isinstance(self.gif_group_size, bool) or not isinstance(self.gif_group_size, int) or self.gif_group_size < 0:
            raise ValueError(
                "gif_group_size must be 0 (one range per channel group) or a positive integer (channels per range), "
                f"got {self.gif_group_size!r}"
            )
        if self.gif_group_size and self.gif_group_range != "group":
            raise ValueError(
                f"gif_group_size={self.gif_group_size} needs gif_group_range='group', got {self.gif_group_range!r}"
            )
        check_gif_options(
            self.gif_bits,
            self.gif_extra_bits,
            self.saliency_fraction,
            self.gif_group_range,
            self.gif_clip_ratio,
            self.gif_group_size,
        )
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int):
            raise ValueError(f"rotation_seed must be an integer, got {self.rotation_seed!r}")  # noqa: TRY004
        alpha = self.smoothing_alpha
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1
        ):
            raise ValueError(f"smoothing_alpha must be None (off) or a number in [0, 1], got {alpha!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        for name in ("online_down_proj_rotation", "untied_embeddings"):
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
        return self.num_steps if self.neuron == "elastic" else 1

    def neuron_options(self) -> dict:
        """The elastic neuron's keyword arguments."""
        return {
            "spike_levels": self.spike_levels,
            "use_amplitude": self.use_amplitude,
            "alpha_init": self.alpha_init,
            "learn_alpha": self.learn_alpha,
            "reset": self.reset,
        }

    def to_dict(self) -> dict:
        return copy.deepcopy({name: getattr(self, name) for name in ("quant_method", *self.field_names())})


# set, not register_*(): `import spikelm` puts a stand-in there first (see spikelm/__init__.py), and a reload
# must not fail on the registry's "already registered" check
AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = SpikeLMConversionConfig
