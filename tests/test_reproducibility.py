"""The same command with the same seed, thread count and inputs, run twice in fresh processes, gives the same numbers
and the same weights bit for bit (``spikelm finetune``, ``spikify``, ``distill``). Each run is its own process (torch
seeds itself from the OS at start-up, so an unseeded draw differs between processes, never inside one), with
another ``PYTHONHASHSEED`` (set and dict orders that depend on string hashes differ too)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama, tiny_config
from safetensors.torch import load_file

from spikelm.data.tokenization import sample_text_path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "tests" / "fixtures" / "glue" / "SST-2"
TEXT = "The quick brown fox jumps over the lazy dog. " * 200
TIMING = ("train_seconds", "eval_seconds", "seconds_per_epoch", "tokens_per_s", "seconds", "convert_seconds")


def run_twice(tmp_path, *args) -> tuple[Path, Path]:
    """``spikelm ARGS --output-dir run-N`` in two fresh processes (2 threads each, another hash seed each)."""
    outs = []
    for run in (1, 2):
        out = tmp_path / f"run-{run}"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "2",
            "PYTHONHASHSEED": str(run),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [sys.executable, "-m", "spikelm", *args, "--output-dir", str(out)]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(out)
    return outs[0], outs[1]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(first) == sorted(second)
    differ = {name: (first[name].double() - second[name].double()).abs().max().item() for name in first}
    assert {name: d for name, d in differ.items() if not torch.equal(first[name], second[name])} == {}


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def jsonl(path: Path) -> list:
    return [without_timing(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [[], ["--padding", "longest", "--group-by-length"]],  # the second: the demo's batches (grouped by length)
    ids=["default", "grouped-by-length"],
)
def test_finetune_twice_gives_the_same_metrics_and_weights(tmp_path, options):
    # a pretraining checkpoint: finetune gives it a new classification head (the draw that came before the seed)
    torch.manual_seed(0)
    from spikelm import SpikeLMForPreTraining

    model = SpikeLMForPreTraining(tiny_config(vocab_size=30522, max_position_embeddings=64, num_steps=2))
    with torch.no_grad():
        model(input_ids=torch.randint(1000, 5000, (4, 16)))  # data-initialised alphas
    model.save_pretrained(tmp_path / "pretrained")
    a, b = run_twice(
        tmp_path,
        *("finetune", "--model", str(tmp_path / "pretrained"), "--task", "sst2", "--data-dir", str(SST2)),
        *("--max-length", "32", "--batch-size", "8", "--learning-rate", "1e-3", "--epochs", "1", *options),
    )
    assert_same_weights(a, b)
    assert jsonl(a / "train_log.jsonl") == jsonl(b / "train_log.jsonl")
    assert (a / "dev_predictions.tsv").read_text() == (b / "dev_predictions.tsv").read_text()
    results = [without_timing(json.loads((d / "eval_results.json").read_text())) for d in (a, b)]
    assert results[0] == results[1]
    assert results[0]["settings"]["threads"] == 2  # recorded: float sums depend on it


@pytest.mark.slow
@pytest.mark.parametrize("neuron", ["gif", "elastic"])
def test_spikify_twice_gives_the_same_tensors(tmp_path, neuron):
    save_tiny_llama(tmp_path / "llama", sorted(set(TEXT.replace(".", " .").split())), max_position_embeddings=128)
    (tmp_path / "cal.txt").write_text(TEXT)
    a, b = run_twice(
        tmp_path,
        *("spikify", "--model", str(tmp_path / "llama"), "--neuron", neuron, "--calibration-text"),
        *(str(tmp_path / "cal.txt"), "--calibration-sequences", "2", "--calibration-length", "16"),
        *("--eval-tokens", "0"),
    )
    assert_same_weights(a, b)
    summaries = [without_timing(json.loads((d / "spikify_summary.json").read_text())) for d in (a, b)]
    for summary in summaries:  # the output directories differ by name only
        summary.pop("output_dir", None)
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_distill_twice_gives_the_same_student_and_log(tmp_path):
    from test_distill import MICRO, llama_config
    from transformers import LlamaForCausalLM

    from spikelm.data.tokenization import train_wordpiece

    text = Path(sample_text_path()).read_text()
    tok = train_wordpiece(text.split("\n"), 400)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(llama_config(len(tok), pad_token_id=tok.pad_token_id))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher.save_pretrained(tmp_path / "student")
    a, b = run_twice(
        tmp_path,
        *("distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student")),
        *("--text-file", str(sample_text_path()), "--no-progress", *MICRO, "--max-steps", "6"),
        *("--set", "eval_every=3"),
    )
    assert jsonl(a / "train_log.jsonl") == jsonl(b / "train_log.jsonl")
    assert_same_weights(a, b)
