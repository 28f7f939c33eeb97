"""SpikeLM encoder models (BERT-like), SPEC section 3.

Reading order: embeddings, attention, feed-forward, block, encoder, heads, models.

Tensors inside the encoder are time-major: ``(T, B, L, D)``. The embedding output is shared by the
T steps; every linear layer of every block spikes its input with its own multi-step neuron (one
neuron for the shared Q/K/V input); the projected K and V are spiked again per step (no membrane);
Q, softmax, GELU, residuals and LayerNorms stay real-valued. After the last block the T copies are
averaged and the heads are ordinary real-valued layers. With ``config.spiking=False`` the same code
is the real-valued BERT (T = 1, plain ``nn.Linear``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput

from spikelm.nn.exact import spiking_sdpa
from spikelm.nn.layers import SpikeLinear
from spikelm.nn.neurons import SpikingNeuron, named_neurons, neuron_class

from .configuration_spikelm import SpikeLMConfig

try:  # transformers >= 5: init functions that leave loaded tensors alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init


def make_linear(config: SpikeLMConfig, in_features: int, out_features: int) -> nn.Linear:
    """A spiking linear layer (neuron on the input), or ``nn.Linear`` for the real-valued model."""
    if config.spiking:
        return SpikeLinear(in_features, out_features, num_steps=config.num_steps, **config.neuron_options())
    return nn.Linear(in_features, out_features)


SPIKELM_NEURON = "elastic"  # the registered neuron (spikelm.nn.neurons) a native SpikeLM is built of


def make_respike(config: SpikeLMConfig) -> SpikingNeuron | None:
    """The per-step (no membrane) elastic neuron that spikes the projected K or V; None if not spiking."""
    if not config.spiking:
        return None
    return neuron_class(SPIKELM_NEURON)(config.num_steps, membrane=False, **config.neuron_options())


def additive_attention_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) 1/0 padding mask -> (B, 1, 1, L) additive mask (0 or the dtype's minimum)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


# ----------------------------------------------------------------------------------------------
# Embeddings (real-valued, computed once)
# ----------------------------------------------------------------------------------------------


class SpikeLMEmbeddings(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        embeds = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=embeds.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, length, dtype=torch.long, device=embeds.device)
        embeds = embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeds))


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


class SpikeLMSelfAttention(nn.Module):
    """Multi-head self-attention with one neuron on the shared Q/K/V input and ternary K and V.

    ``qkv`` is one (spiking) linear layer producing [Q; K; V]; the authors' three neurons on the
    same input have identical data-initialised alphas, hence identical spikes, so one suffices.
    """

    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = make_linear(config, config.hidden_size, 3 * config.hidden_size)
        self.key_spike = make_respike(config)
        self.value_spike = make_respike(config)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (T, B, L, H*d) -> (T*B, H, L, d)
        steps, batch, length, _ = x.shape
        return x.reshape(steps * batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        steps, batch, length, width = hidden_states.shape
        query, key, value = self.qkv(hidden_states).chunk(3, dim=-1)
        if self.key_spike is not None:
            key = self.key_spike(key)
            value = self.value_spike(value)
        query, key, value = self._heads(query), self._heads(key), self._heads(value)
        if attention_mask is not None:  # (B, 1, 1, L) -> (T*B, 1, 1, L)
            attention_mask = attention_mask.expand(steps, -1, -1, -1, -1).reshape(steps * batch, 1, 1, length)
        dropout = self.dropout_prob if self.training else 0.0
        probs = None
        if output_attentions:
            scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = F.softmax(scores, dim=-1)
            context = torch.matmul(F.dropout(probs, dropout, self.training), value)
            probs = probs.reshape(steps, batch, self.num_heads, length, length)
        else:
            context = spiking_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(steps, batch, length, width)
        return context, probs


class SpikeLMSelfOutput(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.dense = make_linear(config, config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.block_layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class SpikeLMAttention(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.self = SpikeLMSelfAttention(config)
        self.output = SpikeLMSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        context, probs = self.self(hidden_states, attention_mask, output_attentions)
        return self.output(context, hidden_states), probs


# ----------------------------------------------------------------------------------------------
# Feed-forward, block, encoder
# ----------------------------------------------------------------------------------------------


class SpikeLMIntermediate(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.dense = make_linear(config, config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class SpikeLMOutput(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.dense = make_linear(config, config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.block_layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class SpikeLMLayer(nn.Module):
    """A post-LayerNorm BERT block on time-major input (T, B, L, D)."""

    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.attention = SpikeLMAttention(config)
        self.intermediate = SpikeLMIntermediate(config)
        self.output = SpikeLMOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, attention_mask, output_attentions)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, probs


class SpikeLMEncoder(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.layer = nn.ModuleList([SpikeLMLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, output_hidden_states=False):
        """``hidden_states`` (T, B, L, D) -> the last layer's (T, B, L, D), per-layer states, attentions."""
        all_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, probs = layer(hidden_states, attention_mask, output_attentions)
            if output_hidden_states:
                all_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return hidden_states, all_states, all_attentions


