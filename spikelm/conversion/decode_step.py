"""A converted decoder block's decoding step as one function: the same operations as the block's modules and hooks,
without their per-call cost (docs/BENCHMARKS.md, "Fast decoding of the signed default").

At a decoding step (one new token per row) a converted LLaMA-layout block runs ~20 module calls and 7 hooks around
a few C++ calls (the neurons with their readers, the K/V cache step, the attention, the online Hadamard): on a
2-core CPU that glue is about a tenth of the step. :func:`install` replaces each block's ``forward`` by
:func:`block_forward`, which runs :class:`BlockStep` where it computes exactly what the modules would, and the
block's own forward everywhere else. :class:`BlockStep` calls the same functions in the same order (the norms, the
activation and the online rotation as the modules themselves; the neurons and their readers through
:func:`read_site`, which the modules' hooks call too; the rotary embedding, the cache's ``update`` and the attention
function the attention module calls), so its output is the modules' bit for bit (tests/test_fast_decoding.py).

It runs only where nothing would differ:

* the block's description says its forward is the pre-norm, gated-MLP block this step mirrors (``decode_step`` of
  :class:`~spikelm.conversion.architectures.Architecture`: LLaMA, Mistral, Qwen2), and spikify's hooks are the
  only ones on the modules it bypasses (the attention, the MLP, the linears, the hosts; the rotation's pre-hook on
  the FFN's last linear is run as the hook would), none registered for every module, and the readers' ``forward``
  is still the one spikify set;
* a decoding step: one position per row, a spike-code cache, the rotary embedding given, spikelm's attention
  implementation, not training;
* the switch is on: ``$SPIKELM_DECODE_STEP`` (1, the default; 0 runs the modules), :func:`forced` in code.

Everything else (a prefill, a hook of the user's, another attention implementation, ``use_cache=False``) runs the
block's own forward, as it did before.

Asking every dispatcher its questions at every step (each neuron's ``value_plan``, ``linears_kernel`` for each
weight, the norm, rotary, Hadamard and attention dispatchers) cost as much as the rest of the glue, so the step keeps
a :class:`_Plan`: the answers, resolved once (:meth:`BlockStep.resolve`, on inputs of the step's shapes, dtypes and
device) and kept while nothing they read has changed (:meth:`_Plan.holds`: the switches, grad mode, threads, the
input's rows / dtype / device, the same float32 CPU contiguous weights, no attribute assigned on any spiking neuron
since (:func:`~spikelm.nn.neurons.base.state_epoch`) and the same ``plan_stamp``, no hooks, the same rotation); then
:meth:`BlockStep.planned` calls the compiled functions themselves with them. Where a piece would not take its C++
kernel there is no plan and the step calls the functions as above.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..nn import cpu_kernels
from ..nn.kernels import (
    CPP,
    attention_kernel,
    attention_order,
    cpp_on,
    environment_switch,
    linears_kernel,
    max_rows,
    norm_kernel,
    rotary_kernel,
    rotation_kernel,
    rotation_loops,
    spike_linear,
)
from ..nn.neurons.base import SpikingNeuron, global_hooks, state_epoch
from .attention import NAME as SPIKING_ATTENTION
from .attention import decoding_attention, spiking_attention, unsupported
from .cache import is_spike_cache
from .rotation import OnlineHadamard, _online_operands, _rotate_input_pre_hook

ENV_VAR = "SPIKELM_DECODE_STEP"
_override: list = [None]


def set_enabled(flag: bool | None) -> None:
    """Turn the blocks' decoding step on or off for this process; ``None``: follow ``$SPIKELM_DECODE_STEP``."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects True, False or None, got {flag!r}")
    _override[0] = flag


@contextlib.contextmanager
def forced(flag: bool | None):
    """The decoding step switched on (True) or off (False) inside the block; None leaves the switch as it is."""
    before = _override[0]
    if flag is not None:
        set_enabled(flag)
    try:
        yield
    finally:
        _override[0] = before


_seen: list = [object(), True]  # (the environment's raw value, whether it says on)


def enabled() -> bool:
    """Whether the decoding step may run (the switch; a bad value of the variable is a :class:`UserError`, read with
    the kernel switches' rule: 1 / 0, true / false, yes / no, on / off)."""
    if _override[0] is not None:
        return _override[0]
    raw = os.environ.get(ENV_VAR)
    if raw is not _seen[0] and raw != _seen[0]:
        _seen[:] = [raw, environment_switch(ENV_VAR)]
    return _seen[1]


