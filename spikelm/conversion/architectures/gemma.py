"""Gemma, Gemma-2 and Gemma-3 (text): the LLaMA attribute paths, RMSNorms that compute ``x * (1 + w)``.

* Gemma: pre norms only; its RMSNorm gain ``1 + w`` folds like any other (the folded norm stores ``w = 0``).
* Gemma-2 and Gemma-3: *sandwich* norms: ``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalise
  the attention and MLP outputs before the residual add, ``pre_feedforward_layernorm`` feeds gate/up. A rotation
  of the residual stream cannot be folded through a post norm's gain, so only the online rotation of down_proj's
  input applies. Sliding-window layers alternate with global ones (``config.layer_types``); Gemma-3 normalises
  q and k per head after their projections. Embeddings are scaled by sqrt(hidden) and the logits soft-capped:
  scalars and an elementwise function of the head's output, untouched by the conversion.

No norm acts on V (Gemma-3's q/k norms touch Q and K only), so the per-head value/output rotation is exact for all
three.
"""

from __future__ import annotations

from .base import Architecture, InputSite, Norm, ValueOutput, register


def _sites(mlp_norm: str) -> tuple[InputSite, ...]:
    return (
        InputSite(
            "qkv_input", "self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"
        ),
        InputSite("o_input", "self_attn.o_proj", ("self_attn.o_proj",)),
        InputSite("gate_up_input", "mlp", ("mlp.gate_proj", "mlp.up_proj"), mlp_norm),
        InputSite("down_input", "mlp.down_proj", ("mlp.down_proj",)),
    )


def _gemma(model_type: str, sandwich: bool, qk_norm: bool) -> Architecture:
    norms = [Norm("input_layernorm", gain="1+w")]
    if sandwich:
        norms += [
            Norm("post_attention_layernorm", "post", "1+w"),
            Norm("pre_feedforward_layernorm", gain="1+w"),
            Norm("post_feedforward_layernorm", "post", "1+w"),
        ]
    else:
        norms.append(Norm("post_attention_layernorm", gain="1+w"))
    if qk_norm:
        norms += [Norm("self_attn.q_norm", "qk", "1+w"), Norm("self_attn.k_norm", "qk", "1+w")]
    return Architecture(
        model_type=model_type,
        layers="layers",
        attention="self_attn",
        sites=_sites("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"),
        average_after="norm",
        causal=True,
        writers=("self_attn.o_proj", "mlp.down_proj"),
        norms=tuple(norms),
        final_norm=Norm("norm", "final", "1+w"),
        value_output=ValueOutput("self_attn.v_proj", "self_attn.o_proj"),
        description="Gemma decoder (RMSNorm gain 1 + w" + (", sandwich norms)" if sandwich else ")"),
    )


GEMMA = register(_gemma("gemma", sandwich=False, qk_norm=False))
GEMMA2 = register(_gemma("gemma2", sandwich=True, qk_norm=False))
GEMMA3_TEXT = register(_gemma("gemma3_text", sandwich=True, qk_norm=True))
