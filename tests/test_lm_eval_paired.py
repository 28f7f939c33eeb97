"""benchmarks/lm_eval_paired.py: per-document comparison of two lm-eval --log_samples files (no lm-eval needed)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lm_eval_paired.py"


def load_script():
    spec = importlib.util.spec_from_file_location("lm_eval_paired", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_samples(path, rows):
    """rows: (log-likelihoods of the choices, label) per document, as lm-eval logs them (strings, acc as float)."""
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, (scores, label) in enumerate(rows):
            best = max(range(len(scores)), key=scores.__getitem__)
            row = {
                "doc_id": doc_id,
                "doc": {"input": f"doc {doc_id}", "label": label},
                "filtered_resps": [[str(s), "False"] for s in scores],
                "acc": float(best == label),
                "acc_norm": float(best == label),
            }
            f.write(json.dumps(row) + "\n")


def test_paired_counts_and_exact_mcnemar(tmp_path, capsys):
    scipy_stats = pytest.importorskip("scipy.stats")
    paired = load_script()
    # 6 documents, label 0 each; first run right on 0,1,2,3; second right on 0,4 (and picks choice 1 on 1,2,3, 5)
    first = [([-1, -2], 0), ([-1, -3], 0), ([-1, -2], 0), ([-1, -2], 0), ([-2, -1], 0), ([-3, -1], 0)]
    second = [([-1, -2], 0), ([-3, -1], 0), ([-2, -1], 0), ([-2, -1], 0), ([-1, -2], 0), ([-3, -1], 0)]
    write_samples(tmp_path / "a.jsonl", first)
    write_samples(tmp_path / "b.jsonl", second)
    paired.main(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    out = capsys.readouterr().out
    p = scipy_stats.binomtest(1, 4, 0.5).pvalue  # discordant: 3 only first, 1 only second
    assert f"acc: n 6, both 1, only first 3, only second 1, p {p:.4f}" in out
    assert "same answer: 2 / 6" in out  # documents 0 and 5
    for k, n in [(4, 18), (0, 5), (7, 7), (13, 30)]:
        assert paired.mcnemar_exact(k, n) == pytest.approx(scipy_stats.binomtest(k, n, 0.5).pvalue)
    assert paired.mcnemar_exact(0, 0) == 1.0


def test_paired_refuses_runs_on_different_documents(tmp_path):
    paired = load_script()
    write_samples(tmp_path / "a.jsonl", [([-1, -2], 0), ([-1, -2], 1)])
    write_samples(tmp_path / "b.jsonl", [([-1, -2], 0)])
    with pytest.raises(SystemExit, match="same documents"):
        paired.main(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
