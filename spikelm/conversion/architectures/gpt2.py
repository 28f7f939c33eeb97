"""GPT-2: blocks in ``h``, fused ``c_attn`` (q/k/v) and ``c_fc`` as Conv1D layers (weights stored (in, out)),
``c_proj`` after attention and after the MLP; pre-LayerNorms ``ln_1``, ``ln_2`` and the final ``ln_f``. A LayerNorm
subtracts the mean, so the residual stream is not rotated; the online rotation is not offered for its Conv1D layers
(conversions stay as they were), nor the per-head value/output rotation (its
description names no value and output linears)."""

from __future__ import annotations

from .base import Architecture, InputSite, Norm, register

GPT2 = register(
    Architecture(
        model_type="gpt2",
        layers="h",
        attention="attn",
        sites=(
            InputSite("qkv_input", "attn", ("attn.c_attn",), "ln_1"),
            InputSite("o_input", "attn.c_proj", ("attn.c_proj",)),
            InputSite("gate_up_input", "mlp", ("mlp.c_fc",), "ln_2"),
            InputSite("down_input", "mlp.c_proj", ("mlp.c_proj",)),
        ),
        average_after="ln_f",
        causal=True,
        writers=("attn.c_proj", "mlp.c_proj"),
        norms=(Norm("ln_1", kind="layer"), Norm("ln_2", kind="layer")),
        final_norm=Norm("ln_f", "final", kind="layer"),
        embeddings="wte",
        online_rotation=False,
        description="GPT-2 decoder (Conv1D projections, LayerNorm)",
    )
)
