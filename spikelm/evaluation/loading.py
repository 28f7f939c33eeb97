"""One loader for the commands that run a model (``perplexity``, ``generate``, ``energy``).

``--model`` may be:

* a native SpikeLM directory (``model_type`` "spikelm", e.g. written by ``spikelm pretrain``);
* a converted model (``spikelm spikify`` or ``spikify(...)`` + ``save_pretrained``: the source architecture with a
  ``quantization_config`` whose ``quant_method`` is "spikelm"), restored spiking by ``from_pretrained``;
* a real-valued transformers model of a family ``spikify`` converts (LLaMA, Mistral, Qwen2, Qwen3, GPT-2, BERT):
  the source, run as it is (the ANN figure);
* a named source (``smollm2-135m``, ``minilm``: :mod:`spikelm.data.pretrained`), fetched on first use.

:func:`inspect_model` reads only the config (so a wrong model is refused before any output is written or any
weight is read); :func:`load_model` then loads it. Anything else is one :class:`~spikelm.errors.UserError` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spikelm.errors import MissingInputError, UserError, weights_refused_in_one_line

NATIVE, CONVERTED, SOURCE = "native", "converted", "source"
KIND_NAMES = {
    NATIVE: "native SpikeLM",
    CONVERTED: "converted spiking model (spikify)",
    SOURCE: "real-valued transformers model",
}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
ENCODER_SOURCES = ("minilm",)  # named sources that are encoders


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` names, read from its config alone."""

    name: str  # as given (a path or a named source)
    path: Path  # the local directory
    kind: str  # NATIVE, CONVERTED or SOURCE
    config: object  # the transformers config
    architecture: str  # the class to load (config.architectures[0], or the family's default)
    causal: bool

    @property
    def spiking(self) -> bool:
        return self.kind == CONVERTED or (self.kind == NATIVE and bool(getattr(self.config, "spiking", True)))

    def describe(self) -> str:
        return f"{self.architecture} ({KIND_NAMES[self.kind]})"


def _supported_model_types() -> list[str]:
    from spikelm.conversion.placement import supported_model_types

    return supported_model_types()


def _quant_method(config) -> str | None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    return quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)


def inspect_model(name_or_path: str | Path, need_causal: bool = False, flag: str = "--model") -> ModelSpec:
    """Resolve ``name_or_path`` (a named source is fetched on first use) and classify it from its config.

    ``need_causal``: refuse, in one line naming the model, anything that is not a causal language model.
    """
    import spikelm.conversion  # noqa: F401  (registers the "spikelm" quantization method)
    import spikelm.models  # noqa: F401  (registers model_type "spikelm")
    from spikelm.data.pretrained import resolve_model_source

    name = str(name_or_path)
    if need_causal and name in ENCODER_SOURCES:  # refused before anything is fetched
        raise UserError(
            f"{flag} {name} is a BERT-family encoder (a named source), not a causal language model; perplexity and "
            "generation need a causal LM (e.g. smollm2-135m)"
        )
    path = Path(resolve_model_source(name))
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{flag} {name}: no config.json there; expected a directory written by save_pretrained")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:  # not JSON, an unknown model_type, a bad field
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag} {name}: cannot read its config.json ({first})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if model_type == "spikelm":
        architecture = architectures[0] if architectures else "SpikeLMModel"
        causal = architecture == "SpikeLMForCausalLM"
        spec = ModelSpec(name, path, NATIVE, config, architecture, causal)
        if need_causal and not causal:
            raise UserError(
                f"{flag} {name} holds a {architecture} checkpoint, not a causal SpikeLM (SpikeLMForCausalLM) or a "
                "causal transformers model; use a decoder trained with `spikelm pretrain --objective clm`, or a "
                "converted / real-valued causal LM"
            )
        return spec
    supported = _supported_model_types()
    method = _quant_method(config)
    if model_type not in supported:
        what = (
            f"{', '.join(architectures)} model (model_type {model_type!r})"
            if architectures
            else f"model_type {model_type!r} model"
        )
        raise UserError(
            f"{flag} {name} holds a {what}, which spikelm does not run: expected a SpikeLM, a converted "
            f"model or a real-valued transformers model of model_type {', '.join(supported)}"
        )
    if method not in (None, "spikelm"):
        raise UserError(
            f"{flag} {name} is quantized with {method!r}; spikelm runs real-valued or spikelm-converted models only"
        )
    is_bert = model_type == "bert"
    if architectures:
        architecture = architectures[0]
    else:
        architecture = "BertModel" if is_bert else "AutoModelForCausalLM"
    causal = not is_bert and (architecture.endswith(CAUSAL_SUFFIXES) or architecture == "AutoModelForCausalLM")
    if need_causal and not causal:
        raise UserError(
            f"{flag} {name} holds a {architecture} ({'BERT-family encoder' if is_bert else 'not a causal LM head'}), "
            "not a causal language model; perplexity and generation need a causal LM"
        )
    return ModelSpec(name, path, CONVERTED if method == "spikelm" else SOURCE, config, architecture, causal)


def load_model(spec: ModelSpec, device=None):
    """The model ``spec`` names, float32, in eval mode (on ``device`` if given).

    Native SpikeLMs load as the class their config names; converted models through ``from_pretrained``'s
    ``spikelm`` quantizer (restored spiking); real-valued ones as they are.
    """
    import torch
    import transformers

    if spec.kind == NATIVE:
        import spikelm

        cls = getattr(spikelm, spec.architecture, None) or spikelm.SpikeLMModel
        with weights_refused_in_one_line(spec.path):
            model = cls.from_pretrained(spec.path, config=spec.config)
    else:
        cls = getattr(transformers, spec.architecture, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            cls = transformers.AutoModelForCausalLM if spec.causal else transformers.AutoModel
        with weights_refused_in_one_line(spec.path):
            model = cls.from_pretrained(spec.path, dtype=torch.float32)
    model = model.eval()
    return model.to(device) if device is not None else model


def load_any_causal_lm(name_or_path: str | Path, device=None):
    """(model, spec) for a causal LM of any kind (see the module docstring); one clear line for anything else."""
    spec = inspect_model(name_or_path, need_causal=True)
    return load_model(spec, device), spec
