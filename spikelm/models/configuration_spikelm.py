"""SpikeLM configuration: the BERT fields, every spiking knob of SPEC section 2, and the decoder's fields."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from spikelm.nn.neurons.elastic import check_neuron_options

POSITION_EMBEDDING_TYPES = ("absolute", "rotary")


class SpikeLMConfig(PretrainedConfig):
    r"""Configuration of a SpikeLM model: the BERT-like encoder or the causal decoder (``SpikeLMForCausalLM``).

    Shape (as BERT):
        vocab_size (int): number of tokens (30522 for bert-base-uncased WordPiece).
        hidden_size (int): width D of the residual stream.
        num_hidden_layers (int): number of Transformer blocks.
        num_attention_heads (int): attention heads per block; must divide ``hidden_size``.
        intermediate_size (int): width of the feed-forward layer.
        max_position_embeddings (int): longest sequence the learned positions cover.
        type_vocab_size (int): number of segment (token type) ids (encoder only).

    Activations and normalisation:
        hidden_act (str): the FFN activation. The released model always uses exact (erf) GELU here,
            whatever its own config says, hence the default ``"gelu"``.
        head_hidden_act (str): activation of the MLM head's transform (the authors' ``hidden_act``;
            ``"relu"`` in their pretraining run).
        layer_norm_eps (float): epsilon of the embedding and head LayerNorms.
        block_layer_norm_eps (float): epsilon of the LayerNorms inside the blocks (1e-12 in the
            released code, hard-coded there).

    Positions and block layout (what the causal decoder may change; the encoder models accept only
    their defaults):
        position_embedding_type (str): ``"absolute"`` (learned position embeddings, as BERT) or
            ``"rotary"`` (rotary embeddings applied to Q and K before K is spiked; decoder only).
            ``max_position_embeddings`` is the longest sequence either kind accepts.
        rope_theta (float): base of the rotary frequencies (used with ``"rotary"`` only).
        pre_layer_norm (bool | None): True: pre-LayerNorm blocks (GPT-style, with a final LayerNorm);
            False: post-LayerNorm blocks (BERT-style); None: each model's own layout, post-LN for the
            encoder models (as released) and pre-LN for ``SpikeLMForCausalLM``. The encoder models
            support only post-LN.

    Regularisation and initialisation: ``hidden_dropout_prob``, ``attention_probs_dropout_prob``,
    ``classifier_dropout`` (None: ``hidden_dropout_prob``), ``initializer_range`` (std of the
    normal init of weights).

    Spiking (SPEC section 2):
        spiking (bool): False builds the real-valued model from the same code: no neurons and no
            T copies of anything, whatever ``num_steps`` says (the ANN baseline).
        num_steps (int): T, the number of time steps every spiking layer runs over.
        spike_levels (str): ``"ternary"`` ({-1, 0, +1}, SpikeLM) or ``"binary"`` ({0, 1}, the
            LIF-BERT baseline).
        use_amplitude (bool): spikes are ``alpha_t * q_t`` (True) or ``q_t`` (False; alpha then only
            sets the firing threshold alpha_t / 2).
        alpha_init (str | float): ``"mean_abs"`` sets alpha_t = 2 * mean|u_t| from the first batch
            each neuron sees; a positive number fixes every alpha to it instead.
        learn_alpha (bool): train alpha with the LSQ step-size gradient (False: frozen, as released).
        reset (str): membrane update after a spike: ``"official"`` (the authors' exact update,
            ternary) or ``"symmetric"`` (leaky hard reset on either sign). Binary spikes always use
            the leaky hard reset.
    """

    model_type = "spikelm"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        head_hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        block_layer_norm_eps: float = 1e-12,
        pad_token_id: int | None = 0,
        classifier_dropout: float | None = None,
        tie_word_embeddings: bool = True,
        spiking: bool = True,
        num_steps: int = 4,
        spike_levels: str = "ternary",
        use_amplitude: bool = True,
        alpha_init: str | float = "mean_abs",
        learn_alpha: bool = False,
        reset: str = "official",
        position_embedding_type: str = "absolute",
        rope_theta: float = 10000.0,
        pre_layer_norm: bool | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.head_hidden_act = head_hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.block_layer_norm_eps = block_layer_norm_eps
        self.classifier_dropout = classifier_dropout
        self.tie_word_embeddings = tie_word_embeddings
        self.spiking = spiking
        self.num_steps = num_steps
        self.spike_levels = spike_levels
        self.use_amplitude = use_amplitude
        self.alpha_init = alpha_init
        self.learn_alpha = learn_alpha
        self.reset = reset
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.pre_layer_norm = pre_layer_norm
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check()

    def _check(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SpikeLMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"SpikeLMConfig.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not isinstance(self.spiking, bool):
            raise ValueError(f"SpikeLMConfig.spiking must be True or False, got {self.spiking!r}")
        from transformers.activations import ACT2FN

        for name in ("hidden_act", "head_hidden_act"):
            if getattr(self, name) not in ACT2FN:
                raise ValueError(
                    f"SpikeLMConfig.{name} must name an activation of transformers.activations.ACT2FN "
                    f"(e.g. 'gelu', 'relu'), got {getattr(self, name)!r}"
                )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"SpikeLMConfig.position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, "
                f"got {self.position_embedding_type!r}"
            )
        if self.position_embedding_type == "rotary" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head size; hidden_size / num_attention_heads = "
                f"{self.hidden_size // self.num_attention_heads}"
            )
        # finite numbers in range (NaN and infinities refused: a NaN dropout or epsilon trains nothing, and
        # config.json cannot even record it as JSON)
        for name, low, high, low_open in (
            ("hidden_dropout_prob", 0.0, 1.0, False),
            ("attention_probs_dropout_prob", 0.0, 1.0, False),
            ("classifier_dropout", 0.0, 1.0, False),
            ("initializer_range", 0.0, None, False),
            ("layer_norm_eps", 0.0, None, True),
            ("block_layer_norm_eps", 0.0, None, True),
            ("rope_theta", 0.0, None, True),
        ):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
            if not ok:
                where = f"in [{low:g}, {high:g}]" if high is not None else ("> 0" if low_open else ">= 0")
                raise ValueError(f"SpikeLMConfig.{name} must be a finite number {where}, got {value!r}")
        if not (self.pre_layer_norm is None or isinstance(self.pre_layer_norm, bool)):
            raise ValueError(f"SpikeLMConfig.pre_layer_norm must be True, False or None, got {self.pre_layer_norm!r}")
        check_neuron_options(
            self.num_steps, self.spike_levels, self.use_amplitude, self.alpha_init, self.learn_alpha, self.reset
        )

    @property
    def effective_num_steps(self) -> int:
        """The number of copies the encoder runs on: ``num_steps`` if spiking, else 1."""
        return self.num_steps if self.spiking else 1

    def neuron_options(self) -> dict:
        """Keyword arguments for :class:`spikelm.ElasticBiSpikingNeuron` from this config."""
        return {
            "spike_levels": self.spike_levels,
            "use_amplitude": self.use_amplitude,
            "alpha_init": self.alpha_init,
            "learn_alpha": self.learn_alpha,
            "reset": self.reset,
        }
