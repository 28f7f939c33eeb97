"""The generic path: where to spike a decoder-only model whose ``model_type`` has no description of its own.

What spikify needs from an architecture (docs/CONVERSION.md, "Any other decoder-only model") is found from the model
itself, by one traced forward pass of a skeleton of the model built from its config on the meta device (no weights,
no arithmetic; the same skeleton at ``spikify`` and at ``from_pretrained``, so the result is deterministic):

* the decoder blocks: the ``nn.ModuleList`` of the base model with one entry per hidden layer;
* the linear inputs to spike: forward pre-hooks on every ``nn.Linear`` (and transformers' GPT-2-style ``Conv1D``)
  inside the blocks record the tensor each one reads; the linears that read the *same* tensor share one neuron (q, k
  and v; gate and up; in a parallel block such as Phi's or Cohere's, q/k/v and the MLP's first linear). The neuron
  lives on the readers' closest common module and is applied in the readers' own pre-hooks, once per tensor;
* K and V: the attention module is the module that receives the cache (``past_key_values``) and inside whose forward
  the cache's ``update(key, value, layer_idx)`` is called, once per block; its attention must go through
  transformers' ``AttentionInterface`` (spikelm's exact attention, :mod:`spikelm.conversion.attention`, replaces it);
* the LM head, the embeddings and anything outside the blocks stay real; the T copies are averaged on the base
  model's output. No rotation or smoothing (they need a family's norms described).

A model this cannot describe is refused with one ``ValueError`` line naming its ``model_type`` and why: an
encoder-decoder or cross-attention, mixture-of-experts blocks, no linear projections in the blocks, a model that
does not take ``past_key_values`` or whose layers do not hand K and V to the cache's ``update`` (Mamba, RWKV,
RecurrentGemma, linear-attention hybrids), attention that does not go through ``AttentionInterface``, blocks that
differ from one another.
"""

from __future__ import annotations

import copy
import inspect
import re
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

from ..attention import spiking_attention
from .base import Architecture, InputSite

TRACE_ATTENTION = "spikelm_trace"  # the attention implementation of the traced skeleton: spikelm's, counted
TRACE_TOKENS = 4
# config fields that announce routed experts (a router is a linear that must stay real; experts are not nn.Linear)
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
# module classes of routed experts (transformers' names: MixtralSparseMoeBlock, Qwen2MoeExperts, GptOssRouter, ...)
EXPERT_CLASSES = re.compile(r"Expert|MoE|Moe|Router")
LINEAR_TYPES = (nn.Linear, Conv1D)


DESCRIPTION = "decoder without a description of its own, traced by the generic path"
ROTATION_NOTICE = "it converts through the generic path: its norms are not described"


def _refuse(model_type, why: str) -> ValueError:
    return ValueError(f"spikify cannot convert model_type {model_type!r} through the generic path: {why}")


def describe(model: nn.Module) -> Architecture:
    """The generic description of ``model`` (a transformers decoder-only model), or ``ValueError`` saying why not.

    Every site is spiked in its readers' pre-hooks (``InputSite.on_readers``); the ``entry`` module repeats the
    inputs T times and its output is averaged; K and V are spiked where ``attention`` receives the cache (under the
    keyword ``cache_argument``), with the (H_kv, 1, d) channels the trace saw. Kept on the model after the first call.
    """
    known = vars(model).get("_spikelm_architecture")
    if isinstance(known, Architecture):
        return known
    architecture = _describe(model)
    model._spikelm_architecture = architecture
    return architecture


def _describe(model: nn.Module) -> Architecture:
    if not isinstance(model, PreTrainedModel):
        raise ValueError(  # noqa: TRY004  (an unsupported model like any other: ValueError)
            f"spikify expects a loaded transformers model (a PreTrainedModel); got a {type(model).__name__}"
        )
    config = model.config
    model_type = getattr(config, "model_type", None)
    check_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "past_key_values" not in inspect.signature(model.base_model.forward).parameters:
        raise _refuse(
            model_type, "it takes no past_key_values (a custom or recurrent cache: K and V are never handed to a cache)"
        )
    if not model._can_set_attn_implementation():
        raise _refuse(model_type, "its attention does not go through transformers' AttentionInterface")
    return _trace(model, model_type, text)


def check_config(config) -> None:
    """What the config alone rules out (before any weight loads): ``ValueError`` naming the model_type and why."""
    model_type = getattr(config, "model_type", None)
    if model_type == "spikelm":
        raise _refuse(model_type, "it is a native SpikeLM, spiking already")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        raise _refuse(model_type, "it is an encoder-decoder model (decoder-only models only)")
    if text is not config:
        raise _refuse(
            model_type,
            f"it is a composite (e.g. multimodal) model; convert its language model ({text.model_type!r}) on its own",
        )
    if getattr(text, "add_cross_attention", False):
        raise _refuse(model_type, "its blocks have cross-attention (decoder-only models only)")
    experts = [f for f in EXPERT_FIELDS if isinstance(getattr(text, f, None), int) and getattr(text, f) > 1]
    if experts:
        raise _refuse(model_type, f"it has mixture-of-experts blocks ({experts[0]}={getattr(text, experts[0])})")


