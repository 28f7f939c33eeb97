"""StarCoder2: the LLaMA attribute paths for attention (q/k/v/o with biases), a two-linear MLP (``c_fc`` then
``c_proj``), pre-LayerNorms with biases and a sliding window. A LayerNorm subtracts the mean, so the residual stream
is not rotated; the online rotation of ``c_proj``'s input applies, and the per-head value/output rotation (v_proj's
bias turns with its rows, o_proj's bias is in the output space)."""

from __future__ import annotations

from .base import Architecture, InputSite, Norm, ValueOutput, register

STARCODER2 = register(
    Architecture(
        model_type="starcoder2",
        layers="layers",
        attention="self_attn",
        sites=(
            InputSite(
                "qkv_input",
                "self_attn",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "input_layernorm",
            ),
            InputSite("o_input", "self_attn.o_proj", ("self_attn.o_proj",)),
            InputSite("gate_up_input", "mlp", ("mlp.c_fc",), "post_attention_layernorm"),
            InputSite("down_input", "mlp.c_proj", ("mlp.c_proj",)),
        ),
        average_after="norm",
        causal=True,
        writers=("self_attn.o_proj", "mlp.c_proj"),
        norms=(Norm("input_layernorm", kind="layer"), Norm("post_attention_layernorm", kind="layer")),
        final_norm=Norm("norm", "final", kind="layer"),
        value_output=ValueOutput("self_attn.v_proj", "self_attn.o_proj"),
        description="StarCoder2 decoder (LayerNorm, two-linear MLP)",
    )
)
