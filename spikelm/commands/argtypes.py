"""Argument types: every option is checked here, when the command line is parsed, before any output directory
is created or any long step runs. An invalid value is one line naming the flag (argparse prefixes
``argument --flag:``) and exit status 2; see :class:`Parser`.

``--set FIELD=VALUE`` values are checked by the one config validator, :meth:`PretrainConfig.check`.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import stat
from pathlib import Path

MAX_TEXT_BYTES = 1 << 30  # the commands read a text input whole: 1 GiB at most

# The one bounds table of numeric flags (every subcommand's flag of that name), checked by argparse as the value is
# read: before any fetch, allocation or model load. The ranges are far beyond a real run and below what breaks
# torch, numpy or the machine (a seed numpy cannot take, a batch of a billion sequences, 10^6 beams).
FLAG_BOUNDS: dict[str, tuple[int | float, int | float]] = {
    "--seed": (0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy, torch and random)
    "--seeds": (0, 2**32 - 1),
    "--ablation-seeds": (0, 2**32 - 1),
    "--batch-size": (1, 4096),
    "--batch-sizes": (1, 4096),
    "--num-beams": (1, 64),
    "--top-k": (1, 1 << 20),
    "--threads": (1, 1024),
    "--repeats": (1, 10_000),
    "--num-steps": (1, 64),  # time steps T (the configs' own check: spikelm.nn.neuron.MAX_NUM_STEPS)
    "--max-length": (2, 1 << 20),  # tokens in one sequence (each model's positions are checked on top)
    "--stride": (1, 1 << 20),
    "--calibration-length": (2, 1 << 20),
    "--prompt-lengths": (1, 1 << 20),
    "--generation-lengths": (2, 1 << 20),
    "--new-tokens": (2, 1 << 20),
    "--max-new-tokens": (1, 1 << 20),
    "--eval-tokens": (0, 1_000_000),  # the Brown text holds about 1.16M words: more tokens than exist is refused
    "--calibration-sequences": (1, 1 << 16),
    "--max-sequences": (1, 1 << 24),
    "--energy-sequences": (1, 1 << 24),
    "--max-steps": (1, 10**9),
    "--pretrain-steps": (1, 10**9),
    "--epochs": (1, 10_000),
    "--finetune-epochs": (1, 10_000),
    "--teacher-epochs": (1, 10_000),
    "--max-train-samples": (1, 10**9),
    "--max-eval-samples": (1, 10**9),
    "--train-samples": (1, 10**9),
    "--dev-samples": (1, 10**9),
    "--dev-examples": (1, 10**9),
    "--finetune-samples": (1, 10**9),
    "--max-minutes": (0, 10**7),
}


def check_bounds(flag: str, value):
    """``value`` of ``flag`` within :data:`FLAG_BOUNDS` (a message naming the range otherwise)."""
    low, high = FLAG_BOUNDS.get(flag, (None, None))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or low is None:
        return value
    if not low <= value <= high:
        _fail(f"must be between {low} and {high}, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``spikelm CMD: error: MESSAGE`` (exit status 2), and whose
    numeric flags are checked against :data:`FLAG_BOUNDS`."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def _get_value(self, action, arg_string):
        value = super()._get_value(action, arg_string)
        for flag in action.option_strings:
            try:
                check_bounds(flag, value)
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentError(action, str(err)) from None
        return value


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def _path(text: str) -> Path:
    if not text or "\x00" in text:
        _fail(f"{text!r} is not a path")
    return Path(text).expanduser()


def check_utf8(path: Path) -> None:
    """Decode the whole of ``path`` as UTF-8, in blocks (memory stays small); a failure names the file and the
    byte's offset in the file. The one check of every text input a flag names, so that no reader meets a bad byte
    later."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as err:
                    _fail(f"{path} is not UTF-8 text ({err.reason} at byte {offset - pending + err.start})")
                offset += len(block)
    except OSError as err:
        _fail(f"{path}: cannot be read ({err.strerror or err})")
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        _fail(f"{path} is not UTF-8 text ({err.reason} at byte {offset - pending + err.start}, the end)")


def utf8_text(text: str) -> str:
    """Text given on the command line: bytes that are not UTF-8 (kept by Python as surrogate escapes) refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = os.fsencode(text[err.start])
        _fail(f"is not UTF-8 text (byte 0x{byte.hex()} at character {err.start})")
    return text


def output_path(text: str) -> str:
    """An output directory's path, ``~`` expanded (the directory itself is checked when it is prepared)."""
    return str(_path(text))


