"""SmoothQuant-style per-channel smoothing folded into a model: an exact transform, before spiking.

A pre RMSNorm's output feeds one input site's linears (the attention's input projections, resp. the FFN's first
linears) and nothing else (the architecture's description, :mod:`spikelm.conversion.architectures`), so a
per-channel factor ``s`` can move from the activations into those weights: gain ``g <- g / s`` (for a ``1 + w``
gain, ``w <- (1 + w) / s - 1``) and every reader ``W <- W diag(s)``. The real-valued model is unchanged; the
activations the neurons see have their outlier channels divided by ``s``, with

    s_c = max|X_c|^alpha / max|W_c|^(1 - alpha)          (SmoothQuant; max|W_c| over the stacked readers' column c)

Apply it after :func:`~spikelm.conversion.rotation.rotate_residual_stream`, never before: the rotation folds every
norm gain into its readers, which would undo the smoothing. The final norm (read by the real-valued LM head) is left
as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .architectures import Architecture, describe
from .rotation import _set

SCALE_MIN = 1e-5  # a channel that never fires (max|X_c| = 0) must not get a zero factor


def _smoothable(model: nn.Module) -> Architecture:
    """The description of ``model`` if it has pre RMSNorms to fold factors into; ``ValueError`` saying why not."""
    architecture = describe(model)
    pairs = architecture.pre_norm_sites()
    if not pairs or any(norm.kind != "rms" for norm, _ in pairs):
        raise ValueError(
            f"smoothing needs RMSNorms before the linear layers they feed; model_type {architecture.model_type!r} "
            "has none (or LayerNorms)"
        )
    return architecture


def _norm_readers(model: nn.Module, architecture: Architecture):
    """``(key, norm module, Norm, readers)`` per pre norm, keyed ``layers.{i}.qkv`` / ``layers.{i}.gate_up``."""
    out = []
    for i, layer in enumerate(model.base_model.get_submodule(architecture.layers)):
        for norm, site in architecture.pre_norm_sites():
            key = f"layers.{i}.{site.kind.removesuffix('_input')}"
            out.append((key, layer.get_submodule(norm.path), norm, [layer.get_submodule(r) for r in site.readers]))
    return out


@torch.no_grad()
def input_absmax(model: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of the inputs read through pre norms (attention and FFN) over calibration ``batches``.

    Returns ``{"layers.{i}.qkv": (hidden,), "layers.{i}.gate_up": (hidden,)}`` (float32, on the model's device).
    """
    architecture = _smoothable(model)
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def record(key):
        def hook(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[key] = x if key not in stats else torch.maximum(stats[key], x)

        return hook

    for key, _, _, readers in _norm_readers(model, architecture):
        handles.append(readers[0].register_forward_pre_hook(record(key)))
    try:
        for ids in [batches] if isinstance(batches, torch.Tensor) else batches:
            model(input_ids=ids.to(model.get_input_embeddings().weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def smooth_model(model: nn.Module, absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict:
    """Fold SmoothQuant factors (from :func:`input_absmax`) into every block's pre RMSNorm gains and readers.

    ``alpha`` in [0, 1] sets how much of the activation range moves into the weights (0.5: SmoothQuant's default).
    Returns ``{"alpha": alpha, "smoothed": number of norms, "max_factor": largest s}``.
    """
    architecture = _smoothable(model)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    count, largest = 0, 0.0
    for key, module, norm, readers in _norm_readers(model, architecture):
        if key not in absmax:
            raise ValueError(f"no calibration statistic for {key}; run input_absmax on this model first")
        act = absmax[key].double().to(module.weight.device).clamp_min(SCALE_MIN)
        weight = torch.cat([r.weight.detach().abs().double() for r in readers]).amax(0).clamp_min(SCALE_MIN)
        s = (act.pow(alpha) / weight.pow(1 - alpha)).clamp_min(SCALE_MIN)
        _set(module.weight, norm.stored_weight(norm.effective_gain(module) / s))
        for linear in readers:
            _set(linear.weight, linear.weight.double() * s.view(1, -1))
        count += 1
        largest = max(largest, float(s.max()))
    return {"alpha": alpha, "smoothed": count, "max_factor": largest}
