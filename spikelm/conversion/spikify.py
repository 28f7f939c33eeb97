"""``spikify``: make a loaded transformers model spike in place, and calibrate it.

The placement (which neurons, where, the hooks) is :mod:`spikelm.conversion.placement`; the quantizer that
restores a saved conversion is :mod:`spikelm.conversion.quantizer`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import PreTrainedModel

from ..data.tokenization import check_fits
from .config import QUANT_METHOD, SpikeLMConversionConfig
from .placement import attach, check_generic_recipe, family_of, is_spiking, neurons, placement, reader_weight
from .quantizer import SpikeLMQuantizer

GENERIC_NOTICE = (
    "model_type {model_type!r} has no architecture description: converted through the generic path (the linear "
    "inputs found by a traced forward), with no rotation"
)


def _needs_data(model: nn.Module) -> bool:
    return any(not n.is_initialized() for _, n in neurons(model))


@torch.no_grad()
def _calibration_batches(model: PreTrainedModel, calibration) -> list[torch.Tensor]:
    """``calibration`` as a list of LongTensors (N, L) whose ids and length the model has (else ``ValueError``)."""
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError("calibration is empty: pass a LongTensor of token ids (N, L) or a list of them")
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
            raise ValueError(
                "calibration must be a LongTensor of token ids of shape (N, L), or a list of them; got "
                f"{type(ids).__name__}{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ''}"
            )
        check_fits(model.config, ids=ids, length=ids.shape[1], what="the model", length_flag="calibration length")
    return batches


def calibrate(model: PreTrainedModel, calibration) -> None:
    """Run calibration token ids through the model (eval mode, no grad) to initialise the neurons.

    ``calibration``: a LongTensor (N, L) (one batch) or a list of them. Each neuron calibrates as its plug-in says
    (:meth:`~spikelm.nn.neurons.base.SpikingNeuron.calibration_recorder`). Elastic neurons set their alphas from the
    first batch (alpha_t = 2 mean|u_t|, SPEC section 2; later batches change nothing and are skipped). GIF neurons
    mark their salient channels from every batch (the top ``saliency_fraction`` by SpikeLLM's score, on the
    real-valued activations: each GIF neuron passes its input through while calibrating).
    """
    batches = _calibration_batches(model, calibration)
    readers = {site.name: [model.get_submodule(r) for r in site.readers] for site in placement(model)}
    recorders = []
    for name, n in neurons(model):  # neurons that calibrate on every batch (None: on their first input)
        weights = [reader_weight(r) for r in readers[name]] if readers.get(name) else None
        recorder = n.calibration_recorder(weights)
        if recorder is not None:
            recorders.append(recorder)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            if not recorders and not _needs_data(model):
                break
            with torch.no_grad():  # as documented: nothing to differentiate (autograd kept every activation)
                model.base_model(input_ids=ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
        for recorder in recorders:
            recorder.finish()


def fit_transform(architecture, config: SpikeLMConversionConfig, model: nn.Module | None = None) -> str | None:
    """Restrict the recipe's rotations, in ``config``, to what ``architecture`` can fold exactly (never a wrong
    fold), and return one line saying what was dropped and why (None if nothing): the residual-stream rotation needs
    pre RMSNorms only (:meth:`~spikelm.conversion.architectures.Architecture.rotation_blocker`); the online rotation
    of the FFN's last linear input needs the description to offer it; the per-head value/output rotation needs the
    description to name its linears, and ``model`` (when given) a head size with a Hadamard matrix and no clamp of V
    (:func:`spikelm.conversion.rotation.value_rotation_blocker`)."""
    dropped = []
    reason = architecture.rotation_blocker() if config.rotation != "none" else None
    if reason is not None:
        dropped.append(f"no residual-stream rotation ({reason})")
        config.rotation = "none"
    if config.online_down_proj_rotation and not architecture.online_rotation:
        dropped.append("no online rotation of the FFN's last linear input (not offered for this architecture)")
        config.online_down_proj_rotation = False
    if config.value_rotation:
        if model is not None:
            from .rotation import value_rotation_blocker

            value_reason = value_rotation_blocker(model, architecture)
        else:
            value_reason = architecture.value_rotation_blocker()
        if value_reason is not None:
            dropped.append(f"no per-head value/output rotation ({value_reason})")
            config.value_rotation = False
    if not dropped:
        return None
    kept = [
        what
        for what, on in (
            ("the online rotation of the FFN's last linear input", config.online_down_proj_rotation),
            ("the per-head value/output rotation", config.value_rotation),
        )
        if on
    ]
    kept = f"; {' and '.join(kept)} {'is' if len(kept) == 1 else 'are'} kept" if kept else ""
    return f"model_type {architecture.model_type!r}: {'; '.join(dropped)}{kept}"


def spikify(
    model: PreTrainedModel, config: SpikeLMConversionConfig | dict | None = None, calibration=None, **overrides
) -> PreTrainedModel:
    """Make ``model`` spike, in place, and return it (same object, same class).

    Args:
        model: a loaded transformers model of a described architecture
            (:func:`spikelm.conversion.architectures.supported_model_types`), any head.
        config: a :class:`SpikeLMConversionConfig`, a dict of its fields, or None (defaults).
        calibration: token ids (LongTensor (N, L), or a list of them) run through the model before it is returned,
            to initialise the alphas; without it, alphas initialise on the first forward pass.
        **overrides: config fields, e.g. ``num_steps=2, reset="symmetric"``. A rotation the architecture cannot
            fold exactly is dropped with a one-line warning naming the reason, and the saved config says so.

    The model then carries the config as ``model.config.quantization_config`` and a quantizer as
    ``model.hf_quantizer``: ``save_pretrained`` writes the spiking section and the alphas, and
    ``from_pretrained`` (after ``import spikelm``) restores the spiking model.
    """
    if isinstance(config, SpikeLMConversionConfig):
        config = SpikeLMConversionConfig(**{**config.to_dict(), **overrides})
    elif config is None or isinstance(config, dict):
        config = SpikeLMConversionConfig(**{**(config or {}), **overrides})
    else:
        raise TypeError(f"config must be a SpikeLMConversionConfig, a dict or None; got {type(config).__name__}")
    architecture = family_of(model)  # unsupported architectures first: the clearest message
    check_generic_recipe(architecture, config)
    if calibration is not None:  # ids beyond the vocabulary or the positions, before the model is changed
        calibration = _calibration_batches(model, calibration)
    if is_spiking(model):
        raise ValueError(f"this {type(model).__name__} is already spiking; spikify the real-valued source model")
    notice = fit_transform(architecture, config, model)
    if architecture.generic:  # one line whether a rotation was asked for (and dropped) or not
        notice = GENERIC_NOTICE.format(model_type=architecture.model_type)
    if notice is not None:
        warnings.warn(f"spikify: {notice}", UserWarning, stacklevel=2)
    if config.rotation != "none":  # exact: the real-valued model computes the same function afterwards
        from .rotation import rotate_residual_stream

        summary = rotate_residual_stream(
            model,
            kind=config.rotation,
            seed=config.rotation_seed,
            online_down_proj=config.online_down_proj_rotation,
            online_seed=config.rotation_seed + 1,
        )
        config.untied_embeddings = config.untied_embeddings or summary["untied_embeddings"]
    elif config.online_down_proj_rotation:
        from .rotation import attach_online_down_proj_rotation

        attach_online_down_proj_rotation(model, seed=config.rotation_seed + 1, kind="hadamard")
    if config.value_rotation:  # exact too, and independent of the residual stream's rotation (within attention)
        from .rotation import rotate_values

        rotate_values(model, seed=config.rotation_seed + 2)
    if config.smoothing_alpha is not None:  # exact too; after the rotation, which would undo it
        if calibration is None:
            raise ValueError("smoothing_alpha needs calibration token ids: its per-channel factors come from them")
        from .smoothing import input_absmax, smooth_model

        smooth_model(model, input_absmax(model, calibration), alpha=config.smoothing_alpha)
    attach(model, config)
    model.config.quantization_config = config
    model.hf_quantizer = SpikeLMQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    if calibration is not None:
        calibrate(model, calibration)
    return model
