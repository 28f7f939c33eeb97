"""BERT-family encoders: blocks in ``encoder.layer``, separate query/key/value under ``attention.self``; post-norm
blocks (each LayerNorm after its residual add), so the T copies are averaged after the encoder. Not causal: no
spike-code cache. No rotation: post LayerNorms subtract the mean and sit after the residual adds; the per-head
value/output rotation is not offered either (the description names no value and output linears)."""

from __future__ import annotations

from .base import Architecture, InputSite, Norm, register

BERT = register(
    Architecture(
        model_type="bert",
        layers="encoder.layer",
        attention="attention.self",
        sites=(
            InputSite(
                "qkv_input", "attention.self", ("attention.self.query", "attention.self.key", "attention.self.value")
            ),
            InputSite("o_input", "attention.output.dense", ("attention.output.dense",)),
            InputSite("gate_up_input", "intermediate.dense", ("intermediate.dense",)),
            InputSite("down_input", "output.dense", ("output.dense",)),
        ),
        average_after="encoder",
        causal=False,
        writers=("attention.output.dense", "output.dense"),
        norms=(
            Norm("attention.output.LayerNorm", "post", kind="layer"),
            Norm("output.LayerNorm", "post", kind="layer"),
        ),
        final_norm=None,
        embeddings="embeddings.word_embeddings",
        online_rotation=False,
        description="BERT-family encoder (post-LayerNorm blocks)",
    )
)
