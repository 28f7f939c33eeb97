"""The model card (README.md) of a saved spiking conversion: where it came from and how it was made."""

from __future__ import annotations

import json
from pathlib import Path

from ..nn.neurons import neuron_class, neuron_classes
from .architectures import lookup
from .config import SpikeLMConversionConfig


def recipe_fields(config: SpikeLMConversionConfig) -> dict:
    """The config's fields that apply to its neuron: the other registered neurons' fields are left out (e.g. GIF runs
    T = 2^a steps: the elastic ``num_steps`` is unused)."""
    unused = {name for cls in neuron_classes() if cls.name != config.neuron for name in cls.config_fields}
    return {k: v for k, v in config.to_dict().items() if k not in unused}


def _recipe(config: SpikeLMConversionConfig) -> str:
    return neuron_class(config.neuron).describe(config.to_dict())


def _others(config: SpikeLMConversionConfig) -> str:
    """The other neurons, as the card names them: "the GIF neuron's fields", "the elastic neuron's fields"."""
    names = [cls.display_name or cls.name for cls in neuron_classes() if cls.name != config.neuron]
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


def write_model_card(
    directory,
    config: SpikeLMConversionConfig,
    source: str,
    calibration: str | None = None,
    perplexity: dict[str, float] | None = None,
    evaluation: str | None = None,
    notes: list[str] | None = None,
    model_type: str | None = None,
) -> Path:
    """Write ``directory/README.md`` for a saved conversion and return its path.

    Args:
        config: the conversion recipe (``model.config.quantization_config``).
        source: the real-valued model it was converted from (a name or path).
        calibration: what the calibration data was (e.g. "32 sequences of 512 tokens of the pypi corpus"), or None
            (alphas were initialised on the first forward pass).
        perplexity: measured perplexities by row name, e.g. ``{"source (real-valued)": 15.1, "this model": 65.4}``.
        evaluation: the text and settings the perplexities were measured on (window, stride, token count).
        notes: further lines (e.g. training after conversion).
        model_type: the source's ``model_type``; its architecture's description names where the T copies are
            averaged and which rotation parts apply (:mod:`spikelm.conversion.architectures`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = lookup(model_type)
    averaged = f"`{architecture.average_after}`" if architecture is not None else "the final norm"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [spikelm, spiking-neural-network]",
        "---",
        "",
        f"# Spiking conversion of {source}",
        "",
        f"Converted from **{source}** with spikelm's `spikify`: {_recipe(config)}.",
        (
            "Every linear layer's input is spiked (one neuron where several layers share an input) except "
            f"{', '.join(f'`{m}`' for m in config.modules_to_not_convert) or 'none'}; K (after the rotary embedding) "
            "and V are spiked per step; norms, softmax, activations and residual adds stay real-valued; the T "
            f"copies are averaged after {averaged}."
        ),
        *(
            [f"Source architecture: {architecture.description} (`model_type` {architecture.model_type!r})."]
            if architecture is not None
            else []
        ),
        "",
        "Load it with `import spikelm` and the usual `AutoModelForCausalLM.from_pretrained(...)` (or `AutoModel...`):",
        "the `quantization_config` section of `config.json` (`quant_method: spikelm`) rebuilds the spiking model.",
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe_fields(config), indent=2),
        "```",
        "",
        f"(The {_others(config)} neuron's fields, unused here, are left out; `config.json` holds them all.)",
        "",
        "## Calibration data",
        "",
        calibration or "None: the alphas were initialised from the first batch the model saw.",
        "",
    ]
    if architecture is not None and architecture.rotation_blocker() is not None:
        lines += [f"No residual-stream rotation for this architecture: {architecture.rotation_blocker()}.", ""]
    if config.rotation != "none" or config.online_down_proj_rotation or config.value_rotation:
        lines += [
            "## Transforms",
            "",
            (
                f"Residual-stream rotation: {config.rotation}; online rotation of the FFN's last linear input: "
                f"{'yes' if config.online_down_proj_rotation else 'no'}"
                + ("; per-head rotation of the attention's values and output: yes" if config.value_rotation else "")
                + ". The real-valued model's function is unchanged by them (they are folded into the weights)."
            ),
            "",
        ]
    if config.untied_embeddings:
        lines += [
            (
                "**The LM head was untied from the input embeddings** (a weight transform needed it): this "
                "checkpoint stores both matrices."
            ),
            "",
        ]
    if perplexity:
        lines += ["## Measured perplexity", ""]
        if evaluation:
            lines += [evaluation, ""]
        lines += ["| model | perplexity |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in perplexity.items()]
        lines.append("")
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path
