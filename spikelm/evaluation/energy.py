"""Energy estimate of a spiking model from the spikes it actually emits (SPEC section 6).

    E = E_AC x ACs + E_MAC x MACs          E_AC = 0.9 pJ, E_MAC = 4.6 pJ (45 nm; configurable)

A forward pass is run with hooks on the model's modules (by type, not by path), so the same counting
serves any model built from these pieces: the encoder family and the causal decoder alike.

What is counted, per step t, over real (non-padding) tokens only:

* ``W s_t`` of a :class:`~spikelm.nn.layers.SpikeLinear` (the spike is the input): every nonzero spike of
  either sign is added into each of the layer's outputs, so ACs = nonzero inputs x ``out_features``;
  then one multiplication by alpha_t per output: MACs = real tokens x ``out_features`` (none when
  ``use_amplitude=False``: the spikes are then +-1).
* ``Q K^T`` with ternary K (``key_spike``; Q real): score[i, j] = sum_c Q[i, c] K[j, c], so a nonzero
  K[j, c] adds +-Q[i, c] into the score of every query i that attends to key j. ACs = nonzero K
  entries x fan-out, fan-out(j) = number of real queries attending to j (all real tokens for the
  bidirectional encoder; those at or after j under a causal mask). MACs = one alpha per score.
* ``P V`` with ternary V (``value_spike``; P real): context[i, c] = sum_j P[i, j] V[j, c], so a nonzero
  V[j, c] adds +-P[i, j] into context[i, c] for every query i attending to j: the same fan-out as K.
  MACs = one alpha per context output (real queries x width).
* Every other matrix product is real-valued: MACs = rows x in x out for a linear layer, pairs x width
  for Q K^T and P V.

The headline total (the paper's convention) is the matrix products inside the Transformer blocks
(all their linear layers, Q K^T and P V), per sequence, summed over the T steps. Embeddings (lookups)
are excluded; linear layers outside the blocks (pooler, heads) are reported separately. Softmax,
LayerNorm, activation functions and the 1/sqrt(d) score scaling are reported as element counts,
outside the total; bias and residual additions are not counted. The ANN figure is the same products
run once on real-valued inputs (independent of T).

Converted models (``spikelm.spikify``) and their real-valued sources (every architecture described in
``spikelm.conversion.architectures``) are counted by the same counter, from the description and the placement
(``spikelm.conversion.placement``) instead of SpikeLM's own layer types:

* every linear layer fed by a placed neuron: ACs = sum over the steps of |spike level| x out_features (a ternary
  spike is one AC, a GIF spike of level k is k ACs: the sum of a channel's levels over the steps is its integer
  code); MACs: elastic, one alpha multiply per output and step; GIF, per token and output one multiply per scale
  (2 with saliency and per-group ranges, else 1) and one zero-point multiply-accumulate per channel group (2 with
  saliency, else 1; the weights' row sums are constants); with ranges per G channels (``gif_group_size``), one
  scale multiply and one zero-point term per range group: ``ceil(salient / G) + ceil(others / G)`` of each;
* Q K^T and P V with spiking K / V: ACs = sum of the key's (value's) levels x fan-out (the real queries attending
  that key, times the query heads sharing its key/value head); MACs: elastic, one alpha per score (Q K^T) or per
  context output (P V) and step; GIF, per score (Q K^T) and per query-key pair and head (P V, where P is first
  scaled by each key's scale) one multiply per scale and one per zero point, and the zero-point term of Q K^T needs
  the row sums of Q (head_dim ACs per query and head);
* everything real-valued as MACs: linear layers not fed by a neuron (the LM head, any skipped layer), the online
  Hadamard on the FFN's last linear input (size x sum of its factor sizes per row), norms, softmax and activations
  (one MAC per element, in the whole-model total only).

``whole_model`` adds the heads and the element-wise operations (as MACs) to the headline, spike generation included
(one operation per channel-step slot a neuron runs: the code's multiply, the membrane's subtract).

Beside these figures at ``constants`` (the headline's, default 32-bit float), every summary carries:

* ``precisions``: both models at the same weight precision, fp32, bf16 and int8 (Horowitz's 45 nm add and
  multiply-add, :data:`~spikelm.evaluation.energy_constants.PRECISIONS`; an AC of the spiking model adds a weight of
  the precision the real-valued model multiplies), per token, blocks and whole model, compute only and with memory;
* ``memory``: the weights read per token (batch-1 decoding, no reuse across tokens): every weight of a linear layer
  in the real-valued model; in the spiking model a linear fed by spikes reads only the rows of the input channels that
  fire at some step of that token (plus its bias, and a GIF reader the row sums of W its zero-point terms need);
  embedding rows and norm gains in the whole model (the same in both); priced at ``memory_pJ_per_bit`` x the
  precision's bits (docs/CONVERSION.md, Energy).

A decode step (one new token attending a filled cache, :func:`measure_decode_energy`) counts the spikes of every
cached key and value, as they are read again by the new query.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from spikelm.nn.layers import SpikeLinear
from spikelm.nn.neurons import SpikingNeuron, named_neurons

from .energy_constants import DEFAULT_CONSTANTS, MEMORY_PJ_PER_BIT, MEMORY_SOURCE, PRECISIONS, EnergyConstants

FORMULA = "E = E_AC x ACs + E_MAC x MACs"
CONVENTION = (
    "headline = the matrix products inside the Transformer blocks (every linear layer, Q K^T, P V), per sequence, "
    "summed over the T time steps, real tokens only; ACs of a product with a spiking operand = nonzero spikes "
    "(either sign) x fan-out, plus one MAC per output and step for the alpha scaling; embeddings excluded; "
    "pooler and heads reported separately; softmax, LayerNorm, activations and the 1/sqrt(d) score scaling "
    "reported as element counts outside the total; bias and residual additions not counted"
)
ELEMENTWISE_OPS = ("softmax", "score_scaling", "layernorm", "activation", "spike_generation")
READ_KINDS = ("embedding", "norm")
CONVERTED_CONVENTION = (
    "; a transformers model (converted or its real-valued source): the operands come from the placed neurons, a "
    "spike of level k counts k ACs per fan-out (GIF; ternary: 1), a GIF reader adds per output one MAC per scale and "
    "per zero point, K/V spikes are read by every query attending them (x the query heads per K/V head), the online "
    "Hadamard counts as MACs, a token a neuron passes real-valued (signed outlier tokens) costs its readers fan-in x "
    "fan-out MACs (docs/CONVERSION.md, Energy)"
)
WHOLE_MODEL = (
    "whole model = headline + the products outside the blocks (LM head, pooler, classifier) + every element-wise "
    "operation (norms, softmax, score scaling, activations, spike generation: one per channel and step a neuron "
    "runs) counted as one MAC per element"
)
FIGURES = {
    "snn_mJ_per_sequence / ann_mJ_per_sequence (the headline)": "compute energy of the matrix products inside the "
    "Transformer blocks (every linear layer, Q K^T, P V), per sequence, at --ac-pj / --mac-pj (default 32-bit float)",
    "whole_model": "the headline plus the products outside the blocks (LM head, pooler, classifier) and every "
    "element-wise operation (norms, softmax, score scaling, activations, spike generation) as one MAC per element",
    "precisions": "both models at the same weight precision (fp32, bf16, int8; Horowitz's add and multiply-add "
    "energies for each), per token: blocks and whole_model (compute only, as above) and *_with_memory (plus every "
    "weight read, see memory)",
    "memory": "weights read per token (batch-1 decoding: no reuse across tokens) at pJ_per_bit x the precision's "
    "bits; a spiking linear skips the weight rows of the input channels that fire nothing at any step",
    "per_generated_token": "the same figures for one decode step after the window's other tokens are cached",
}
NOT_COUNTED = (
    "reads and writes of activations, spike codes and the KV cache (the memory figure is "
    "weights only); bias and residual additions; the exponentials, divisions and square roots inside softmax and "
    "norms beyond one MAC per element; the per-token range (max/min) the quantising neurons take; an int8 model's "
    "(re)quantisation multiplies, in either model; wider accumulators than the weight precision"
)
MEMORY_CONVENTION = (
    "weight reads per token: every weight of a linear layer (and its bias) once per token in the real-valued "
    "model; a linear layer fed by spikes reads the rows of the input channels that fire at some step (a channel that "
    "fires nothing at every step skips its row of out_features weights), its bias, and a GIF reader the row sums "
    "of W its zero-point terms need (one per zero-point group and output); embedding rows (one per token) and norm "
    "gains in the whole model, the same in both models; the online Hadamard is computed, not stored"
)
_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.Tanh, nn.SiLU, nn.Sigmoid, nn.Softmax)


def is_attention(module: nn.Module) -> bool:
    """A SpikeLM attention module: it has ``num_heads`` and the ``key_spike``/``value_spike`` slots
    (neurons, or None in the real-valued model)."""
    return all(hasattr(module, a) for a in ("num_heads", "key_spike", "value_spike"))


def find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The Transformer blocks: the first ``nn.ModuleList`` whose every item holds an attention module."""
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(any(is_attention(m) for m in block.modules()) for block in module)
        ):
            return module
    return None


