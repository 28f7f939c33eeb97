"""Distillation of a (spiking) causal LM student toward a real-valued teacher, on ``accelerate``.

``run_distillation(config, output_dir)`` is the whole recipe; ``spikelm distill`` is a thin CLI over it. The
teacher is any Hugging Face causal LM directory (or a named source, where ``spikelm.data.pretrained`` provides
``resolve_model_source``); the student is a causal LM directory loaded with
``AutoModelForCausalLM.from_pretrained`` after ``import spikelm``, so a spikified student (``spikelm spikify``)
or a causal SpikeLM (``spikelm pretrain --objective clm``) loads spiking. Both must share the tokenizer: the
training blocks are tokenized with the teacher's, and the vocabulary sizes must agree.

Loss, per token of the training blocks::

    kl_weight * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))  +  hidden_weight * MSE(h_s, h_t)

with ``T = temperature`` (default 1) and the hidden-state MSE (default weight 0) on the last hidden state
(``hidden_layers=last``) or every layer's (``all``, ``output_hidden_states``). Every student parameter trains,
except: the embeddings (``freeze_embeddings``), the LM head (``freeze_lm_head``; tied with the embeddings
where the model ties them) and, unless ``learn_alpha``, every parameter named ``*alpha*`` (spike amplitudes;
neurons with a ``learn_alpha`` attribute get it set too, which turns their LSQ gradient on).

Data: causal blocks of ``max_length`` tokens from the corpus (default: the ``pypi`` corpus, the same corpus,
split and block machinery as ``spikelm pretrain --objective clm``); validation blocks come from the corpus's
held-out split, never from training batches. At the start, every ``eval_every`` steps and at the end the run
reports the held-out KL (at T = 1), the student's and the teacher's held-out perplexity and, with
``eval_text=FILE``, the student's perplexity on the first ``eval_text_tokens`` tokens of that file (blocks of
``max_length``, stride ``max_length``): one ``"event": "eval"`` line of ``train_log.jsonl`` each, with the
tokens seen so far, so the perplexity-vs-tokens curve can be drawn (``distill_curve.png`` is drawn at the end).

Output directory: the student (``save_pretrained``, loads with ``AutoModelForCausalLM.from_pretrained``) and the
teacher's tokenizer; ``distill_config.json``; ``train_log.jsonl``; ``metrics.json``; ``tensorboard/``;
``distill_curve.png``; ``checkpoints/step-N/`` (model, optimizer, scheduler, per-process RNG, data position,
written atomically), shared with :mod:`spikelm.training.pretrain`, as are the schedule, the data position and exact
``--resume``.

GPUs (see ``docs/DISTILLATION.md``)::

    accelerate launch --num_processes 4 -m spikelm distill --teacher T --student S --output-dir OUT \\
        --set batch_size=32 --set max_length=512

(``python -m spikelm`` and, after the layout change, ``-m spikelm.commands.main`` are the same entry point.)
``mixed_precision=auto`` is bf16 on a GPU; the teacher is then held in bf16 (``teacher_dtype``). For a model
that does not fit one GPU, launch with an FSDP accelerate config: the student is sharded by ``prepare``, the
teacher too (forward only), and the whole state dict is gathered for the final ``save_pretrained``; periodic
checkpoints and ``--resume`` are not available under FSDP yet (untested here: no multi-GPU machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError, loading_in_one_line
from ..evaluation.loading import load_pretrained
from ..outputs import lock_existing_output_dir, new_files_follow_umask, write_json_atomic
from .checkpoints import INPUTS_FILE, check_inputs
from .presets import ConfigError, _coerce, _number, check_optimisation_fields, load_config_file, parse_value
from .pretrain import (
    PretrainingData,
    TrainState,
    _peak_rss_mb,
    _prepare_output,
    _truncate_log,
    find_resume_checkpoint,
    linear_schedule,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

COMMAND = "distill"
CONFIG_FILE = "distill_config.json"
CURVE_FILE = "distill_curve.png"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class DistillError(UserError):
    """A distillation run that cannot start as asked (the message says why and what to do)."""


@dataclass
class DistillConfig:
    # the models
    teacher: str | None = None  # a causal LM directory or a named source (real-valued)
    student: str | None = None  # a causal LM directory (e.g. written by `spikelm spikify`)
    # data
    corpus: str | None = None  # as `spikelm pretrain`: a named corpus, a saved dataset, a directory (None: pypi)
    text_file: str | None = None  # a plain-text file as the corpus (a blank line between documents)
    max_length: int = 256  # tokens per training block
    eval_text: str | None = None  # a text file (e.g. Brown) for the perplexity-vs-tokens curve
    eval_text_tokens: int = 32768  # its first tokens scored, in blocks of max_length
    # the loss
    temperature: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 0.0  # weight of the hidden-state MSE (0: off)
    hidden_layers: str = "last"  # "last" (the last hidden state) or "all" (every layer's)
    # what trains
    learn_alpha: bool = True  # parameters named *alpha* (spike amplitudes) train
    freeze_embeddings: bool = False
    freeze_lm_head: bool = False
    # optimisation
    batch_size: int = 8  # sequences per optimizer step, all processes and accumulation steps together
    grad_accum: int = 1
    learning_rate: float = 5e-5  # peak AdamW learning rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None
    max_steps: int = 1000
    schedule_steps: int | None = None  # length of the linear decay (None: max_steps)
    max_minutes: float | None = None
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU), "no", "bf16"
    teacher_dtype: str = "auto"  # "auto" (bfloat16 under bf16, else float32), "float32", "bfloat16"
    seed: int = 0
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100
    eval_examples: int = 64  # held-out blocks (the first of a fixed, seeded set)
    save_every: int = 200
    keep_checkpoints: int = 2

    # what spikelm.training.pretrain.PretrainingData reads: causal blocks
    objective: ClassVar[str] = "clm"
    mlm_probability: ClassVar[float] = 0.15
    short_seq_prob: ClassVar[float] = 0.1

    @property
    def total_schedule_steps(self) -> int:
        return self.schedule_steps or self.max_steps

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_ratio * self.total_schedule_steps)

    def check(self) -> None:
        for name in ("teacher", "student"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required (a causal LM directory)")
        if self.corpus is not None and self.text_file is not None:
            raise ConfigError("pass either a corpus (corpus=) or a text file (text_file=), not both")
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
            "eval_text_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        _number("temperature", self.temperature, low=0.0, low_open=True)
        _number("kl_weight", self.kl_weight, low=0.0)
        _number("hidden_weight", self.hidden_weight, low=0.0)
        if self.kl_weight + self.hidden_weight == 0:
            raise ConfigError("kl_weight and hidden_weight must be >= 0, and one of them positive")
        if self.hidden_layers not in ("last", "all"):
            raise ConfigError(f"hidden_layers must be 'last' or 'all', got {self.hidden_layers!r}")
        if self.teacher_dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"teacher_dtype must be 'auto', 'float32' or 'bfloat16', got {self.teacher_dtype!r}")
        for name in ("learn_alpha", "freeze_embeddings", "freeze_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_optimisation_fields(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DistillConfig)]


def resolve_distill_config(config_file: str | Path | None = None, sets: list[str] = (), **fields) -> DistillConfig:
    """Defaults, then a YAML/JSON config file, then ``--set FIELD=VALUE`` strings, then keyword ``fields``
    (those that are not None)."""
    defaults = DistillConfig()
    config = DistillConfig()

    def apply(values: dict, origin: str) -> None:
        for name, value in values.items():
            if name not in config_fields():
                raise ConfigError(f"{origin}: unknown config key {name!r}. Fields: {', '.join(config_fields())}")
            setattr(config, name, _coerce(name, value, getattr(defaults, name)))

    apply(load_config_file(config_file) if config_file else {}, f"--config {config_file}")
    parsed = {}
    for item in sets:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        parsed[name.strip()] = parse_value(value)
    apply(parsed, "--set")
    apply({k: v for k, v in fields.items() if v is not None}, "arguments")
    config.check()
    return config


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------


def resolve_source(name_or_path: str, role: str, resolver: Callable | None = None) -> Path:
    """The local directory of a model: ``resolver(name_or_path)`` (default: ``spikelm.data.pretrained``'s
    ``resolve_model_source`` where it exists: named sources), else a directory holding ``config.json``."""
    if resolver is None:
        try:
            from ..data.pretrained import resolve_model_source as resolver
        except ImportError:
            resolver = None
    if resolver is not None:
        try:
            path = Path(resolver(name_or_path))
        except (ValueError, KeyError, OSError) as err:
            raise DistillError(f"--{role}: {err}") from err
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise DistillError(
                f"--{role} {name_or_path}: no such directory (expected a causal LM directory "
                "written by save_pretrained)"
            )
    if not (path / "config.json").is_file():
        raise DistillError(f"--{role} {path}: no config.json there (expected a directory written by save_pretrained)")
    return path


def causal_lm_config(path: Path, role: str):
    """The config of the causal LM in ``path``; a clear error for an encoder or an unknown architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import spikelm.models  # noqa: F401  (registers model_type "spikelm"; the "spikelm" quantization method is known
    # to transformers from `import spikelm` on)

    with loading_in_one_line(path, f"--{role}"):
        config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and (
        not architectures or any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)
    )
    if not causal:
        what = ", ".join(architectures) or f"model_type {config.model_type!r}"
        raise DistillError(
            f"--{role} {path} holds a {what} checkpoint, not a causal language model "
            "(AutoModelForCausalLM); distillation needs next-token distributions"
        )
    return config


