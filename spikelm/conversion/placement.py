"""Where the neurons go and the hooks that run them (the module surgery behind ``spikify``).

What happens to a model (docs/CONVERSION.md, "How it works"):

* The T copies of the network run folded into the batch axis, time-major ((T*B, L, D): copy t is rows t*B..t*B+B-1).
  A forward pre-hook on the base model repeats ``input_ids`` / ``inputs_embeds``, ``attention_mask``,
  ``position_ids`` and ``token_type_ids`` T times on entry, so the embedding output is repeated T times; a forward
  hook averages the T copies after the final norm (after the encoder for BERT, whose blocks end in a norm), so the
  heads (LM head, pooler, classifier) see (B, L, D) and stay real-valued.
* Every linear layer's input is spiked by a neuron, one per shared input: a forward pre-hook on the module that
  receives the input (the *host* of an input site) spikes it with that module's ``input_neuron`` (a registered
  submodule, so its alphas are in the state dict, e.g. ``model.layers.0.self_attn.input_neuron.alpha``). Where the
  hosts and their reading linears are is the architecture's description (:mod:`spikelm.conversion.architectures`).
* K (after the rotary embedding) and V are spiked per step by the attention module's ``key_neuron`` and
  ``value_neuron`` where the attention hands them to its cache (see :mod:`spikelm.conversion.cache`); a causal model
  creates its spike-code cache itself, so ``generate()`` needs no extra argument.
* Norms, rotary embeddings, softmax, activations and residual adds are untouched (real-valued).
* One model whatever the path: in inference the linear layers reading a neuron and the attention accumulate in
  float64 and round once (:mod:`spikelm.nn.exact`; the attention through :mod:`spikelm.conversion.attention`, set as
  the model's attention implementation), so a token gets the same codes in a prefill, a decoding step, a longer
  prompt, with the C++ kernels or without.

Hooks are not saved with a model: :func:`attach` (called by ``spikify`` and, on ``from_pretrained``, by the
quantizer before the weights load) adds neurons and hooks from the config alone.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import UserError
from ..nn.kernels import spike_linear
from ..nn.neurons import SpikingNeuron, neuron_class
from .architectures import SITE_KINDS, Architecture, describe, registered
from .attention import NAME as SPIKING_ATTENTION
from .cache import SpikeCodeCache, TransientSpikeKV, into_spike_cache, is_spike_cache
from .config import QUANT_METHOD, SpikeLMConversionConfig
from .decode_step import install as install_decode_step
from .decode_step import read_site

# the inputs that are repeated T times on entry (those whose first axis is the batch)
BATCHED_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
FAMILIES = registered()  # every described architecture (one per model type)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def is_spiking(model: nn.Module) -> bool:
    """True for a converted model, a native SpikeLM, or anything holding a spiking neuron."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == QUANT_METHOD:
        return True
    if getattr(getattr(model, "config", None), "model_type", None) == "spikelm":
        return True
    return any(isinstance(m, SpikingNeuron) or hasattr(m, "input_neuron") for m in model.modules())


def family_of(model: nn.Module) -> Architecture:
    """The description of ``model``'s architecture (:func:`spikelm.conversion.architectures.describe`);
    ``ValueError`` naming the problem if it has none."""
    return describe(model)


def check_generic_recipe(family: Architecture, config: SpikeLMConversionConfig) -> None:
    """A model converted through the generic path gets no smoothing (its norms are not described; a rotation is
    dropped with the path's notice, :func:`spikelm.conversion.spikify.spikify`): ``ValueError`` naming the field."""
    if family.generic and config.smoothing_alpha is not None:
        raise ValueError(
            f"smoothing_alpha={config.smoothing_alpha!r}: model_type {family.model_type!r} converts through the "
            "generic path, which has no smoothing (it needs the family's norms described); set it to None"
        )


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) or f".{s}." in name for s in skip)


def _get(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path) if path else module


# ----------------------------------------------------------------------------------------------
# Neurons
# ----------------------------------------------------------------------------------------------


