"""`spikelm reproduce` end to end on a minute-scale budget: output files, skipped rows, exact reruns."""

import json
import shutil
from pathlib import Path

import pytest

from spikelm.commands.main import main
from spikelm.data.tokenization import sample_text_path
from spikelm.experiments.reproduce import VARIANTS, Budget, pretrain_config
from spikelm.experiments.reproduce_report import DOC_BEGIN, DOC_END, PLOTS
from spikelm.training.finetune import load_task_data

GLUE = Path(__file__).parent / "fixtures" / "glue"
TINY = [
    "--set",
    "hidden_size=32",
    "--set",
    "num_hidden_layers=1",
    "--set",
    "num_attention_heads=2",
    "--set",
    "intermediate_size=64",
    "--set",
    "batch_size=8",
    "--set",
    "eval_examples=16",
    "--pretrain-steps",
    "3",
    "--train-samples",
    "30",
    "--dev-samples",
    "12",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--max-length",
    "32",
    "--energy-sequences",
    "2",
    "--corpus",
    str(sample_text_path()),
]


def make_suite(root: Path) -> Path:
    """The offline suite's layout, filled from the GLUE fixtures (a 3-topic task from the SST-2 sentences)."""
    shutil.copytree(GLUE / "SST-2", root / "multiemo-sst2")
    shutil.copytree(GLUE / "MNLI", root / "vitaminc")
    sentences = [line.split("\t")[0] for line in (GLUE / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    (root / "bbc-topics").mkdir()
    for split, rows in (("train", sentences[:36]), ("dev", sentences[36:])):
        lines = ["index\ttext\tlabel"] + [f"{i}\t{s}\t{'abc'[i % 3]}" for i, s in enumerate(rows)]
        (root / "bbc-topics" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def reproduce(suite, out, *extra):
    return main(["reproduce", "--suite", str(suite), "--output-dir", str(out), *TINY, *extra])


def figures(row: dict) -> dict:
    """A row's results without its timings."""
    return {
        "pretraining": {k: row["pretraining"][k] for k in ("initial_validation", "final_validation", "train_tokens")},
        "losses": [e["loss"] for e in row["pretrain_log"]],
        "tasks": {
            t: (r["best"], r["last"], [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in r["curve"]])
            for t, r in row["tasks"].items()
        },
        "energy": row["energy"],
    }


@pytest.mark.slow
def test_reproduce_end_to_end_skips_finished_rows_and_reruns_exactly(tmp_path, capsys):
    suite = make_suite(tmp_path / "suite")
    doc = tmp_path / "REPRODUCTION.md"
    doc.write_text(f"# notes\n\n{DOC_BEGIN}\nold\n{DOC_END}\n\nafter\n")
    out = tmp_path / "run"
    variants = "ann,lif-bert,spikelm-t1,spikelm-t4,spikelm-t4-symmetric-reset"
    assert reproduce(suite, out, "--variants", variants, "--seeds", "0", "--doc", str(doc)) == 0
    names = [f"{v}-seed0" for v in variants.split(",")]
    rows = {n: json.loads((out / "rows" / f"{n}.json").read_text()) for n in names}
    assert sorted(rows) == sorted(p.stem for p in (out / "rows").glob("*.json"))

    # every row trained the same number of steps on the same tokens, with its own spiking settings
    tokens = {r["pretraining"]["train_tokens"] for r in rows.values()}
    assert len(tokens) == 1 and all(r["pretraining"]["steps"] == 3 for r in rows.values())
    for name, row in rows.items():
        saved = json.loads((out / "runs" / name / "pretrain" / "config.json").read_text())
        assert all(saved[k] == v for k, v in VARIANTS[row["variant"]].model.items())
        assert not (out / "runs" / name / "pretrain" / "checkpoints").exists()
        for task in ("multiemo-sst2", "vitaminc", "bbc-topics"):
            result = row["tasks"][task]
            assert [e["epoch"] for e in result["curve"]] == [1, 2]
            sizes = json.loads((out / "data" / "summary.json").read_text())["sizes"][task]
            assert (
                result["settings"]["train_examples"]
                == sizes["train"]
                == min(30, len((suite / task / "train.tsv").read_text().splitlines()) - 1)
            )
            assert result["settings"]["learning_rate"] == 3e-4
        # energy: the ANN has no spikes; every spiking model is cheaper than its ANN and fires
        energy = row["energy"]
        if row["variant"] == "ann":
            assert energy["snn_mJ_per_sequence"] is None and energy["mean_firing_rate"] is None
        else:
            assert energy["ratio"] == pytest.approx(energy["ann_mJ_per_sequence"] / energy["snn_mJ_per_sequence"])
            assert 0 < energy["mean_firing_rate"] < 1
            assert energy["num_steps"] == row["model"]["num_steps"]
            assert energy["tokens_per_sequence"] == 32
    # ANN energy depends on the shape only: the same for every model
    assert len({round(r["energy"]["ann_mJ_per_sequence"], 12) for r in rows.values()}) == 1

    # the majority baselines are those of the subsets written for fine-tuning
    summary = json.loads((out / "report" / "summary.json").read_text())
    dev = load_task_data("sst2", str(out / "data" / "multiemo-sst2"), need_train=True)
    counts = [dev.splits["train"].labels.count(c) for c in (0, 1)]
    majority = counts.index(max(counts))
    expected = dev.splits["dev"].labels.count(majority) / len(dev.splits["dev"].labels)
    assert summary["majority"]["multiemo-sst2 (acc)"] == pytest.approx(expected)
    assert len(dev.splits["train"]) == 30 and len(dev.splits["dev"]) == 12
    avg = summary["variants"]["spikelm-t4"]["avg"][0]
    scores = [summary["variants"]["spikelm-t4"]["scores"][c][0] for c in summary["columns"]]
    assert avg == pytest.approx(sum(scores) / 4) and len(scores) == 4  # MNLI-like: m and mm count separately
    assert set(summary["claims"]["ordering"]) == {"ann", "lif-bert", "spikelm-t1", "spikelm-t4"}

    for name in PLOTS:
        assert (out / "report" / name).stat().st_size > 1000
        assert (tmp_path / "reproduction" / name).is_file()
    text = doc.read_text()
    assert "old" not in text and text.endswith(f"{DOC_END}\n\nafter\n") and "| spikelm-t4 | 4 |" in text

    # a rerun skips every finished row and leaves its file as it was
    before = {n: (out / "rows" / f"{n}.json").read_bytes() for n in names}
    capsys.readouterr()
    assert reproduce(suite, out, "--variants", variants, "--seeds", "0") == 0
    log = capsys.readouterr().out
    assert all(f"{n}: done before, skipped" in log for n in names)
    assert before == {n: (out / "rows" / f"{n}.json").read_bytes() for n in names}

    # rerunning one row from scratch elsewhere reproduces it exactly
    again = tmp_path / "again"
    assert reproduce(suite, again, "--variants", "spikelm-t4", "--seeds", "0") == 0
    assert figures(json.loads((again / "rows" / "spikelm-t4-seed0.json").read_text())) == figures(
        rows["spikelm-t4-seed0"]
    )


def test_interrupted_row_reuses_finished_stages(tmp_path, capsys):
    """A row killed after its pretraining and one task: the rerun reuses both and completes the row."""
    suite = make_suite(tmp_path / "suite")
    out = tmp_path / "run"
    args = ["--variants", "spikelm-t1", "--seeds", "0", "--tasks", "multiemo-sst2,bbc-topics"]
    assert reproduce(suite, out, *args) == 0
    row = out / "rows" / "spikelm-t1-seed0.json"
    first = json.loads(row.read_text())
    row.unlink()
    (out / "runs" / "spikelm-t1-seed0" / "bbc-topics" / "eval_results.json").unlink()
    capsys.readouterr()
    assert reproduce(suite, out, *args) == 0
    log = capsys.readouterr().out
    assert "pretraining: done before, reusing" in log and "multiemo-sst2: done before, reusing" in log
    assert "bbc-topics: done before" not in log
    assert figures(json.loads(row.read_text())) == figures(first)

    # the report of this run into a named block of a document that holds another run's block too
    doc = tmp_path / "REPRODUCTION.md"
    doc.write_text(f"{DOC_BEGIN}\nkept\n{DOC_END}\n<!-- reproduce-small:begin -->\nold\n<!-- reproduce-small:end -->\n")
    assert (
        main(["reproduce", "--report-only", "--output-dir", str(out), "--doc", str(doc), "--doc-block", "small"]) == 0
    )
    text = doc.read_text()
    assert "kept" in text and "old" not in text and "| spikelm-t1 | 1 |" in text
    assert "(reproduction/small/finetune_curves.png)" in text
    assert (tmp_path / "reproduction" / "small" / "finetune_curves.png").is_file()
    assert not (tmp_path / "reproduction" / "finetune_curves.png").exists()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    suite = make_suite(tmp_path / "suite")
    cases = [
        (["--variants", "ann,snn"], "--variants: unknown ['snn']"),
        (["--tasks", "sst2"], "not a task of the offline suite"),
        (["--set", "num_steps=2"], "--set num_steps: set by the experiment itself"),
        (["--set", "no_such_field=1"], "unknown config key 'no_such_field'"),
        (["--epochs", "0"], "argument --epochs: must be at least 1"),
        (["--doc-block", "small"], "--doc-block names a block of the --doc file"),
        (["--doc", str(tmp_path / "d.md"), "--doc-block", "a b"], "--doc-block expects letters, digits"),
        (["--doc", str(tmp_path / "d.md")], "no such file"),
        (["--doc", str(suite / "multiemo-sst2" / "train.tsv")], "has no '<!-- reproduce:begin -->'"),
    ]
    for extra, message in cases:
        assert reproduce(suite, tmp_path / "out", *extra) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    assert main(["reproduce", "--suite", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"), *TINY]) == 2
    assert "build the suite with `spikelm data prepare-glue-offline" in capsys.readouterr().err


def test_budget_fields_that_define_a_row_are_not_overridable():
    config = pretrain_config(
        Budget(pretrain_steps=7, pretrain_overrides={"learning_rate": 5e-4}), VARIANTS["lif-bert"], seed=3
    )
    assert (config.max_steps, config.seed, config.learning_rate) == (7, 3, 5e-4)
    assert config.model["spike_levels"] == "binary" and config.model["num_steps"] == 4
    assert config.save_every == 2  # a few checkpoints per run, for resuming an interrupted row