# ----------------------------------------------------------------------------------------------
# A neuron and the linears reading its spikes (the hooks' function too)
# ----------------------------------------------------------------------------------------------


def read_site(
    neuron: nn.Module, x: torch.Tensor, steps: int, weights: list[torch.Tensor], biases: list
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``(spikes, outputs)``: ``neuron`` on ``x`` and, where they run in one C++ call, the linears (``weights``,
    ``biases``) reading those spikes: the neuron's pass and all the linears in one call where its value is that one
    pass (:meth:`~spikelm.nn.neurons.base.SpikingNeuron.value_plan`; ``token_values_linears``), else the neuron
    called as usual and, for two or more readers, their few-row linears in one call. ``outputs`` None: each reader
    computes its own (:func:`~spikelm.nn.kernels.spike_linear`). The same functions as one by one: the same bits."""
    plan = neuron.value_plan(x) if steps == 1 else None
    if plan is not None and linears_kernel(x, weights, biases) == CPP:
        return cpu_kernels.token_values_linears(x, plan, weights, biases)
    spikes = neuron.spike_folded(x, steps)
    if len(weights) < 2 or linears_kernel(spikes, weights, biases) != CPP:
        return spikes, None
    return spikes, cpu_kernels.few_rows_linears(spikes, weights, biases)


class _Site:
    """One input site of a block: its host (whose ``input_neuron`` spikes the input), its readers, and whether the
    host's pre-hooks rotate the input first (the online Hadamard of the FFN's last linear)."""

    def __init__(self, layer: nn.Module, site, rotated: bool):
        self.host = layer.get_submodule(site.host)
        self.readers = [layer.get_submodule(r) for r in site.readers]
        self.rotated = rotated
        if not isinstance(self.host.input_neuron, nn.Module) or (rotated and self.host.online_rotation is None):
            raise TypeError("not a converted site")

    def outputs(self, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
        host, readers = self.host, self.readers
        if self.rotated:
            x = host.online_rotation(x)
        weights, biases = [r.weight for r in readers], [r.bias for r in readers]
        spikes, outs = read_site(host.input_neuron, x, steps, weights, biases)
        if outs is None:
            outs = [spike_linear(spikes, w, b) for w, b in zip(weights, biases, strict=True)]
        return outs


def _same_code(function, reference) -> bool:
    """Whether ``function`` is ``reference`` or a copy of its source (transformers copies LLaMA's norm and rotary
    embedding into each family's module): the C++ mirrors are taken only for that code."""
    try:
        return function is reference or inspect.getsource(function) == inspect.getsource(reference)
    except (OSError, TypeError):
        return False


def _llama_reference():
    from transformers.models.llama import modeling_llama

    return modeling_llama


_F32, _F64 = torch.float32, torch.float64
_UNSET = object()  # a plan's attention order not asked yet


class _Plan:
    """What one block's decoding step calls, resolved once by the dispatchers (:meth:`BlockStep.resolve` asks each
    the question the modules' path asks at every call) and kept while nothing those answers read has changed
    (:meth:`holds`): the switches, the grad mode and thread count, the rows, dtype and device of the input and of
    cos / sin, the weights (the same tensors, float32, on the CPU, contiguous), the neurons (no attribute assigned
    since, :func:`~spikelm.nn.neurons.base.state_epoch`; the same :meth:`plan_stamp`; no hooks), the rotation."""

    __slots__ = (
        "epoch",
        "rows",
        "threads",
        "cos_shape",
        "sites",
        "params",
        "tensors",
        "weights",
        "neurons",
        "rotation",
        "rotation_key",
        "hadamard",
        "order",
    )

    def holds(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        if self.epoch != state_epoch() or torch.is_grad_enabled() or not cpp_on():
            return False
        if hidden_states.shape[0] != self.rows or hidden_states.dtype is not _F32 or not hidden_states.is_cpu:
            return False
        if self.rows > max_rows() or torch.get_num_threads() != self.threads:
            return False
        if cos.shape != self.cos_shape or sin.shape != self.cos_shape or cos.dtype is not _F32 or sin.dtype is not _F32:
            return False
        if not (cos.is_cpu and sin.is_cpu):
            return False
        for module, name, tensor in self.params:
            if module._parameters.get(name) is not tensor:
                return False
        for tensor in self.tensors:
            if tensor.dtype is not _F32 or not tensor.is_cpu:
                return False
        for weight in self.weights:
            if not weight.is_contiguous():
                return False
        for host, neuron, stamp in self.neurons:
            if host._modules.get("input_neuron") is not neuron or neuron._forward_hooks or neuron._forward_pre_hooks:
                return False
            if neuron.plan_stamp() != stamp:
                return False
        rotation = self.rotation
        if rotation is not None:
            host, module = rotation
            if host._modules.get("online_rotation") is not module or module._forward_hooks or "forward" in vars(module):
                return False
            if module._forward_pre_hooks or (module.kind, module.size, module.seed) != self.rotation_key:
                return False
        return True


class BlockStep:
    """The decoding step of one pre-norm block with a gated MLP (``h += o(attn(n1(h))); h += down(act(gate(n2(h)))
    * up(n2(h)))``), as the block's modules compute it; :meth:`runs` says where it may replace them."""

    def __init__(self, layer: nn.Module, family, steps: int, ours: set[int], readers_forward: dict):
        sites = {s.kind: s for s in family.sites}
        self.steps = steps
        self.attention = layer.get_submodule(family.attention)
        self.norm1 = layer.get_submodule(sites["qkv_input"].norm)
        self.norm2 = layer.get_submodule(sites["gate_up_input"].norm)
        self.qkv = _Site(layer, sites["qkv_input"], False)
        self.o = _Site(layer, sites["o_input"], False)
        self.gate_up = _Site(layer, sites["gate_up_input"], False)
        down_host = layer.get_submodule(sites["down_input"].host)
        self.down = _Site(layer, sites["down_input"], _rotate_input_pre_hook in down_host._forward_pre_hooks.values())
        self.mlp = self.gate_up.host
        module = sys.modules[type(self.attention).__module__]
        self.rotary = module.apply_rotary_pos_emb
        llama = _llama_reference()
        # the C++ mirrors of LLaMA's RMSNorm and rotary embedding, where the block runs that very code
        self.mirror_rotary = _same_code(self.rotary, llama.apply_rotary_pos_emb) and _same_code(
            getattr(module, "rotate_half", None), llama.rotate_half
        )
        self.mirror_norms = all(
            _same_code(type(n).forward, llama.LlamaRMSNorm.forward) and isinstance(n.variance_epsilon, float)
            for n in (self.norm1, self.norm2)
        )
        # the modules the step does not call, each with the pre-hooks it may carry (spikify's, the rotation's)
        bypassed = {id(m): m for m in (self.attention, self.mlp, *self.qkv.readers, *self.o.readers)}
        if self.mirror_norms:  # not called either: their hooks would not run
            bypassed.update({id(m): m for m in (self.norm1, self.norm2)})
        bypassed.update({id(m): m for m in (*self.gate_up.readers, *self.down.readers, self.down.host)})
        self.guard = [
            (m, tuple(k for k, hook in m._forward_pre_hooks.items() if k in ours or hook is _rotate_input_pre_hook))
            for m in bypassed.values()
        ]
        self.readers_forward = [(r, readers_forward[id(r)]) for s in self.sites() for r in s.readers]
        self.plan: _Plan | None = None  # the step's resolved calls (resolve), kept while they hold

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        state["plan"] = None  # a copy resolves its own
        return state

    def resolve(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> _Plan | None:
        """The plan of this step for ``hidden_states`` (B, 1, C) and ``cos`` / ``sin``: each dispatcher asked once, on
        inputs of those shapes, dtypes and device, the question the modules' path asks at every call; None where any
        piece would not take its C++ kernel (the norms, each neuron with its readers, the rotary embedding, the online
        Hadamard) or the block's step has more than one time step per token."""
        if self.steps != 1 or not (self.mirror_norms and self.mirror_rotary) or torch.is_grad_enabled():
            return None
        for site in self.sites():  # a neuron without a value plan (GIF, elastic): no plan, asked cheaply first
            if getattr(type(site.host.input_neuron), "value_plan", None) in (None, SpikingNeuron.value_plan):
                return None
        rows, norms = hidden_states.shape[0], (self.norm1, self.norm2)
        if any(norm_kernel(hidden_states, norm.weight) != CPP for norm in norms):
            return None
        plan = _Plan()
        plan.epoch, plan.rows, plan.threads, plan.cos_shape = state_epoch(), rows, torch.get_num_threads(), cos.shape
        plan.params = [(norm, "weight", norm.weight) for norm in norms]
        plan.sites, plan.neurons, plan.rotation, plan.hadamard, plan.order = [], [], None, None, _UNSET
        for site in self.sites():
            host, width = site.host, site.readers[0].weight.shape[1]
            probe = hidden_states.new_empty((rows, 1, width))
            if site.rotated:
                module = host.online_rotation
                if type(module) is not OnlineHadamard or "forward" in vars(module) or module.size != width:
                    return None
                if module._forward_hooks or module._forward_pre_hooks or rotation_kernel(probe) != CPP:
                    return None
                signs, mats = _online_operands(module.kind, module.size, module.seed, probe.device, _F64)
                if signs is None:
                    return None
                plan.rotation, plan.rotation_key = (host, module), (module.kind, module.size, module.seed)
                plan.hadamard = (signs, mats, rotation_loops(probe, signs, mats))
            neuron = host.input_neuron
            weights, biases = [r.weight for r in site.readers], [r.bias for r in site.readers]
            values = neuron.value_plan(probe)
            if values is None or linears_kernel(probe, weights, biases) != CPP:
                return None
            plan.sites.append((values, weights, biases))
            plan.neurons.append((host, neuron, neuron.plan_stamp()))
            plan.params += [(r, "weight", r.weight) for r in site.readers]
            plan.params += [(r, "bias", r.bias) for r in site.readers]
        plan.tensors = [t for _, _, t in plan.params if t is not None]
        plan.weights = [t for _, name, t in plan.params if name == "weight"]
        heads = (
            plan.sites[0][1][0].shape[0] // self.attention.head_dim,
            plan.sites[0][1][1].shape[0] // self.attention.head_dim,
        )
        probe_q = hidden_states.new_empty((rows, heads[0], 1, self.attention.head_dim))
        probe_k = hidden_states.new_empty((rows, heads[1], 1, self.attention.head_dim))
        if rotary_kernel(probe_q, probe_k, cos, sin) != CPP:
            return None
        return plan

    def norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.mirror_norms and norm_kernel(x, norm.weight) == CPP:
            return cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
        return norm(x)

    def sites(self) -> tuple[_Site, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    def clean(self) -> bool:
        """Whether the bypassed modules carry exactly the hooks the step runs itself, and the readers the forward
        spikify set."""
        for module, pre in self.guard:
            if module._forward_hooks or tuple(module._forward_pre_hooks) != pre:
                return False
        for reader, forward in self.readers_forward:
            if reader.__dict__.get("forward") is not forward:
                return False
        return not global_hooks()

    def runs(self, layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> bool:
        cache = kwargs.get("past_key_values")
        return (
            hidden_states.dim() == 3
            and hidden_states.shape[1] == 1
            and cache is not None
            and kwargs.get("position_embeddings") is not None
            and not layer.training
            and self.attention.config._attn_implementation == SPIKING_ATTENTION
            and enabled()
            and is_spike_cache(cache)
            and self.clean()
        )

    def __call__(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cos, sin = position_embeddings
        plan = self.plan
        if plan is None or not plan.holds(hidden_states, cos, sin):
            plan = self.plan = self.resolve(hidden_states, cos, sin)
        if plan is not None:
            return self.planned(
                plan, hidden_states, cos, sin, attention_mask, position_ids, past_key_values, use_cache, kwargs
            )
        attention, steps = self.attention, self.steps
        lead = hidden_states.shape[:-1]
        residual = hidden_states
        q, k, v = self.qkv.outputs(self.norm(self.norm1, hidden_states), steps)
        shape = (*lead, -1, attention.head_dim)
        q, k, v = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
        if self.mirror_rotary and rotary_kernel(q, k, cos, sin) == CPP:
            q, k = cpu_kernels.rotary_embedding(q, k, cos, sin)
        else:
            q, k = self.rotary(q, k, cos, sin)
        k, v = past_key_values.update(k, v, attention.layer_idx)
        out = self.attend(
            ALL_ATTENTION_FUNCTIONS[SPIKING_ATTENTION], q, k, v, attention_mask, position_ids, use_cache, kwargs
        )
        (o,) = self.o.outputs(out.reshape(*lead, -1).contiguous(), steps)
        hidden_states = residual + o
        residual = hidden_states
        gate, up = self.gate_up.outputs(self.norm(self.norm2, hidden_states), steps)
        (down,) = self.down.outputs(self.mlp.act_fn(gate) * up, steps)
        return residual + down

    def attend(self, function, q, k, v, attention_mask, position_ids, use_cache, kwargs) -> torch.Tensor:
        """The attention function called as the attention module calls it (no dropout at a decoding step)."""
        attention = self.attention
        out, _ = function(
            attention,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0,
            scaling=attention.scaling,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        return out

    def planned(
        self, plan: _Plan, hidden_states, cos, sin, attention_mask, position_ids, past_key_values, use_cache, kwargs
    ):
        """The step by the compiled functions themselves, with the arguments :meth:`resolve` found: the calls the
        dispatchers make on the modules' path (norm, neuron and readers, rotary embedding, the cache's ``update``,
        the attention, the online Hadamard), in the same order on the same tensors, so the same bits
        (tests/test_decode_step.py)."""
        run, attention, rows = cpu_kernels.direct(), self.attention, plan.rows
        (qkv, o, gate_up, down), dim = plan.sites, attention.head_dim
        residual = hidden_states
        x = run.rms_norm(hidden_states, self.norm1.weight, float(self.norm1.variance_epsilon))
        _, q, k, v = run.token_values_linears(x.view(rows, -1), *qkv[0], qkv[1], qkv[2])
        q = q.view(rows, 1, -1, dim).transpose(1, 2)
        k = k.view(rows, 1, -1, dim).transpose(1, 2)
        v = v.view(rows, 1, -1, dim).transpose(1, 2)
        q, k = run.rotary_embedding(q, k, cos, sin)
        k, v = past_key_values.update(k, v, attention.layer_idx)
        function = ALL_ATTENTION_FUNCTIONS[SPIKING_ATTENTION]
        if function is spiking_attention and not unsupported(kwargs) and attention_kernel(q, k, v) == CPP:
            if plan.order is _UNSET:  # the same shapes and threads at every step the plan holds
                plan.order = attention_order(q, k, v)
            out = decoding_attention(q, k, v, attention_mask, attention.scaling, kwargs.get("softcap"), plan.order)
        else:
            out = self.attend(function, q, k, v, attention_mask, position_ids, use_cache, kwargs)
        _, out = run.token_values_linears(out.reshape(rows, -1), *o[0], o[1], o[2])
        hidden_states = residual + out.view(rows, 1, -1)
        residual = hidden_states
        x = run.rms_norm(hidden_states, self.norm2.weight, float(self.norm2.variance_epsilon))
        _, gate, up = run.token_values_linears(x.view(rows, -1), *gate_up[0], gate_up[1], gate_up[2])
        x = self.mlp.act_fn(gate.view(rows, 1, -1)) * up.view(rows, 1, -1)  # the modules' shapes, (B, 1, C)
        if plan.hadamard is not None:
            x = run.online_hadamard(x, *plan.hadamard, False)
        _, out = run.token_values_linears(x.view(rows, -1), *down[0], down[1], down[2])
        return residual + out.view(rows, 1, -1)


def block_forward(layer: nn.Module, step: BlockStep, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A converted block's ``forward``: :class:`BlockStep` at a decoding step where it runs, else the block's own."""
    if not args and step.runs(layer, hidden_states, kwargs):
        return step(hidden_states, **kwargs)
    return type(layer).forward(layer, hidden_states, *args, **kwargs)


class _Installed:
    """The handle of a block whose ``forward`` is :func:`block_forward`: ``remove()``."""

    def __init__(self, layer: nn.Module, step: BlockStep):
        self.layer = layer
        layer.forward = partial(block_forward, layer, step)

    def remove(self) -> None:
        if "forward" in vars(self.layer):
            del self.layer.forward


def install(layers, family, steps: int, handles: list) -> list:
    """Give each block of ``layers`` the decoding step where its description offers it (``family.decode_step``) and
    spikify routed every reader (``handles``: the hooks and routes just attached); returns the new handles. A block
    whose ``forward`` another library already replaced (e.g. an offloading hook) keeps it."""
    if not family.decode_step:
        return []
    ours = {h.id for h in handles if isinstance(h, RemovableHandle)}
    readers_forward = {id(h.linear): vars(h.linear).get("forward") for h in handles if hasattr(h, "linear")}
    installed = []
    for layer in layers:
        if "forward" in vars(layer):
            continue
        try:
            step = BlockStep(layer, family, steps, ours, readers_forward)
        except (AttributeError, KeyError, TypeError):  # a site not converted (modules_to_not_convert), no act_fn
            continue
        if not hasattr(step.mlp, "act_fn"):
            continue
        installed.append(_Installed(layer, step))
    return installed