def make_neuron(
    kind: str, config: SpikeLMConversionConfig, channels: int | tuple[int, ...], reader_weights: list[torch.Tensor]
) -> nn.Module:
    """The neuron for one placement site.

    Args:
        kind: one of :data:`SITE_KINDS`: the shared input of the query/key/value projections (``"qkv_input"``),
            the attention output projection's input (``"o_input"``), the shared input of the FFN's first linear(s)
            (``"gate_up_input"``), the FFN's last linear's input (``"down_input"``), or K / V per step (``"k"``,
            ``"v"``).
        config: the conversion recipe.
        channels: the width C of the input (…, C); for K/V the channel shape ``(H_kv, 1, d)`` of their
            (B, H_kv, L, d) layout.
        reader_weights: the (out, in) weights of the linear layers that read this input (stacked, they give
            SpikeLLM's saliency); empty for K/V. They may be on the meta device while a saved model loads: compute
            anything from them at calibration (:func:`calibrate`), not here.

    The neuron is the config's registered neuron (:mod:`spikelm.nn.neurons`), built by its ``from_config``: an
    elastic neuron sees time-major input (T, …, C); a GIF neuron sees the (…, C) input of the single copy of the
    network and returns its dequantised spike sum, same shape.
    """
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown placement site {kind!r}; expected one of {SITE_KINDS}")
    cls = neuron_class(config.neuron)
    return cls.from_config(cls.site_fields(config.to_dict(), kind), channels, per_step=kind in ("k", "v"))


def reader_weight(linear: nn.Module) -> torch.Tensor:
    weight = linear.weight
    return weight.t() if type(linear).__name__ == "Conv1D" else weight  # GPT-2's Conv1D stores (in, out)


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------


