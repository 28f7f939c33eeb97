"""The interface every spiking neuron implements, and the registry of neurons by name (docs/CONVERSION.md, "Adding
a neuron").

A neuron is a plug-in: one module in :mod:`spikelm.nn.neurons` holds its maths, its fast paths and everything the
rest of spikelm needs to know about it, as the members of :class:`SpikingNeuron` below. No module outside this
package asks which neuron it holds: placement, the spike-code cache, the energy counter, the statistics, the
conversion config and its recipes, the model card and the commands all call these members. The registry key is the
conversion config's ``neuron`` field (``"elastic"``, ...): :func:`neuron_class` turns a saved config's name into the
class, :func:`register_neuron` adds one.

Layering: this package is in ``nn``, below every other wing, so what a neuron gives the others is plain data
(numbers, int64 tensors, strings, dicts of config fields); the other wings hold what needs their own machinery and
pick it by a name the neuron declares (the K/V cache layer: :attr:`SpikingNeuron.cache_layout`, looked up in
:data:`spikelm.conversion.cache.CACHE_LAYERS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn


class SpikingNeuron(nn.Module):
    """The base class of every spiking neuron (a ``torch.nn.Module``).

    **Class attributes** (the plug-in's description, read without building a neuron):

    * ``name`` (str): the registry key and the conversion config's ``neuron`` value, e.g. ``"elastic"``.
    * ``display_name`` (str): the neuron's name in prose (the model card's "the GIF neuron's fields"); default
      ``name``.
    * ``config_fields`` (dict, field -> default): the conversion-config fields this neuron owns, under the names
      saved configs use (so ``config.json`` files from before load unchanged). Every registered neuron's fields are
      fields of :class:`~spikelm.conversion.config.SpikeLMConversionConfig`, in registry order.
    * ``shared_fields`` (tuple of str): other neurons' fields this neuron reads too (the signed neuron reads GIF's
      ``saliency_fraction``); a field of another neuron outside it is refused by ``spikify --set`` for this neuron.
    * ``recipe_defaults`` (dict): the fields of the named recipe ``spikify --neuron NAME`` (besides the rotations
      every recipe shares, which spikelm.conversion.recipes adds; a rotation only this recipe asks for, such as
      ``value_rotation``, is here), ``"neuron"`` included.
    * ``cache_layout`` (str): how a converted model's K/V cache stores this neuron's spikes; the conversion wing
      maps it to a cache layer class (:data:`spikelm.conversion.cache.CACHE_LAYERS`: ``"step_codes"``, per-step
      integer codes with per-step scales; ``"token_codes"``, one integer code per value with a per-token grid).
    * ``traceless_fields`` (tuple of str): this neuron's config fields that leave no trace in the saved tensors (a
      saved model records their values in its safetensors metadata, so an edited ``config.json`` is refused).
    * ``counting_backend`` (str or None): the backend the energy counter switches the neuron to while counting, so
      that its forward output shows its spikes (None: the neuron is left as it is).

    **Configuration** (class methods; ``fields`` is a mapping of conversion-config fields: ``config.to_dict()`` or
    a saved ``quantization_config`` dict; a missing field of this neuron takes its ``config_fields`` default):

    * :meth:`config_values` -> dict: this neuron's fields taken out of the keyword arguments a config is built from.
    * :meth:`check_config` -> None: raise ``ValueError`` naming the first of this neuron's fields out of range
      (called for every registered neuron, whichever is chosen).
    * :meth:`model_steps` -> int: how many copies of the network run (folded into the batch axis).
    * :meth:`time_steps` -> int: T, the time steps the spikes run over.
    * :meth:`recipe` -> dict: the named recipe's fields, with ``--num-steps`` (if given) mapped onto them;
      :meth:`finish_recipe` -> dict: the fields once the user's overrides are in.
    * :meth:`site_fields` -> dict: the fields for one kind of placement site (per-site settings);
      :meth:`from_config` -> SpikingNeuron: the neuron of one placement site.
    * :meth:`describe` -> str: the model card's sentence on the neuron (after "Converted ... with spikify: ").
    * :meth:`summary` -> str: a few words for a command's report (``spikelm energy``).
    * :meth:`steps_summary` -> str: the time steps in words (``spikelm generate``).

    **Running** (instance methods):

    * ``forward(x)``: the neuron's value on ``x``; the readable reference path when the neuron's backend is
      ``"reference"``, bit for bit the same value on every other backend.
    * :meth:`spike_folded` -> Tensor: ``forward`` on an input whose ``steps`` network copies are folded into the
      batch axis (``(steps * B, ..., C)``), same shape out.
    * :meth:`step_spikes` -> ``(levels, fired)``: the spikes of one call, per step: int64 ``(S, ..., C)``
      |spike level| and 1 where a spike fired.
    * :meth:`linear` -> Tensor: a linear layer reading the neuron's spikes of ``x``, on the neuron's one-shot code.

    **Calibration and state**: :meth:`initialize_parameters` (a fresh model's parameters, through the given init
    functions), :meth:`reset_calibration` (forget calibration), :meth:`state_loaded` (a saved state was loaded),
    :meth:`is_initialized` (bool: data-dependent parameters are set), :meth:`calibration_flag` (the saved flag, or
    None when the neuron has none), :meth:`state_problem` (a loaded state that spikelm cannot have saved, in words,
    or None), :meth:`calibration_recorder` (an object whose ``finish()`` ends calibration, or None when the neuron
    calibrates on its first input).

    **Statistics**: ``record_stats`` (bool attribute), :meth:`reset_stats`, :meth:`spike_stats` -> dict or None
    (``firing_rate`` per step, ``spikes`` per step, ``slots`` per step, plus the neuron's own entries),
    :meth:`step_counts` -> int64 (3, S) tensor or None (spikes of each sign and slots per step, on the device).

    **Energy** (int64 tensors of length ``steps``, summed by :mod:`spikelm.evaluation.energy`):
    :meth:`slots`, :meth:`reader_macs`, :meth:`reader_weight_reads`, :meth:`attention_ops`, and
    :meth:`real_rows` (the rows that pass real-valued, if any).

    **Kernels**: :meth:`packs_kv_on_cpu` (bool: a decoding step may spike and pack K/V in the C++ kernel).
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    config_fields: ClassVar[dict[str, Any]] = {}
    recipe_defaults: ClassVar[dict[str, Any]] = {}
    shared_fields: ClassVar[tuple[str, ...]] = ()
    cache_layout: ClassVar[str] = ""
    traceless_fields: ClassVar[tuple[str, ...]] = ()
    counting_backend: ClassVar[str | None] = None

    # -- configuration ------------------------------------------------------------------------------------------

    @classmethod
    def field(cls, fields: Mapping[str, Any], name: str) -> Any:
        """``fields[name]``, or this neuron's default for it."""
        return fields.get(name, cls.config_fields[name])

    @classmethod
    def config_values(cls, given: dict[str, Any]) -> dict[str, Any]:
        """This neuron's fields, popped from ``given`` (the keyword arguments of a config), defaults filled in."""
        return {name: given.pop(name, default) for name, default in cls.config_fields.items()}

    @classmethod
    def check_config(cls, fields: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the first of this neuron's fields out of range."""

    @classmethod
    def model_steps(cls, fields: Mapping[str, Any]) -> int:
        """How many copies of the network run, folded into the batch axis (1: the network runs once)."""
        return 1

    @classmethod
    def time_steps(cls, fields: Mapping[str, Any]) -> int:
        """T, the time steps the spikes run over (at most: e.g. GIF's non-salient channels fire in one)."""
        return cls.model_steps(fields)

    @classmethod
    def recipe(cls, num_steps: int | None = None) -> dict[str, Any]:
        """The named recipe's neuron fields; ``num_steps`` (``--num-steps``, >= 1) mapped onto this neuron's fields.

        Raises ``ValueError`` naming ``--num-steps`` if this neuron cannot run that many steps."""
        fields = dict(cls.recipe_defaults)
        if num_steps is not None:
            raise ValueError(f"--num-steps does not apply to --neuron {cls.name}")
        return fields

    @classmethod
    def finish_recipe(cls, fields: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """The recipe's fields after the user's ``overrides`` were applied (``spikify --set``): a chance to drop a
        default that no longer applies. Returns the fields."""
        return fields

    @classmethod
    def site_fields(cls, fields: Mapping[str, Any], kind: str) -> dict[str, Any]:
        """The fields for a placement site of ``kind`` (``qkv_input``, ``o_input``, ``gate_up_input``,
        ``down_input``, ``k``, ``v``): a neuron whose settings differ per site maps them here (default: as given)."""
        return dict(fields)

    @classmethod
    def from_config(cls, fields: Mapping[str, Any], channels: int | tuple[int, ...], per_step: bool) -> SpikingNeuron:
        """The neuron of one placement site: ``channels`` the input width C (or, for K/V, the channel shape
        ``(H_kv, 1, d)``); ``per_step`` True for K and V (spiked at every step on their own, no membrane)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, fields: Mapping[str, Any]) -> str:
        """The model card's sentence on this neuron and its settings."""
        return f"the {cls.name} neuron"

    @classmethod
    def summary(cls, fields: Mapping[str, Any]) -> str:
        """A few words on the neuron and its settings, for a command's report."""
        return f"{cls.name} neuron"

    @classmethod
    def steps_summary(cls, fields: Mapping[str, Any]) -> str:
        """The model's time steps in words."""
        return f"{cls.model_steps(fields)} time steps"

    # -- running ------------------------------------------------------------------------------------------------

    def spike_folded(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """``forward`` on ``x`` whose ``steps`` network copies are folded into the batch axis; same shape out."""
        return self(x)

    def step_spikes(self, x: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, fired)``, int64 ``(S, ..., C)``: the spikes this neuron emitted per step on input ``x``, whose
        forward output was ``output`` (on :attr:`counting_backend`)."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A linear layer reading this neuron's spikes of ``x``, computed from the neuron's one-shot code: the value
        of ``exact_linear(self(x), weight, bias)`` (:mod:`spikelm.nn.exact`) up to the rounding of that arithmetic
        (the elastic neuron: bit for bit; GIF: within float32 rounding, the integer codes accumulated apart)."""
        raise NotImplementedError

    # -- calibration and state ----------------------------------------------------------------------------------

    def is_initialized(self) -> bool:
        """Whether the neuron's data-dependent parameters are set (False: its next input sets them)."""
        return True

    def initialize_parameters(self, init) -> None:
        """Set the parameters a fresh model starts from, with ``init``'s functions (``transformers.initialization``,
        which leaves loaded tensors alone, or ``torch.nn.init``): a model's ``_init_weights`` calls it."""

    def reset_calibration(self) -> None:
        """Forget what calibration set (a real-valued checkpoint was loaded into a new spiking model: nothing was
        loaded into the neuron, its data-dependent state comes from data)."""

    def state_loaded(self) -> None:
        """A saved state was just loaded into the neuron (drop caches of it)."""

    def calibration_flag(self) -> bool | None:
        """The saved "calibrated" flag (read from the state, not a cache), or None when the neuron has none."""
        return None

    def state_problem(self) -> str | None:
        """What is wrong with a loaded state that spikelm cannot have saved (e.g. a non-positive amplitude), in
        words after the neuron's name; None when the state is sound."""
        return None

    def calibration_recorder(self, reader_weights: Sequence[torch.Tensor] | None):
        """Start calibrating on the real-valued activations: an object whose ``finish()`` sets the neuron from what
        it saw (and removes its hooks), or None when the neuron sets itself from its first input.

        ``reader_weights``: the (out, in) weights of the linear layers reading this neuron (None for K/V)."""
        return None

    # -- statistics ---------------------------------------------------------------------------------------------

    record_stats: bool = False

    def reset_stats(self) -> None:
        """Forget the counts recorded so far."""
        self.stats = None

    def spike_stats(self) -> dict | None:
        """The counts recorded while ``record_stats`` was on, ready for JSON (None if nothing was recorded):
        ``firing_rate`` (per step), ``spikes`` (per step), ``slots`` (per step), and the neuron's own entries."""
        stats = getattr(self, "stats", None)
        return None if stats is None else stats.as_dict()

    def step_counts(self) -> torch.Tensor | None:
        """int64 (3, S): the positive spikes, negative spikes and slots per step recorded so far (None if nothing
        was recorded), left on the neuron's device (no host sync: the firing-rate monitor batches them). By default
        from :meth:`spike_stats` (every spike counted positive)."""
        stats = self.spike_stats()
        if stats is None:
            return None
        spikes = torch.tensor(stats["spikes"], dtype=torch.int64)
        return torch.stack([spikes, torch.zeros_like(spikes), torch.tensor(stats["slots"], dtype=torch.int64)])

    # -- energy -------------------------------------------------------------------------------------------------

    def slots(self, steps: int, rows: int, width: int) -> torch.Tensor:
        """int64 (steps,): the channel-steps that could fire over ``rows`` inputs of ``width`` channels."""
        return torch.full((steps,), rows * width, dtype=torch.int64)

    def real_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The rows of input ``x`` (bool, ``x.shape[:-1]``) that pass real-valued instead of spiking (a neuron's
        outlier tokens: their readers multiply, fan-in x fan-out MACs each, and :meth:`step_spikes` gives them no
        spikes); None when every row spikes (the default)."""
        return None

    def reader_macs(self, steps: int, outputs: int) -> torch.Tensor:
        """int64 (steps,): the multiplies a linear layer reading these spikes adds to its accumulates, for
        ``outputs`` (= rows x out_features) outputs (e.g. one amplitude multiply per output and step)."""
        raise NotImplementedError

    def reader_weight_reads(self) -> int:
        """Numbers a linear layer reading these spikes reads per output and token besides its weight rows and bias
        (the memory-inclusive energy figure, docs/CONVERSION.md, Energy): e.g. the row sums of W a zero-point term
        needs, one per zero-point group. None by default."""
        return 0

    def attention_ops(
        self, product: str, steps: int, pairs: int, heads: int, head_dim: int, queries: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(macs, extra_acs)``, int64 (steps,) each, of ``Q K^T`` (``product="scores"``, this neuron spikes K) or
        ``P V`` (``"context"``, it spikes V) beyond the spikes' own accumulates: ``pairs`` query-key pairs per
        query head, ``heads`` query heads of ``head_dim``, ``queries`` real queries."""
        raise NotImplementedError

    # -- kernels ------------------------------------------------------------------------------------------------

    def fused_codes(self, x: torch.Tensor, want_code: bool = False, pack_bits: int = 0, code_offset: int = 0):
        """A per-token code neuron's one-pass C++ code of ``x`` (:class:`~spikelm.nn.cpu_kernels.TokenCodes`, bit for
        bit its readable path) where it has one; None (the default) makes the caller take the readable path."""
        return None

    def value_plan(self, x: torch.Tensor) -> tuple | None:
        """The arguments of :func:`spikelm.nn.cpu_kernels.token_values` after ``x`` (``group, top, inner, clip_ratio,
        dead_zone, floor, signed, outlier_threshold``) where this neuron's forward value of ``x`` is that one C++
        pass and nothing else runs on the call (no hooks, no statistics): a caller may then run the pass itself,
        fused with the linears that read it (placement, a decoding step). None (the default): call the neuron."""
        return None

    def plan_stamp(self) -> Any:
        """What :meth:`value_plan`'s result depends on besides the neuron's attributes (whose every assignment moves
        :func:`state_epoch`) and the input's shape, dtype and device: a caller keeping a plan across calls (a
        block's decoding step) compares it at each call. Default None (nothing else)."""
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        _epoch[0] += 1

    def packs_kv_on_cpu(self) -> bool:
        """Whether a decoding step may spike and pack this K/V neuron's input in the C++ kernel (same codes)."""
        return False


_REGISTRY: dict[str, type[SpikingNeuron]] = {}


_epoch = [0]


def state_epoch() -> int:
    """A counter moved by every attribute assignment on any spiking neuron (its settings, its parameters and buffers
    set anew, its cached groups and plans): a plan resolved from neurons (a block's decoding step keeps one) holds
    while the counter has not moved and each neuron's :meth:`~SpikingNeuron.plan_stamp` is unchanged."""
    return _epoch[0]


def global_hooks() -> bool:
    """Whether module hooks registered for every module (``torch.nn.modules.module.register_module_forward_*``)
    would run on a module's call: a fast path that skips calling modules (a neuron's fused pass, a block's decoding
    step) must then step aside."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def register_neuron(cls: type[SpikingNeuron]) -> type[SpikingNeuron]:
    """Add a neuron class under its ``name`` (a class decorator); a second class under the same name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, SpikingNeuron)) or not cls.name:
        raise TypeError(f"register_neuron takes a SpikingNeuron subclass with a name, got {cls!r}")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"a neuron named {cls.name!r} is already registered ({known.__module__}.{known.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def neuron_names() -> tuple[str, ...]:
    """The registered neurons' names, in registration order."""
    return tuple(_REGISTRY)


def neuron_classes() -> tuple[type[SpikingNeuron], ...]:
    """The registered neuron classes, in registration order."""
    return tuple(_REGISTRY.values())


def neuron_class(name: str) -> type[SpikingNeuron]:
    """The neuron class registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"neuron must be one of {neuron_names()}, got {name!r}")
    return cls


def named_neurons(model: nn.Module) -> list[tuple[str, SpikingNeuron]]:
    """``(name, neuron)`` for every spiking neuron of ``model``, in module (forward) order.

    The one way to list neurons: a SpikeLM model's ``neurons()``, the spike statistics, the firing-rate monitor and
    the energy counter use it.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SpikingNeuron)]
