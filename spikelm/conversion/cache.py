"""Spiking K and V for a converted model, and the cache that keeps them as spike codes.

A converted model runs its T copies folded into the batch axis, time-major: K and V reach the attention's cache
``update`` as (T*B, H, L, d), after the rotary embedding. That call is where they are spiked, per step, by the
attention module's ``key_neuron`` and ``value_neuron`` (no membrane, SPEC section 3), on every path:

* with a cache (``use_cache=True``, ``generate()``): a ``DynamicCache`` whose layers are :class:`SpikeCodeLayer`
  spikes the new K and V, appends their codes (packed 5 per byte by default, :mod:`spikelm.nn.packing`) to the
  stored ones, laid out (B, T*H, L, d) with T on the head
  axis (``generate()`` reorders and selects caches along dim 0, the batch), and returns the spikes of every cached
  token decoded with the per-step alphas;
* without one, :class:`TransientSpikeKV` spikes them and keeps nothing.

With GIF neurons (no T copies) the cache layer is :class:`GIFCodeLayer`: it keeps each token's integer code (the
sum of its spikes; packed to its bit width by default) with the token's scale and zero point, and decodes them as
the neuron does.

Both call the same neurons on the same tensors, so cached decoding equals a full forward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..models.modeling_spikelm_causal import DEFAULT_PACKING, SpikeKVCacheLayer
from ..nn import cpu_kernels, kernels
from ..nn._constants import ALPHA_FLOOR
from ..nn.neurons import SpikingNeuron
from ..nn.neurons.base import global_hooks, state_epoch
from ..nn.neurons.gif import SCALE_FLOOR, max_code, pack_grid, unpack_grid
from ..nn.packing import pack_bits, unpack_bits


def spike_per_step(neuron: SpikingNeuron, states: torch.Tensor, steps: int) -> torch.Tensor:
    """K or V (T*B, H, L, d), time-major in the batch axis, through its per-step neuron."""
    return neuron.spike_folded(states, steps)


def fold_steps_into_heads(states: torch.Tensor, steps: int) -> torch.Tensor:
    """(T*B, H, L, d) -> (B, T*H, L, d), step-major inside the head axis."""
    batch_steps, heads, length, head_dim = states.shape
    batch = batch_steps // steps
    return (
        states.view(steps, batch, heads, length, head_dim)
        .transpose(0, 1)
        .reshape(batch, steps * heads, length, head_dim)
    )


def unfold_steps_from_heads(states: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T*H, L, d) -> (T*B, H, L, d), the inverse of :func:`fold_steps_into_heads`."""
    batch, steps_heads, length, head_dim = states.shape
    heads = steps_heads // steps
    return (
        states.view(batch, steps, heads, length, head_dim)
        .transpose(0, 1)
        .reshape(steps * batch, heads, length, head_dim)
    )


def spike_scale(neuron: SpikingNeuron) -> torch.Tensor:
    """The per-step magnitude a spike code decodes with: alpha_t (floored as the neuron uses it), or 1."""
    alpha = neuron.alpha.detach()
    return alpha.clamp_min(ALPHA_FLOOR) if neuron.use_amplitude else torch.ones_like(alpha)