def _skeleton(model: PreTrainedModel) -> PreTrainedModel:
    """A weightless copy of ``model`` from its config (the meta device), with the tracing attention."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = type(model)(config)
    skeleton.set_attn_implementation(TRACE_ATTENTION)
    return skeleton.eval()


def _blocks(base: nn.Module, layers: int, model_type) -> tuple[str, nn.ModuleList]:
    """The ModuleList of ``layers`` blocks holding linear layers (the first in module order)."""
    found = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == layers > 0]
    for name, module in found:
        if any(isinstance(m, LINEAR_TYPES) for m in module.modules()):
            return name, module
    if found:
        raise _refuse(model_type, "its decoder blocks have no nn.Linear projections to spike")
    raise _refuse(model_type, f"no list of its {layers} decoder blocks was found in the base model")


class _TraceCache(DynamicCache):
    """A ``DynamicCache`` that notes each ``update``: the layer index, K and V's shapes, and the innermost module
    running at the time that received this cache."""

    def __init__(self, tracer, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracer = tracer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.tracer.updates.append(
            (layer_idx, tuple(key_states.shape), tuple(value_states.shape), self.tracer.receiver(), self.tracer.calls)
        )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class _Tracer:
    """The hooks of one traced forward."""

    def __init__(self, base: nn.Module, block_path: str, blocks: nn.ModuleList):
        self.names = {m: n for n, m in blocks.named_modules()}  # "i.rest" relative to the ModuleList
        self.entries = []  # the blocks' ancestors (from the base model) run with the input ids, in call order
        self.reads = []  # (name, input tensor, call number)
        self.calls = 0
        self.stack = []  # (name, received the cache)
        self.updates = []
        self.attention_modules = []
        self.cache = None
        self.handles = []
        for module in blocks.modules():
            self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._leave, always_call=True))
            if isinstance(module, LINEAR_TYPES):
                self.handles.append(module.register_forward_pre_hook(self._read, with_kwargs=True))
        parts = block_path.split(".")
        for depth in range(len(parts)):
            path = ".".join(parts[:depth])
            hook = partial(self._entered, path)
            self.handles.append(base.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))

    def _entered(self, path, module, args, kwargs):
        keywords = _positional_names(module.forward)
        given = {**dict(zip(keywords, args, strict=False)), **kwargs}
        if given.get("input_ids") is not None or given.get("inputs_embeds") is not None:
            self.entries.append(path)

    def _enter(self, module, args, kwargs):
        keyword = next((k for k, v in kwargs.items() if v is self.cache and v is not None), None)
        received = keyword is not None or any(a is self.cache for a in args)
        self.stack.append((self.names[module], received, keyword))

    def _leave(self, module, args, output):
        self.stack.pop()

    def _read(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.reads.append((self.names[module], x, self.calls))
        self.calls += 1

    def receiver(self):
        for name, received, keyword in reversed(self.stack):
            if received:
                return name, keyword
        return None, None

    def attention_call(self, module) -> None:
        self.attention_modules.append(self.names.get(module))

    def remove(self):
        for handle in self.handles:
            handle.remove()


_ACTIVE: list[_Tracer] = []


def _traced_attention(module, query, key, value, attention_mask, **kwargs):
    if _ACTIVE:
        _ACTIVE[-1].attention_call(module)
    return spiking_attention(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(TRACE_ATTENTION, _traced_attention)
AttentionMaskInterface.register(TRACE_ATTENTION, sdpa_mask)


def _common(names: list[str]) -> str:
    """The closest common module of ``names`` (dotted paths relative to a block; "" for the block)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _relative(name: str) -> tuple[int, str]:
    index, _, rest = name.partition(".")
    return int(index), rest


def _trace(model: PreTrainedModel, model_type, text) -> Architecture:
    layers = getattr(text, "num_hidden_layers", None)
    skeleton = _skeleton(model)
    base = skeleton.base_model
    block_path, blocks = _blocks(base, layers or 0, model_type)
    routed = next((m for m in blocks.modules() if EXPERT_CLASSES.search(type(m).__name__)), None)
    if routed is not None:
        raise _refuse(model_type, f"it has mixture-of-experts blocks ({type(routed).__name__})")
    tracer = _Tracer(base, block_path, blocks)
    cache = _TraceCache(tracer, config=skeleton.config)
    tracer.cache = cache
    ids = torch.zeros(1, TRACE_TOKENS, dtype=torch.long, device="meta")
    _ACTIVE.append(tracer)
    try:
        skeleton(input_ids=ids, past_key_values=cache, use_cache=True)  # as a user calls it (OPT skips its base)
    except NotImplementedError as err:
        raise _refuse(model_type, f"its attention needs what spikelm's does not compute ({err})") from None
    except Exception as err:  # noqa: BLE001  (any failure of the traced forward: refused in one line)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _refuse(model_type, f"its traced forward failed ({type(err).__name__}: {first[:200]})") from None
    finally:
        _ACTIVE.pop()
        tracer.remove()
    return _analyse(model_type, block_path, layers, tracer)