def check_shared_vocabulary(teacher_config, student_config, tokenizer, student_dir: Path) -> None:
    """Teacher and student must predict over the same vocabulary, the teacher's tokenizer's."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise DistillError(
            f"teacher and student do not share a vocabulary: the teacher predicts over "
            f"{teacher_config.vocab_size} tokens, the student over {student_config.vocab_size} "
            f"(--student {student_dir}); distil into a student converted from the teacher (or one with its tokenizer)"
        )
    if len(tokenizer) > teacher_config.vocab_size:
        raise DistillError(
            f"the teacher's tokenizer has {len(tokenizer)} tokens, more than its model's vocabulary "
            f"({teacher_config.vocab_size})"
        )
    if any((student_dir / name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        try:
            student_tokenizer = AutoTokenizer.from_pretrained(student_dir)
        except (OSError, ValueError):
            return
        if student_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise DistillError(
                f"the student's tokenizer ({student_dir}) differs from the teacher's; teacher and "
                "student must share one tokenizer"
            )


def set_trainable(student, config: DistillConfig) -> None:
    """All parameters train except the frozen embeddings / LM head and, unless ``learn_alpha``, spike amplitudes."""
    for name, param in student.named_parameters():
        param.requires_grad_(config.learn_alpha if "alpha" in name.rsplit(".", 1)[-1] else True)
    for module in student.modules():
        # a neuron's own switch; a SpikeLM neuron without amplitude has no alpha gradient (alpha is a threshold)
        learn = config.learn_alpha and getattr(module, "use_amplitude", True) is not False
        if hasattr(module, "set_learn_alpha"):
            module.set_learn_alpha(learn)
        elif isinstance(getattr(module, "learn_alpha", None), bool):
            module.learn_alpha = learn
            for name, param in module.named_parameters(recurse=False):
                if "alpha" in name:
                    param.requires_grad_(learn)
    # saved with the student: a SpikeLM config's field, or a conversion's quantization_config (spikelm.spikify)
    for section in (student.config, getattr(student.config, "quantization_config", None)):
        if isinstance(section, dict) and isinstance(section.get("learn_alpha"), bool):
            section["learn_alpha"] = config.learn_alpha and section.get("use_amplitude", True) is not False
        elif isinstance(getattr(section, "learn_alpha", None), bool):
            section.learn_alpha = config.learn_alpha and getattr(section, "use_amplitude", True) is not False
    frozen = []
    if config.freeze_embeddings and student.get_input_embeddings() is not None:
        frozen.append(student.get_input_embeddings().weight)
    if config.freeze_lm_head and student.get_output_embeddings() is not None:
        frozen.append(student.get_output_embeddings().weight)
    for param in frozen:
        param.requires_grad_(False)


def _load_models(teacher_dir: Path, student_dir: Path, config: DistillConfig, mixed: str):
    from transformers import AutoModelForCausalLM

    teacher_dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "auto": torch.bfloat16 if mixed == "bf16" else torch.float32,
    }[config.teacher_dtype]
    teacher = load_pretrained(AutoModelForCausalLM, teacher_dir, "--teacher", dtype=teacher_dtype).eval()
    teacher.requires_grad_(False)
    torch.manual_seed(config.seed)  # weights the checkpoint lacks (if any) are the same on every process
    student = load_pretrained(AutoModelForCausalLM, student_dir, "--student", dtype=torch.float32)
    return teacher, student


# ----------------------------------------------------------------------------------------------
# The loss and evaluation
# ----------------------------------------------------------------------------------------------


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at ``temperature``, per position (nats)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def _hidden_pairs(student_out, teacher_out, layers: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    s_hidden, t_hidden = student_out.hidden_states, teacher_out.hidden_states
    if s_hidden is None or t_hidden is None:
        raise DistillError("hidden_weight > 0 needs both models to return hidden states (output_hidden_states)")
    if layers == "last":
        pairs = [(s_hidden[-1], t_hidden[-1])]
    else:
        if len(s_hidden) != len(t_hidden):
            raise DistillError(
                f"hidden_layers=all needs as many layers in the student ({len(s_hidden) - 1}) as in "
                f"the teacher ({len(t_hidden) - 1}); use hidden_layers=last"
            )
        pairs = list(zip(s_hidden, t_hidden, strict=True))
    for s, t in pairs:
        if s.shape != t.shape:
            raise DistillError(
                f"the student's hidden states {tuple(s.shape)} do not match the teacher's "
                f"{tuple(t.shape)}; hidden_weight needs the same hidden size"
            )
    return pairs


def distillation_loss(student, teacher, batch: dict, config: DistillConfig) -> tuple[torch.Tensor, dict]:
    """The training loss of one micro-batch and its parts (detached, for logging)."""
    hidden = config.hidden_weight > 0
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if hidden:
        inputs["output_hidden_states"] = True
    with torch.no_grad():
        teacher_out = teacher(**inputs)
    student_out = student(**inputs)
    mask = batch["attention_mask"].float()
    kl = (token_kl(student_out.logits, teacher_out.logits, config.temperature) * mask).sum() / mask.sum()
    kl = kl * config.temperature**2
    loss = config.kl_weight * kl
    parts = {"kl": kl.detach()}
    if hidden:
        pairs = _hidden_pairs(student_out, teacher_out, config.hidden_layers)
        mse = sum((((s.float() - t.float()) ** 2).mean(-1) * mask).sum() / mask.sum() for s, t in pairs) / len(pairs)
        loss = loss + config.hidden_weight * mse
        parts["hidden_mse"] = mse.detach()
    return loss, parts


@torch.no_grad()
def evaluate_distillation(student, teacher, batches: list[dict], accelerator) -> dict:
    """Held-out KL(teacher || student) at T = 1 (every position), and the student's and the teacher's
    next-token loss and perplexity (every position but the last of a block), over every process's share."""
    was_training = student.training
    student.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with accelerator.autocast():
            s_logits = student(**inputs).logits.float()
            t_logits = teacher(**inputs).logits.float()
        mask = batch["attention_mask"].bool()
        sums[0] += token_kl(s_logits, t_logits)[mask].sum().double()
        sums[1] += mask.sum()
        keep = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).reshape(-1).bool()
        targets = batch["input_ids"][:, 1:].reshape(-1)[keep]
        for i, logits in enumerate((s_logits, t_logits)):
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])[keep]
            sums[2 + i] += F.cross_entropy(flat, targets, reduction="sum").double()
        sums[4] += targets.numel()
    sums = accelerator.reduce(sums, reduction="sum")
    student.train(was_training)
    loss, teacher_loss = float(sums[2] / sums[4]), float(sums[3] / sums[4])
    return {
        "kl": float(sums[0] / sums[1]),
        "loss": loss,
        "perplexity": math.exp(loss),
        "teacher_loss": teacher_loss,
        "teacher_perplexity": math.exp(teacher_loss),
        "tokens": int(sums[4]),
    }


