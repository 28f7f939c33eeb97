"""What makes a resumed run the same run, shared by the training commands (``pretrain``; ``distill`` reuses it).

- :func:`check_resume_settings`: a run's settings are recorded once (``pretrain_config.json``); a resume may
  change only the fields that legitimately change (a larger step or time budget, logging/evaluation/checkpoint
  frequency, device and precision, number of processes: not a setting); any other difference is refused in
  one line naming the field.
- :func:`resumable_checkpoints` / :func:`verify_checkpoint`: the newest *complete* checkpoint. A damaged one
  (a truncated ``model.safetensors`` or ``optimizer.pt``, e.g. a disk that filled up) is skipped with a warning
  naming it and the one used instead.
- :func:`read_jsonl`: a log whose last line was torn by a kill is read without it.
- :func:`load_tensors`: ``torch.load(weights_only=True)`` whose refusal of a pickle is one line (never a
  suggestion to unpickle it anyway).
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import torch

from spikelm.errors import UserError, refused_pickle

# fields a resumed run may change (max_steps only upwards)
RESUMABLE_FIELDS = frozenset(
    {"max_steps", "max_minutes", "log_every", "eval_every", "save_every", "keep_checkpoints", "mixed_precision"}
)


class ResumeError(UserError):
    """A resume that would not continue the recorded run (the message names the field), or nothing to resume."""


class DamagedCheckpointError(Exception):
    """A checkpoint whose files cannot be read back whole."""


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key == "model":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_resume_settings(
    recorded: dict, requested: dict, source: str, resumable=RESUMABLE_FIELDS, defaults: dict | None = None
) -> None:
    """Refuse ``requested`` settings that differ from the ``recorded`` run outside ``resumable`` (one line
    naming the field). A model field missing from one side compares equal to its default in ``defaults``."""
    old, new = _flatten(recorded), _flatten(requested)
    defaults = _flatten(defaults or {})
    for name in sorted(set(old) | set(new)):
        base = name.split(".", 1)[-1]
        a = old.get(name, defaults.get(name, defaults.get(base)))
        b = new.get(name, defaults.get(name, defaults.get(base)))
        if _same(a, b):
            continue
        if name == "max_steps" and isinstance(a, int) and isinstance(b, int):
            if b < a:
                raise ResumeError(
                    f"--resume: max_steps {b} is smaller than the recorded run's {a} ({source}); a resume may only "
                    "extend the run"
                )
            continue
        if name in resumable:
            continue
        raise ResumeError(
            f"--resume: {name} {b!r} differs from the recorded run's {a!r} ({source}); a resumed run keeps its "
            "settings: drop the flag, or start a new run in another --output-dir"
        )


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a torn last line (a kill mid-write) is dropped with a warning."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped a torn last line (the run was stopped mid-write)", stacklevel=2)
                break
            raise ResumeError(f"{path} line {i + 1} is not JSON: the log is damaged") from None
    return records


def load_tensors(path: Path, map_location=None):
    """``torch.load(path, weights_only=True)``; a file holding Python objects is refused in one line."""
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as err:
        raise refused_pickle(path, err) from None


# trainer_state.json: the fields of TrainState (training.pretrain) and the number of processes, with their types
TRAINER_FIELDS = {
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "train_tokens": int,
    "train_seconds": (int, float),
    "world_size": int,
    "initial_eval": (dict, type(None)),
}
CHECKPOINT_FILES = ("trainer_state.json", "config.json", "model.safetensors", "optimizer.pt")


def verify_checkpoint(path: Path, required=CHECKPOINT_FILES, model=None) -> None:
    """Read every file of a checkpoint back whole and check what it holds; :class:`DamagedCheckpointError` naming
    the file if one cannot be read or holds something a checkpoint never does: a trainer state without its fields,
    a config that is not a JSON object, an optimizer file without the optimizer's and scheduler's states, RNG
    files without a torch state, and (given the ``model`` being resumed) weights whose names or shapes are not the
    model's."""
    from safetensors.torch import load_file

    for name in required:
        if not (path / name).is_file():
            raise DamagedCheckpointError(f"{name} is missing")
    for name in [n for n in required if n.endswith(".json")]:
        try:
            content = json.loads((path / name).read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise DamagedCheckpointError(f"{name}: {err}") from None
        if not isinstance(content, dict):
            raise DamagedCheckpointError(f"{name} is not a JSON object")
        if name == "trainer_state.json":
            wrong = [
                k
                for k, kind in TRAINER_FIELDS.items()
                if not isinstance(content.get(k), kind)
                or isinstance(content.get(k), bool)
                or (kind is int and content[k] < 0)
            ]
            if wrong or set(content) - set(TRAINER_FIELDS):
                bad = wrong or sorted(set(content) - set(TRAINER_FIELDS))
                raise DamagedCheckpointError(f"trainer_state.json: field {bad[0]} missing, unknown or of a wrong value")
    for name in [n for n in required if n.endswith(".safetensors")]:
        try:
            tensors = load_file(str(path / name))
        except Exception as err:  # safetensors raises its own error types
            raise DamagedCheckpointError(f"{name}: {str(err).splitlines()[0] if str(err) else err!r}") from None
        if model is not None:
            _check_weights(name, tensors, model)
    for file in [path / n for n in required if n.endswith(".pt")] + sorted(path.glob("rng-*.pt")):
        try:
            content = load_tensors(file, map_location="cpu")
        except UserError:
            raise
        except Exception as err:  # a truncated zip archive, an EOF
            first = str(err).splitlines()[0] if str(err) else repr(err)
            raise DamagedCheckpointError(f"{file.name}: {first}") from None
        if file.name.startswith("rng-"):
            ok = isinstance(content, dict) and isinstance(content.get("torch"), torch.Tensor)
        else:
            optimizer = content.get("optimizer") if isinstance(content, dict) else None
            ok = isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)
            ok = ok and isinstance(content.get("scheduler"), dict)
        if not ok:
            raise DamagedCheckpointError(f"{file.name} does not hold the states a checkpoint saves")


