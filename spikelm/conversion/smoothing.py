"""SmoothQuant-style per-channel smoothing folded into a LLaMA-family model: an exact transform, before spiking.

An RMSNorm's output feeds q/k/v (resp. gate/up) and nothing else, so a per-channel factor ``s`` can move from the
activations into those weights: gain ``g <- g / s`` and every reader ``W <- W diag(s)``. The real-valued model is
unchanged; the activations the neurons see have their outlier channels divided by ``s``, with

    s_c = max|X_c|^alpha / max|W_c|^(1 - alpha)          (SmoothQuant; max|W_c| over the stacked readers' column c)

Apply it after :func:`~spikelm.conversion.rotation.rotate_residual_stream`, never before: the rotation folds every
norm gain into its readers, which would undo the smoothing. The final norm (read by the real-valued LM head) is left
as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .rotation import _check_supported, _set

SCALE_MIN = 1e-5  # a channel that never fires (max|X_c| = 0) must not get a zero factor


def _norm_readers(layer) -> dict[str, tuple[nn.Module, list[nn.Linear]]]:
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
        "gate_up": (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
    }


@torch.no_grad()
def input_absmax(model: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of the q/k/v and gate/up inputs over calibration ``batches`` of input ids.

    Returns ``{"layers.{i}.qkv": (hidden,), "layers.{i}.gate_up": (hidden,)}`` (float32, on the model's device).
    """
    _check_supported(model)
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def record(key):
        def hook(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[key] = x if key not in stats else torch.maximum(stats[key], x)

        return hook

    for i, layer in enumerate(model.model.layers):
        for name, (_, readers) in _norm_readers(layer).items():
            handles.append(readers[0].register_forward_pre_hook(record(f"layers.{i}.{name}")))
    try:
        for ids in [batches] if isinstance(batches, torch.Tensor) else batches:
            model(input_ids=ids.to(model.model.embed_tokens.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def smooth_model(model: nn.Module, absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict:
    """Fold SmoothQuant factors (from :func:`input_absmax`) into every block's RMSNorm gains and readers.

    ``alpha`` in [0, 1] sets how much of the activation range moves into the weights (0.5: SmoothQuant's default).
    Returns ``{"alpha": alpha, "smoothed": number of norms, "max_factor": largest s}``.
    """
    _check_supported(model)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    count, largest = 0, 0.0
    for i, layer in enumerate(model.model.layers):
        for name, (norm, readers) in _norm_readers(layer).items():
            key = f"layers.{i}.{name}"
            if key not in absmax:
                raise ValueError(f"no calibration statistic for {key}; run input_absmax on this model first")
            act = absmax[key].double().to(norm.weight.device).clamp_min(SCALE_MIN)
            weight = torch.cat([r.weight.detach().abs().double() for r in readers]).amax(0).clamp_min(SCALE_MIN)
            s = (act.pow(alpha) / weight.pow(1 - alpha)).clamp_min(SCALE_MIN)
            _set(norm.weight, norm.weight.double() / s)
            for linear in readers:
                _set(linear.weight, linear.weight.double() * s.view(1, -1))
            count += 1
            largest = max(largest, float(s.max()))
    return {"alpha": alpha, "smoothed": count, "max_factor": largest}
