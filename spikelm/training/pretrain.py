"""Pretraining SpikeLM from scratch (SPEC section 4) on ``accelerate``: one CPU/GPU, or DDP under
``accelerate launch`` / ``torchrun``.

``run_pretraining(config, output_dir)`` is the whole recipe; ``spikelm pretrain`` is a thin CLI over
it. Reading order: the model, the data, evaluation, checkpoints, the training loop.

Output directory: ``config.json`` + ``model.safetensors`` (``SpikeLMForPreTraining.from_pretrained``
loads it; ``SpikeLMForCausalLM`` for clm) and the tokenizer beside them; ``token_counts.safetensors``
(the training stream's token frequencies: the unigram baseline, which ``spikelm perplexity`` also
reports); ``pretrain_config.json``; ``train_log.jsonl`` (one JSON
object per logged step); ``metrics.json`` (validation at the start and the end, unigram baseline,
tokens/s, peak memory); ``tensorboard/``; ``checkpoints/step-N/`` (model, optimizer, scheduler,
per-process RNG state, data position), each written to a temporary directory and renamed into place.

Exactness of ``resume``: the data of an epoch is a pure function of ``(seed, epoch)``
(``spikelm.data.objectives``) and the position is saved, so a resumed run sees the same batches;
dropout draws from the torch RNG, whose state every process saves and restores.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spikelm.data.corpora import load_corpus
from spikelm.data.objectives import IGNORE_INDEX, Batcher, build_examples, document_separator, tokenize_corpus
from spikelm.errors import UserError
from spikelm.evaluation.perplexity import TOKEN_COUNTS_FILE, unigram_log_probs
from spikelm.models.configuration_spikelm import SpikeLMConfig
from spikelm.outputs import (
    check_output_dir,
    lock_existing_output_dir,
    new_files_follow_umask,
    prepare_output_dir,
    write_json_atomic,
    write_text_atomic,
)

from .checkpoints import (
    INPUTS_FILE,
    check_inputs,
    check_resume_settings,
    first_complete_checkpoint,
    load_tensors,
    read_jsonl,
    resumable_checkpoints,
    verify_checkpoint,
)
from .presets import PretrainConfig

logger = logging.getLogger(__name__)

COMMAND = "pretrain"
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "position_embedding_type",
    "num_steps",
    "spiking",
    "spike_levels",
)


class PretrainError(UserError):
    """A pretraining run that cannot start as asked (the message says why and what to do)."""


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # optimizer steps done within the epoch
    train_tokens: int = 0  # non-padding input tokens seen, all processes
    train_seconds: float = 0.0  # time spent in training steps (validation and checkpoints excluded)
    initial_eval: dict | None = None


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def model_config(config: PretrainConfig, tokenizer) -> SpikeLMConfig:
    """The SpikeLMConfig of a run: the preset's shape and ``config.model``, sized to the tokenizer.

    A causal model's positions default to the training block length (learned positions beyond it would
    never be trained, and generation and perplexity windows stop there), and its end-of-text token is
    the document separator of the training blocks, so ``generate()`` stops where documents end.
    """
    fields = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if config.objective == "clm":
        separator = document_separator(tokenizer)
        fields.update(
            max_position_embeddings=config.max_length,
            eos_token_id=separator,
            bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else separator,
        )
    return SpikeLMConfig(**{**fields, **config.model})


def build_model(config: PretrainConfig, tokenizer):
    """A randomly initialised ``SpikeLMForCausalLM`` (clm), ``SpikeLMForPreTraining`` (mlm-nsp) or
    ``SpikeLMForMaskedLM`` (mlm)."""
    from spikelm.data.tokenization import check_fits
    from spikelm.models.modeling_spikelm import SpikeLMForMaskedLM, SpikeLMForPreTraining
    from spikelm.models.modeling_spikelm_causal import SpikeLMForCausalLM

    classes = {"clm": SpikeLMForCausalLM, "mlm-nsp": SpikeLMForPreTraining, "mlm": SpikeLMForMaskedLM}
    shape = model_config(config, tokenizer)
    what = "the model (--set vocab_size)" if "vocab_size" in config.model else "the model"
    check_fits(shape, tokenizer, what=what, tokenizer_flag=f"the tokenizer ({config.tokenizer or 'the default'})")
    return classes[config.objective](shape)


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, LayerNorm weights and spike amplitudes."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".alpha"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer, warmup: int, total: int):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------


class PretrainingData:
    """Tokenized train/validation splits and the batches of each optimizer step, per process."""

    def __init__(self, config: PretrainConfig, tokenizer, corpus, world_size: int, rank: int):
        self.config, self.tokenizer, self.world_size, self.rank = config, tokenizer, world_size, rank
        by_sentence = config.objective != "clm"
        self.train = tokenize_corpus(corpus["train"]["text"], tokenizer, by_sentence)
        self.validation = tokenize_corpus(corpus["validation"]["text"], tokenizer, by_sentence)
        if self.train.num_tokens == 0:
            raise PretrainError("the training split of the corpus holds no tokens")
        self.batcher = Batcher(config.objective, tokenizer, config.seed, config.mlm_probability)
        per_step = world_size * config.grad_accum
        if config.batch_size % per_step:
            raise PretrainError(
                f"batch_size {config.batch_size} must be a multiple of processes x grad_accum "
                f"({world_size} x {config.grad_accum})"
            )
        self.micro_batch = config.batch_size // per_step
        self._epoch, self._examples = None, None

    def examples(self, epoch: int):
        if self._epoch != epoch:
            self._examples = build_examples(
                self.config.objective,
                self.train,
                self.tokenizer,
                self.config.max_length,
                self.config.seed,
                epoch,
                self.config.short_seq_prob,
            )
            self._epoch = epoch
            if len(self._examples) < self.config.batch_size:
                raise PretrainError(
                    f"the corpus yields {len(self._examples)} training sequences, fewer than one batch "
                    f"({self.config.batch_size}); use a larger corpus or a smaller batch_size"
                )
        return self._examples

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.examples(epoch)) // self.config.batch_size

    def micro_batches(self, epoch: int, batch_in_epoch: int) -> list[dict]:
        """This process's ``grad_accum`` micro-batches of one optimizer step: slices of the global batch."""
        examples = self.examples(epoch)
        start = batch_in_epoch * self.config.batch_size
        out = []
        for micro in range(self.config.grad_accum):
            offset = start + (micro * self.world_size + self.rank) * self.micro_batch
            out.append(self.batcher(examples, np.arange(offset, offset + self.micro_batch), epoch))
        return out

    def validation_batches(self, batch_size: int) -> list[dict]:
        """The fixed validation set (seeded apart from training), this process's share."""
        seed = self.config.seed + 1_000_003
        examples = build_examples(
            self.config.objective,
            self.validation,
            self.tokenizer,
            self.config.max_length,
            seed,
            0,
            self.config.short_seq_prob,
        )
        batcher = Batcher(self.config.objective, self.tokenizer, seed, self.config.mlm_probability)
        indices = np.arange(min(len(examples), self.config.eval_examples))[self.rank :: self.world_size]
        return [batcher(examples, indices[i : i + batch_size], 0) for i in range(0, len(indices), batch_size)]

    def token_counts(self) -> torch.Tensor:
        """How often each token occurs in the training stream (for clm, one separator per document)."""
        counts = np.bincount(self.train.tokens, minlength=len(self.tokenizer)).astype(np.int64)
        if self.config.objective == "clm":
            counts[document_separator(self.tokenizer)] += self.train.num_documents
        return torch.from_numpy(counts)

    def unigram_log_probs(self) -> torch.Tensor:
        """log p(token) from training-token frequencies (add-one smoothed): the unigram baseline's model."""
        return unigram_log_probs(self.token_counts())


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model, batches: list[dict], accelerator, causal: bool = False, unigram_log_probs: torch.Tensor | None = None
) -> dict:
    """Token-weighted MLM (or, ``causal``, next-token) loss and accuracy, NSP accuracy, and the loss of the
    unigram model ``unigram_log_probs`` on the same targets, over every process's share; ``causal`` adds
    the perplexities of both."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            out = model(**batch) if causal else model(**batch, masked_logits_only=True)
        labels = batch["labels"]
        if causal:  # position t predicts token t + 1
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            targets = labels[:, 1:].reshape(-1)
            keep = batch["attention_mask"][:, 1:].reshape(-1).bool()
            logits, targets = logits[keep], targets[keep]
        else:  # with labels the MLM head ran only at the masked positions: one row per target
            logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
            targets = labels[labels != IGNORE_INDEX]
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += (logits.argmax(-1) == targets).sum()
        sums[2] += targets.numel()
        if unigram_log_probs is not None:
            sums[5] -= unigram_log_probs.to(targets.device)[targets].sum()
        if "next_sentence_label" in batch:
            sums[3] += (out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum()
            sums[4] += batch["next_sentence_label"].numel()
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    result = {"loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2]), "tokens": int(sums[2])}
    if sums[4] > 0:
        result["nsp_accuracy"] = float(sums[3] / sums[4])
    if unigram_log_probs is not None:
        result["unigram_loss"] = float(sums[5] / sums[2])
    if causal:  # perplexity = exp(mean next-token cross-entropy), for the model and the unigram baseline
        for key in ("loss", "unigram_loss"):
            if key in result:
                result[key.replace("loss", "perplexity")] = math.exp(result[key])
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = checkpoint_root(output_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(output_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(
    output_dir: Path,
    accelerator,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    config: PretrainConfig,
    keep: int,
    config_file: str = "pretrain_config.json",
) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temporary directory renamed into place, then ``latest``.

    ``config`` is any recipe with ``to_dict()``, saved as ``config_file`` (``spikelm distill`` shares this)."""
    from safetensors.torch import save_model

    root = checkpoint_root(output_dir)
    name = f"step-{state.step:08d}"
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(accelerator.device), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.architectures = [type(unwrapped).__name__]  # as save_pretrained: loads with Auto classes
        unwrapped.config.to_json_file(tmp / "config.json")
        with new_files_follow_umask(tmp):  # safetensors writes 0600
            save_model(unwrapped, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        write_json_atomic(tmp / "trainer_state.json", {**state.__dict__, "world_size": accelerator.num_processes})
        write_json_atomic(tmp / config_file, config.to_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", name + "\n")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return root / name


def check_checkpoint_shape(path: Path, model_config: SpikeLMConfig) -> None:
    saved = SpikeLMConfig.from_json_file(path / "config.json")  # fields it predates take their defaults
    diffs = [
        f"{k} {getattr(saved, k)!r} (this run: {getattr(model_config, k)!r})"
        for k in SHAPE_FIELDS
        if getattr(saved, k) != getattr(model_config, k)
    ]
    if diffs:
        raise PretrainError(f"checkpoint {path} was saved from a model of another shape: {'; '.join(diffs)}")


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> TrainState:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"), device=str(accelerator.device))
    saved = load_tensors(path / "optimizer.pt", map_location=accelerator.device)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    trainer = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file() and trainer.pop("world_size") == accelerator.num_processes:
        rng = load_tensors(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and accelerator.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], accelerator.device)
    else:
        warnings.warn(f"{path} was saved by another number of processes; dropout RNG reseeded", stacklevel=2)
        torch.manual_seed(1 + trainer["step"] * 1000 + accelerator.process_index)
    trainer.pop("world_size", None)
    return TrainState(**trainer)


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    model: torch.nn.Module  # the trained model (unwrapped), on every process
    metrics: dict
    output_dir: Path


def run_identity(config: PretrainConfig) -> dict:
    """What makes two runs the same run (an output directory holding another is refused)."""
    return {
        "objective": config.objective,
        "preset": config.preset,
        "model": config.model,
        "tokenizer": config.tokenizer,
        "seed": config.seed,
    }


def _check_output(output_dir: Path, config: PretrainConfig, overwrite: bool, resume: bool | str | None) -> None:
    """The refusals of :func:`_prepare_output`, read-only: run before the tokenizer and corpus are loaded."""
    identity = json.loads(json.dumps(run_identity(config)))
    check_output_dir(output_dir, COMMAND, overwrite, identity=identity, replaces=_replaced(overwrite, resume))
    _refuse_started_run(output_dir, overwrite, resume)


def _replaced(overwrite: bool, resume, outputs: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What ``--overwrite`` (not resuming) removes first: a previous run's own outputs (prepare_output_dir
    refuses, deleting nothing, in a directory the command did not write)."""
    if not overwrite or resume:
        return ()
    return (
        "checkpoints",
        "tensorboard",
        "train_log.jsonl",
        "metrics.json",
        "model.safetensors",
        TOKEN_COUNTS_FILE,
        *outputs,
    )


def _refuse_started_run(output_dir: Path, overwrite: bool, resume) -> None:
    has_run = (checkpoint_root(output_dir) / "latest").is_file() or (output_dir / "model.safetensors").is_file()
    if has_run and not resume and not overwrite:
        raise PretrainError(
            f"--output-dir {output_dir} already holds this run's checkpoints or model; pass --resume "
            "to continue it, or --overwrite to start again"
        )


def _prepare_output(
    output_dir: Path,
    config: PretrainConfig,
    overwrite: bool,
    resume: bool | str | None,
    command: str = COMMAND,
    identity: dict | None = None,
    outputs: tuple[str, ...] = (),
    inputs: dict | None = None,
) -> None:
    """Refuse to touch a directory that holds something else, or a finished/started run without --resume.

    ``command``/``identity`` name another command's run (default: this one's); ``outputs``: more files that
    ``--overwrite`` removes; ``inputs``: flag -> path the run reads (an output overlapping one is refused)."""
    identity = run_identity(config) if identity is None else identity
    _refuse_started_run(output_dir, overwrite, resume)
    prepare_output_dir(
        output_dir,
        command,
        overwrite,
        identity=json.loads(json.dumps(identity)),
        inputs=inputs,
        replaces=_replaced(overwrite, resume, outputs),
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run rewrites what followed its checkpoint); a torn last
    line (a kill mid-write) is dropped."""
    if not path.is_file():
        return
    records = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def find_resume_checkpoint(output_dir: Path, resume: bool | str, model=None) -> Path:
    """The checkpoint ``resume`` names (True: the newest complete one in ``output_dir``, falling back past a
    damaged latest one with a warning). ``model``: the model being resumed, whose weights a checkpoint must hold."""
    verify = functools.partial(verify_checkpoint, model=model)
    if resume is True:
        root = checkpoint_root(output_dir)
        pointer = root / "latest"
        try:
            latest = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        except (OSError, UnicodeDecodeError):
            latest = None  # a damaged pointer: the newest complete checkpoint is found without it
        path = first_complete_checkpoint(resumable_checkpoints(root, latest), verify)
        if path is None:
            raise PretrainError(f"--resume: no checkpoint found in {root}")
        return path
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise PretrainError(f"--resume {path}: not a checkpoint directory (no trainer_state.json)")
    try:
        verify(path)
    except Exception as err:
        if isinstance(err, UserError):
            raise
        raise PretrainError(f"--resume {path}: the checkpoint is damaged ({err})") from None
    return path