def _check_weights(name: str, tensors: dict, model) -> None:
    """The saved weights are the model's: no foreign name, no other shape, nothing missing (a weight tied to a
    saved one, which safetensors stores once, aside)."""
    state = model.state_dict()
    for key, tensor in tensors.items():
        if key not in state:
            raise DamagedCheckpointError(f"{name} holds {key}, which the model does not have")
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise DamagedCheckpointError(
                f"{name}: {key} has shape {tuple(tensor.shape)}, the model {tuple(state[key].shape)}"
            )
    saved = {state[k].data_ptr() for k in tensors}
    missing = [k for k in state if k not in tensors and state[k].data_ptr() not in saved]
    if missing:
        raise DamagedCheckpointError(f"{name} lacks {missing[0]}")


def input_fingerprint(path: str | Path) -> str:
    """The sha256 of a file, or of a directory's files (names and contents, sorted): what a run read."""
    import hashlib

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


INPUTS_FILE = "input_hashes.json"


def check_inputs(output_dir: Path, inputs: dict, resume: bool) -> dict:
    """The content hash of each input (flag -> path; None skipped). On ``resume``, one whose content changed since
    the run recorded it (same path, new content) is refused naming it. Returns what to record in
    :data:`INPUTS_FILE`."""
    current = {  # an input that is not there is the caller's to refuse
        flag: {"path": str(p), "sha256": input_fingerprint(p)}
        for flag, p in inputs.items()
        if p is not None and Path(p).exists()
    }
    recorded_file = Path(output_dir) / INPUTS_FILE
    if resume and recorded_file.is_file():
        try:
            recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            recorded = None
        if not isinstance(recorded, dict):
            raise ResumeError(f"--resume: {recorded_file} is damaged; the run's inputs cannot be compared")
        for flag, now in current.items():
            before = recorded.get(flag)
            if isinstance(before, dict) and before.get("sha256") != now["sha256"]:
                raise ResumeError(
                    f"--resume: {flag} {now['path']} is not what the run started with (its content changed: sha256 "
                    f"{now['sha256'][:12]}, recorded {str(before.get('sha256'))[:12]}); restore it, or start a new "
                    "run in another --output-dir"
                )
    return current


def resumable_checkpoints(root: Path, latest: Path | None) -> list[Path]:
    """Candidate checkpoints, newest first (``latest`` first of all)."""
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    if latest is not None and latest in found:
        found.remove(latest)
        found.insert(0, latest)
    return found


def first_complete_checkpoint(candidates: list[Path], verify=verify_checkpoint) -> Path | None:
    """The first candidate that reads back whole; each damaged one skipped is named in a warning."""
    damaged = []
    for path in candidates:
        try:
            verify(path)
        except DamagedCheckpointError as err:
            damaged.append(f"{path} ({err})")
            continue
        if damaged:
            warnings.warn(
                f"checkpoint {'; '.join(damaged)} is damaged: resuming from the previous complete checkpoint {path}",
                stacklevel=2,
            )
        return path
    if damaged:
        raise ResumeError(f"--resume: every checkpoint is damaged: {'; '.join(damaged)}")
    return None
