"""Pretraining configuration: named presets (a model shape plus a training recipe), overrides.

A run is described by one :class:`PretrainConfig`. Its ``model`` dict holds :class:`SpikeLMConfig`
fields (shape and spiking knobs); every other field is the recipe. ``resolve_config`` starts from a
preset, applies a YAML/JSON config file, then ``--set FIELD=VALUE`` overrides (a ``FIELD`` names a
recipe field or a ``SpikeLMConfig`` field); an unknown name is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from spikelm.data.objectives import OBJECTIVES
from spikelm.errors import UserError


class ConfigError(UserError):
    """A preset, config file or override that cannot be used (the message says what is expected)."""


@dataclass
class PretrainConfig:
    # what to train
    preset: str = "tiny"
    objective: str = "mlm-nsp"  # "mlm-nsp" (BERT), "mlm", "clm" (causal: SpikeLMForCausalLM)
    model: dict = field(default_factory=dict)  # SpikeLMConfig fields
    # data
    corpus: str | None = None  # a named corpus, a saved datasets dataset, a text file or a directory (None: pypi)
    text_file: str | None = None  # a plain-text file, a blank line between documents
    tokenizer: str | None = None  # None: bert-base-uncased (gpt2 for clm)
    max_length: int = 128  # tokens per sequence
    mlm_probability: float = 0.15
    short_seq_prob: float = 0.1  # NSP: chance of a shorter target length, as BERT
    # optimisation
    batch_size: int = 32  # sequences per optimizer step, all processes and accumulation steps together
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    learning_rate: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # not applied to biases, LayerNorms and alpha
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-6
    warmup_ratio: float = 0.06  # linear warm-up over this fraction of schedule_steps (if warmup_steps is None)
    warmup_steps: int | None = None
    max_steps: int = 1000  # optimizer steps of this run
    schedule_steps: int | None = None  # length of the linear decay (None: max_steps)
    max_minutes: float | None = None  # also stop after this much training time (the schedule still spans max_steps)
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, none on CPU), "no", "bf16"
    seed: int = 0
    # bookkeeping
    log_every: int = 10  # steps between lines of train_log.jsonl
    eval_every: int = 200  # steps between validations (and at the start and the end)
    eval_examples: int = 1024  # validation sequences (the first of a fixed, seeded set)
    save_every: int = 500  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2

    @property
    def total_schedule_steps(self) -> int:
        return self.schedule_steps or self.max_steps

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_ratio * self.total_schedule_steps))

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.corpus is not None and self.text_file is not None:
            raise ConfigError("pass either a corpus (--corpus) or a text file (--text-file), not both")
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "max_length",
            "log_every",
            "eval_every",
            "save_every",
            "keep_checkpoints",
            "eval_examples",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        _number("mlm_probability", self.mlm_probability, low=0.0, high=1.0, low_open=True, high_open=True)
        _number("short_seq_prob", self.short_seq_prob, low=0.0, high=1.0)
        check_optimisation_fields(self)
        for name in ("corpus", "text_file", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
        unknown = sorted(set(self.model) - set(model_fields()))
        if unknown:
            raise ConfigError(
                f"unknown model field(s) {', '.join(unknown)}; SpikeLMConfig fields: {', '.join(model_fields())}"
            )
        if self.model.get("max_position_embeddings", 512) < self.max_length:
            raise ConfigError(f"max_length {self.max_length} exceeds the model's max_position_embeddings")
        from spikelm.models.configuration_spikelm import SpikeLMConfig

        try:  # the model fields: SpikeLMConfig's own checks (shapes, spiking knobs), before any work
            SpikeLMConfig(**self.model)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model field: {' '.join(str(err).split())}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_optimisation_fields(config) -> None:
    """The optimisation fields pretraining and distillation share (``--set`` of ``pretrain``, ``demo``,
    ``reproduce`` and ``distill`` end here): finite numbers in range, integers where steps are counted."""
    if config.max_minutes is not None:
        _number("max_minutes", config.max_minutes, low=0.0, low_open=True)
    _number("learning_rate", config.learning_rate, low=0.0, low_open=True)
    _number("weight_decay", config.weight_decay, low=0.0)
    _number("adam_beta1", config.adam_beta1, low=0.0, high=1.0, high_open=True)
    _number("adam_beta2", config.adam_beta2, low=0.0, high=1.0, high_open=True)
    _number("adam_epsilon", config.adam_epsilon, low=0.0, low_open=True)
    _number("warmup_ratio", config.warmup_ratio, low=0.0, high=1.0)
    _number("max_grad_norm", config.max_grad_norm, low=0.0)
    for name in ("warmup_steps", "schedule_steps"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if config.schedule_steps is not None and config.schedule_steps < config.max_steps:
        raise ConfigError(f"schedule_steps ({config.schedule_steps}) must be >= max_steps ({config.max_steps})")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {config.seed!r}")
    if config.mixed_precision not in ("auto", "no", "bf16"):
        raise ConfigError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {config.mixed_precision!r}")


def _number(name: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    """A finite number (NaN and infinities refused: JSON cannot even record them) within the range."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = (
            f" in {lo}, {hi}"
            if low is not None and high is not None
            else (f" > {low:g}" if low_open else (f" >= {low:g}" if low is not None else ""))
        )
        raise ConfigError(f"{name} must be a finite number{where}, got {value!r}")