class SpikeCodeLayer(SpikeKVCacheLayer):
    """One attention layer's cache: spikes the new K and V with the layer's neurons and stores int8 codes.

    Stored tensors are the native decoder's :class:`SpikeKVCacheLayer` layout, (B, T*H, L, ·): packed codes
    (``packing`` per byte, the default) or int8 (``packing=None``); ``update`` takes and returns the model's
    (T*B, H, L, d) layout.
    """

    def __init__(
        self,
        key_neuron: SpikingNeuron,
        value_neuron: SpikingNeuron,
        steps: int,
        packing: int | None = DEFAULT_PACKING,
    ):
        super().__init__(packing)
        self.key_neuron, self.value_neuron, self.steps = key_neuron, value_neuron, steps

    @classmethod
    def for_neurons(cls, key_neuron, value_neuron, steps: int, packing: int | None = DEFAULT_PACKING):
        return cls(key_neuron, value_neuron, steps, packing)

    @staticmethod
    def describe_packing(packing: int | None) -> str:
        return "int8 codes" if packing is None else f"ternary codes packed {packing} per byte"

    def _fast_append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether a decoding step may spike, pack and decode K/V in the C++ kernels (CPU float32, 5 codes per
        byte, plain elastic K/V neurons without membrane, statistics or hooks; the same codes and values)."""
        if self.packing != 5:
            return False
        if not (self.key_neuron.packs_kv_on_cpu() and self.value_neuron.packs_kv_on_cpu()):
            return False
        return kernels.kv_append_kernel(key_states, value_states) == kernels.CPP  # spikelm.nn.kernels decides

    def _append_packed(self, name: str, neuron: SpikingNeuron, states: torch.Tensor) -> torch.Tensor:
        """Spike and pack ``states`` onto the stored codes ``name``; the decoded cache, in the model's layout."""
        low = -1 if neuron.spike_levels == "ternary" else 0
        scale = spike_scale(neuron)
        setattr(self, {"keys": "key_scale", "values": "value_scale"}[name], scale)
        codes = cpu_kernels.spike_pack5(states, neuron.alpha.detach().clamp_min(ALPHA_FLOOR).float(), low)
        setattr(self, name, torch.cat([getattr(self, name), codes], -2))
        return cpu_kernels.unpack5_steps_into_batch(getattr(self, name), scale.float(), self.width)

    def update(self, key_states, value_states, *args, **kwargs):
        steps = self.steps
        if (
            self.is_initialized
            and self._decode_after_append(key_states, value_states)
            and self._fast_append(key_states, value_states)
        ):
            return (
                self._append_packed("keys", self.key_neuron, key_states),
                self._append_packed("values", self.value_neuron, value_states),
            )
        keys = spike_per_step(self.key_neuron, key_states, steps)
        values = spike_per_step(self.value_neuron, value_states, steps)
        if self.is_initialized and self._decode_after_append(keys, values):
            # inference: pack the new codes in the model's layout, fold the bytes, decode straight into it
            key_scale, value_scale = spike_scale(self.key_neuron), spike_scale(self.value_neuron)
            self.key_scale, self.value_scale = key_scale, value_scale
            for name, spikes in (("keys", keys), ("values", values)):
                setattr(
                    self, name, torch.cat([getattr(self, name), fold_steps_into_heads(self._encode(spikes), steps)], -2)
                )
            return (
                self._decode(self.keys, key_scale, "key", steps_into_batch=True),
                self._decode(self.values, value_scale, "value", steps_into_batch=True),
            )
        keys, values = super().update(
            fold_steps_into_heads(keys, steps),
            fold_steps_into_heads(values, steps),
            key_scale=spike_scale(self.key_neuron),
            value_scale=spike_scale(self.value_neuron),
        )
        return unfold_steps_from_heads(keys, steps), unfold_steps_from_heads(values, steps)


def _code_dtype(top: int) -> torch.dtype:
    return torch.uint8 if top <= 255 else torch.int16 if top <= 32767 else torch.int32