def attention_fan_out(token_mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """(B, L) -> (B, L): for each key position, the number of real queries that attend to it.

    Zero at padding. Bidirectional: every real query; causal: the real queries at or after the key.
    """
    real = token_mask.bool()
    if causal:
        at_or_after = real.flip(1).long().cumsum(1).flip(1)
        return at_or_after * real
    return real.long().sum(1, keepdim=True) * real


def query_fan_out(query_mask: torch.Tensor, key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, Lq), (B, Lk) -> (B, Lk): for each key, the real queries of this pass that attend to it.

    The queries are the last Lq of the Lk positions (a decode step: Lq new tokens after Lk - Lq cached ones; a
    full pass: Lq = Lk). Causal: the queries at or after the key; else every real query. Zero at padded keys.
    """
    queries, keys = query_mask.long(), key_mask.long()
    if not causal:
        return queries.sum(1, keepdim=True) * keys
    length_q, length_k = queries.shape[1], keys.shape[1]
    positions = torch.arange(length_k - length_q, length_k, device=queries.device)
    sees = positions[:, None] >= torch.arange(length_k, device=queries.device)[None, :]  # (Lq, Lk)
    return (queries[:, :, None] * sees.long()[None]).sum(1) * keys


@dataclass
class _HFLayout:
    """Where the counted parts of a transformers model of a converted family are (spiking or not)."""

    layers: nn.ModuleList
    attentions: list
    sites: list  # PlacedNeuron, empty for the real-valued source
    copies: int  # network copies folded into the batch (elastic T), else 1
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool


def _hf_layout(model: nn.Module) -> _HFLayout | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None or model_type == "spikelm" or not hasattr(model, "base_model"):
        return None
    from spikelm.conversion.architectures import describe
    from spikelm.conversion.placement import placement

    try:
        family = describe(model)
    except ValueError:
        return None
    layers = model.base_model.get_submodule(family.layers)
    state = getattr(model, "_spikelm", None)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if family.kv_channels is not None:  # what the generic path's trace saw K and V handed to the cache as
        kv_heads, _, head_dim = family.kv_channels
    return _HFLayout(
        layers=layers,
        attentions=[layer.get_submodule(family.attention) for layer in layers],
        sites=placement(model) if state is not None else [],
        copies=state.steps if state is not None else 1,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=family.causal,
    )


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of an ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored (in, out)); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _bias_size(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def _weight_size(module: nn.Module) -> int:
    """Numbers a linear layer reads per token: its weight matrix and its bias."""
    return module.weight.numel() + _bias_size(module)


def _parameter_size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _spike_levels(neuron: SpikingNeuron, x: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|level|, fired)``, int64 (S, ...): the spikes a placed neuron emitted on input ``x``, per step (the
    neuron's :meth:`~spikelm.nn.neurons.base.SpikingNeuron.step_spikes`: elastic, level 1 wherever the output is
    nonzero; GIF, the spikes of its own quantiser, levels 0..2^n - 1)."""
    return neuron.step_spikes(x, output)


def _slots(neuron: SpikingNeuron, steps: int, rows: int, width: int) -> torch.Tensor:
    """Channel-steps that could fire (the neuron's ``slots``: elastic, every channel at every step; GIF, every
    channel at step 0 and the salient ones after)."""
    return neuron.slots(steps, rows, width)


def _row_sum_reads(neuron: SpikingNeuron) -> int:
    """Constants a linear layer fed by ``neuron`` reads per token and output besides its weight rows and bias (the
    neuron's ``reader_weight_reads``: a GIF reader's zero-point terms ``zero_g x rowsum_g(W)`` need the row sums of
    W over each zero-point group; elastic none)."""
    return int(neuron.reader_weight_reads())


def _output_macs(neuron: SpikingNeuron, steps: int, outputs: int) -> torch.Tensor:
    """MACs per step of a linear layer's ``outputs`` (rows x out) fed by ``neuron`` (the neuron's ``reader_macs``:
    elastic, one alpha multiply per output and step with amplitude; GIF, per output one multiply per scale and one
    per zero point, once)."""
    return neuron.reader_macs(steps, outputs)


@dataclass
class ProductCount:
    """One matrix product of the model, its operations summed over everything counted so far.

    ``acs``/``macs`` are per time step (length T for products inside the time-major blocks, 1 for
    those run once, like the heads); ``ann_macs`` is the same product in the real-valued model.
    """

    name: str
    kind: str  # "linear", "attention_scores" (Q K^T) or "attention_context" (P V)
    group: str  # the name inside its block (e.g. "attention.self.qkv"); outside the blocks, the name itself
    block: str | None  # the block holding it (e.g. "bert.encoder.layer.0"); None outside the blocks
    neuron: str | None = None  # the neuron whose spikes are the operand; None for a real-valued product
    acs: torch.Tensor | None = None
    macs: torch.Tensor | None = None
    ann_macs: int = 0
    weight_reads: int = 0  # weights (and constants: bias, GIF row sums) read, summed over the tokens counted
    ann_weight_reads: int = 0  # the same in the real-valued model: every weight, once per token

    def add(self, acs: torch.Tensor | None = None, macs: torch.Tensor | None = None, steps: int = 1) -> None:
        for attr, value in (("acs", acs), ("macs", macs)):
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.int64).reshape(-1).cpu()
            value = value.expand(steps) if value.numel() == 1 else value
            current = getattr(self, attr)
            setattr(self, attr, value.clone() if current is None else current + value)


