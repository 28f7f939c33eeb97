"""OLMo (the first): the LLaMA attribute paths with non-parametric LayerNorms (no gain, no bias; they still subtract
the mean, so the residual stream is not rotated; the online rotation of down_proj's input applies). The per-head
value/output rotation applies unless the config's ``clip_qkv`` clamps q, k and v elementwise."""

from __future__ import annotations

from .base import Architecture, Norm, ValueOutput, register
from .llama import SITES, WRITERS

OLMO = register(
    Architecture(
        model_type="olmo",
        layers="layers",
        attention="self_attn",
        sites=SITES,
        average_after="norm",
        causal=True,
        writers=WRITERS,
        norms=(Norm("input_layernorm", kind="layer"), Norm("post_attention_layernorm", kind="layer")),
        final_norm=Norm("norm", "final", kind="layer"),
        value_output=ValueOutput("self_attn.v_proj", "self_attn.o_proj", clamp="clip_qkv"),
        description="OLMo decoder (non-parametric LayerNorm)",
    )
)