# shapes: (layers, hidden, heads); FFN = 4 x hidden as BERT
def _shape(layers: int, hidden: int, heads: int) -> dict:
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
    }


# CPU recipes: they learn within minutes on a laptop (batch 32, lr ~1e-3, 6 % warm-up)
_CPU_RECIPE = {"batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.06}

PRESETS: dict[str, dict] = {
    "tiny": {"model": _shape(2, 128, 2), **_CPU_RECIPE, "max_steps": 1000, "eval_examples": 256},
    "mini": {"model": _shape(4, 256, 4), **_CPU_RECIPE, "max_steps": 2000, "eval_examples": 256},
    "small": {"model": _shape(4, 512, 8), **_CPU_RECIPE, "learning_rate": 5e-4, "max_steps": 4000},
    "medium": {"model": _shape(8, 512, 8), **_CPU_RECIPE, "learning_rate": 5e-4, "max_steps": 8000},
    # The paper's run (SPEC section 4): BERT-base, T=4, ReLU in the MLM head transform as the authors did;
    # AdamW lr 2e-4, no weight decay, 5,000 warm-up steps, linear decay configured for 500k steps and
    # stopped at 100k, global batch 512 (8 GPUs x 64), MLM + NSP at length 128.
    "base": {
        "model": {**_shape(12, 768, 12), "num_steps": 4, "head_hidden_act": "relu"},
        "batch_size": 512,
        "learning_rate": 2e-4,
        "weight_decay": 0.0,
        "warmup_steps": 5000,
        "schedule_steps": 500_000,
        "max_steps": 100_000,
        "eval_every": 5000,
        "save_every": 5000,
        "log_every": 100,
    },
}


def model_fields() -> list[str]:
    from spikelm.models.configuration_spikelm import SpikeLMConfig

    params = inspect.signature(SpikeLMConfig.__init__).parameters
    return [n for n, p in params.items() if n not in ("self", "kwargs") and p.kind is p.POSITIONAL_OR_KEYWORD]


def recipe_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(PretrainConfig) if f.name != "model"]


def parse_value(text: str):
    """``--set`` values are JSON (numbers such as 1e-3, true/false, null, lists), else the plain string.

    Plain strings stay strings: ``mixed_precision=no`` is "no", not YAML's False.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(name: str, value, default):
    """Match the type of the recipe field's default (an int where a float is expected is fine)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if default is not None and not isinstance(value, type(default)) and value is not None:
        raise ConfigError(f"{name} expects a {type(default).__name__}, got {value!r}")
    return value


def apply_overrides(config: PretrainConfig, overrides: dict, origin: str) -> None:
    defaults = PretrainConfig()
    for name, value in overrides.items():
        if name == "model":
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: 'model' must be a mapping of SpikeLMConfig fields")
            apply_overrides(config, value, origin)
        elif name in recipe_fields():
            setattr(config, name, _coerce(name, value, getattr(defaults, name)))
        elif name in model_fields():
            config.model[name] = value
        else:
            raise ConfigError(
                f"{origin}: unknown config key {name!r}. Recipe fields: {', '.join(recipe_fields())}. "
                f"Model (SpikeLMConfig) fields: {', '.join(model_fields())}"
            )


def load_config_file(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path} is not valid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of field: value")
    return data


def config_from_dict(recorded: dict, origin: str) -> PretrainConfig:
    """A :class:`PretrainConfig` from its recorded ``to_dict()`` (``pretrain_config.json``)."""
    if not isinstance(recorded, dict):
        raise ConfigError(f"{origin} must hold a mapping of field: value")
    config = PretrainConfig(preset=recorded.get("preset", "tiny"))
    config.model = {}
    apply_overrides(config, recorded, origin)
    return config


def resolve_resumed_config(
    recorded: dict, origin: str, preset: str | None = None, config_file=None, sets: list[str] = (), **fields
) -> PretrainConfig:
    """The recorded run's settings, with the flags given on resume applied (the caller refuses any that change
    the run: :func:`spikelm.training.checkpoints.check_resume_settings`)."""
    config = config_from_dict(recorded, origin)
    file_data = load_config_file(config_file) if config_file else {}
    if preset is not None:
        file_data = {**file_data, "preset": preset}
    apply_overrides(config, file_data, f"--config {config_file}")
    apply_overrides(config, parse_sets(sets), "--set")
    apply_overrides(config, {k: v for k, v in fields.items() if v is not None}, "arguments")
    config.check()
    return config


def parse_sets(sets: list[str]) -> dict:
    parsed = {}
    for item in sets:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        parsed[name.strip()] = parse_value(value)
    return parsed


def resolve_config(
    preset: str | None = None, config_file: str | Path | None = None, sets: list[str] = (), **fields
) -> PretrainConfig:
    """Preset, then the config file, then ``--set FIELD=VALUE`` strings, then keyword ``fields``."""
    file_data = load_config_file(config_file) if config_file else {}
    preset = preset or file_data.get("preset") or "tiny"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    config = PretrainConfig(preset=preset)
    recipe = dict(PRESETS[preset])
    config.model = dict(recipe.pop("model"))
    apply_overrides(config, recipe, f"preset {preset}")
    apply_overrides(config, {k: v for k, v in file_data.items() if k != "preset"}, f"--config {config_file}")
    apply_overrides(config, parse_sets(sets), "--set")
    apply_overrides(config, {k: v for k, v in fields.items() if v is not None}, "arguments")
    config.check()
    return config
