"""What a source architecture is to spikelm: a description of where things are, and the registry of them.

A converted model keeps transformers' own modules (hooks add the neurons; docs/CONVERSION.md), so a family needs no
weight map, only a description: an :class:`Architecture` saying

* where the decoder (or encoder) blocks live (``layers``, a ModuleList path inside the base model) and on which
  module's output the T copies are averaged (``average_after``: the final norm, or the encoder of a post-norm BERT);
* each linear input site (:class:`InputSite`): the module whose input is spiked (the *host*; its forward pre-hook
  spikes the input with ``host.input_neuron``) and the linears reading that input, which share the neuron
  (separate q/k/v or a fused qkv, gate/up or a fused gate_up);
* which linears write to the residual stream (``writers``) and which module holds the token embeddings;
* each norm (:class:`Norm`): its gain convention (``w``, or ``1 + w`` as Gemma's RMSNorm computes ``x * (1 + w)``),
  its kind (RMSNorm commutes with a rotation once gain-free; a LayerNorm subtracts the mean and does not) and its
  position (a *pre* norm reads the residual stream and feeds the linears of a site; a *post* norm normalises a
  branch's output before the residual add, as in Gemma-2/3's sandwich and OLMo-2; a *qk* norm acts on queries and
  keys after their projections; the *final* norm before the head);
* the attention module of a block, which hands K (after the rotary embedding) and V to the cache, where they are
  spiked (:mod:`spikelm.conversion.cache`), and which layers attend through a sliding window;
* where the attention's values are made and read (:class:`ValueOutput`: the linear whose output rows hold V, per
  K/V head, and the linear reading the attention output, per query head), for the per-head value/output rotation.

From the description follow whether the residual-stream rotation can be folded exactly
(:meth:`Architecture.rotation_blocker`), whether the online rotation of the FFN's last linear input can be
(``online_rotation``) and whether the per-head value/output rotation can be
(:meth:`Architecture.value_rotation_blocker`). Placement, rotation, smoothing, energy counting and the model card
read only this; no module outside this package names a projection (tests/test_layout.py).

The registry is keyed by ``model_type``; :func:`describe` returns the entry for a model, and is the one hook point
for model types not in the table (a ``generic`` module in this package, when present, builds a description from the
model itself).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

SITE_KINDS = ("qkv_input", "o_input", "gate_up_input", "down_input", "k", "v")
GAINS = ("w", "1+w")  # y = n(x) * w, or y = n(x) * (1 + w) (Gemma)
NORM_KINDS = ("rms", "layer")  # RMSNorm, or LayerNorm (subtracts the mean)
POSITIONS = ("pre", "post", "qk", "final")


@dataclass(frozen=True)
class Norm:
    """One norm of a block (path relative to the block) or the final norm (path relative to the base model).

    ``gain``: ``"w"`` (``y = n(x) * w``) or ``"1+w"`` (``y = n(x) * (1 + w)``, Gemma). ``kind``: ``"rms"`` or
    ``"layer"``. ``position``: ``"pre"`` (reads the residual stream, feeds a site's linears), ``"post"`` (normalises
    a branch's output before the residual add), ``"qk"`` (queries / keys after their projection), ``"final"``.
    """

    path: str
    position: str = "pre"
    gain: str = "w"
    kind: str = "rms"

    def __post_init__(self):
        if self.gain not in GAINS or self.kind not in NORM_KINDS or self.position not in POSITIONS:
            raise ValueError(f"bad Norm {self}: gain in {GAINS}, kind in {NORM_KINDS}, position in {POSITIONS}")

    @property
    def folds_a_rotation(self) -> bool:
        """A rotation of the residual stream can be folded through this norm: an RMSNorm (gain-free, it commutes
        with any rotation) that reads the residual stream (pre, final). A q/k norm is not on the residual stream
        (it neither allows nor blocks it); a post norm or a LayerNorm blocks it."""
        return self.kind == "rms" and self.position in ("pre", "final")

    @property
    def identity(self) -> float:
        """The stored weight value that makes the gain 1 (what a folded norm holds)."""
        return 0.0 if self.gain == "1+w" else 1.0

    def effective_gain(self, module: nn.Module):
        """The gain the norm multiplies by (float64): ``w`` or ``1 + w``."""
        weight = module.weight.double()
        return weight + 1.0 if self.gain == "1+w" else weight

    def stored_weight(self, gain):
        """The weight to store for an effective ``gain`` (the inverse of :meth:`effective_gain`)."""
        return gain - 1.0 if self.gain == "1+w" else gain


@dataclass(frozen=True)
class InputSite:
    """One spiking neuron on a linear input: ``kind`` (one of :data:`SITE_KINDS`), the ``host`` module (inside a
    block) whose input it spikes, the linears reading that input (they share the neuron), and the ``pre`` norm whose
    output the input is (``None`` when it is not a norm's output: o_proj's and down_proj's inputs, OLMo-2's q/k/v)."""

    kind: str
    host: str
    readers: tuple[str, ...]
    norm: str | None = None
    # True: the readers' own pre-hooks spike the input with the host's neuron, once per tensor (the generic path:
    # the host is where the neuron lives, e.g. the block of a parallel attention + MLP, not a module receiving it)
    on_readers: bool = False


@dataclass(frozen=True)
class ValueOutput:
    """Where a block's attention makes its values and reads its output (paths relative to the block), for the
    per-head value/output rotation (:func:`spikelm.conversion.rotation.rotate_values`; docs/CONVERSION.md).

    ``value``: the linear whose output holds V, ``head_dim`` rows per K/V head (its last rows when ``fused``: a
    fused q/k/v projection whose output is Q, then K, then V, each head after the other). ``output``: the linear
    reading the attention output, ``head_dim`` input columns per query head. ``clamp``: a config field that, when
    set, clamps V elementwise (OLMo's ``clip_qkv``), which no rotation commutes with.
    """

    value: str
    output: str
    fused: bool = False
    clamp: str | None = None


def sliding_layers_from_config(config) -> tuple[int, ...]:
    """The layers that attend through a sliding window, from transformers' own config fields: ``layer_types``
    (``"sliding_attention"``) where the config has it, else every layer when ``sliding_window`` is set (and
    ``use_sliding_window`` is not False, Qwen2)."""
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return tuple(range(layers))
    return ()


@dataclass(frozen=True)
class Architecture:
    """Where things are in one source architecture (``model_type``); paths relative to the base model
    (``layers``, ``average_after``, ``embeddings``, ``final_norm``) or to a block (everything else).

    ``causal``: a decoder (builds a spike-code cache for decoding); False for an encoder. ``online_rotation``: the
    online rotation of the FFN's last linear input (the ``down_input`` site) is offered. ``rotation_notice``: a
    reason, beyond the norms, why the residual stream cannot be rotated. ``sliding_layers``: which layers of a config
    attend through a sliding window (the mask restricts them; the spike-code cache keeps every position).
    """

    model_type: str
    layers: str
    attention: str
    sites: tuple[InputSite, ...]
    average_after: str
    causal: bool
    writers: tuple[str, ...] = ()
    norms: tuple[Norm, ...] = ()
    final_norm: Norm | None = None
    embeddings: str = "embed_tokens"
    online_rotation: bool = True
    rotation_notice: str | None = None
    sliding_layers: Callable = field(default=sliding_layers_from_config, compare=False)
    description: str = ""  # one line for messages and the model card, e.g. "LLaMA-style decoder"
    # where the T copies enter (inputs repeated) and leave (hidden states averaged), relative to the base model:
    # "" the base model itself; OPT runs its decoder without its base model's forward
    entry: str = ""
    cache_argument: str = "past_key_values"  # the keyword under which the attention receives the cache
    kv_channels: tuple[int, int, int] | None = None  # (H_kv, 1, d) of K and V; None: from the config
    generic: bool = False  # built by the generic module from a traced forward, not from the table
    # the per-head value/output rotation: where V is made and the attention output read; None: not offered
    value_output: ValueOutput | None = None
    # the block's forward is the pre-norm block with a gated MLP whose decoding step spikelm.conversion.decode_step
    # runs in one function (LLaMA's, Mistral's, Qwen2's: the same operations); False: the block's modules run
    decode_step: bool = False

    def __post_init__(self):
        for site in self.sites:
            if site.kind not in SITE_KINDS:
                raise ValueError(f"{self.model_type}: unknown site kind {site.kind!r}; expected one of {SITE_KINDS}")

    @property
    def name(self) -> str:
        return self.model_type

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.model_type,)

    def site(self, kind: str) -> InputSite | None:
        return next((s for s in self.sites if s.kind == kind), None)

    def norm(self, path: str) -> Norm:
        return next(n for n in self.norms if n.path == path)

    def pre_norm_sites(self) -> list[tuple[Norm, InputSite]]:
        """``(norm, site)`` for every site whose input is a pre norm's output (in block order)."""
        return [(self.norm(s.norm), s) for s in self.sites if s.norm is not None]

    def folded_norms(self, model: nn.Module) -> list[tuple[str, nn.Module, Norm]]:
        """``(name in model.named_modules(), module, Norm)`` of every norm a residual-stream rotation folds into its
        readers (each block's pre norms, then the final norm): after the fold each stores :attr:`Norm.identity`."""
        base = model.base_model
        prefix = f"{model.base_model_prefix}." if base is not model else ""
        out = []
        for index, layer in enumerate(base.get_submodule(self.layers)):
            for norm, _ in self.pre_norm_sites():
                out.append((f"{prefix}{self.layers}.{index}.{norm.path}", layer.get_submodule(norm.path), norm))
        if self.final_norm is not None:
            final = self.final_norm
            out.append((f"{prefix}{final.path}", base.get_submodule(final.path), final))
        return out

    def rotation_blocker(self) -> str | None:
        """Why a rotation of the residual stream cannot be folded exactly into this architecture, or None."""
        if self.rotation_notice:
            return self.rotation_notice
        for norm in (*self.norms, *([self.final_norm] if self.final_norm else [])):
            if norm.position == "qk" or norm.folds_a_rotation:
                continue
            if norm.kind != "rms":
                return f"its {norm.path} is a LayerNorm, which subtracts the mean: a rotation does not commute with it"
            if norm.position == "post":
                return (
                    f"its {norm.path} normalises a branch's output before the residual add: a rotation of the "
                    f"residual stream cannot be folded through its gain ({'1 + w' if norm.gain == '1+w' else 'w'})"
                )
        if self.final_norm is None:
            return "it has no final norm before the head to fold the rotation into"
        return None

    def value_rotation_blocker(self, config=None) -> str | None:
        """Why the per-head value/output rotation cannot be folded exactly into this architecture (with ``config``,
        the model's text config: a clamp of V set in it), or None."""
        if self.value_output is None:
            if self.generic:
                return "the generic path does not know which linears make the values and read the attention output"
            return "its description names no per-head value and output linears"
        clamp = self.value_output.clamp
        if clamp is not None and config is not None and getattr(config, clamp, None) is not None:
            return f"its config's {clamp}={getattr(config, clamp)!r} clamps V elementwise, which a rotation changes"
        return None

    def check_config(self, config) -> None:
        """``ValueError`` for a configuration of this model type that spikify cannot convert."""
        if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError(f"spikify does not support cross-attention ({self.model_type} has add_cross_attention)")
        if not self.causal and getattr(config, "is_decoder", False):
            raise ValueError(
                f"spikify supports {self.model_type} models as encoders only (this config has is_decoder=True)"
            )


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    """Add ``architecture`` to the table under its ``model_type`` (one entry per model type)."""
    if architecture.model_type in _REGISTRY:
        raise ValueError(f"model_type {architecture.model_type!r} is already described")
    _REGISTRY[architecture.model_type] = architecture
    return architecture


def lookup(model_type: str | None) -> Architecture | None:
    """The table's entry for ``model_type``, or None."""
    return _REGISTRY.get(model_type)


def registered() -> tuple[Architecture, ...]:
    return tuple(_REGISTRY[t] for t in sorted(_REGISTRY))


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def describe(model: nn.Module) -> Architecture:
    """The description of ``model``: the table's entry for its ``model_type``, or, for a type not in the table, the
    one the ``generic`` module of this package builds from the model (when it exists). ``ValueError`` naming the
    problem for anything else."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # an unsupported architecture like any other: ValueError
        raise ValueError(  # noqa: TRY004
            f"spikify expects a loaded transformers model (a PreTrainedModel); got a {type(model).__name__}"
        )
    config = model.config
    model_type = getattr(config, "model_type", None)
    architecture = lookup(model_type)
    if architecture is None:
        generic = f"{__package__}.generic"
        if importlib.util.find_spec(generic) is not None:
            return importlib.import_module(generic).describe(model)
        raise ValueError(
            f"spikify does not support {type(model).__name__} (model_type {model_type!r}); supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    architecture.check_config(config)
    return architecture
