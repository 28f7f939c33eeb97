"""One loader for the commands that run a model (``perplexity``, ``generate``, ``energy``).

``--model`` may be:

* a native SpikeLM directory (``model_type`` "spikelm", e.g. written by ``spikelm pretrain``);
* a converted model (``spikelm spikify`` or ``spikify(...)`` + ``save_pretrained``: the source architecture with a
  ``quantization_config`` whose ``quant_method`` is "spikelm"), restored spiking by ``from_pretrained``;
* a real-valued transformers model of a family ``spikify`` converts (described in
  :mod:`spikelm.conversion.architectures`): the source, run as it is (the ANN figure);
* a named source (``smollm2-135m``, ``gemma3-270m``, ``minilm``: :mod:`spikelm.data.pretrained`), fetched on first use.

:func:`inspect_model` reads only the config (so a wrong model is refused before any output is written or any
weight is read); :func:`load_model` then loads it. Anything else is one :class:`~spikelm.errors.UserError` line.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from spikelm.errors import MissingInputError, UserError, loading_in_one_line

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
    from spikelm.conversion.architectures import supported_model_types

    return supported_model_types()


def _generic_refusal(config) -> str | None:
    """Why the generic path refuses ``config`` from the config alone (an encoder-decoder, mixture of experts...), or
    None (:func:`spikelm.conversion.architectures.generic.check_config`)."""
    from spikelm.conversion.architectures.generic import check_config

    try:
        check_config(config)
    except ValueError as err:
        return str(err)
    return None


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
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, unknown model_type, bad field
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
    if model_type not in supported and _generic_refusal(config) is None:
        pass  # a decoder-only model of another type: the generic path describes it once loaded
    elif model_type not in supported:
        what = (
            f"{', '.join(architectures)} model (model_type {model_type!r})"
            if architectures
            else f"model_type {model_type!r} model"
        )
        raise UserError(
            f"{flag} {name} holds a {what}, which spikelm does not run ({_generic_refusal(config)}): expected a "
            f"SpikeLM, a converted model, a real-valued transformers model of model_type {', '.join(supported)} or "
            "another decoder-only transformers model"
        )
    if method not in (None, "spikelm"):
        raise UserError(
            f"{flag} {name} is quantized with {method!r}; spikelm runs real-valued or spikelm-converted models only"
        )
    is_bert = model_type == "bert"
    if architectures:
        architecture = architectures[0]
        model_class(config, flag, name)
    else:
        architecture = "BertModel" if is_bert else "AutoModelForCausalLM"
    causal = not is_bert and (architecture.endswith(CAUSAL_SUFFIXES) or architecture == "AutoModelForCausalLM")
    if need_causal and not causal:
        raise UserError(
            f"{flag} {name} holds a {architecture} ({'BERT-family encoder' if is_bert else 'not a causal LM head'}), "
            "not a causal language model; perplexity and generation need a causal LM"
        )
    return ModelSpec(name, path, CONVERTED if method == "spikelm" else SOURCE, config, architecture, causal)


def model_class(config, flag: str = "--model", name=None):
    """The transformers class ``config.architectures[0]`` names, or None when the config names none; refused in one
    line unless it is a model class of the config's own model_type (an edited ``architectures`` would otherwise load
    the weights into another family's model, every tensor newly initialised)."""
    import transformers

    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        return None
    architecture = str(architectures[0])
    cls = getattr(transformers, architecture, None)
    config_class = getattr(cls, "config_class", None)
    if (
        cls is None
        or not hasattr(cls, "from_pretrained")
        or getattr(config_class, "model_type", None) != getattr(config, "model_type", None)
    ):
        raise UserError(
            f"{flag} {name}: config.json's architectures names {architecture!r}, which is not a transformers model "
            f"class of model_type {getattr(config, 'model_type', None)!r}; restore the architectures it was saved with"
        )
    return cls


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off (its load report would add lines to a one-line refusal)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls, path, flag: str = "--model", strict: bool = True, **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` of a user's directory: the one way spikelm loads a model it is given.

    Every failure is one line naming ``flag``, the directory and the reason (``errors.loading_in_one_line``); with
    ``strict``, a tensor of the wrong shape, missing from the file or not used by the model is refused (the
    config and the weights disagree: e.g. an edited ``num_steps``, neuron type or ``vocab_size``). The loaded
    state is then checked (:func:`check_model_state`)."""
    with quiet_transformers(), loading_in_one_line(path, flag):
        model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=strict, **kwargs)
    if strict:
        problems = [
            f"{key} has shape {tuple(saved)} in the file but {tuple(wanted)} in the model"
            for key, saved, wanted in info.get("mismatched_keys") or []
        ]
        problems += [f"{key} is missing from the weights" for key in sorted(info.get("missing_keys") or [])]
        problems += [
            f"{key} is in the weights but not in the model" for key in sorted(info.get("unexpected_keys") or [])
        ]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(
                f"{flag} {path}: its weights do not match its config.json: {problems[0]}{more}; the directory was "
                "edited or mixed from two models: save it again"
            )
    check_model_state(model, f"{flag} {path}")
    check_recipe_metadata(model, path, f"{flag} {path}")
    return model


def check_recipe_metadata(model, path, what: str) -> None:
    """A converted model's ``config.json`` recipe against the settings saved in its weights' safetensors metadata
    (``spikelm.conversion.quantizer.RECIPE_METADATA``: the fields that leave no trace in the tensors): refused in
    one line naming the first field that differs. Models saved before the metadata existed are not checked."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    from spikelm.conversion.quantizer import RECIPE_METADATA, traceless_fields

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or getattr(config, "quant_method", None) != "spikelm":
        return
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return
    with safe_open(str(files[0]), framework="pt") as f:
        saved = (f.metadata() or {}).get(RECIPE_METADATA)
    if saved is None:
        return
    try:
        saved = json.loads(saved)
    except ValueError:
        raise UserError(f"{what}: the recipe recorded in {files[0].name} is not JSON; the file was edited") from None
    current = traceless_fields(config)
    for name, value in saved.items():
        if current.get(name) != value:
            raise UserError(
                f"{what}: config.json's quantization_config says {name}={current.get(name)!r}, but the weights were "
                f"saved with {name}={value!r}; the config was edited after conversion: save the model again"
            )


def check_model_state(model, what: str) -> None:
    """Refuse, in one line naming ``what``, a loaded model whose state cannot be what spikelm saved: a tensor holding
    NaN or infinity, a calibrated spike amplitude (alpha) that is not positive, or neurons of which only some are
    calibrated (``initialized`` flags cleared by hand: their alphas would be re-set from the first input)."""
    import torch

    from spikelm.nn.neurons import named_neurons

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{what}: tensor {name} holds NaN or infinite values; the model is damaged")
    flags = {}
    for name, module in named_neurons(model):
        flag = module.calibration_flag()
        if flag is not None:
            flags[name] = flag
        problem = module.state_problem()
        if problem is not None:
            raise UserError(f"{what}: {name}{problem}")
    _check_rotation_fold(model, what)
    if len(set(flags.values())) > 1:
        cleared = next(name for name, done in flags.items() if not done)
        raise UserError(
            f"{what}: {cleared} is not calibrated (its initialized flag is False) while other neurons are; the "
            "model was edited: save it again"
        )


def _check_rotation_fold(model, what: str) -> None:
    """A converted model whose recipe says its residual stream is rotated has every norm gain the rotation folds
    (its architecture's description says which) at the identity (stored 1, or 0 for a ``1 + w`` gain): a gain that
    is not is a config edited after conversion. (The reverse edit, and ``online_down_proj_rotation``, leave no trace
    in the tensors: they cannot be checked.)"""
    from spikelm.conversion.architectures import describe

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    rotation = config.get("rotation") if isinstance(config, dict) else getattr(config, "rotation", None)
    if rotation in (None, "none"):
        return
    for name, module, norm in describe(model).folded_norms(model):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.device.type != "meta" and not bool((weight == norm.identity).all()):
            raise UserError(
                f"{what}: quantization_config says rotation={rotation!r}, but {name}.weight is not folded (all "
                f"{norm.identity:g}s after a rotation); the config was edited after conversion"
            )


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
        model = load_pretrained(cls, spec.path, config=spec.config)
    else:
        cls = getattr(transformers, spec.architecture, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            cls = transformers.AutoModelForCausalLM if spec.causal else transformers.AutoModel
        model = load_pretrained(cls, spec.path, dtype=torch.float32)
    model = model.eval()
    return model.to(device) if device is not None else model


def load_any_causal_lm(name_or_path: str | Path, device=None):
    """(model, spec) for a causal LM of any kind (see the module docstring); one clear line for anything else."""
    spec = inspect_model(name_or_path, need_causal=True)
    return load_model(spec, device), spec
