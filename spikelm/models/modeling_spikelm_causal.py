"""Causal (decoder-only) SpikeLM: a spiking GPT with a key/value cache of spike codes.

Reading order: positions and masks, the spike-code cache, attention, feed-forward, block, models.

The spiking placement is the encoder's (SPEC section 3): tensors inside the blocks are time-major
``(T, B, L, D)``; every linear layer spikes its input with its own multi-step neuron (one neuron for
the shared Q/K/V input); the projected K and V are spiked again per step (no membrane); Q, softmax,
GELU, residuals and LayerNorms stay real-valued. Attention is causal and the blocks are
pre-LayerNorm (GPT-style) unless ``config.pre_layer_norm=False``. After the final LayerNorm the T
copies are averaged and a real-valued LM head, tied to the token embeddings, gives the logits. With
``config.spiking=False`` the same code is a real-valued GPT.

The membrane runs over the T steps of each token, never across positions, so all a new token needs
from its past is the spiked K and V of earlier tokens: caching them makes incremental decoding equal
to a full forward pass. The cache folds T into the head axis, ``(B, T*H, L, d)``, because
``generate()`` reorders and selects caches along dim 0 (the batch), and stores the spikes as int8
codes with one magnitude per step.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from spikelm.nn.exact import spiking_sdpa
from spikelm.nn.neurons.elastic import ALPHA_FLOOR
from spikelm.nn.packing import (
    PER_BYTE,
    pack_ternary,
    packed_width,
    ternary_table,
    unpack_ternary,
    unpack_ternary_codes,
    unpack_ternary_words,
)

from .configuration_spikelm import SpikeLMConfig
from .modeling_spikelm import SpikeLMPreTrainedModel, check_input_shape, make_linear, make_respike

# ----------------------------------------------------------------------------------------------
# Positions and masks
# ----------------------------------------------------------------------------------------------


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of the rotary angles for integer ``position_ids`` (B, L): two (B, L, head_dim) tensors."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    angles = position_ids[..., None].float() * theta**-exponents
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (i, i + d/2) of ``x`` (T, B, L, H, d) by each position's angles."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def causal_attention_mask(attention_mask, query_length, past_length, dtype, device):
    """Additive (B or 1, 1, Lq, Lk) mask: the query at position ``past_length + i`` sees the keys up to
    itself that are not padding. ``attention_mask`` is the (B, Lk) 1/0 padding mask of the past and
    current tokens, or None. Returns None when nothing is masked (one new token, no padding).
    """
    key_length = past_length + query_length
    query_index = torch.arange(past_length, key_length, device=device)[:, None]
    visible = (torch.arange(key_length, device=device)[None, :] <= query_index)[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask[:, None, None, :].bool()
    if bool(visible.all()):
        return None
    # A left-padding query sees nothing; the finite minimum keeps its (unused) softmax free of NaN.
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------
# The key/value cache: packed spike codes, T folded into the head axis
# ----------------------------------------------------------------------------------------------

# How a spike cache stores its ternary codes unless told otherwise: 5 per byte (see spikelm.nn.packing)
DEFAULT_PACKING = 5


class SpikeKVCacheLayer(DynamicLayer):
    """One block's cached K and V spikes as codes q in {-1, 0, 1}, T folded into the head axis (B, T*H, L, ·).

    ``packing`` is how the codes are stored: 5 or 4 codes per byte (:mod:`spikelm.nn.packing`: (B, T*H, L,
    ceil(d / packing)) uint8; the default, :data:`DEFAULT_PACKING`) or ``None`` for one int8 code per byte
    (B, T*H, L, d). ``update`` takes the new float spikes ``scale_t * q`` with the per-step magnitudes
    ``key_scale`` and ``value_scale`` (T,) (alpha_t, or 1 without amplitude) and returns the spikes of the cached
    tokens followed by the new ones (which keep their autograd graph). Decoding is exact on both layouts: it
    multiplies the same q and scale in the same precision as the neuron did. Magnitudes are taken from the latest
    update (alphas are frozen while decoding). Reordering, cropping and batch selection along dim 0 (and the
    positions, dim -2) are DynamicLayer's, on the stored codes.
    """

    def __init__(self, packing: int | None = DEFAULT_PACKING):
        super().__init__()
        if packing is not None and packing not in PER_BYTE:
            raise ValueError(f"packing must be None or one of {PER_BYTE} codes per byte, got {packing!r}")
        self.packing = packing
        self._tables: dict = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # records the float dtype and device
        self.width = key_states.shape[3]
        if self.packing is None:
            empty, code_dtype = (*key_states.shape[:2], 0, self.width), torch.int8
        else:
            empty, code_dtype = (*key_states.shape[:2], 0, packed_width(self.width, self.packing)), torch.uint8
        self.keys = torch.empty(empty, dtype=code_dtype, device=self.device)
        self.values = torch.empty(empty, dtype=code_dtype, device=self.device)

    def update(self, key_states, value_states, *args, key_scale=None, value_scale=None, **kwargs):
        if key_scale is None or value_scale is None:
            raise ValueError(
                "SpikeKVCacheLayer caches the spikes of a spiking model and needs key_scale and value_scale "
                "(the per-step spike magnitudes); use DynamicCache for a real-valued model"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._decode_after_append(key_states, value_states):
            # inference with packed codes: append, then decode every cached token in one pass (bit-identical:
            # the table holds the values the neuron computed; no copy of the past for a concatenation)
            self.key_scale, self.value_scale = key_scale, value_scale
            self.keys = torch.cat([self.keys, self._encode(key_states)], dim=-2)
            self.values = torch.cat([self.values, self._encode(value_states)], dim=-2)
            return self._decode(self.keys, key_scale, "key"), self._decode(self.values, value_scale, "value")
        past_keys = self._decode(self.keys, key_scale, "key")
        past_values = self._decode(self.values, value_scale, "value")
        self.key_scale, self.value_scale = key_scale, value_scale
        # scale_t > 0, so the sign of a spike is its code
        self.keys = torch.cat([self.keys, self._encode(key_states)], dim=-2)
        self.values = torch.cat([self.values, self._encode(value_states)], dim=-2)
        if past_keys.shape[-2] == 0:
            return key_states, value_states
        return torch.cat([past_keys, key_states], dim=-2), torch.cat([past_values, value_states], dim=-2)

    def _decode_after_append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether ``update`` may return the decoded cache (packed codes, a past to read, no gradient to keep)."""
        if self.packing is None or self.keys.shape[-2] == 0:
            return False
        return not (torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad))

    def _encode(self, spikes: torch.Tensor) -> torch.Tensor:
        codes = torch.sign(spikes.detach()).to(torch.int8)
        return codes if self.packing is None else pack_ternary(codes, self.packing)

    def _compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    def _decode(
        self, codes: torch.Tensor, scale: torch.Tensor, name: str = "key", steps_into_batch: bool = False
    ) -> torch.Tensor:
        """The spikes ``scale_t * q`` of stored ``codes``: (B, T*H, L, d), or (T*B, H, L, d) with
        ``steps_into_batch`` (packed codes only)."""
        steps = scale.shape[0]
        if self.packing == 4:
            return unpack_ternary_words(
                codes, scale, self.width, self.dtype, self._compute_dtype(), steps_into_batch=steps_into_batch
            )
        if self.packing is not None:
            return unpack_ternary(codes, self._table(scale, name), steps, self.width, steps_into_batch)
        batch, heads, length, head_dim = codes.shape
        compute_dtype = self._compute_dtype()
        spikes = codes.reshape(batch, steps, heads // steps, length, head_dim).to(compute_dtype)
        spikes = spikes * scale.to(compute_dtype).view(1, steps, 1, 1, 1)
        return spikes.view(batch, heads, length, head_dim).to(self.dtype)

    def _table(self, scale: torch.Tensor, name: str) -> torch.Tensor:
        """The decoding table of ``scale`` (rebuilt only when the magnitudes change)."""
        cached = self._tables.get(name)
        if cached is not None and cached[0].shape == scale.shape and torch.equal(cached[0], scale):
            return cached[1]
        table = ternary_table(scale, self.packing, self.dtype, self._compute_dtype())
        self._tables[name] = (scale.detach().clone(), table)
        return table

    def codes(self, name: str = "keys") -> torch.Tensor:
        """The stored codes of ``"keys"`` or ``"values"`` as int8 (B, T*H, L, d), whatever the layout."""
        stored = getattr(self, name)
        return stored if self.packing is None else unpack_ternary_codes(stored, self.width, self.packing)


class SpikeLMCache(Cache):
    """The key/value cache of a spiking SpikeLM decoder: one :class:`SpikeKVCacheLayer` per block.

    ``generate()`` uses it automatically for a spiking model; pass ``SpikeLMCache(config)`` as
    ``past_key_values`` to decode step by step yourself. ``packing``: codes per byte (5, the default, or 4), or
    None for int8 codes. A transformers ``DynamicCache`` works too but keeps the float spikes (4 bytes per
    element in float32).
    """

    def __init__(self, config: SpikeLMConfig, packing: int | None = DEFAULT_PACKING):
        super().__init__(layers=[SpikeKVCacheLayer(packing) for _ in range(config.num_hidden_layers)])


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


class SpikeLMCausalSelfAttention(nn.Module):
    """Causal multi-head self-attention: one neuron on the shared Q/K/V input, ternary K and V, real Q.

    With rotary positions, Q and K are rotated before K is spiked, so the cached K stays ternary and
    Q K^T keeps one spiking operand. Heads are laid out (B, T*H, L, d), the cache's layout.
    """

    is_causal = True  # read by transformers' attention helpers and by the energy counter (causal fan-out)

    def __init__(self, config: SpikeLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = make_linear(config, config.hidden_size, 3 * config.hidden_size)
        self.key_spike = make_respike(config)
        self.value_spike = make_respike(config)
        self.dense = make_linear(config, config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob

    def _fold_steps_into_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (T, B, L, H, d) -> (B, T*H, L, d)
        steps, batch, length = x.shape[:3]
        return x.permute(1, 0, 3, 2, 4).reshape(batch, steps * self.num_heads, length, self.head_dim)

    def _cache_scales(self) -> dict:
        """The per-step spike magnitudes of K and V that a spike-code cache decodes with."""
        if self.key_spike is None:
            return {}
        return {
            f"{name}_scale": neuron.alpha.detach().clamp_min(ALPHA_FLOOR)
            if neuron.use_amplitude
            else torch.ones_like(neuron.alpha.detach())
            for name, neuron in (("key", self.key_spike), ("value", self.value_spike))
        }

    def forward(self, hidden_states, attention_mask=None, rotary=None, past_key_values: Cache | None = None):
        steps, batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(steps, batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(3)
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if self.key_spike is not None:
            key, value = self.key_spike(key), self.value_spike(value)
        query, key, value = (self._fold_steps_into_heads(x) for x in (query, key, value))
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx, **self._cache_scales())
        context = spiking_sdpa(
            query, key, value, attn_mask=attention_mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        context = context.view(batch, steps, self.num_heads, length, self.head_dim)
        context = context.permute(1, 0, 3, 2, 4).reshape(steps, batch, length, width)
        return self.dropout(self.dense(context))


# ----------------------------------------------------------------------------------------------
# Feed-forward and block
# ----------------------------------------------------------------------------------------------


class SpikeLMDecoderMLP(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.fc_in = make_linear(config, config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc_out = make_linear(config, config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states):
        return self.dropout(self.fc_out(self.act(self.fc_in(hidden_states))))


def decoder_pre_layer_norm(config: SpikeLMConfig) -> bool:
    """The decoder's block layout: pre-LayerNorm unless the config asks for post-LayerNorm."""
    return config.pre_layer_norm is not False


class SpikeLMDecoderLayer(nn.Module):
    """A causal block on time-major input (T, B, L, D); pre- or post-LayerNorm."""

    def __init__(self, config: SpikeLMConfig, layer_idx: int):
        super().__init__()
        self.pre_layer_norm = decoder_pre_layer_norm(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.block_layer_norm_eps)
        self.attention = SpikeLMCausalSelfAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.block_layer_norm_eps)
        self.mlp = SpikeLMDecoderMLP(config)

    def forward(self, hidden_states, attention_mask=None, rotary=None, past_key_values=None):
        if self.pre_layer_norm:
            hidden_states = hidden_states + self.attention(
                self.attention_norm(hidden_states), attention_mask, rotary, past_key_values
            )
            return hidden_states + self.mlp(self.mlp_norm(hidden_states))
        hidden_states = self.attention_norm(
            hidden_states + self.attention(hidden_states, attention_mask, rotary, past_key_values)
        )
        return self.mlp_norm(hidden_states + self.mlp(hidden_states))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class SpikeLMCausalPreTrainedModel(SpikeLMPreTrainedModel):
    base_model_prefix = "model"
    _no_split_modules = ["SpikeLMDecoderLayer"]


def _check_decoder_inputs(config, input_ids, inputs_embeds, attention_mask, past_length):
    batch, length = check_input_shape(config, input_ids, inputs_embeds)
    if past_length + length > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {past_length + length} ({past_length} cached + {length} new tokens) exceeds the "
            f"model's maximum length, max_position_embeddings={config.max_position_embeddings}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + length):
        raise ValueError(
            f"attention_mask must have shape (batch, cached + new tokens) = {(batch, past_length + length)}; "
            f"got {tuple(attention_mask.shape)}"
        )


class SpikeLMDecoderModel(SpikeLMCausalPreTrainedModel):
    """The bare causal SpikeLM: embeddings, T-step spiking causal blocks, final LayerNorm, T-average.

    ``position_ids`` default to the positions the padding mask implies (so left padding works as in
    ``generate()``), else to ``past_length, past_length + 1, ...``. ``use_cache=True`` returns the
    cache in ``past_key_values`` (a :class:`SpikeLMCache` for a spiking model); a cache passed in is
    updated in place.
    """

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        absolute = config.position_embedding_type == "absolute"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if absolute else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([SpikeLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        pre = decoder_pre_layer_norm(config)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if pre else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        config = self.config
        if output_attentions:
            raise ValueError("output_attentions is not supported by the causal SpikeLM (attention runs in SDPA)")
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if use_cache and past_key_values is None:
            past_key_values = SpikeLMCache(config) if config.spiking else DynamicCache(config=config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        _check_decoder_inputs(config, input_ids, inputs_embeds, attention_mask, past_length)

        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
                position_ids = position_ids[:, past_length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=hidden.device)[None]
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(position_ids)
        hidden = self.dropout(hidden)
        rotary = None
        if config.position_embedding_type == "rotary":
            head_dim = config.hidden_size // config.num_attention_heads
            rotary = rotary_cos_sin(position_ids, head_dim, config.rope_theta, hidden.dtype)
        mask = causal_attention_mask(attention_mask, length, past_length, hidden.dtype, hidden.device)

        # The T copies of the embedding output are one expanded view: no copy.
        hidden = hidden.unsqueeze(0).expand(config.effective_num_steps, *hidden.shape)
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden.mean(0),)
            hidden = layer(hidden, mask, rotary, past_key_values)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        hidden = hidden.mean(0)
        if output_hidden_states:
            all_hidden_states += (hidden,)
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden, past_key_values=past_key_values, hidden_states=all_hidden_states
        )
        return out if return_dict else out.to_tuple()


class SpikeLMForCausalLM(SpikeLMCausalPreTrainedModel, GenerationMixin):
    """The causal SpikeLM with its LM head (tied to the token embeddings unless
    ``tie_word_embeddings=False``); ``generate()`` works as for any transformers causal LM.

    ``labels`` are the input ids (shifted inside; -100 is ignored), as in transformers.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.model = SpikeLMDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )
        return out if return_dict else out.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() builds a float DynamicCache; a spiking model caches int8 spike codes instead.
        user_cache = model_kwargs.get("past_key_values")
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        made = model_kwargs.get("past_key_values")
        if self.config.spiking and user_cache is None and type(made) is DynamicCache and not made.offloading:
            model_kwargs["past_key_values"] = SpikeLMCache(self.config)
