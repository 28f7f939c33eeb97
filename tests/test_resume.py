"""``--resume`` continues the recorded run: its settings restored (not the defaults), a changed setting refused
naming the field, a damaged latest checkpoint skipped for the previous complete one, a torn log line tolerated."""

from __future__ import annotations

import json
import shutil

import pytest

from spikelm.commands.main import main
from spikelm.data.tokenization import sample_text_path
from spikelm.training.checkpoints import ResumeError, check_resume_settings, read_jsonl

MICRO = [
    "--set",
    "hidden_size=32",
    "--set",
    "num_hidden_layers=1",
    "--set",
    "num_attention_heads=2",
    "--set",
    "intermediate_size=64",
    "--set",
    "max_length=32",
    "--set",
    "batch_size=4",
    "--set",
    "eval_examples=8",
    "--set",
    "log_every=1",
    "--set",
    "save_every=2",
    "--set",
    "learning_rate=5e-4",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A micro run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("resume") / "run"
    argv = ["pretrain", "--text-file", str(sample_text_path()), "--no-progress", "--max-steps", "4", *MICRO]
    assert main([*argv, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def run(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def resume(out, *flags):
    return main(["pretrain", "--output-dir", str(out), "--resume", "--no-progress", *flags])


def test_resume_without_flags_restores_the_recorded_settings(run, capsys):
    recorded = json.loads((run / "pretrain_config.json").read_text())
    assert resume(run, "--max-steps", "6") == 0  # a larger budget is a legitimate change
    after = json.loads((run / "pretrain_config.json").read_text())
    assert after == {**recorded, "max_steps": 6}  # nothing else rewritten: not the defaults
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    assert json.loads((run / "config.json").read_text())["hidden_size"] == 32
    assert [r["step"] for r in read_jsonl(run / "train_log.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--set", "learning_rate=1e-3"], "learning_rate"),
        (["--set", "hidden_size=64"], "model.hidden_size"),
        (["--objective", "mlm"], "objective"),
        (["--preset", "mini"], "preset"),
        (["--max-steps", "3"], "max_steps"),
    ],
)
def test_resume_with_a_changed_setting_is_refused_naming_it(run, capsys, flags, field):
    before = (run / "pretrain_config.json").read_bytes()
    assert resume(run, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spikelm pretrain: error: --resume: ") and f" {field} " in err[0]
    assert (run / "pretrain_config.json").read_bytes() == before


@pytest.mark.parametrize("damaged", ["optimizer.pt", "model.safetensors"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run, capsys, damaged):
    latest = run / "checkpoints" / "step-00000004"
    assert (run / "checkpoints" / "latest").read_text().strip() == latest.name
    data = (latest / damaged).read_bytes()
    (latest / damaged).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"step-00000004 \(.*\) is damaged: resuming from the previous complete"):
        assert resume(run, "--max-steps", "5") == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(run / "train_log.jsonl")] == [1, 2, 3, 4, 5]


def test_torn_last_log_line_is_tolerated(run):
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert resume(run, "--max-steps", "5") == 0
    assert [r["step"] for r in read_jsonl(run / "train_log.jsonl")] == [1, 2, 3, 4, 5]


def test_check_resume_settings_allows_only_resumable_fields():
    recorded = {"max_steps": 4, "learning_rate": 1e-3, "log_every": 1, "model": {"hidden_size": 32}}
    check_resume_settings(recorded, {**recorded, "max_steps": 8, "log_every": 5, "mixed_precision": "bf16"}, "x")
    with pytest.raises(ResumeError, match="learning_rate 0.002 differs"):
        check_resume_settings(recorded, {**recorded, "learning_rate": 2e-3}, "x")
    with pytest.raises(ResumeError, match="model.hidden_size 64 differs"):
        check_resume_settings(recorded, {**recorded, "model": {"hidden_size": 64}}, "x")