def apply_input_neuron(neuron: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Spike ``x`` (T*B, …, C), whose T network copies are folded into the batch axis, with ``neuron``
    (:meth:`~spikelm.nn.neurons.base.SpikingNeuron.spike_folded`: over the T steps, time-major, for an elastic
    neuron)."""
    return neuron.spike_folded(x, steps)


def _spike_input(module, args, kwargs, steps):
    if args:
        return (_spike_and_read(module, args[0], steps), *args[1:]), kwargs
    for name in ("hidden_states", "x", "input"):
        if name in kwargs:
            kwargs[name] = _spike_and_read(module, kwargs[name], steps)
            return args, kwargs
    raise RuntimeError(f"spikelm: could not find the input of {type(module).__name__} to spike")


READ_AHEAD = "_spikelm_read_ahead"  # a host's readers computed with its spikes (a list of linears, in its __dict__)
AHEAD = "_spikelm_ahead"  # a reader's output computed ahead: (the input it is for, the output), in its __dict__


def _spike_and_read(host: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``host``'s neuron on ``x`` and, at a decoding step, the linears that read its spikes computed ahead
    (:func:`spikelm.conversion.decode_step.read_site`: the neuron's pass and its readers in one C++ call where they
    run there) and left with each reader for the call that passes it these very spikes
    (:func:`_spike_reader_forward`). The same functions as one by one: the same bits."""
    readers = host.__dict__.get(READ_AHEAD)
    if not readers:
        return apply_input_neuron(host.input_neuron, x, steps)
    spikes, outs = read_site(host.input_neuron, x, steps, [r.weight for r in readers], [r.bias for r in readers])
    if outs is not None:
        for reader, out in zip(readers, outs, strict=True):
            reader.__dict__[AHEAD] = (spikes, out)
    return spikes


def _spike_reader_forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` of a linear that reads a neuron's spikes: its output computed ahead with the other
    readers of the same spikes (:func:`_spike_and_read`) if ``input`` is those spikes, else the few-row kernel for a
    few rows on CPU (a decoding step), else ``F.linear`` (:func:`spikelm.nn.kernels.spike_linear`)."""
    ahead = module.__dict__.get(AHEAD)
    if ahead is not None:
        module.__dict__[AHEAD] = None  # read once: keep no activation alive
        if ahead[0] is input:
            return ahead[1]
    return spike_linear(input, module.weight, module.bias)


class _SpikeReader:
    """The handle of a reader linear whose ``forward`` was set to :func:`_spike_reader_forward`: ``remove()``."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        linear.forward = partial(_spike_reader_forward, linear)

    def remove(self) -> None:
        if "forward" in vars(self.linear):
            del self.linear.forward
        vars(self.linear).pop(AHEAD, None)


class _ReadAhead:
    """The handle of a host whose readers run with its neuron at a decoding step (:func:`_spike_and_read`):
    ``remove()``."""

    def __init__(self, host: nn.Module, readers: list[nn.Linear]):
        self.host = host
        host.__dict__[READ_AHEAD] = readers

    def remove(self) -> None:
        vars(self.host).pop(READ_AHEAD, None)


def _read_spikes(readers: list[nn.Module]) -> list[_SpikeReader]:
    """Route the plain ``nn.Linear`` readers of a neuron through the spike-linear dispatch (others, e.g.
    GPT-2's Conv1D or a module whose forward is already replaced by another library's hook, keep their own)."""
    return [_SpikeReader(r) for r in readers if type(r) is nn.Linear and "forward" not in vars(r)]


class _SharedSpikes:
    """The readers' pre-hook of a neuron whose input several linears read and no host module receives alone (the
    generic path, :class:`~spikelm.conversion.architectures.InputSite` ``on_readers``): the first reader to see a
    tensor spikes it with the host's neuron, the others get the same spikes (kept until each has read them)."""

    def __init__(self, host: nn.Module, readers: int, steps: int):
        self.host, self.readers, self.steps = host, readers, steps
        self.clear()

    def clear(self, *_) -> None:
        self.input = self.output = None
        self.served = 0

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if x is None:
            raise RuntimeError(f"spikelm: could not find the input of {type(module).__name__} to spike")
        if x is not self.input:
            self.input, self.served = x, 0
            self.output = apply_input_neuron(self.host.input_neuron, x, self.steps)
        spikes = self.output
        self.served += 1
        if self.served >= self.readers:  # every reader has it: keep no activation alive
            self.clear()
        if args:
            return (spikes, *args[1:]), kwargs
        return args, {**kwargs, "input": spikes}


def _spike_kv_on_update(module, args, kwargs, steps, argument="past_key_values"):
    cache = kwargs.get(argument)
    if cache is None:
        kwargs[argument] = TransientSpikeKV(module.key_neuron, module.value_neuron, steps)
    elif not is_spike_cache(cache):
        raise RuntimeError(
            f"spikelm: {type(module).__name__} received a {type(cache).__name__} that does not spike K and V; a "
            "spiking model makes its own spike-code cache (pass no cache, or an empty DynamicCache)"
        )
    return args, kwargs


def _positional_to_keywords(forward, args, kwargs) -> dict:
    if not args:
        return kwargs
    return {
        **dict(
            zip(_positional_names(forward.__func__ if hasattr(forward, "__func__") else forward), args, strict=False)
        ),
        **kwargs,
    }


@functools.lru_cache(maxsize=64)
def _positional_names(forward) -> tuple[str, ...]:
    """The names of ``forward``'s positional parameters (``inspect.signature`` is slow: once per function)."""
    parameters = list(inspect.signature(forward).parameters.values())
    if hasattr(forward, "__code__") and parameters and parameters[0].name == "self":
        parameters = parameters[1:]  # the unbound function: drop self, as the bound method's signature does
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _enter_copies(base, args, kwargs, state):
    """Base-model pre-hook: repeat the batched inputs T times (time-major) and supply the spike-code cache."""
    kwargs = _positional_to_keywords(base.forward, args, kwargs)
    steps = state.steps
    ref = kwargs.get("input_ids")
    ref = kwargs.get("inputs_embeds") if ref is None else ref
    if ref is not None and steps > 1:
        batch = ref.shape[0]
        for name in BATCHED_INPUTS:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                kwargs[name] = value.repeat(steps, *([1] * (value.dim() - 1)))
    if state.family.causal:
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(base.config, "use_cache", False)
        if cache is None and use_cache:
            kwargs["past_key_values"] = SpikeCodeCache(state.attentions(), steps)
        elif cache is not None and not is_spike_cache(cache):
            from transformers.cache_utils import DynamicCache

            if type(cache) is not DynamicCache:
                raise ValueError(
                    f"a spiking model caches spike codes and cannot use a {type(cache).__name__}; pass no cache "
                    "(generate() and use_cache=True make the spike-code cache) or an empty DynamicCache"
                )
            into_spike_cache(cache, state.attentions(), steps)
    return (), kwargs


def _average_copies(x: torch.Tensor, steps: int) -> torch.Tensor:
    return x.view(steps, x.shape[0] // steps, *x.shape[1:]).mean(0)


def _average_output(module, args, output, steps):
    """Forward hook at the averaging site: the T copies -> their mean (the final norm's output, or the encoder's)."""
    if isinstance(output, torch.Tensor):
        return _average_copies(output, steps)
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return (_average_copies(output[0], steps), *output[1:])
    output["last_hidden_state"] = _average_copies(output["last_hidden_state"], steps)
    return output


def _leave_copies(base, args, output, steps):
    """Base-model hook: per-layer hidden states and attentions, returned (T*B, …), are averaged over the copies."""
    if steps == 1 or not hasattr(output, "keys"):
        return output
    batch = output["last_hidden_state"].shape[0]
    for name in ("hidden_states", "attentions"):
        states = output.get(name)
        if states is not None:
            output[name] = tuple(
                _average_copies(s, steps) if isinstance(s, torch.Tensor) and s.shape[0] == steps * batch else s
                for s in states
            )
    return output


@dataclass(frozen=True)
class PlacedNeuron:
    """One neuron in a converted model: its module name, its site kind, the linear layers reading its output."""

    name: str
    kind: str
    readers: tuple[str, ...]


class SpikingState:
    """What the hooks of one converted model share (kept on the model as ``model._spikelm``; not saved)."""

    def __init__(
        self,
        model: PreTrainedModel,
        family: Architecture,
        config: SpikeLMConversionConfig,
        handles: list,
        sites: list[PlacedNeuron],
    ):
        self.family, self.config, self.handles, self.sites = family, config, handles, sites
        self.steps = config.model_steps
        self.attention_implementation = model.config._attn_implementation  # restored by detach()
        self._attentions = [_get(layer, family.attention) for layer in _get(model.base_model, family.layers)]

    def attentions(self) -> list[nn.Module]:
        return self._attentions


def attach(model: PreTrainedModel, config: SpikeLMConversionConfig) -> PreTrainedModel:
    """Add the neurons (as submodules) and the hooks that run them; the model's weights are not touched."""
    family = family_of(model)
    check_generic_recipe(family, config)
    base = model.base_model
    entry = _get(base, family.entry)  # where the T copies enter and leave (the base model but for OPT-like models)
    steps = config.model_steps
    prefix = f"{model.base_model_prefix}." if base is not model else ""
    layers_path = f"{prefix}{family.layers}"
    skip = config.modules_to_not_convert
    if config.online_down_proj_rotation:  # rebuilt from its size and seed; the weights already hold the fold
        from .rotation import attach_online_down_proj_rotation

        kind = config.rotation if config.rotation != "none" else "hadamard"
        attach_online_down_proj_rotation(model, seed=config.rotation_seed + 1, kind=kind, fold=False)
    handles, sites = [], []
    for index, layer in enumerate(_get(base, family.layers)):
        block = f"{layers_path}.{index}"
        for site in family.sites:
            names = [f"{block}.{r}" for r in site.readers]
            if any(_skipped(n, skip) for n in names):
                continue
            host = _get(layer, site.host)
            readers = [_get(layer, r) for r in site.readers]
            width = reader_weight(readers[0]).shape[1]
            host.input_neuron = make_neuron(site.kind, config, width, [reader_weight(r) for r in readers])
            host_name = ".".join(p for p in (block, site.host) if p)
            sites.append(PlacedNeuron(f"{host_name}.input_neuron", site.kind, tuple(names)))
            if site.on_readers and len(readers) > 1:
                shared = _SharedSpikes(host, len(readers), steps)
                handles += [r.register_forward_pre_hook(shared, with_kwargs=True) for r in readers]
                handles.append(entry.register_forward_hook(shared.clear, always_call=True))  # a reader skipped
            else:
                handles.append(host.register_forward_pre_hook(partial(_spike_input, steps=steps), with_kwargs=True))
            routed = _read_spikes(readers)  # the few-row kernel at decoding steps (GIF: one row per token)
            handles += routed
            if not site.on_readers and len(routed) == len(readers):
                handles.append(_ReadAhead(host, readers))  # the neuron and its readers in one call at a decoding step
        attention = _get(layer, family.attention)
        if _skipped(f"{layers_path}.{index}.{family.attention}", skip):
            raise UserError(  # a conversion setting the user chose (spikify --set modules_to_not_convert=...)
                f"modules_to_not_convert names the attention module {family.attention!r}: K and V of a converted "
                "model are always spiked (the spike-code cache depends on it); skip its linear layers instead"
            )
        kv_channels = family.kv_channels or (_kv_heads(model.config), 1, _head_dim(model.config))
        attention.key_neuron = make_neuron("k", config, kv_channels, [])
        attention.value_neuron = make_neuron("v", config, kv_channels, [])
        sites += [PlacedNeuron(f"{block}.{family.attention}.{kind}_neuron", kind[0], ()) for kind in ("key", "value")]
        on_update = partial(_spike_kv_on_update, steps=steps, argument=family.cache_argument)
        handles.append(attention.register_forward_pre_hook(on_update, with_kwargs=True))
    handles += install_decode_step(_get(base, family.layers), family, steps, handles)
    state = SpikingState(model, family, config, handles, sites)
    _set_attention(model, SPIKING_ATTENTION)
    handles.append(entry.register_forward_pre_hook(partial(_enter_copies, state=state), with_kwargs=True))
    handles.append(_get(base, family.average_after).register_forward_hook(partial(_average_output, steps=steps)))
    handles.append(entry.register_forward_hook(partial(_leave_copies, steps=steps)))
    model._spikelm = state
    return model


def _set_attention(model: PreTrainedModel, name: str | None) -> None:
    """Set the model's attention implementation (every family spikify supports calls transformers'
    ``AttentionInterface``; see :mod:`spikelm.conversion.attention`)."""
    if name is None or model.config._attn_implementation == name:
        return
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"spikify needs {type(model).__name__} to call transformers' AttentionInterface (its attention must be "
            "replaceable so that every path computes the same codes)"
        )
    model.set_attn_implementation(name)


def placement(model: PreTrainedModel) -> list[PlacedNeuron]:
    """Every neuron ``spikify`` placed in ``model``, in forward order, with its kind and the layers it feeds
    (names as in ``model.named_modules()``; for energy counting and reports)."""
    state = getattr(model, "_spikelm", None)
    if state is None:
        raise ValueError(f"this {type(model).__name__} was not converted by spikify")
    return list(state.sites)


def detach(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`attach`: remove the hooks and the neurons; the weights stay as they are.

    A rotation folded into the weights (and its online part on the FFN's last linear input) stays: it is exact, so
    the model computes its real-valued function again. ``model.dequantize()`` calls this and drops the quantization
    config.
    """
    state = getattr(model, "_spikelm", None)
    if state is None:
        raise ValueError(f"this {type(model).__name__} was not converted by spikify")
    for handle in state.handles:
        handle.remove()
    _set_attention(model, state.attention_implementation)
    for name, _ in neurons(model):
        parent, _, attr = name.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, attr)
    del model._spikelm
    return model


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def neurons(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, neuron)`` for every neuron spikify placed, in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("input_neuron", "key_neuron", "value_neuron")
    ]
