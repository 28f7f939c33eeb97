"""Phi-3: the LLaMA block with fused projections: one ``qkv_proj`` reads the attention input, one ``gate_up_proj``
the MLP input (its output is split into gate and up); pre-RMSNorms with gain ``w``. V is the last rows of
``qkv_proj``'s output, so the per-head value/output rotation turns those rows only."""

from __future__ import annotations

from .base import Architecture, InputSite, Norm, ValueOutput, register

PHI3 = register(
    Architecture(
        model_type="phi3",
        layers="layers",
        attention="self_attn",
        sites=(
            InputSite("qkv_input", "self_attn", ("self_attn.qkv_proj",), "input_layernorm"),
            InputSite("o_input", "self_attn.o_proj", ("self_attn.o_proj",)),
            InputSite("gate_up_input", "mlp", ("mlp.gate_up_proj",), "post_attention_layernorm"),
            InputSite("down_input", "mlp.down_proj", ("mlp.down_proj",)),
        ),
        average_after="norm",
        causal=True,
        writers=("self_attn.o_proj", "mlp.down_proj"),
        norms=(Norm("input_layernorm"), Norm("post_attention_layernorm")),
        final_norm=Norm("norm", "final"),
        value_output=ValueOutput("self_attn.qkv_proj", "self_attn.o_proj", fused=True),
        description="Phi-3 decoder (fused qkv and gate_up projections)",
    )
)