def eval_text_batches(
    path: str | Path, tokenizer, config: DistillConfig, batch_size: int, world_size: int, rank: int
) -> list[dict]:
    """The first ``eval_text_tokens`` tokens of a text file in blocks of ``max_length`` (stride ``max_length``;
    a shorter last block is dropped unless it is the only one), this process's share."""
    from ..evaluation.perplexity import read_text

    ids = tokenizer(read_text(path), add_special_tokens=False, verbose=False)["input_ids"][: config.eval_text_tokens]
    if len(ids) < 2:
        raise DistillError(f"eval_text {path} holds fewer than 2 tokens")
    width = min(config.max_length, len(ids))
    blocks = np.asarray(ids[: len(ids) // width * width], dtype=np.int64).reshape(-1, width)[rank::world_size]
    out = []
    for i in range(0, len(blocks), batch_size):
        ids_t = torch.from_numpy(np.ascontiguousarray(blocks[i : i + batch_size]))
        out.append({"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)})
    return out


def plot_curve(log_path: Path, out_path: Path) -> bool:
    """``distill_curve.png``: held-out KL and perplexities against training tokens, from the log's eval lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    evals = [e for e in map(json.loads, log_path.read_text().splitlines()) if e.get("event") == "eval"]
    if not evals:
        return False
    tokens = [e["tokens"] for e in evals]
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    ax_kl.plot(tokens, [e["heldout_kl"] for e in evals], marker="o")
    ax_kl.set(xlabel="training tokens", ylabel="held-out KL(teacher || student), nats", title="held-out KL")
    ax_ppl.plot(tokens, [e["val_perplexity"] for e in evals], marker="o", label="student, held-out corpus")
    ax_ppl.axhline(evals[0]["teacher_val_perplexity"], linestyle="--", color="gray", label="teacher, held-out corpus")
    if "eval_text_perplexity" in evals[0]:
        ax_ppl.plot(tokens, [e["eval_text_perplexity"] for e in evals], marker="s", label="student, eval_text")
        ax_ppl.axhline(
            evals[0]["teacher_eval_text_perplexity"], linestyle=":", color="black", label="teacher, eval_text"
        )
    ax_ppl.set(xlabel="training tokens", ylabel="perplexity", title="perplexity", yscale="log")
    ax_ppl.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return True


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    model: torch.nn.Module  # the distilled student (unwrapped), on every process
    metrics: dict
    output_dir: Path


def _check_checkpoint(path: Path, student_config) -> None:
    saved = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    fields = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    diffs = [
        f"{k} {saved.get(k)!r} (this student: {getattr(student_config, k, None)!r})"
        for k in fields
        if k in saved and saved[k] != getattr(student_config, k, None)
    ]
    if diffs:
        raise DistillError(f"checkpoint {path} was saved from another student: {'; '.join(diffs)}")


def run_distillation(
    config: DistillConfig,
    output_dir: str | Path,
    overwrite: bool = False,
    resume: bool | str | None = None,
    progress: bool = True,
    resolver: Callable | None = None,
    log=None,
) -> DistillResult:
    """Distil ``config.student`` toward ``config.teacher`` as ``config`` says, writing into ``output_dir``.

    ``resume``: True (the latest checkpoint in ``output_dir``) or a checkpoint directory. ``resolver``: maps a
    model name or path to a directory (default: ``spikelm.data.pretrained.resolve_model_source`` where it exists).
    Every input is checked before ``output_dir`` is touched. Returns the student and the metrics. Progress: a bar
    (``progress``) and lines to ``log`` (default: this module's logger), on the main process only. The same seed,
    thread count and inputs give the same student bit for bit (:mod:`spikelm.training.reproducibility`).
    """
    from .reproducibility import reproducible

    config.check()
    with reproducible(config.seed):
        return _run_distillation(config, output_dir, overwrite, resume, progress, resolver, log)


def _run_distillation(config, output_dir, overwrite, resume, progress, resolver, log) -> DistillResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..data.corpora import load_corpus

    config.check()
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    if not accelerator.is_main_process:
        log = lambda *args, **kwargs: None  # noqa: E731
    elif log is None:
        log = logger.info
    output_dir = Path(output_dir)

    teacher_dir = resolve_source(config.teacher, "teacher", resolver)
    student_dir = resolve_source(config.student, "student", resolver)
    if Path(teacher_dir).resolve() == Path(student_dir).resolve():
        raise DistillError(
            f"--teacher and --student are the same model ({student_dir}); distil toward another (real-valued) model"
        )
    teacher_config = causal_lm_config(teacher_dir, "teacher")
    student_config = causal_lm_config(student_dir, "student")
    for role, model_config in (("teacher", teacher_config), ("student", student_config)):
        positions = getattr(model_config, "max_position_embeddings", None)
        if isinstance(positions, int) and config.max_length > positions:
            raise DistillError(
                f"max_length {config.max_length} exceeds the {role}'s {positions} positions "
                f"(max_position_embeddings); use --set max_length={positions} or less"
            )
    resume_path = None
    if resume:
        lock_existing_output_dir(output_dir, COMMAND)  # before reading checkpoints a running job may be writing
        resume_path = find_resume_checkpoint(output_dir, resume)
        _check_checkpoint(resume_path, student_config)
    data_files = {"--teacher": teacher_dir, "--text-file": config.text_file, "eval_text": config.eval_text}
    inputs = check_inputs(output_dir, data_files, bool(resume))
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    except (OSError, ValueError) as err:
        raise DistillError(f"--teacher {teacher_dir}: no usable tokenizer there ({err})") from err
    check_shared_vocabulary(teacher_config, student_config, tokenizer, student_dir)
    if config.eval_text is not None and not Path(config.eval_text).exists():
        raise DistillError(f"eval_text {config.eval_text} does not exist")

    with accelerator.main_process_first():  # a named corpus is built once, into the cache
        corpus = load_corpus(config.corpus, config.text_file)
    data = PretrainingData(config, tokenizer, corpus, accelerator.num_processes, accelerator.process_index)
    val_batches = data.validation_batches(max(1, data.micro_batch))
    if not val_batches:
        raise DistillError(
            "the corpus's held-out split yields no validation block; use a larger corpus or a smaller max_length"
        )
    text_batches = None
    if config.eval_text is not None:
        text_batches = eval_text_batches(
            config.eval_text,
            tokenizer,
            config,
            max(1, data.micro_batch),
            accelerator.num_processes,
            accelerator.process_index,
        )

    teacher, student = _load_models(teacher_dir, student_dir, config, mixed)
    if resume_path is not None:
        resume_path = find_resume_checkpoint(output_dir, resume, student)  # its weights must be this student's
    set_trainable(student, config)
    # every input is checked: only now is the output directory touched
    if accelerator.is_main_process:
        identity = {"teacher": str(config.teacher), "student": str(config.student), "seed": config.seed}
        _prepare_output(
            output_dir,
            config,
            overwrite,
            resume,
            command=COMMAND,
            identity=identity,
            outputs=(CURVE_FILE,),
            inputs={"--teacher": teacher_dir, "--student": student_dir},
        )
    accelerator.wait_for_everyone()
    student.to(accelerator.device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(student, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )
    scheduler = linear_schedule(optimizer, config.num_warmup_steps, config.total_schedule_steps)
    torch.manual_seed(config.seed * 1000 + 1 + accelerator.process_index)  # dropout: differs per process
    state = TrainState()
    if resume_path is not None:
        state = load_checkpoint(resume_path, accelerator, student, optimizer, scheduler)
        log(f"resumed from {resume_path} at step {state.step}")

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp:
        if resume_path is not None:
            raise DistillError("--resume is not available under FSDP yet (checkpoints hold whole, unsharded states)")
        if accelerator.is_main_process:
            warnings.warn(
                "FSDP: no checkpoints are written (not supported yet); the final student is saved", stacklevel=2
            )
        teacher = accelerator.prepare_model(teacher)  # sharded too: forward only
    else:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    if hasattr(student, "alphas_initialized") and not student.alphas_initialized:
        # a causal SpikeLM whose alphas were never set: from the first training batch, as `spikelm pretrain`
        first = data.micro_batches(state.epoch, state.batch_in_epoch)[0]
        cuda_devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices), accelerator.autocast():
            student(**{k: v.to(accelerator.device) for k, v in first.items() if k != "labels"})
    model, optimizer = accelerator.prepare(student, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    writer = None
    log_path = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=state.step + 1 if state.step else None)
        write_json_atomic(output_dir / CONFIG_FILE, config.to_dict())
        write_json_atomic(output_dir / INPUTS_FILE, inputs)
        _truncate_log(log_path, state.step)
        if state.step == 0:
            log_path.unlink(missing_ok=True)

    def validate(tag: str) -> dict:
        result = {"validation": evaluate_distillation(unwrapped, teacher, val_batches, accelerator)}
        if text_batches is not None:
            result["eval_text"] = evaluate_distillation(unwrapped, teacher, text_batches, accelerator)
        entry = {
            "event": "eval",
            "step": state.step,
            "tokens": state.train_tokens,
            "heldout_kl": result["validation"]["kl"],
            "val_perplexity": result["validation"]["perplexity"],
            "teacher_val_perplexity": result["validation"]["teacher_perplexity"],
        }
        if text_batches is not None:
            entry.update(
                eval_text_kl=result["eval_text"]["kl"],
                eval_text_perplexity=result["eval_text"]["perplexity"],
                teacher_eval_text_perplexity=result["eval_text"]["teacher_perplexity"],
            )
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            for key, value in entry.items():
                if key not in ("event", "step", "tokens"):
                    writer.add_scalar(f"validation/{key}", value, state.step)
                    writer.add_scalar(f"validation_by_tokens/{key}", value, state.train_tokens)
        log(
            f"step {state.step} ({tag}, {state.train_tokens} tokens): held-out KL "
            f"{entry['heldout_kl']:.4f}, perplexity {entry['val_perplexity']:.2f} (teacher "
            f"{entry['teacher_val_perplexity']:.2f})"
            + (f", eval_text perplexity {entry['eval_text_perplexity']:.2f}" if text_batches else "")
        )
        return result

    if state.initial_eval is None:
        state.initial_eval = validate("start")

    bar = tqdm(
        total=config.max_steps,
        initial=state.step,
        disable=not (progress and accelerator.is_main_process),
        desc="distill",
        dynamic_ncols=True,
    )
    last_eval = None
    time_limit = config.max_minutes * 60 if config.max_minutes is not None else math.inf
    run_started = time.perf_counter()
    while state.step < config.max_steps:
        if state.batch_in_epoch >= data.steps_in_epoch(state.epoch):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        started = time.perf_counter()
        batches = data.micro_batches(state.epoch, state.batch_in_epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, kl, hidden mse, tokens
        for micro, batch in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = nullcontext() if micro == len(batches) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss, parts = distillation_loss(model, teacher, batch, config)
                loss = loss / len(batches)
            accelerator.backward(loss)
            sums[0] += loss.detach().double()
            sums[1] += parts["kl"].double() / len(batches)
            sums[2] += parts.get("hidden_mse", torch.zeros((), device=sums.device)).double() / len(batches)
            sums[3] += batch["attention_mask"].sum()
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(sums, reduction="sum")
        state.step += 1
        state.batch_in_epoch += 1
        elapsed = time.perf_counter() - started
        state.train_seconds += elapsed
        state.train_tokens += int(sums[3])
        loss_value, kl_value, mse_value = (float(sums[i]) / accelerator.num_processes for i in range(3))
        if not math.isfinite(loss_value):
            raise DistillError(
                f"the distillation loss became {loss_value} at step {state.step}; lower the learning rate"
            )
        tokens_per_s = float(sums[3]) / elapsed
        bar.update(1)
        bar.set_postfix(kl=f"{kl_value:.4f}", tok_s=f"{tokens_per_s:.0f}")
        out_of_time = bool(
            accelerator.reduce(
                torch.tensor(
                    float(accelerator.is_main_process and time.perf_counter() - run_started >= time_limit),
                    device=accelerator.device,
                ),
                reduction="sum",
            )
        )
        last = state.step == config.max_steps or out_of_time
        if accelerator.is_main_process and (state.step % config.log_every == 0 or last):
            entry = {
                "event": "train",
                "step": state.step,
                "loss": loss_value,
                "kl": kl_value,
                "lr": scheduler.get_last_lr()[0],
                "epoch": state.epoch,
                "tokens_per_s": tokens_per_s,
                "tokens": state.train_tokens,
            }
            if config.hidden_weight > 0:
                entry["hidden_mse"] = mse_value
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            for key in ("loss", "kl", "lr", "tokens_per_s", "hidden_mse"):
                if key in entry:
                    writer.add_scalar(f"train/{key}", entry[key], state.step)
        if state.step % config.eval_every == 0 or last:
            last_eval = validate(f"step {state.step}")
        if (state.step % config.save_every == 0 or last) and not fsdp:
            save_checkpoint(
                output_dir,
                accelerator,
                model,
                optimizer,
                scheduler,
                state,
                config,
                config.keep_checkpoints,
                config_file=CONFIG_FILE,
            )
        if out_of_time:
            log(f"stopping after {config.max_minutes} minutes at step {state.step}")
            break
    bar.close()
    if last_eval is None:
        last_eval = validate("end")

    metrics = {
        "teacher": str(config.teacher),
        "student": str(config.student),
        "student_class": type(unwrapped).__name__,
        "steps": state.step,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": mixed,
        "parameters": sum(p.numel() for p in unwrapped.parameters()),
        "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        "initial_validation": state.initial_eval,
        "final_validation": last_eval,
        "train_tokens": state.train_tokens,
        "train_seconds": state.train_seconds,
        "tokens_per_second": state.train_tokens / max(state.train_seconds, 1e-9),
        "peak_rss_mb": _peak_rss_mb(),
    }
    # under FSDP the whole state dict is gathered onto the main process (a collective: every process calls it)
    state_dict = accelerator.get_state_dict(model) if fsdp else None
    if accelerator.is_main_process:
        with new_files_follow_umask(output_dir):  # safetensors writes 0600
            unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
        write_json_atomic(output_dir / "metrics.json", metrics)
        writer.close()
        plot_curve(log_path, output_dir / CURVE_FILE)
    accelerator.wait_for_everyone()
    return DistillResult(unwrapped, metrics, output_dir)