def add_output_dir(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--output-dir`` (an :func:`output_path`) and ``--overwrite``, the same two options on every subcommand that
    writes a directory. (Here, below :mod:`spikelm.commands.main`: a subcommand never imports the module that
    imports it.)"""
    parser.add_argument(
        "--output-dir", type=output_path, required=required, help="directory to write into (created if missing)"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into --output-dir even if it holds other files")


def existing_file(text: str) -> Path:
    """A file that exists (not a directory) and can be read."""
    path = _path(text)
    if path.is_dir():
        _fail(f"{path} is a directory; expected a file")
    if not path.exists():
        _fail(f"{path}: no such file")
    try:
        mode = path.stat().st_mode
    except OSError as err:
        _fail(f"{path}: cannot be read ({err.strerror or err})")
    if not stat.S_ISREG(mode):  # a FIFO or a device would block the open, or never end
        _fail(f"{path} is not a regular file (a pipe, socket or device); expected a file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        _fail(
            f"{path} is {path.stat().st_size / 2**30:.1f} GiB; at most {MAX_TEXT_BYTES / 2**30:.0f} GiB is read whole"
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        _fail(f"{path}: cannot be read ({err.strerror or err})")
    return path


def text_file(text: str) -> str:
    """A UTF-8 text file (not a directory)."""
    path = existing_file(text)
    check_utf8(path)
    return str(path)


def text_path(text: str) -> str:
    """A UTF-8 text file, or a directory of them (each file checked whole)."""
    path = _path(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            _fail(f"{path} is a directory with no files in it")
        if sum(file.stat().st_size for file in files) > MAX_TEXT_BYTES:
            _fail(f"{path}: its files hold more than {MAX_TEXT_BYTES / 2**30:.0f} GiB, which is read whole")
        for file in files:
            check_utf8(file)
        return str(path)
    return text_file(text)


def existing_dir(text: str) -> str:
    path = _path(text)
    if path.exists() and not path.is_dir():
        _fail(f"{path} is a file; expected a directory")
    if not path.is_dir():
        _fail(f"{path}: no such directory")
    return str(path)


def model_dir(text: str) -> str:
    """A directory written by ``save_pretrained``: its ``config.json`` must be UTF-8 JSON."""
    path = Path(existing_dir(text))
    config = path / "config.json"
    if not config.is_file():
        _fail(f"{path} has no config.json; expected a directory written by save_pretrained")
    check_utf8(config)
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        _fail(f"{config} is not valid JSON ({err})")
    if not isinstance(parsed, dict):
        _fail(f"{config} must hold a JSON object (a model configuration)")
    for field in ("quantization_config", "auto_map"):  # read as objects by transformers, before any check of ours
        if field in parsed and not isinstance(parsed[field], (dict, type(None))):
            _fail(f"{config}: {field} must be a JSON object, got {type(parsed[field]).__name__}")
    return str(path)


def model_source(text: str) -> str:
    """A model directory (``config.json`` UTF-8) or a named source of :mod:`spikelm.data.pretrained`
    (``smollm2-135m``, ``gemma3-270m``, ``minilm``; fetched later, when the command runs)."""
    from spikelm.data.pretrained import NAMED_SOURCES

    if text in NAMED_SOURCES:
        return text
    path = _path(text)
    if not path.exists() and not text.startswith((".", "/", "~")) and "/" not in text:
        _fail(f"{text!r} is neither a model directory nor a named source ({', '.join(NAMED_SOURCES)})")
    return model_dir(text)


def model_dir_not_named(text: str) -> str:
    """A model directory, where a named source makes no sense (e.g. a distillation student): the name is refused
    saying what to pass instead."""
    from spikelm.data.pretrained import NAMED_SOURCES

    if text in NAMED_SOURCES:
        _fail(
            f"{text} is a named (real-valued) source, not a model directory; convert it first "
            f"(`spikelm spikify --model {text} --output-dir DIR`) and pass DIR"
        )
    return model_dir(text)


def model_ref(text: str) -> str:
    """A model directory, or a name (hub or built-in, e.g. ``minilm``): checked as a directory only if it is a
    path that exists or looks like one."""
    path = _path(text)
    if path.exists() or text.startswith((".", "/", "~")):
        return model_dir(text)
    return text


def dir_or_name(text: str) -> str:
    """A directory, or a name (hub or built-in): checked as a directory only if it exists or looks like a path."""
    path = _path(text)
    if path.exists() or text.startswith((".", "/", "~")):
        return existing_dir(text)
    return text


def integer(minimum: int | None = None, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _fail(f"expected an integer, got {text!r}")
        if minimum is not None and value < minimum:
            _fail(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            _fail(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False):
    """A finite float (NaN and infinities refused) within the range."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _fail(f"expected a number, got {text!r}")
        if not math.isfinite(value):
            _fail(f"must be a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            _fail(f"must be {'greater than' if exclusive_minimum else 'at least'} {minimum:g}, got {text}")
        if maximum is not None and value > maximum:
            _fail(f"must be at most {maximum:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = integer(1)
nonnegative_int = integer(0)
positive_number = number(0.0, exclusive_minimum=True)
nonnegative_number = number(0.0)


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (refused without CUDA, or beyond the devices present), ``mps`` or ``auto``."""
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        _fail(f"{text!r} is not a device (e.g. cpu, cuda, cuda:0)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            _fail(f"{text}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            _fail(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            _fail(f"{text}: MPS is not available on this machine")
    elif dev.type != "cpu":
        _fail(f"{text}: unsupported device type {dev.type!r} (use cpu or cuda)")
    return text