def recorded_config(output_dir: Path, checkpoint: Path | None = None) -> dict | None:
    """The settings the run was started with: the checkpoint's ``pretrain_config.json``, else the run's."""
    for path in ([checkpoint / "pretrain_config.json"] if checkpoint else []) + [output_dir / "pretrain_config.json"]:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise PretrainError(f"{path} is not readable JSON ({err}); the run's settings are lost") from None
    return None


def check_resumed_config(config: PretrainConfig, output_dir: Path, checkpoint: Path) -> None:
    """Refuse a resume whose settings differ from the recorded run's (outside the fields a resume may change)."""
    recorded = recorded_config(output_dir, checkpoint)
    if recorded is not None:
        source = f"{checkpoint / 'pretrain_config.json'}"
        check_resume_settings(recorded, config.to_dict(), source, defaults=PretrainConfig().to_dict())


def run_pretraining(
    config: PretrainConfig,
    output_dir: str | Path,
    overwrite: bool = False,
    resume: bool | str | None = None,
    progress: bool = True,
    log=None,
) -> PretrainResult:
    """Pretrain as ``config`` says, writing into ``output_dir``. ``resume``: True (the latest checkpoint
    in ``output_dir``) or a checkpoint directory. Returns the trained model and the metrics. Progress: a tqdm
    bar (``progress``) and lines to ``log`` (default: this module's logger), on the main process only."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from spikelm.data.tokenization import load_tokenizer

    config.check()
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True on a machine without a GPU: accelerate then runs processes launched by torchrun as DDP over gloo
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    if not accelerator.is_main_process:
        log = lambda *args, **kwargs: None  # noqa: E731
    elif log is None:
        log = logger.info
    output_dir = Path(output_dir)
    resume_path = None
    if resume:
        lock_existing_output_dir(output_dir, COMMAND)  # before reading checkpoints a running job may be writing
        resume_path = find_resume_checkpoint(output_dir, resume)
        check_resumed_config(config, output_dir, resume_path)
    inputs = check_inputs(output_dir, {"--text-file": config.text_file}, bool(resume))
    if accelerator.is_main_process:  # a directory that will be refused is refused before any long step
        _check_output(output_dir, config, overwrite, resume)

    tokenizer = load_tokenizer(config.tokenizer or ("gpt2" if config.objective == "clm" else "bert-base-uncased"))
    with accelerator.main_process_first():  # a named corpus is built once, into the cache
        corpus = load_corpus(config.corpus, config.text_file)
    data = PretrainingData(config, tokenizer, corpus, accelerator.num_processes, accelerator.process_index)

    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = build_model(config, tokenizer)
    if resume_path is not None:
        check_checkpoint_shape(resume_path, model.config)
        resume_path = find_resume_checkpoint(output_dir, resume, model)  # its weights must be this model's
    # every input is checked: only now is the output directory touched
    if accelerator.is_main_process:
        _prepare_output(output_dir, config, overwrite, resume)
    accelerator.wait_for_everyone()
    model.to(accelerator.device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )
    scheduler = linear_schedule(optimizer, config.num_warmup_steps, config.total_schedule_steps)
    torch.manual_seed(config.seed * 1000 + 1 + accelerator.process_index)  # dropout: differs per process
    state = TrainState()
    if resume_path is not None:
        state = load_checkpoint(resume_path, accelerator, model, optimizer, scheduler)
        log(f"resumed from {resume_path} at step {state.step}")

    val_batches = data.validation_batches(max(1, data.micro_batch))
    unigram = data.unigram_log_probs()
    if hasattr(model, "alphas_initialized") and not model.alphas_initialized:
        first = data.micro_batches(state.epoch, state.batch_in_epoch)[0]
        # alpha is set from the first training batch (statistics summed over processes inside the neuron),
        # before DDP wraps the model; fork_rng: the first step then draws exactly the same dropout masks
        cuda_devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices), accelerator.autocast():
            model(**{k: v.to(accelerator.device) for k, v in first.items()})
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    writer = None
    log_path = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=state.step + 1 if state.step else None)
        write_json_atomic(output_dir / "pretrain_config.json", config.to_dict())
        write_json_atomic(output_dir / INPUTS_FILE, inputs)
        _truncate_log(log_path, state.step)
        if state.step == 0:
            log_path.unlink(missing_ok=True)

    def validate(tag: str) -> dict:
        result = evaluate(unwrapped, val_batches, accelerator, config.objective == "clm", unigram)
        if writer is not None:
            for key, value in result.items():
                writer.add_scalar(f"validation/{key}", value, state.step)
        log(
            f"step {state.step} validation ({tag}): "
            + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        )
        return result

    if state.initial_eval is None:
        state.initial_eval = validate("start")

    bar = tqdm(
        total=config.max_steps,
        initial=state.step,
        disable=not (progress and accelerator.is_main_process),
        desc="pretrain",
        dynamic_ncols=True,
    )
    last_eval = None
    time_limit = config.max_minutes * 60 if config.max_minutes is not None else math.inf
    run_started = time.perf_counter()
    fast_mlm = {} if config.objective == "clm" else {"masked_logits_only": True}  # the MLM head on masked rows
    while state.step < config.max_steps:
        if state.batch_in_epoch >= data.steps_in_epoch(state.epoch):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        started = time.perf_counter()
        batches = data.micro_batches(state.epoch, state.batch_in_epoch)
        step_loss = torch.zeros((), device=accelerator.device)
        tokens = 0
        for micro, batch in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = nullcontext() if micro == len(batches) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = model(**batch, **fast_mlm).loss / len(batches)
            accelerator.backward(loss)
            step_loss += loss.detach()
            tokens += int(batch["attention_mask"].sum())
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        counts = accelerator.reduce(
            torch.tensor([float(step_loss), float(tokens)], device=accelerator.device, dtype=torch.float64),
            reduction="sum",
        )
        state.step += 1
        state.batch_in_epoch += 1
        elapsed = time.perf_counter() - started
        state.train_seconds += elapsed
        state.train_tokens += int(counts[1])
        loss_value = float(counts[0]) / accelerator.num_processes
        if not math.isfinite(loss_value):
            raise PretrainError(f"the training loss became {loss_value} at step {state.step}; lower the learning rate")
        tokens_per_s = counts[1].item() / elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:.0f}")
        # every process must agree to stop: process 0's clock decides
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
                "step": state.step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "epoch": state.epoch,
                "tokens_per_s": tokens_per_s,
                "tokens": state.train_tokens,
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            writer.add_scalar("train/loss", loss_value, state.step)
            writer.add_scalar("train/lr", entry["lr"], state.step)
            writer.add_scalar("train/tokens_per_s", tokens_per_s, state.step)
        if state.step % config.eval_every == 0 or last:
            last_eval = validate(f"step {state.step}")
        if state.step % config.save_every == 0 or last:
            save_checkpoint(
                output_dir, accelerator, model, optimizer, scheduler, state, config, config.keep_checkpoints
            )
        if out_of_time:
            log(f"stopping after {config.max_minutes} minutes at step {state.step}")
            break
    bar.close()
    if last_eval is None:
        last_eval = validate("end")

    metrics = {
        "objective": config.objective,
        "preset": config.preset,
        "steps": state.step,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": mixed,
        "parameters": sum(p.numel() for p in unwrapped.parameters()),
        "initial_validation": state.initial_eval,
        "final_validation": last_eval,
        "unigram_baseline_loss": state.initial_eval.get("unigram_loss"),
        "train_tokens": state.train_tokens,
        "train_seconds": state.train_seconds,
        "tokens_per_second": state.train_tokens / max(state.train_seconds, 1e-9),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if "unigram_perplexity" in state.initial_eval:
        metrics["unigram_baseline_perplexity"] = state.initial_eval["unigram_perplexity"]
    if accelerator.is_main_process:
        with new_files_follow_umask(output_dir):  # safetensors writes 0600
            unwrapped.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            save_file({"counts": data.token_counts()}, str(output_dir / TOKEN_COUNTS_FILE))  # the unigram baseline
        write_json_atomic(output_dir / "metrics.json", metrics)
        writer.close()
    accelerator.wait_for_everyone()
    return PretrainResult(unwrapped, metrics, output_dir)
