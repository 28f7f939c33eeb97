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


def verify_checkpoint(path: Path, required=("trainer_state.json", "model.safetensors", "optimizer.pt")) -> None:
    """Read every file of a checkpoint back whole; :class:`DamagedCheckpointError` if one cannot be."""
    from safetensors.torch import load_file

    for name in required:
        if not (path / name).is_file():
            raise DamagedCheckpointError(f"{name} is missing")
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (ValueError, OSError) as err:
        raise DamagedCheckpointError(f"trainer_state.json: {err}") from None
    for name in [n for n in required if n.endswith(".safetensors")]:
        try:
            load_file(str(path / name))
        except Exception as err:  # safetensors raises its own error types
            raise DamagedCheckpointError(f"{name}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    for file in [path / n for n in required if n.endswith(".pt")] + sorted(path.glob("rng-*.pt")):
        try:
            load_tensors(file, map_location="cpu")
        except UserError:
            raise
        except Exception as err:  # a truncated zip archive, an EOF
            first = str(err).splitlines()[0] if str(err) else repr(err)
            raise DamagedCheckpointError(f"{file.name}: {first}") from None


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
