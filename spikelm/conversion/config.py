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
from ..nn.signed import check_signed_options

QUANT_METHOD = "spikelm"
FORMAT_VERSION = 1  # bump when a saved model of the previous version would load differently
NEURONS = ("elastic", "gif", "signed")
SITE_KINDS = ("qkv_input", "o_input", "gate_up_input", "down_input", "k", "v")  # as placement.SITE_KINDS
ROTATIONS = ("none", "hadamard", "random")


class SpikeLMConversionConfig(QuantizationConfigMixin):
    r"""How a pretrained model is made to spike (SPEC sections 2, 3 and 8).

    Neuron:
        neuron (str): ``"elastic"``: SpikeLM's elastic bi-spiking neuron, the network runs as T copies (T folded into
            the batch axis); ``"gif"``: SpikeLLM's GIF neuron, whose steps are internal to the neuron (the network
            runs once; ``num_steps`` is then not used); ``"signed"``: the signed multi-level neuron
            (:mod:`spikelm.nn.signed`; steps internal too).
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

    Signed neuron (``neuron="signed"``, docs/CONVERSION.md, "Signed spikes and energy"):
        signed_bits (int): bits of a code, sign included: codes -Q..Q, Q = 2^(bits-1) - 1 (4 bits: -7..7).
        signed_steps (int): T; one spike carries at most ceil(Q / T) levels (the spikes change, not the code).
        signed_group_size (int): channels per per-token range (scale) inside each channel set; 0: one per set.
        signed_clip_ratio (float): each range is this fraction of the group's max |x|.
        signed_dead_zone (float): inputs below this many quantisation steps in magnitude fire nothing.
        signed_salient_bits (int or None): bits of the salient channels' codes (the top ``saliency_fraction`` by
            calibration saliency); None: no saliency.
        signed_site_bits (dict or None): bits per placement site kind (``qkv_input``, ``o_input``,
            ``gate_up_input``, ``down_input``, ``k``, ``v``), overriding ``signed_bits`` there.
        signed_learn_scale (bool): a learnable scale factor per channel set (for distillation).

    Outlier handling (equivalence transforms folded into the weights before spiking):
        rotation (str): ``"none"``, ``"hadamard"`` or ``"random"``: an orthogonal rotation of the residual stream
            (LLaMA family; RMSNorm gains folded in first, see :mod:`spikelm.conversion.rotation`).
        rotation_seed (int): seed of the rotation's random signs (or matrix); the online rotation uses seed + 1.
        online_down_proj_rotation (bool): also rotate down_proj's input at run time (a Hadamard rebuilt from its
            size and seed on load, so nothing extra is saved).
        smoothing_alpha (float or None): None (default): off; a number in [0, 1]: SmoothQuant per-channel factors
            ``max|X_c|^alpha / max|W_c|^(1 - alpha)`` from the calibration text, folded into every block's RMSNorm
            gains and q/k/v, gate/up weights after the rotation (LLaMA family; needs calibration; exact for the
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
        signed_bits: int = 4,
        signed_steps: int = 1,
        signed_group_size: int = 64,
        signed_clip_ratio: float = 1.0,
        signed_dead_zone: float = 0.0,
        signed_salient_bits: int | None = None,
        signed_site_bits: dict | None = None,
        signed_learn_scale: bool = False,
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
        self.signed_bits = signed_bits
        self.signed_steps = signed_steps
        self.signed_group_size = signed_group_size
        self.signed_clip_ratio = signed_clip_ratio
        self.signed_dead_zone = signed_dead_zone
        self.signed_salient_bits = signed_salient_bits
        self.signed_site_bits = dict(signed_site_bits) if isinstance(signed_site_bits, dict) else signed_site_bits
        self.signed_learn_scale = signed_learn_scale
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
            "signed_bits",
            "signed_steps",
            "signed_group_size",
            "signed_clip_ratio",
            "signed_dead_zone",
            "signed_salient_bits",
            "signed_site_bits",
            "signed_learn_scale",
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
        self._check_signed()
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

    def _check_signed(self) -> None:
        sites = self.signed_site_bits
        if sites is not None and (
            not isinstance(sites, dict)
            or any(k not in SITE_KINDS for k in sites)
            or any(isinstance(b, bool) or not isinstance(b, int) for b in sites.values())
        ):
            raise ValueError(
                f"signed_site_bits must be None or a dict of site kind ({', '.join(SITE_KINDS)}) to integer bits, "
                f"got {sites!r}"
            )
        if not isinstance(self.signed_learn_scale, bool):
            raise ValueError(f"signed_learn_scale must be True or False, got {self.signed_learn_scale!r}")  # noqa: TRY004
        for bits in [self.signed_bits, *(sites or {}).values()]:
            salient = self.signed_salient_bits
            check_signed_options(
                bits,
                self.signed_steps,
                self.signed_group_size,
                self.signed_clip_ratio,
                self.signed_dead_zone,
                None if salient is None else max(salient, bits) if isinstance(salient, int) else salient,
                self.saliency_fraction,
            )

    def signed_options(self, kind: str) -> dict:
        """The signed neuron's keyword arguments at a placement site of ``kind`` (its bits from ``signed_site_bits``;
        salient channels never get fewer bits than the site's others)."""
        bits = (self.signed_site_bits or {}).get(kind, self.signed_bits)
        salient = self.signed_salient_bits
        return {
            "bits": bits,
            "num_steps": self.signed_steps,
            "group_size": self.signed_group_size,
            "clip_ratio": self.signed_clip_ratio,
            "dead_zone": self.signed_dead_zone,
            "salient_bits": None if salient is None else max(salient, bits),
            "saliency_fraction": self.saliency_fraction if salient is not None else 0.0,
            "learn_scale": self.signed_learn_scale,
        }

    @property
    def model_steps(self) -> int:
        """How many copies of the network run: T for the elastic neuron, 1 for GIF (its steps are internal)."""
        return self.num_steps if self.neuron == "elastic" else 1  # GIF and signed: steps internal to the neuron

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