def _positional_names(forward) -> tuple[str, ...]:
    parameters = inspect.signature(forward).parameters.values()
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _analyse(model_type, block_path: str, layers: int, tracer: _Tracer) -> Architecture:
    if not tracer.entries:
        raise _refuse(model_type, "no module of its base model runs the decoder blocks with the input ids")
    entry = max(tracer.entries, key=len)  # the innermost: where the T copies enter and are averaged
    reads = [(name, x, call) for name, x, call in tracer.reads if "." in name]
    if not reads:
        raise _refuse(model_type, "its decoder blocks have no nn.Linear projections to spike")
    # K and V: one cache update per block, from the same module of every block
    if len(tracer.updates) != layers:
        raise _refuse(
            model_type,
            f"{len(tracer.updates)} of its {layers} blocks hand K and V to the cache's update (recurrent or "
            "linear-attention layers, a custom cache or layers sharing K/V; every block must, once)",
        )
    attention, argument, updates_at, kv_shapes = None, None, {}, set()
    for _layer_idx, key_shape, value_shape, (receiver, keyword), call in tracer.updates:
        if receiver is None or "." not in receiver or keyword is None:
            raise _refuse(model_type, "its cache update is not called from a module given the cache by keyword")
        index, rel = _relative(receiver)
        if attention not in (None, rel) or argument not in (None, keyword) or index in updates_at:
            raise _refuse(model_type, "its blocks hand K and V to the cache from different modules")
        attention, argument, updates_at[index] = rel, keyword, call
        if key_shape != value_shape:
            raise _refuse(model_type, f"its K and V differ in shape ({key_shape} and {value_shape})")
        kv_shapes.add(key_shape)
    if len(kv_shapes) != 1:
        raise _refuse(model_type, f"its layers hand K and V of different shapes to the cache ({sorted(kv_shapes)})")
    ((_, kv_heads, _, head_dim),) = kv_shapes
    seen = [name for name in tracer.attention_modules if name is not None]
    if len(seen) != layers or any(_relative(name)[1] != attention for name in seen):
        raise _refuse(model_type, "its attention does not go through transformers' AttentionInterface in every block")
    # the linear inputs: readers of one tensor share one neuron
    per_block: dict[int, list] = {i: [] for i in range(layers)}
    for name, x, call in reads:
        index, rel = _relative(name)
        groups = per_block[index]
        for group in groups:
            if group[0] is x:
                group[1].append(rel)
                break
        else:
            groups.append([x, [rel], call])
    structures = set()
    for index, groups in per_block.items():
        names = [r for _, readers, _ in groups for r in readers]
        if len(names) != len(set(names)):
            raise _refuse(model_type, "a linear layer of its blocks runs more than once per forward pass")
        structures.add(tuple((tuple(readers), call < updates_at[index]) for _, readers, call in groups))
    if len(structures) != 1:
        raise _refuse(model_type, "its decoder blocks differ in their linear layers (one description fits them all)")
    structure = next(iter(structures))
    sites, hosts, mlp_seen = [], set(), False
    inside = attention + "."
    for readers, before_update in structure:
        in_attention = [r.startswith(inside) for r in readers]
        if any(in_attention) and before_update:
            kind = "qkv_input"  # (with the MLP's first linear too in a parallel block such as Phi's)
        elif all(in_attention):
            kind = "o_input"
        else:
            kind = "down_input" if mlp_seen else "gate_up_input"
        mlp_seen = mlp_seen or not all(in_attention)
        host = _common(list(readers)) if len(readers) > 1 else readers[0]
        if host in hosts:  # two inputs meet in one module: the neuron lives on the first reader instead
            host = readers[0]
        hosts.add(host)
        sites.append(InputSite(kind, host, tuple(readers), on_readers=True))
    return Architecture(
        model_type,
        block_path,
        attention,
        tuple(sites),
        average_after=entry,
        causal=True,
        embeddings="",
        online_rotation=False,
        rotation_notice=ROTATION_NOTICE,
        description=DESCRIPTION,
        entry=entry,
        cache_argument=argument,
        kv_channels=(kv_heads, 1, head_dim),
        generic=True,
    )