class GIFCodeLayer(DynamicLayer):
    """One attention layer's cache for GIF K/V neurons: integer codes (B, H, L, d) plus a per-token grid.

    ``keys`` / ``values`` hold the codes: packed to their bit width b (``packed=True``, the default: b bit planes
    of ceil(d / 8) bytes per token and head, :func:`~spikelm.nn.packing.pack_bits`, (B, H, L, b * ceil(d / 8))
    uint8), or one integer per value (uint8 for n + a <= 8); ``key_grid`` / ``value_grid`` (B, H, L, w)
    each token's scale(s) and zero point(s) in the quantiser's dtype (:func:`~spikelm.nn.gif.pack_grid`: one of
    each, or one per channel group with saliency). Decoding is the neuron's own :func:`~spikelm.nn.gif.dequantize`,
    so cached tokens equal what a full forward pass computes.
    """

    def __init__(self, key_neuron: nn.Module, value_neuron: nn.Module, packed: bool = DEFAULT_PACKING is not None):
        super().__init__()
        self.key_neuron, self.value_neuron, self.packed = key_neuron, value_neuron, packed
        self.key_grid = self.value_grid = None
        # inference on CPU float32 (the C++ token_codes pass): the cached tokens' values decoded once, as they came,
        # in float64 (the attention's accumulation type, so a step converts nothing), (B, H, capacity, d) each with
        # the first ``decoded_length`` tokens in use; None until a fast step builds them (from the codes if any)
        self.decoded_keys = self.decoded_values = None
        self.decoded_length = 0
        self._code_buffers: dict = {}  # the fast path's growing buffers of the stored codes (see _append_codes)

    @classmethod
    def for_neurons(cls, key_neuron, value_neuron, steps: int, packing: int | None = DEFAULT_PACKING):
        return cls(key_neuron, value_neuron, packed=packing is not None)

    @staticmethod
    def describe_packing(packing: int | None) -> str:
        return "int8 codes" if packing is None else "GIF codes packed to their bit width"

    def _top_code(self) -> int:
        """The largest stored code (its bit width sets the packing)."""
        return max_code(self.key_neuron.bits, self.key_neuron.extra_bits)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        top = self._top_code()
        self.code_dtype, self.bits, self.width = _code_dtype(top), top.bit_length(), key_states.shape[3]
        stored = (torch.uint8, self.bits * -(-self.width // 8)) if self.packed else (self.code_dtype, self.width)
        for name, states in (("keys", key_states), ("values", value_states)):
            setattr(self, name, torch.empty((*states.shape[:2], 0, stored[1]), dtype=stored[0], device=self.device))
        self.is_initialized = True

    def _encode(self, code: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return code.to(self.code_dtype)
        planes = pack_bits(code, self.bits)  # (B, H, L, bits, w)
        return planes.flatten(-2)

    def codes(self, name: str = "keys") -> torch.Tensor:
        """The stored codes of ``"keys"`` or ``"values"``, one integer per value (B, H, L, d), whatever the layout."""
        stored = getattr(self, name)
        if not self.packed:
            return stored
        return unpack_bits(stored.unflatten(-1, (self.bits, -1)), self.width, self.code_dtype)

    def _decode(self, name: str, neuron: nn.Module, grid: torch.Tensor | None) -> torch.Tensor:
        if grid is None:  # nothing cached yet: (B, H, 0, d)
            stored = getattr(self, name)
            return torch.empty((*stored.shape[:3], self.width), dtype=self.dtype, device=stored.device)
        codes = self.codes(name)
        scale, zero = unpack_grid(grid)
        return neuron.dequantize(codes, scale, zero).to(self.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        fast = self._fast_update(key_states, value_states)
        if fast is not None:
            return fast
        self.decoded_keys = self.decoded_values = None  # the PyTorch path keeps no decoded copy
        self.decoded_length = 0
        out = []
        for name, neuron, states in (("key", self.key_neuron, key_states), ("value", self.value_neuron, value_states)):
            codes_name, grid_name = f"{name}s", f"{name}_grid"
            codes, grid = getattr(self, codes_name), getattr(self, grid_name)
            past = self._decode(codes_name, neuron, grid)
            spiked = neuron(states)  # the dequantised spike sum, straight-through gradient
            with torch.no_grad():
                code, new_grid = self._quantize(neuron, states)
            setattr(self, codes_name, torch.cat([codes, self._encode(code)], dim=-2))
            setattr(self, grid_name, new_grid if grid is None else torch.cat([grid, new_grid], dim=-2))
            out.append(torch.cat([past, spiked], dim=-2))
        return out[0], out[1]

    @staticmethod
    def _quantize(neuron: nn.Module, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's codes and its grid as stored (scale and zero point packed together)."""
        code, scale, zero = neuron.quantize(states)
        return code, pack_grid(scale, zero)

    def _code_offset(self) -> int:
        """What a stored code adds to the neuron's code (0; the signed layer stores -Q..Q offset by Q)."""
        return 0

    @staticmethod
    def _plain(neuron: nn.Module) -> bool:
        """A neuron the fast step may bypass: no statistics to record, no hooks to run."""
        return (
            not getattr(neuron, "record_stats", False) and not neuron._forward_hooks and not neuron._forward_pre_hooks
        )

    def _fast_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """The update outside autograd on CPU float32 (where :func:`spikelm.nn.kernels.token_code_kernel` takes the
        C++ pass): each new token coded once (codes, grid and dequantised value in one call), its codes appended to
        the stored ones and its values to the decoded copy, which is returned (float64 views of every cached token).
        The values are those :meth:`_decode` gives (dequantisation is per token), so the attention sees the same
        numbers as on the PyTorch path. None where the fast step does not run (the PyTorch path then does)."""
        if not (self._plain(self.key_neuron) and self._plain(self.value_neuron)):
            return None
        pack = dict(want_code=True, pack_bits=self.bits if self.packed else 0, code_offset=self._code_offset())
        fast_k = self.key_neuron.fused_codes(key_states, **pack)
        fast_v = None if fast_k is None else self.value_neuron.fused_codes(value_states, **pack)
        if fast_v is None:
            return None
        if self.decoded_keys is None and self.key_grid is not None:  # tokens cached by the PyTorch path
            self._start_decoded(
                self._decode("keys", self.key_neuron, self.key_grid),
                self._decode("values", self.value_neuron, self.value_grid),
            )
        for name, fast in (("key", fast_k), ("value", fast_v)):
            code = fast.code
            if not self.packed:
                code = (code + self._code_offset()).to(self.code_dtype)
            self._append_codes(f"{name}s", f"{name}_grid", code, fast.grid)
        if self.decoded_keys is None:
            self._start_decoded(fast_k[0], fast_v[0])
        else:
            self._append_decoded(fast_k[0], fast_v[0])
        length = self.decoded_length
        return self.decoded_keys[:, :, :length], self.decoded_values[:, :, :length]

    def _append_codes(self, codes_name: str, grid_name: str, code: torch.Tensor, grid: torch.Tensor) -> None:
        """Append (B, H, n, w) stored codes and their grid on the fast path: written into buffers grown by half
        their length (``keys`` / ``key_grid`` ... are views of them, exactly the stored tokens), so a step copies
        only the new token, not the whole cache as ``torch.cat`` does. Where the stored tensors are not the views
        last set (the PyTorch path, a reorder, a crop) or the buffer was made under ``torch.inference_mode`` and is
        written outside it, a new buffer starts from them."""
        code_buffer, grid_buffer, length = self._code_room(codes_name, grid_name, lambda: (code, grid), code.shape[-2])
        new = code.shape[-2]
        code_buffer[:, :, length : length + new] = code
        grid_buffer[:, :, length : length + new] = grid
        self._set_code_views(codes_name, grid_name, code_buffer, grid_buffer, length + new)

    def _code_room(self, codes_name: str, grid_name: str, like, new: int):
        """``(codes buffer, grid buffer, stored length)`` with room for ``new`` more tokens (see :meth:`_append_codes`;
        ``like()``: a tensor of the stored codes' and one of the grid's dtype, device, batch, heads and width, asked
        only where new buffers are made)."""
        stored, old_grid = getattr(self, codes_name), getattr(self, grid_name)
        length = stored.shape[-2]
        buffers = self._code_buffers.get(codes_name)  # (codes buffer, grid buffer, the views set last)
        if (
            buffers is None
            or buffers[2][0] is not stored
            or buffers[2][1] is not old_grid
            or length + new > buffers[0].shape[-2]
            or (buffers[0].is_inference() and not torch.is_inference_mode_enabled())
        ):
            capacity = max(length + length // 2, length + new, 64)
            like_code, like_grid = like()
            code_buffer = like_code.new_empty((*like_code.shape[:2], capacity, like_code.shape[-1]))
            grid_buffer = like_grid.new_empty((*like_grid.shape[:2], capacity, like_grid.shape[-1]))
            if length:
                code_buffer[:, :, :length] = stored
                grid_buffer[:, :, :length] = old_grid
            return code_buffer, grid_buffer, length
        return buffers[0], buffers[1], length

    def _set_code_views(self, codes_name: str, grid_name: str, code_buffer, grid_buffer, length: int) -> None:
        views = (code_buffer[:, :, :length], grid_buffer[:, :, :length])
        setattr(self, codes_name, views[0])
        setattr(self, grid_name, views[1])
        self._code_buffers[codes_name] = (code_buffer, grid_buffer, views)

    def _start_decoded(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.decoded_keys = self.decoded_values = None
        self.decoded_length = 0
        self._append_decoded(keys, values)

    def _append_decoded(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append (B, H, n, d) values to the decoded copy, growing its capacity geometrically (no per-step copy of
        the whole cache; it grows by half its length)."""
        length, new = self.decoded_length, keys.shape[-2]
        self._decoded_room(keys, values, new)
        self.decoded_keys[:, :, length : length + new] = keys
        self.decoded_values[:, :, length : length + new] = values
        self.decoded_length = length + new

    def _decoded_room(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        """Grow the decoded copy (if needed) to hold ``new`` more tokens (``keys`` / ``values``: tensors of the
        batch, heads and width to hold)."""
        length = self.decoded_length
        # a copy made under torch.inference_mode cannot be written outside it: copied into a new buffer
        stale = (
            self.decoded_keys is not None and self.decoded_keys.is_inference() and not torch.is_inference_mode_enabled()
        )
        if self.decoded_keys is None or length + new > self.decoded_keys.shape[-2] or stale:
            capacity = max(length + length // 2, length + new, 64)  # amortised O(1) per token, at most 1.5x
            grown = []
            for old, states in ((self.decoded_keys, keys), (self.decoded_values, values)):
                buffer = states.new_empty((*states.shape[:2], capacity, states.shape[-1]), dtype=torch.float64)
                if old is not None:
                    buffer[:, :, :length] = old[:, :, :length]
                grown.append(buffer)
            self.decoded_keys, self.decoded_values = grown

    def held_bytes(self) -> dict[str, int]:
        """Bytes this layer holds: ``"codes"`` (the packed codes and the grids; on the fast path their buffers'
        whole capacity) and ``"decoded"`` (the decoded copy a fast CPU step keeps, its whole capacity; 0 on the
        PyTorch path)."""
        held = []
        for name, grid_name in (("keys", "key_grid"), ("values", "value_grid")):
            stored, grid = getattr(self, name, None), getattr(self, grid_name)
            buffers = self._code_buffers.get(name)
            if buffers is not None and buffers[2][0] is stored and buffers[2][1] is grid:
                stored, grid = buffers[0], buffers[1]  # the fast path's buffers, whole
            held += [stored, grid]
        codes = sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
        decoded = sum(t.numel() * t.element_size() for t in (self.decoded_keys, self.decoded_values) if t is not None)
        return {"codes": codes, "decoded": decoded}

    def _apply(self, fn) -> None:
        self.decoded_keys = self.decoded_values = None  # rebuilt from the codes by the next fast step
        self.decoded_length = 0
        self._code_buffers = {}
        if self.is_initialized and self.key_grid is not None:
            self.keys, self.values, self.key_grid, self.value_grid = (
                fn(t) for t in (self.keys, self.values, self.key_grid, self.value_grid)
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove:
            self._apply(lambda t: t[..., : -abs(tokens_to_remove), :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])


class SignedCodeLayer(GIFCodeLayer):
    """One attention layer's cache for signed K/V neurons (:mod:`spikelm.nn.neurons.signed`, cache layout
    ``"signed_codes"``): each token's signed codes -Q..Q stored offset by Q (0..2Q), packed to their bit width
    (``packed=True``: :func:`~spikelm.nn.packing.pack_bits`, b = bit length of 2Q, (B, H, L, b * ceil(d / 8)) uint8)
    or one integer per value; ``key_grid`` / ``value_grid`` (B, H, L, G) each token's per-group scales in the
    quantiser's dtype (no zero point). Decoding is the neuron's own ``dequantize``, so cached tokens equal what a
    full forward pass computes."""

    @staticmethod
    def describe_packing(packing: int | None) -> str:
        return "int8 codes" if packing is None else "signed codes packed to their bit width"

    def lazy_initialization(self, key_states, value_states) -> None:
        self.offset = max(int(n.groups()[1].max()) for n in (self.key_neuron, self.value_neuron))
        super().lazy_initialization(key_states, value_states)

    def _top_code(self) -> int:
        """Codes -Q..Q are stored offset by Q: 0..2Q."""
        return 2 * self.offset

    def _encode(self, code: torch.Tensor) -> torch.Tensor:
        return super()._encode(code + self.offset)

    def _code_offset(self) -> int:
        return self.offset

    def codes(self, name: str = "keys") -> torch.Tensor:
        """The stored signed codes of ``"keys"`` or ``"values"`` (B, H, L, d), int32."""
        return super().codes(name).to(torch.int32) - self.offset

    def _decode(self, name: str, neuron: nn.Module, grid: torch.Tensor | None) -> torch.Tensor:
        if grid is None:
            stored = getattr(self, name)
            return torch.empty((*stored.shape[:3], self.width), dtype=self.dtype, device=stored.device)
        return neuron.dequantize(self.codes(name), grid).to(self.dtype)

    @staticmethod
    def _quantize(neuron: nn.Module, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's signed codes and its per-group scales (no zero point)."""
        return neuron.quantize(states)

    def _fast_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """:meth:`GIFCodeLayer._fast_update` in one C++ call where both neurons give a plan
        (:meth:`~spikelm.nn.neurons.signed.SignedNeuron.kv_plan`) and the codes are packed: K and V coded
        (``token_codes``) and their codes, scales and decoded values written into the growing buffers
        (``kv_codes_append``: the same functions and copies, the same bits)."""
        if (
            not self.packed
            or (self.decoded_keys is None and self.key_grid is not None)  # tokens cached by the PyTorch path
        ):
            return super()._fast_update(key_states, value_states)
        plans = self._kv_plans_for(key_states, value_states)
        if plans is None:
            return super()._fast_update(key_states, value_states)
        batch, heads, new, _ = key_states.shape
        rooms = []
        for codes_name, grid_name, plan in (("keys", "key_grid", plans[0]), ("values", "value_grid", plans[1])):

            def like(groups=plan[1].shape[0]):
                planes = self.bits * -(-self.width // 8)
                code = key_states.new_empty((batch, heads, 1, planes), dtype=torch.uint8)
                return code, key_states.new_empty((batch, heads, 1, groups))

            rooms.append(self._code_room(codes_name, grid_name, like, new))
        decoded_at = self.decoded_length
        self._decoded_room(key_states, value_states, new)
        if rooms[0][2] != rooms[1][2]:  # keys and values always hold the same tokens
            raise RuntimeError(f"spikelm: the cache holds {rooms[0][2]} keys but {rooms[1][2]} values")
        cpu_kernels.kv_codes_append(
            key_states,
            value_states,
            plans[0],
            plans[1],
            SCALE_FLOOR,
            self.bits,
            self.offset,
            [rooms[0][0], rooms[0][1], rooms[1][0], rooms[1][1], self.decoded_keys, self.decoded_values],
            rooms[0][2],
            decoded_at,
        )
        for (codes_name, grid_name), room in zip((("keys", "key_grid"), ("values", "value_grid")), rooms, strict=True):
            self._set_code_views(codes_name, grid_name, room[0], room[1], room[2] + new)
        self.decoded_length = length = decoded_at + new
        return self.decoded_keys[:, :, :length], self.decoded_values[:, :, :length]

    def _kv_plans_for(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple | None:
        """``(key plan, value plan)``: the neurons' :meth:`~spikelm.nn.neurons.signed.SignedNeuron.kv_plan` where
        both give one and the neurons are plain, else None. Kept for the next steps while nothing they read changes
        (a decoding step asks at every layer): no neuron attribute assigned (``state_epoch``), the same shapes, and
        still no gradient recorded, no hooks, float32 CPU states, the C++ kernels on."""
        key_neuron, value_neuron = self.key_neuron, self.value_neuron
        key = None
        if not (
            torch.is_grad_enabled()
            or key_states.dtype is not torch.float32
            or value_states.dtype is not torch.float32
            or not (key_states.is_cpu and value_states.is_cpu)
            or key_neuron._forward_hooks
            or key_neuron._forward_pre_hooks
            or value_neuron._forward_hooks
            or value_neuron._forward_pre_hooks
            or global_hooks()
            or not kernels.cpp_on()
        ):
            key = (state_epoch(), key_states.shape, value_states.shape, key_neuron, value_neuron)
            kept = self.__dict__.get("_kv_plans")
            if kept is not None and kept[0] == key:
                return kept[1]
        if not (self._plain(key_neuron) and self._plain(value_neuron)) or key_states.shape != value_states.shape:
            return None
        key_plan = key_neuron.kv_plan(key_states)
        value_plan = None if key_plan is None else value_neuron.kv_plan(value_states)
        if value_plan is None:
            return None
        self._kv_plans = (key, (key_plan, value_plan))  # key None (not keepable): asked again next time
        return key_plan, value_plan


class TransientSpikeKV:
    """Stands in for the cache when there is none (``use_cache=False``): spikes K and V, stores nothing."""

    def __init__(self, key_neuron: nn.Module, value_neuron: nn.Module, steps: int):
        self.key_neuron, self.value_neuron, self.steps = key_neuron, value_neuron, steps

    def update(self, key_states, value_states, *args, **kwargs):
        return (
            spike_per_step(self.key_neuron, key_states, self.steps),
            spike_per_step(self.value_neuron, value_states, self.steps),
        )

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0


# how a converted model's K/V cache stores each neuron's spikes, by the neuron's ``cache_layout``
# (spikelm.nn.neurons.base.SpikingNeuron): a layer class made by ``layer(key_neuron, value_neuron, steps, packing)``
CACHE_LAYERS: dict[str, type[DynamicLayer]] = {
    "step_codes": SpikeCodeLayer,  # per-step ternary codes, alpha_t per step (the elastic neuron)
    "token_codes": GIFCodeLayer,  # one integer code per value, a per-token grid (GIF)
    "signed_codes": SignedCodeLayer,  # one signed code per value, per-token scales per group (the signed neuron)
}


def cache_layer_class(neuron: SpikingNeuron | type[SpikingNeuron]) -> type[DynamicLayer]:
    """The cache layer class for K/V spiked by ``neuron`` (an instance or a class), after its ``cache_layout``."""
    layout = neuron.cache_layout
    if layout not in CACHE_LAYERS:
        raise ValueError(f"no spike-code cache layer for the cache layout {layout!r}; known: {sorted(CACHE_LAYERS)}")
    return CACHE_LAYERS[layout]


def is_spike_cache(cache) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` whose layers are all spike-code layers. Asked by every attention
    layer at every step: the answer for a cache's layer list (the same list object, the same length) is kept on the
    cache (``into_spike_cache`` sets a new list)."""
    if not isinstance(cache, DynamicCache):
        return False
    layers = cache.layers
    seen = cache.__dict__.get("_spikelm_checked")
    if seen is not None and seen[0] is layers and seen[1] == len(layers):
        return True
    kinds = tuple(CACHE_LAYERS.values())
    if len(layers) > 0 and all(isinstance(layer, kinds) for layer in layers):
        cache.__dict__["_spikelm_checked"] = (layers, len(layers))
        return True
    return False


def make_spike_layers(
    attentions: list[nn.Module], steps: int, packing: int | None = DEFAULT_PACKING
) -> list[DynamicLayer]:
    """One spike-code layer per attention module, in layer order (:func:`cache_layer_class` of its K neuron).

    ``packing``: ternary codes per byte (5 or 4; GIF codes then packed to their bit width), or None (one code per
    byte)."""
    return [
        cache_layer_class(attn.key_neuron).for_neurons(attn.key_neuron, attn.value_neuron, steps, packing)
        for attn in attentions
    ]


def into_spike_cache(
    cache: DynamicCache, attentions: list[nn.Module], steps: int, packing: int | None = DEFAULT_PACKING
) -> DynamicCache:
    """Turn an empty ``DynamicCache`` into a spike-code cache in place (the object ``generate()`` holds)."""
    if cache.get_seq_length() > 0:
        raise ValueError(
            "a spiking model caches spike codes, but the DynamicCache passed as past_key_values already holds "
            f"{cache.get_seq_length()} tokens of float keys and values; pass no cache (or an empty one)"
        )
    cache.layers = make_spike_layers(attentions, steps, packing)
    cache.layer_class_to_replicate = None
    return cache


class SpikeCodeCache(DynamicCache):
    """The spike-code cache of a converted model (made for you by the model; see the module docstring).

    Make one yourself with :func:`spike_code_cache` (e.g. ``packing=None`` for unpacked codes)."""

    def __init__(self, attentions: list[nn.Module], steps: int, packing: int | None = DEFAULT_PACKING):
        super().__init__()
        into_spike_cache(self, attentions, steps, packing)


def spike_code_cache(model: nn.Module, packing: int | None = DEFAULT_PACKING) -> SpikeCodeCache:
    """An empty spike-code cache for the converted ``model``, to pass as ``past_key_values`` (to ``generate()`` or
    a forward call). ``packing``: ternary codes per byte (5, the default, or 4; GIF codes packed to their bit
    width), or None for one code per byte."""
    state = getattr(model, "_spikelm", None)
    if state is None:
        raise ValueError(f"this {type(model).__name__} was not converted by spikify")
    return SpikeCodeCache(state.attentions(), state.steps, packing)