class SpikeLMPooler(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


# ----------------------------------------------------------------------------------------------
# Heads (real-valued)
# ----------------------------------------------------------------------------------------------


class SpikeLMPredictionHeadTransform(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.head_hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class SpikeLMLMPredictionHead(nn.Module):
    """Transform, then the decoder (tied to the word embeddings by default) plus its own bias."""

    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.transform = SpikeLMPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states)) + self.bias


class SpikeLMOnlyMLMHead(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.predictions = SpikeLMLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


def masked_lm_logits_and_loss(head: SpikeLMLMPredictionHead, sequence_output, labels, masked_logits_only=False):
    """MLM logits and loss. By default, as transformers' ``BertForMaskedLM``: logits at every position,
    (B, L, V), so that ``Trainer``, ``pipeline("fill-mask")`` and ``compute_metrics`` work, and with labels the
    cross-entropy over the positions whose label is not -100.

    ``masked_logits_only=True`` (the fast path pretraining opts into): with labels, the head runs only where
    ``labels != -100`` (15 % of tokens) and the logits returned are those rows, (number of masked tokens, V),
    in row-major order of the masked positions; the loss is the same cross-entropy.
    """
    if labels is None:
        return head(sequence_output), None
    if masked_logits_only:
        masked = labels != -100
        logits = head(sequence_output[masked])
        return logits, F.cross_entropy(logits, labels[masked])
    logits = head(sequence_output)
    return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class SpikeLMPreTrainingHeads(nn.Module):
    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.predictions = SpikeLMLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output, pooled_output):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


@dataclass
class SpikeLMModelOutput(ModelOutput):
    """Like BERT's ``BaseModelOutputWithPooling``; every tensor is averaged over the T steps.

    ``step_hidden_states`` (only with ``output_step_hidden_states=True``): per layer, the
    (T, B, L, D) states before averaging, the embedding output first.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    step_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SpikeLMForPreTrainingOutput(ModelOutput):
    """``prediction_logits`` is (B, L, V) when called without ``labels``; with ``labels`` the MLM head
    runs only at the masked positions and it holds those rows, (number of masked tokens, V)."""

    loss: torch.FloatTensor | None = None
    prediction_logits: torch.FloatTensor | None = None
    seq_relationship_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class SpikeLMPreTrainedModel(PreTrainedModel):
    config_class = SpikeLMConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SpikeLMEmbeddings", "SpikeLMLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):  # SpikeLinear included
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SpikeLMLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, SpikingNeuron):
            module.initialize_parameters(init)

    def neurons(self):
        """``(name, neuron)`` for every spiking neuron of the model, in forward order."""
        return named_neurons(self)

    def set_neuron_backend(self, backend: str) -> None:
        """Run every neuron on ``"fused"``/``"auto"`` (default) or ``"reference"`` (per-step) code."""
        for _, neuron in self.neurons():
            neuron.backend = backend

    @property
    def alphas_initialized(self) -> bool:
        return all(neuron.is_initialized() for _, neuron in self.neurons())


def check_input_shape(config: SpikeLMConfig, input_ids, inputs_embeds) -> tuple[int, int]:
    """``(batch, length)`` of exactly one of ``input_ids`` (batch, length) or ``inputs_embeds`` (batch, length,
    hidden), no longer than ``max_position_embeddings``; ``ValueError`` otherwise (encoder and decoder alike)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    want = 2 if input_ids is not None else 3
    if ref.dim() != want:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        shape = "(batch, length)" if want == 2 else "(batch, length, hidden_size)"
        raise ValueError(f"{name} must have shape {shape}; got {tuple(ref.shape)}")
    batch, length = ref.shape[:2]
    if length > config.max_position_embeddings:
        raise ValueError(f"sequence length {length} exceeds max_position_embeddings={config.max_position_embeddings}")
    return batch, length


