"""The LLaMA layout: pre-RMSNorm blocks (``input_layernorm`` before attention, ``post_attention_layernorm`` before
the MLP, gain ``w``), separate q/k/v and gate/up projections, ``model.norm`` before the head.

Mistral (sliding window), Qwen2 (q/k/v biases, sliding window from a layer on) and Qwen3 (per-head RMSNorm on q
and k after their projections) keep the same attribute paths; Granite's scalar multipliers (embedding, residual,
attention, logits) commute with a rotation, so it is this layout too. None of them touches V between its
projection and the attention (the q/k norms act on Q and K only), so the per-head value/output rotation is exact.
"""

from __future__ import annotations

from .base import Architecture, InputSite, Norm, ValueOutput, register

SITES = (
    InputSite(
        "qkv_input", "self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"
    ),
    InputSite("o_input", "self_attn.o_proj", ("self_attn.o_proj",)),
    InputSite("gate_up_input", "mlp", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    InputSite("down_input", "mlp.down_proj", ("mlp.down_proj",)),
)
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
NORMS = (Norm("input_layernorm"), Norm("post_attention_layernorm"))
VALUE_OUTPUT = ValueOutput("self_attn.v_proj", "self_attn.o_proj")
QK_NORMS = (Norm("self_attn.q_norm", "qk"), Norm("self_attn.k_norm", "qk"))


def llama_layout(
    model_type: str, norms=NORMS, description: str = "LLaMA-style decoder", decode_step: bool = False
) -> Architecture:
    """A LLaMA-layout decoder of ``model_type`` (the shared table entry of this module's families)."""
    return Architecture(
        model_type=model_type,
        layers="layers",
        attention="self_attn",
        sites=SITES,
        average_after="norm",
        causal=True,
        writers=WRITERS,
        norms=norms,
        final_norm=Norm("norm", "final"),
        value_output=VALUE_OUTPUT,
        description=description,
        decode_step=decode_step,
    )


# these three blocks compute LLaMA's decoder layer (Mistral and Qwen2 pass their sliding window in the mask, which
# spikelm's attention reads): spikelm.conversion.decode_step runs their decoding step in one function
LLAMA = register(llama_layout("llama", decode_step=True))
MISTRAL = register(llama_layout("mistral", decode_step=True))
QWEN2 = register(llama_layout("qwen2", decode_step=True))
QWEN3 = register(llama_layout("qwen3", NORMS + QK_NORMS, "LLaMA-style decoder with q/k norms"))
GRANITE = register(llama_layout("granite", description="LLaMA-style decoder with scalar multipliers"))
