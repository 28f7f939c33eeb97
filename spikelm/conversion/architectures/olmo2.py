"""OLMo-2: norms *after* the attention and MLP outputs (``post_attention_layernorm``, ``post_feedforward_layernorm``,
before the residual add), none before them: q/k/v and gate/up read the residual stream itself; RMSNorm on the whole
q and k projections. A rotation of the residual stream cannot be folded through the post norms' gains, so only the
online rotation of down_proj's input applies, and the per-head value/output rotation (no norm acts on V)."""

from __future__ import annotations

from .base import Architecture, InputSite, Norm, ValueOutput, register

OLMO2 = register(
    Architecture(
        model_type="olmo2",
        layers="layers",
        attention="self_attn",
        sites=(
            InputSite("qkv_input", "self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            InputSite("o_input", "self_attn.o_proj", ("self_attn.o_proj",)),
            InputSite("gate_up_input", "mlp", ("mlp.gate_proj", "mlp.up_proj")),
            InputSite("down_input", "mlp.down_proj", ("mlp.down_proj",)),
        ),
        average_after="norm",
        causal=True,
        writers=("self_attn.o_proj", "mlp.down_proj"),
        norms=(
            Norm("post_attention_layernorm", "post"),
            Norm("post_feedforward_layernorm", "post"),
            Norm("self_attn.q_norm", "qk"),
            Norm("self_attn.k_norm", "qk"),
        ),
        final_norm=Norm("norm", "final"),
        value_output=ValueOutput("self_attn.v_proj", "self_attn.o_proj"),
        description="OLMo-2 decoder (norms after the attention and MLP outputs)",
    )
)