def _check_inputs(config: SpikeLMConfig, input_ids, inputs_embeds, attention_mask, token_type_ids):
    batch, length = check_input_shape(config, input_ids, inputs_embeds)
    for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tensor is not None and tuple(tensor.shape) != (batch, length):
            raise ValueError(f"{name} must have shape {(batch, length)} like the input; got {tuple(tensor.shape)}")


class SpikeLMModel(SpikeLMPreTrainedModel):
    """The bare SpikeLM encoder: embeddings, T-step spiking blocks, T-average, optional pooler."""

    def __init__(self, config: SpikeLMConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        if config.position_embedding_type != "absolute" or config.pre_layer_norm:
            raise ValueError(
                "the SpikeLM encoder models are post-LayerNorm with learned absolute positions (as released); "
                f"got position_embedding_type={config.position_embedding_type!r}, pre_layer_norm="
                f"{config.pre_layer_norm!r}. Rotary positions and pre-LayerNorm blocks are for SpikeLMForCausalLM"
            )
        self.embeddings = SpikeLMEmbeddings(config)
        self.encoder = SpikeLMEncoder(config)
        self.pooler = SpikeLMPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_step_hidden_states: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        _check_inputs(config, input_ids, inputs_embeds, attention_mask, token_type_ids)

        embedding_output = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        mask = additive_attention_mask(attention_mask, embedding_output.dtype)
        steps = config.effective_num_steps
        # The T copies of the embedding output are one expanded view: no copy.
        hidden = embedding_output.unsqueeze(0).expand(steps, *embedding_output.shape)
        last, step_states, attentions = self.encoder(
            hidden, mask, output_attentions, output_hidden_states or output_step_hidden_states
        )
        sequence_output = last.mean(0)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        hidden_states = tuple(h.mean(0) for h in step_states) if output_hidden_states else None
        if attentions is not None:
            attentions = tuple(a.mean(0) for a in attentions)
        out = SpikeLMModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
            step_hidden_states=step_states if output_step_hidden_states else None,
        )
        return out if return_dict else out.to_tuple()


class SpikeLMForPreTraining(SpikeLMPreTrainedModel):
    """SpikeLM with the MLM and next-sentence heads, as pretrained in the paper."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.bert = SpikeLMModel(config)
        self.cls = SpikeLMPreTrainingHeads(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        next_sentence_label=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        masked_logits_only=False,
        **kwargs,
    ):
        """``masked_logits_only``: with ``labels``, prediction logits only at the masked positions (see
        :func:`masked_lm_logits_and_loss`); default: (B, L, V) as transformers."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        seq_logits = self.cls.seq_relationship(outputs.pooler_output)
        prediction_logits, loss = masked_lm_logits_and_loss(
            self.cls.predictions, outputs.last_hidden_state, labels, masked_logits_only
        )
        if labels is not None and next_sentence_label is not None:
            loss = loss + F.cross_entropy(seq_logits.reshape(-1, 2), next_sentence_label.reshape(-1))
        out = SpikeLMForPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return out if return_dict else out.to_tuple()


class SpikeLMForMaskedLM(SpikeLMPreTrainedModel):
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.bert = SpikeLMModel(config, add_pooling_layer=False)
        self.cls = SpikeLMOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        masked_logits_only=False,
        **kwargs,
    ):
        """``masked_logits_only``: as :class:`SpikeLMForPreTraining`."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits, loss = masked_lm_logits_and_loss(
            self.cls.predictions, outputs.last_hidden_state, labels, masked_logits_only
        )
        out = MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return out if return_dict else out.to_tuple()


class SpikeLMForSequenceClassification(SpikeLMPreTrainedModel):
    """Pooled output -> dropout -> linear; regression when ``num_labels == 1``, as BERT's."""

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = SpikeLMModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        out = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return out if return_dict else out.to_tuple()