@dataclass
class NeuronCount:
    """Spikes of one neuron over real tokens, per step and sign."""

    name: str
    positive: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    negative: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    slots: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    levels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # sum of |level|

    def add(
        self, positive: torch.Tensor, negative: torch.Tensor, slots: torch.Tensor, levels: torch.Tensor | None = None
    ) -> None:
        if self.slots.numel() == 0:
            self.positive, self.negative, self.slots, self.levels = (torch.zeros_like(positive.cpu()) for _ in range(4))
        self.positive += positive.cpu()
        self.negative += negative.cpu()
        self.slots += slots.cpu()
        self.levels += (positive + negative if levels is None else levels).cpu()


@dataclass
class _Consumer:
    """What a neuron's spikes feed: a product, and how to weigh each row of spikes by its fan-out."""

    product: str
    out_features: int | None = None  # a linear layer
    attention: nn.Module | None = None  # Q K^T or P V of this attention module


class OperationCounter:
    """Counts the operations of ``model`` while it runs, from the spikes its neurons emit.

    ::

        counter = OperationCounter(model)
        with torch.no_grad(), counter:            # hooks on; neurons on the reference (per-step) path
            for batch in batches:
                with counter.tokens(batch["attention_mask"]):
                    model(**batch)
        summary = counter.summary()

    Only positions where the (B, L) token mask is 1 are counted. Inputs are expected time-major
    inside the blocks, (T, B, L, D); a tensor whose (B, L) dimensions do not match the mask (e.g. the
    pooler's (B, D)) has all its rows counted.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList | None = None):
        self.model = model
        self.hf = _hf_layout(model)  # a transformers model of a converted family (spiking or not); None: native
        if blocks is None and self.hf is not None:
            blocks = self.hf.layers
        blocks = find_blocks(model) if blocks is None else blocks
        # module -> name; a lone layer counted on its own is named after its class
        self._names = {m: n or type(m).__name__ for n, m in model.named_modules()}
        # no blocks (e.g. a lone layer): everything is in the headline
        self._block_prefixes = [self._names[b] + "." for b in blocks] if blocks is not None else [""]
        self.products: dict[str, ProductCount] = {}
        self.neurons: dict[str, NeuronCount] = {}
        self.elementwise = {region: {op: 0 for op in ELEMENTWISE_OPS} for region in ("blocks", "outside_blocks")}
        self.elementwise_ann = {region: {op: 0 for op in ELEMENTWISE_OPS} for region in ("blocks", "outside_blocks")}
        # weights read outside the matrix products (the same in both models): embedding rows, norm gains
        self.other_reads = {region: {kind: 0 for kind in READ_KINDS} for region in ("blocks", "outside_blocks")}
        self.num_sequences = 0
        self.num_tokens = 0
        self.alpha_was_initialized = all(m.is_initialized() for _, m in named_neurons(model))
        self._mask: torch.Tensor | None = None
        self._handles = []
        self._backends = {}
        self._planned: dict[str, tuple[str, str | None]] = {}  # product name -> (kind, operand neuron)
        self._consumers: dict[nn.Module, _Consumer] = {}
        self._neuron_called: dict[nn.Module, bool] = {}
        self._key_mask: torch.Tensor | None = None
        self._counting = True
        self._kv_history: dict[nn.Module, list[torch.Tensor]] = {}

    # -- where a module sits ------------------------------------------------------------------

    def _place(self, name: str) -> tuple[str | None, str]:
        """(the block holding module ``name`` or None, the name inside that block)."""
        for prefix in self._block_prefixes:
            if name.startswith(prefix):
                return prefix.removesuffix("."), name[len(prefix) :]
        return None, name

    def _region(self, name: str) -> str:
        return "outside_blocks" if self._place(name)[0] is None else "blocks"

    def _product(self, name: str) -> ProductCount:
        """The count of product ``name``, created when first used, so products list in forward order."""
        if name not in self.products:
            kind, neuron = self._planned[name]
            block, group = self._place(name)
            self.products[name] = ProductCount(name, kind, group, block, neuron)
        return self.products[name]

    # -- hooks ----------------------------------------------------------------------------------

    def __enter__(self):
        if self.hf is not None:
            self._enter_hf()
            return self
        for module, name in self._names.items():
            if isinstance(module, SpikingNeuron) and module.counting_backend is not None:
                self._backends[module] = module.backend
                module.backend = module.counting_backend  # the per-step path returns the spikes to the hook
                self._hook(module, self._on_spikes, name)
            if isinstance(module, nn.Linear):
                self._plan_linear(name, module)
            elif is_attention(module):
                self._plan_attention(name, module)
            elif isinstance(module, nn.LayerNorm):
                self._hook(module, self._on_elementwise, name, "layernorm")
            elif isinstance(module, _ACTIVATIONS) or type(module).__module__ == "transformers.activations":
                self._hook(module, self._on_elementwise, name, "activation")
            elif isinstance(module, nn.Embedding):
                self._hook(module, self._on_embedding, name)
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, backend in self._backends.items():
            module.backend = backend
        self._backends.clear()
        return False

    def _hook(self, module, fn, *extra, with_kwargs=False):
        def hook(mod, args, *rest):
            return fn(mod, args, *rest, *extra)

        self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def _plan_linear(self, name: str, linear: nn.Linear) -> None:
        if isinstance(linear, SpikeLinear):
            self._planned[name] = ("linear", self._names[linear.neuron])
            self._consumers[linear.neuron] = _Consumer(name, out_features=linear.out_features)

            def before(mod, args):
                self._neuron_called[mod.neuron] = False

            self._handles.append(linear.register_forward_pre_hook(before))
        else:
            self._planned[name] = ("linear", None)
        self._hook(linear, self._on_linear, name)

    def _plan_attention(self, name: str, attention: nn.Module) -> None:
        for product_name, kind, neuron_attr in (
            (name + ".scores", "attention_scores", "key_spike"),
            (name + ".context", "attention_context", "value_spike"),
        ):
            neuron = getattr(attention, neuron_attr)
            self._planned[product_name] = (kind, self._names[neuron] if neuron is not None else None)
            if neuron is not None:
                self._consumers[neuron] = _Consumer(product_name, attention=attention)
        self._hook(attention, self._on_attention, name, with_kwargs=True)

    @contextmanager
    def tokens(self, token_mask: torch.Tensor, key_mask: torch.Tensor | None = None, count: bool = True):
        """Count the forward passes run inside this block over the real tokens of ``token_mask`` (B, L).

        Converted models and their sources only: ``key_mask`` (B, L_past + L) is the attention mask of a decode
        step over the cached tokens and the new ones (the new ones are its last L positions); ``count=False`` runs
        a pass (the prefill of a decode step) that only records the spikes of the keys and values it caches.
        """
        if token_mask.dim() != 2:
            raise ValueError(f"token_mask must have shape (batch, length); got {tuple(token_mask.shape)}")
        if key_mask is not None:
            if self.hf is None:
                raise ValueError("a key_mask (a decode step over a cache) is counted for converted models only")
            batch, length = token_mask.shape
            if key_mask.dim() != 2 or key_mask.shape[0] != batch or key_mask.shape[1] < length:
                raise ValueError(
                    f"key_mask {tuple(key_mask.shape)} must be (batch, cached + new tokens) for token_mask "
                    f"{tuple(token_mask.shape)}"
                )
        else:
            self._kv_history.clear()  # a new sequence: no cached keys
        self._mask = token_mask.bool()
        self._key_mask = None if key_mask is None else key_mask.bool()
        self._counting = count
        if count:
            self.num_sequences += token_mask.shape[0]
            self.num_tokens += int(self._mask.sum())
        try:
            yield
        finally:
            self._mask = self._key_mask = None
            self._counting = True

    def _row_mask(self, rows_shape) -> torch.Tensor | None:
        """The token mask if a tensor's row dimensions end in (B, L), else None (every row counts)."""
        mask = self._mask
        if mask is not None and len(rows_shape) >= 2 and tuple(rows_shape[-2:]) == tuple(mask.shape):
            return mask
        return None

    def _real_rows(self, rows_shape) -> int:
        mask = self._row_mask(rows_shape)
        if mask is None:
            return math.prod(rows_shape)
        return math.prod(rows_shape[:-2]) * int(mask.sum())

    def _time_steps(self, shape) -> int:
        """T for a time-major (T, B, L, D) tensor, 1 for anything else."""
        return shape[0] if len(shape) == 4 and self._row_mask(shape[:-1]) is not None else 1

    def _require_mask(self, what: str) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError(f"{what} ran outside OperationCounter.tokens(mask): wrap each forward pass in it")
        return self._mask

    def _on_spikes(self, neuron, args, spikes, name):
        self._require_mask(name)
        spikes = spikes.detach()
        if spikes.dim() > 4:  # K/V spiked after the head split (the decoder): (T, B, L, H, d) -> (T, B, L, H*d)
            spikes = spikes.flatten(3)
        steps, rows_shape, width = spikes.shape[0], spikes.shape[1:-1], spikes.shape[-1]
        mask = self._row_mask(rows_shape)
        if mask is not None:
            mask = mask.to(spikes.device)
        weight = torch.ones(rows_shape, dtype=torch.int64, device=spikes.device) if mask is None else mask.long()
        positive = (spikes > 0).sum(-1)  # (T, *rows)
        negative = (spikes < 0).sum(-1)
        per_step = lambda counts: (counts * weight).reshape(steps, -1).sum(1)  # noqa: E731
        real_rows = int(weight.sum())
        slots = torch.full((steps,), real_rows * width, dtype=torch.int64)
        self.neurons.setdefault(name, NeuronCount(name)).add(per_step(positive), per_step(negative), slots)
        self.elementwise[self._region(name)]["spike_generation"] += int(slots.sum())

        consumer = self._consumers.get(neuron)
        if consumer is None:
            return
        nonzero = positive + negative
        if consumer.out_features is not None:  # W s_t: every nonzero input feeds every output
            self._neuron_called[neuron] = True
            acs = per_step(nonzero) * consumer.out_features
            outputs = real_rows * consumer.out_features
            # memory: the weight rows of the channels that fire at some step, once per token
            fired = (spikes != 0).any(0).sum(-1)  # (*rows): channels that fired at any step
            self._product(consumer.product).weight_reads += int((fired * weight).sum()) * consumer.out_features
        else:
            if mask is None:
                raise ValueError(
                    f"{name}: spikes of shape {tuple(spikes.shape)} do not match the token mask "
                    f"{tuple(self._mask.shape)}; attention is counted on time-major (T, B, L, D) inputs"
                )
            fan_out = attention_fan_out(mask, getattr(consumer.attention, "is_causal", False))
            acs = (nonzero * fan_out).reshape(steps, -1).sum(1)
            if self._planned[consumer.product][0] == "attention_scores":
                outputs = consumer.attention.num_heads * int(fan_out.sum())  # one alpha per score
            else:
                outputs = real_rows * width  # one alpha per context output
        macs = outputs if neuron.use_amplitude else 0
        self._product(consumer.product).add(acs=acs, macs=macs, steps=steps)

    def _on_linear(self, linear, args, output, name):
        self._require_mask(name)
        x = args[0]
        product = self._product(name)
        rows = self._real_rows(x.shape[:-1])
        if isinstance(linear, SpikeLinear):
            if not self._neuron_called.get(linear.neuron, False):
                raise RuntimeError(
                    f"{name} did not call its neuron on the reference backend, so its spikes could not be counted"
                )
            steps = x.shape[0]
            product.ann_macs += rows // steps * linear.in_features * linear.out_features
            product.weight_reads += rows // steps * _bias_size(linear)  # the rows were counted with the spikes
        else:
            steps = self._time_steps(x.shape)
            macs = rows * linear.in_features * linear.out_features
            product.add(macs=torch.full((steps,), macs // steps, dtype=torch.int64), steps=steps)
            product.ann_macs += macs // steps
            product.weight_reads += rows // steps * _weight_size(linear)
        product.ann_weight_reads += rows // steps * _weight_size(linear)

    def _on_attention(self, attention, args, kwargs, output, name):
        mask = self._require_mask(name)
        hidden = args[0] if args else kwargs["hidden_states"]
        steps, batch, length = hidden.shape[:3]
        if (batch, length) != tuple(mask.shape):
            raise ValueError(
                f"{name}: input of shape {tuple(hidden.shape)} does not match the token mask {tuple(mask.shape)}; "
                "count full forward passes (no key/value cache)"
            )
        width = attention.num_heads * getattr(attention, "head_dim", hidden.shape[-1] // attention.num_heads)
        pairs = int(attention_fan_out(mask, getattr(attention, "is_causal", False)).sum())
        for suffix, spike in (("scores", attention.key_spike), ("context", attention.value_spike)):
            product = self._product(f"{name}.{suffix}")
            product.ann_macs += pairs * width
            if spike is None:  # real-valued operands: a MAC per term
                product.add(macs=pairs * width, steps=steps)
        region = self._region(name)
        scores = attention.num_heads * pairs
        for op in ("softmax", "score_scaling"):
            self.elementwise[region][op] += steps * scores
            self.elementwise_ann[region][op] += scores

    def _on_elementwise(self, module, args, output, name, op):
        self._require_mask(name)
        x = args[0]
        elements = self._real_rows(x.shape[:-1]) * x.shape[-1]
        region = self._region(name)
        self.elementwise[region][op] += elements
        self.elementwise_ann[region][op] += elements // self._time_steps(x.shape)
        if op == "layernorm":  # its gain and bias, read once per token
            tokens = self._real_rows(x.shape[:-1]) // self._time_steps(x.shape)
            self.other_reads[region]["norm"] += tokens * _parameter_size(module)

    def _on_embedding(self, module, args, output, name):
        """One row of the table per token (a lookup: no arithmetic)."""
        if not self._counting:
            return
        mask = self._require_mask(name)
        rows_shape = output.shape[:-1]
        tokens = int(mask.sum()) if len(rows_shape) >= 1 and rows_shape[-1] == mask.shape[1] else math.prod(rows_shape)
        self.other_reads[self._region(name)]["embedding"] += tokens * module.embedding_dim

    # -- converted models and their transformers sources -------------------------------------------

    def _enter_hf(self) -> None:
        hf = self.hf
        readers: dict[nn.Module, str] = {}
        for site in hf.sites:
            if site.kind in ("k", "v"):
                continue  # read by the attention products, counted there
            neuron = self.model.get_submodule(site.name)
            linears = [(r, self.model.get_submodule(r)) for r in site.readers]
            for reader, linear in linears:
                readers[linear] = site.name
                self._planned[reader] = ("linear", site.name)
            self._use_reference(neuron)
            self._hook(neuron, self._on_input_spikes, site.name, linears)
        for attention in hf.attentions:
            name = self._names[attention]
            key, value = getattr(attention, "key_neuron", None), getattr(attention, "value_neuron", None)
            for suffix, kind, neuron in (("scores", "attention_scores", key), ("context", "attention_context", value)):
                self._planned[f"{name}.{suffix}"] = (kind, None if neuron is None else self._names[neuron])
                if neuron is not None:
                    self._use_reference(neuron)
                    self._hook(neuron, self._on_kv_spikes, self._names[neuron])
            self._hook(attention, self._on_hf_attention, name, key, value)
        from spikelm.conversion.rotation import OnlineHadamard

        for module, name in self._names.items():
            if _linear_dims(module) is not None:
                self._planned.setdefault(name, ("linear", None))
                self._hook(module, self._on_hf_linear, name, module in readers)
            elif isinstance(module, OnlineHadamard):
                self._planned[name] = ("rotation", None)
                self._hook(module, self._on_rotation, name)
            elif _is_norm(module):
                self._hook(module, self._on_hf_elementwise, name, "layernorm")
            elif isinstance(module, nn.Embedding):
                self._hook(module, self._on_embedding, name)
            elif isinstance(module, _ACTIVATIONS) or type(module).__module__ == "transformers.activations":
                self._hook(module, self._on_hf_elementwise, name, "activation")

    def _use_reference(self, neuron: SpikingNeuron) -> None:
        if neuron.counting_backend is not None:
            self._backends[neuron] = neuron.backend
            neuron.backend = neuron.counting_backend

    def _hf_rows(self, rows_shape) -> tuple[int, int]:
        """(real rows, copies of the network) of a tensor whose row dimensions end in (copies * B, L)."""
        mask = self._mask
        batch, length = mask.shape
        if len(rows_shape) >= 2 and rows_shape[-1] == length and rows_shape[-2] % batch == 0:
            copies = rows_shape[-2] // batch
            return copies * int(mask.sum()) * math.prod(rows_shape[:-2]), copies
        return math.prod(rows_shape), 1

    def _on_input_spikes(self, neuron, args, output, name, readers):
        if not self._counting:
            return
        mask = self._require_mask(name)
        levels, events = _spike_levels(neuron, args[0], output)
        steps, width = levels.shape[0], levels.shape[-1]
        weight = mask.reshape(-1).to(levels.device).long()
        per_row = levels.reshape(steps, -1, width).sum(-1)
        if per_row.shape[1] != weight.numel():
            raise ValueError(
                f"{name}: {per_row.shape[1]} input rows per step do not match the {weight.numel()} tokens of the mask"
            )
        level_sum = (per_row * weight).sum(1).cpu()
        event_sum = (events.reshape(steps, -1, width).sum(-1) * weight).sum(1).cpu()
        real = int(weight.sum())
        passing = neuron.real_rows(args[0])  # rows passed real-valued (outlier tokens): multiplied, not spiked
        multiplied = 0 if passing is None else int((passing.reshape(-1).to(weight.device).long() * weight).sum())
        slots = _slots(neuron, steps, real, width)
        self.neurons.setdefault(name, NeuronCount(name)).add(event_sum, torch.zeros_like(event_sum), slots, level_sum)
        self.elementwise[self._region(name)]["spike_generation"] += int(slots.sum())
        # memory: a reader skips the weight rows of the channels that fire nothing at any step of a token
        fired = (levels.reshape(steps, -1, width) != 0).any(0).sum(-1)  # (rows,): channels fired at any step
        fired_channels = int((fired * weight).sum())
        constants = _row_sum_reads(neuron)
        for reader, linear in readers:
            out_features = _linear_dims(linear)[1]
            macs = _output_macs(neuron, steps, real * out_features)
            macs[0] += multiplied * width * out_features
            product = self._product(reader)
            product.add(acs=level_sum * out_features, macs=macs, steps=steps)
            product.weight_reads += (fired_channels + multiplied * width + real * constants) * out_features

    def _on_kv_spikes(self, neuron, args, output, name):
        levels, events = _spike_levels(neuron, args[0], output)  # (S, B, H_kv, L_new, d)
        self._kv_history.setdefault(neuron, []).append(levels.sum(dim=(2, 4)).cpu())  # (S, B, L_new)
        if not self._counting:
            return
        mask = self._require_mask(name)
        steps, batch, heads, length, head_dim = levels.shape
        if (batch, length) != tuple(mask.shape):
            raise ValueError(f"{name}: keys/values of shape {tuple(levels.shape[1:])} do not match the token mask")
        weight = mask.to(levels.device).long()
        level_sum = (levels.sum(dim=(2, 4)) * weight).sum(dim=(1, 2)).cpu()
        event_sum = (events.sum(dim=(2, 4)) * weight).sum(dim=(1, 2)).cpu()
        real = int(weight.sum())
        slots = _slots(neuron, steps, real, heads * head_dim)
        self.neurons.setdefault(name, NeuronCount(name)).add(event_sum, torch.zeros_like(event_sum), slots, level_sum)
        self.elementwise[self._region(name)]["spike_generation"] += int(slots.sum())

    def _on_hf_attention(self, attention, args, output, name, key_neuron, value_neuron):
        rows = self._require_mask(name)
        if not self._counting:
            return
        keys = rows if self._key_mask is None else self._key_mask
        hf = self.hf
        fan_out = query_fan_out(rows, keys, hf.causal)  # (B, L_keys)
        pairs, queries = int(fan_out.sum()), int(rows.sum())
        heads, head_dim, group = hf.heads, hf.head_dim, hf.heads // hf.kv_heads
        for suffix, neuron in (("scores", key_neuron), ("context", value_neuron)):
            product = self._product(f"{name}.{suffix}")
            product.ann_macs += pairs * heads * head_dim
            if neuron is None:  # real-valued K/V: a MAC per term
                product.add(macs=pairs * heads * head_dim, steps=hf.copies)
                continue
            history = self._kv_history.get(neuron, [])
            levels = torch.cat(history, dim=-1) if history else None
            if levels is None or tuple(levels.shape[1:]) != tuple(keys.shape):
                raise RuntimeError(
                    f"{name}: the spikes of {tuple(keys.shape)} keys/values were not all seen; run the prefill "
                    "inside OperationCounter.tokens(mask, count=False) before counting a decode step"
                )
            steps = levels.shape[0]
            acs = (levels * fan_out.cpu().long()).sum(dim=(1, 2)) * group
            macs, extra_acs = neuron.attention_ops(suffix, steps, pairs, heads, head_dim, queries)
            product.add(acs=acs + extra_acs, macs=macs, steps=steps)
        region = self._region(name)
        for op in ("softmax", "score_scaling"):
            self.elementwise[region][op] += hf.copies * heads * pairs
            self.elementwise_ann[region][op] += heads * pairs

    def _on_hf_linear(self, linear, args, output, name, fed_by_neuron):
        if not self._counting:
            return
        self._require_mask(name)
        in_features, out_features = _linear_dims(linear)
        rows, copies = self._hf_rows(args[0].shape[:-1])
        product = self._product(name)
        tokens = rows // copies
        product.ann_macs += tokens * in_features * out_features
        product.ann_weight_reads += tokens * _weight_size(linear)
        if not fed_by_neuron:  # the neuron's hook counted the spiking product
            macs = tokens * in_features * out_features
            product.add(macs=torch.full((copies,), macs, dtype=torch.int64), steps=copies)
            product.weight_reads += tokens * _weight_size(linear)
        else:  # the weight rows were counted with the spikes; the bias is read whatever fired
            product.weight_reads += tokens * _bias_size(linear)

    def _on_rotation(self, module, args, output, name):
        if not self._counting:
            return
        from spikelm.conversion.rotation import _online_operands

        self._require_mask(name)
        x = args[0]
        rows, copies = self._hf_rows(x.shape[:-1])
        signs, mats = _online_operands(module.kind, module.size, module.seed, x.device, torch.float32)
        per_row = module.size * sum(m.shape[0] for m in mats) + (0 if signs is None else module.size)
        self._product(name).add(macs=torch.full((copies,), rows // copies * per_row, dtype=torch.int64), steps=copies)

    def _on_hf_elementwise(self, module, args, output, name, op):
        if not self._counting:
            return
        self._require_mask(name)
        x = args[0]
        rows, copies = self._hf_rows(x.shape[:-1])
        region = self._region(name)
        self.elementwise[region][op] += rows * x.shape[-1]
        self.elementwise_ann[region][op] += rows // copies * x.shape[-1]
        if op == "layernorm":  # its gain (and bias), read once per token
            self.other_reads[region]["norm"] += rows // copies * _parameter_size(module)

    # -- results --------------------------------------------------------------------------------

    def summary(self, constants: EnergyConstants = DEFAULT_CONSTANTS, memory_pJ_per_bit: float = MEMORY_PJ_PER_BIT):
        """Per-sequence figures (means over the sequences counted), ready for JSON; see :func:`summarize`."""
        return summarize(self, constants, memory_pJ_per_bit)


def _rates(neuron: NeuronCount) -> dict:
    slots = neuron.slots.clamp_min(1).double()
    return {
        "firing_rate": ((neuron.positive + neuron.negative) / slots).tolist(),
        "positive_rate": (neuron.positive / slots).tolist(),
        "negative_rate": (neuron.negative / slots).tolist(),
    }


def _total(values: torch.Tensor | None) -> int:
    return 0 if values is None else int(values.sum())


def summarize(
    counter: OperationCounter,
    constants: EnergyConstants = DEFAULT_CONSTANTS,
    memory_pJ_per_bit: float = MEMORY_PJ_PER_BIT,
) -> dict:
    """The energy summary of everything ``counter`` counted, per sequence (``num_sequences`` averaged).

    Keys: ``spiking``, ``snn_mJ_per_sequence``, ``ann_mJ_per_sequence``, ``ratio`` (ANN / SNN), ``acs``
    and ``macs`` (spiking model, headline products), ``ann_macs``, per-token energies,
    ``mean_firing_rate`` (nonzero spikes / spike slots over every neuron), ``per_layer`` (headline
    products), ``heads`` (products outside the blocks), ``elementwise`` (outside the total),
    ``constants_pJ``, ``formula``, ``convention``. SNN fields are None for a model without neurons.
    """
    if counter.num_sequences == 0:
        raise ValueError("nothing was counted: run the model inside OperationCounter.tokens(mask) first")
    n = counter.num_sequences
    modules = {name: m for m, name in counter._names.items()}
    spiking = bool(counter.neurons)

    def entry(product: ProductCount) -> dict:
        acs, macs = _total(product.acs) / n, _total(product.macs) / n
        out = {
            "name": product.name,
            "kind": product.kind,
            "group": product.group,
            "block": product.block,
            "neuron": product.neuron,
            "acs": acs,
            "macs": macs,
            "acs_per_step": [] if product.acs is None else (product.acs.double() / n).tolist(),
            "macs_per_step": [] if product.macs is None else (product.macs.double() / n).tolist(),
            "ann_macs": product.ann_macs / n,
            "weight_reads": product.weight_reads / n,
            "ann_weight_reads": product.ann_weight_reads / n,
            "snn_mJ": constants.millijoules(acs, macs),
            "ann_mJ": constants.millijoules(0, product.ann_macs / n),
            "firing_rate": [],
            "positive_rate": [],
            "negative_rate": [],
            "alpha": [],
        }
        if product.neuron in counter.neurons:
            out.update(_rates(counter.neurons[product.neuron]))
            alpha = getattr(modules[product.neuron], "alpha", None)
            out["alpha"] = [] if alpha is None else alpha.detach().float().cpu().tolist()
        return out

    counted = [p for p in counter.products.values() if p.acs is not None or p.macs is not None or p.ann_macs]
    per_layer = [entry(p) for p in counted if p.block is not None]
    heads = [entry(p) for p in counted if p.block is None]
    acs = sum(e["acs"] for e in per_layer)
    macs = sum(e["macs"] for e in per_layer)
    ann_macs = sum(e["ann_macs"] for e in per_layer)
    snn_mJ = constants.millijoules(acs, macs) if spiking else None
    ann_mJ = constants.millijoules(0, ann_macs)
    tokens = counter.num_tokens / n

    neurons = list(counter.neurons.values())
    spikes = sum(int((c.positive + c.negative).sum()) for c in neurons)
    slots = sum(int(c.slots.sum()) for c in neurons)
    steps = max((c.slots.numel() for c in neurons), default=0)

    def step_rate(attr):  # over every neuron, per step
        if not neurons or any(c.slots.numel() != steps for c in neurons):
            return []
        num = sum(getattr(c, attr) if attr != "nonzero" else c.positive + c.negative for c in neurons)
        return (num.double() / sum(c.slots for c in neurons).clamp_min(1).double()).tolist()

    def per_sequence(table):
        return {region: {op: count / n for op, count in ops.items()} for region, ops in table.items()}

    heads_macs = sum(e["macs"] for e in heads)
    heads_ann = sum(e["ann_macs"] for e in heads)
    ew_snn = sum(sum(ops.values()) for ops in counter.elementwise.values()) / n
    ew_ann = sum(sum(ops.values()) for ops in counter.elementwise_ann.values()) / n
    whole_snn = constants.millijoules(acs, macs + heads_macs + ew_snn) if spiking else None
    whole_ann = constants.millijoules(0, ann_macs + heads_ann + ew_ann)
    whole_model = {
        "convention": WHOLE_MODEL,
        "snn_acs": acs if spiking else None,
        "snn_macs": macs + heads_macs + ew_snn if spiking else None,
        "ann_macs": ann_macs + heads_ann + ew_ann,
        "snn_mJ_per_sequence": whole_snn,
        "ann_mJ_per_sequence": whole_ann,
        "snn_mJ_per_token": whole_snn / tokens if spiking else None,
        "ann_mJ_per_token": whole_ann / tokens,
        "ratio": whole_ann / whole_snn if spiking and whole_snn > 0 else None,
    }
    reads = {
        "blocks": (sum(e["weight_reads"] for e in per_layer), sum(e["ann_weight_reads"] for e in per_layer)),
        "heads": (sum(e["weight_reads"] for e in heads), sum(e["ann_weight_reads"] for e in heads)),
    }
    for kind in READ_KINDS:
        count = sum(counter.other_reads[region][kind] for region in counter.other_reads) / n
        reads[kind] = (count, count)
    memory = memory_figures(reads, tokens, spiking, memory_pJ_per_bit)
    compute = {
        "blocks": (acs, macs, ann_macs),
        "whole_model": (acs, macs + heads_macs + ew_snn, ann_macs + heads_ann + ew_ann),
    }
    return {
        "figures": FIGURES,
        "not_counted": NOT_COUNTED,
        "spiking": spiking,
        "num_sequences": n,
        "tokens_per_sequence": tokens,
        "num_steps": steps if spiking else 1,
        "constants_pJ": {"ac": constants.ac_pJ, "mac": constants.mac_pJ},
        "formula": FORMULA,
        "convention": CONVENTION + (CONVERTED_CONVENTION if counter.hf is not None else ""),
        "snn_mJ_per_sequence": snn_mJ,
        "ann_mJ_per_sequence": ann_mJ,
        "ratio": ann_mJ / snn_mJ if spiking and snn_mJ > 0 else None,
        "snn_mJ_per_token": snn_mJ / tokens if spiking else None,
        "ann_mJ_per_token": ann_mJ / tokens,
        "acs": acs if spiking else None,
        "macs": macs if spiking else None,
        "ann_macs": ann_macs,
        "mean_firing_rate": spikes / slots if slots else None,
        "firing_rate_per_step": step_rate("nonzero"),
        "positive_rate_per_step": step_rate("positive"),
        "negative_rate_per_step": step_rate("negative"),
        "alpha_was_initialized": counter.alpha_was_initialized,
        "per_layer": per_layer,
        "heads": {"macs": heads_macs, "mJ": constants.millijoules(0, heads_macs), "layers": heads},
        "whole_model": whole_model,
        "precisions": precision_figures(compute, memory, tokens, spiking),
        "memory": memory,
        "neurons": {c.name: {**_rates(c), "levels_per_step": (c.levels.double() / n).tolist()} for c in neurons},
        "elementwise": {
            "snn": per_sequence(counter.elementwise) if spiking else None,
            "ann": per_sequence(counter.elementwise_ann),
            "note": "elements processed per sequence (not in the headline total); each costs one or more "
            "operations (exp, divide, square root...), which this estimate leaves uncounted",
        },
    }


def _ratio(snn: float | None, ann: float) -> float | None:
    return snn / ann if snn is not None and ann > 0 else None


def memory_figures(reads: dict, tokens: float, spiking: bool, pJ_per_bit: float) -> dict:
    """The weight reads per token (``reads``: part -> (spiking model, real-valued model), per sequence), the blocks'
    and the whole model's, and their energy per token at each precision of :data:`PRECISIONS` (``pJ_per_bit``)."""
    per_token = {part: (snn / tokens, ann / tokens) for part, (snn, ann) in reads.items()}
    parts = {"blocks": ("blocks",), "whole_model": tuple(per_token)}
    out = {
        "pJ_per_bit": pJ_per_bit,
        "source": MEMORY_SOURCE,
        "convention": MEMORY_CONVENTION,
        "reads_per_token": {
            part: {"snn": snn if spiking else None, "ann": ann} for part, (snn, ann) in per_token.items()
        },
    }
    for scope, names in parts.items():
        snn = sum(per_token[p][0] for p in names)
        ann = sum(per_token[p][1] for p in names)
        out[scope] = {
            "snn_weight_reads_per_token": snn if spiking else None,
            "ann_weight_reads_per_token": ann,
            "skipped_fraction": 1 - snn / ann if spiking and ann > 0 else None,
            "mJ_per_token": {
                p.name: {
                    "snn": snn * p.weight_bits * pJ_per_bit * 1e-9 if spiking else None,
                    "ann": ann * p.weight_bits * pJ_per_bit * 1e-9,
                }
                for p in PRECISIONS
            },
        }
    return out


def precision_figures(compute: dict, memory: dict, tokens: float, spiking: bool) -> dict:
    """Both models at the same precision (:data:`PRECISIONS`): per token, the blocks (the headline's products) and
    the whole model, compute only and with the weight reads of :func:`memory_figures`. ``compute``: scope ->
    (ACs, MACs, ANN MACs) per sequence."""
    out = {}
    for p in PRECISIONS:
        entry = {
            "add_pJ": p.add_pJ,
            "multiply_pJ": p.multiply_pJ,
            "mac_pJ": p.mac_pJ,
            "weight_bits": p.weight_bits,
            "note": p.note,
        }
        for scope, (acs, macs, ann_macs) in compute.items():
            snn = p.millijoules(acs, macs) / tokens if spiking else None
            ann = p.millijoules(0, ann_macs) / tokens
            mem = memory[scope]["mJ_per_token"][p.name]
            snn_mem = snn + mem["snn"] if spiking else None
            ann_mem = ann + mem["ann"]
            entry[scope] = {"snn_mJ_per_token": snn, "ann_mJ_per_token": ann, "snn_over_ann": _ratio(snn, ann)}
            entry[f"{scope}_with_memory"] = {
                "snn_mJ_per_token": snn_mem,
                "ann_mJ_per_token": ann_mem,
                "snn_over_ann": _ratio(snn_mem, ann_mem),
            }
        out[p.name] = entry
    return out


def measure_energy(
    model: nn.Module,
    batches,
    constants: EnergyConstants = DEFAULT_CONSTANTS,
    progress=None,
    memory_pJ_per_bit: float = MEMORY_PJ_PER_BIT,
) -> dict:
    """Run ``model`` (in eval mode, no gradients) on ``batches`` and return :func:`summarize`'s dict.

    Each batch is a dict of model input tensors with ``input_ids`` (B, L) and, for padded batches,
    ``attention_mask`` (1 = real token): only real tokens are counted. Batches are moved to the
    model's device. ``progress``, if given, wraps the batch iterable (e.g. ``tqdm``).
    """
    counter = OperationCounter(model)
    device = next(model.parameters()).device
    accepted = _accepted_inputs(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            for batch in progress(batches) if progress else batches:
                batch = {k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted}
                mask = batch.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(batch["input_ids"])
                with counter.tokens(mask):
                    model(**batch)
    finally:
        model.train(was_training)
    return counter.summary(constants, memory_pJ_per_bit)


def _accepted_inputs(model: nn.Module) -> set[str] | None:
    """The input names ``model.forward`` takes (None: anything, e.g. ``**kwargs`` only)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names or None


def measure_decode_energy(
    model: nn.Module,
    batches,
    constants: EnergyConstants = DEFAULT_CONSTANTS,
    progress=None,
    memory_pJ_per_bit: float = MEMORY_PJ_PER_BIT,
) -> dict:
    """The energy of one generated token: per sequence of each batch, the first L - 1 tokens fill the cache
    (a prefill, not counted: it only records the spikes of the keys and values it caches), then the decode step
    of token L (one new query attending L cached keys) is counted. :func:`summarize`'s dict, whose
    ``*_per_sequence`` figures are per generated token; ``context_tokens`` the mean cache length.

    For causal converted models (``spikelm.spikify``) and their real-valued transformers sources; batches with
    padding are skipped (a decode step continues an unpadded prompt here).
    """
    counter = OperationCounter(model)
    if counter.hf is None or not counter.hf.causal:
        raise ValueError(
            "energy per generated token is counted for causal converted models and their transformers sources; "
            f"got a {type(model).__name__}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    contexts = []
    try:
        with torch.no_grad(), counter:
            for batch in progress(batches) if progress else batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                if ids.shape[1] < 2 or not bool(mask.bool().all()):
                    continue
                with counter.tokens(mask[:, :-1], count=False):
                    cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
                with counter.tokens(mask[:, -1:], key_mask=mask):
                    model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
                contexts += [ids.shape[1] - 1] * ids.shape[0]
    finally:
        model.train(was_training)
    if not contexts:
        raise ValueError("no unpadded sequence of at least 2 tokens to count a decode step on")
    summary = counter.summary(constants, memory_pJ_per_bit)
    summary["context_tokens"] = sum(contexts) / len(contexts)
    return summary
