"""``spikelm demo`` end to end on a reduced budget, with models a user saves through the public transformers API
(a tiny BERT and a tiny LLaMA standing in for MiniLM and SmolLM2) and a synthetic stand-in for the BIG-bench
sentiment file: no download. The figures the demo prints and writes are checked against the files it wrote and
against numbers the test computes itself."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch
from conftest import save_tiny_llama

from spikelm.commands.main import main

POSITIVE = "good great lovely excellent friendly clean comfortable".split()
NEGATIVE = "bad awful dirty rude noisy broken terrible".split()
NEUTRAL = "the hotel room staff food was and very our stay".split()


def _sentiment_task() -> dict:
    rng = random.Random(0)
    examples = []
    for i in range(400):
        positive = i % 2 == 0
        words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2) + [f"n{i}"]
        rng.shuffle(words)
        scores = {"positive": int(positive), "negative": int(not positive), "neutral": 0, "ambivalent": 0}
        examples.append({"input": " ".join(words) + " .", "target_scores": scores})
    return {"examples": examples}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from transformers import BertConfig, BertModel

    from spikelm.data.tokenization import load_bert_tokenizer

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    bert = root / "bert"
    tokenizer = load_bert_tokenizer()
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(bert)
    tokenizer.save_pretrained(bert)

    words = sorted(set(POSITIVE + NEGATIVE + NEUTRAL + ["city", "history", "begins", "."]))
    text = " ".join(random.Random(1).choice(words) for _ in range(3000))
    llama = root / "llama"
    save_tiny_llama(llama, words, max_position_embeddings=1024)
    text_file = root / "text.txt"
    text_file.write_text(text)
    return {"bert": bert, "llama": llama, "text": text_file}


def _read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.mark.slow
def test_demo_end_to_end_figures_match_the_files_it_wrote(sources, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikelm.data import pretrained
    from spikelm.data import sources as data_sources

    monkeypatch.setattr(data_sources, "minilm_dir", lambda: sources["bert"])
    monkeypatch.setitem(pretrained.NAMED_SOURCES, "smollm2-135m", lambda: sources["llama"])
    monkeypatch.setattr(data_sources, "bigbench_task", lambda name: _sentiment_task())
    out = tmp_path / "demo"
    args = [
        "demo",
        "--text-file",
        str(sources["text"]),
        "--finetune-samples",
        "96",
        "--finetune-epochs",
        "2",
        "--teacher-epochs",
        "1",
        "--finetune-lr",
        "1e-3",
        "--dev-examples",
        "16",
        "--eval-tokens",
        "1024",
        "--calibration-sequences",
        "2",
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    figures = json.loads((out / "figures.json").read_text())
    report = (out / "report.md").read_text()

    # classifier: test accuracy recomputed from the prediction files and the held-out labels
    c = figures["classifier"]
    data = out / "data" / "multiemo-sst2"
    labels = {r["index"]: r["label"] for r in _read_tsv(data / "test_labels.tsv")}
    assert len(labels) == c["test_examples"] > 0
    for name in ("teacher", "student"):
        predicted = {r["index"]: r["prediction"] for r in _read_tsv(out / c[name]["test_predictions"])}
        accuracy = sum(predicted[i] == y for i, y in labels.items()) / len(labels)
        assert c[name]["test_accuracy"] == pytest.approx(accuracy)
        assert f"{accuracy:.4f}" in report and f"{accuracy:.4f}" in printed
        results = json.loads((out / c[name]["model_dir"] / "eval_results.json").read_text())
        assert c[name]["dev_accuracy"] == results["best"]["accuracy"]
        assert results["settings"]["dev_examples"] == {"dev": 16}
    assert c["teacher"]["spiking"] is False and c["student"]["spiking"] is True and c["student"]["num_steps"] == 4
    assert json.loads((out / c["student"]["model_dir"] / "eval_results.json").read_text())["settings"]["teacher"]
    train = [r["label"] for r in _read_tsv(data / "train.tsv")]
    majority = max(set(train), key=train.count)
    assert c["majority_class"]["test_accuracy"] == pytest.approx(
        sum(y == majority for y in labels.values()) / len(labels)
    )
    assert c["gap_points"] == pytest.approx(
        100 * (c["teacher"]["test_accuracy"] - c["student"]["test_accuracy"]), abs=0.01
    )

    # llm: the real-valued perplexity and continuations recomputed with transformers alone
    g = figures["llm"]
    tok = AutoTokenizer.from_pretrained(sources["llama"])
    model = AutoModelForCausalLM.from_pretrained(sources["llama"]).eval()
    ids = tok(sources["text"].read_text(), add_special_tokens=False).input_ids[:1024]
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss for w in (ids[:512], ids[512:])]
    assert g["perplexity"]["real"] == pytest.approx(math.exp(float(sum(losses) / 2)), rel=1e-4)
    assert g["perplexity"]["ratio"] == pytest.approx(g["perplexity"]["spiking"] / g["perplexity"]["real"])
    assert g["perplexity"]["spiking"] != pytest.approx(g["perplexity"]["real"], rel=1e-6)  # it does spike
    assert f"{g['perplexity']['ratio']:.2f}" in report
    from spikelm.conversion.recipes import DEFAULT_RECIPE, RECIPES

    assert g["recipe"] == RECIPES[DEFAULT_RECIPE]  # the default recipe, all of it applied (value rotation included)
    for gen in g["generations"]:
        prompt = torch.tensor([tok(gen["prompt"], add_special_tokens=False).input_ids])
        with torch.no_grad():
            greedy = model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id)
        expected = tok.decode(greedy[0, prompt.shape[1] :], skip_special_tokens=True)
        assert gen["real"]["continuation"] == expected
        assert gen["real"]["tokens_per_second"] > 0 and gen["spiking"]["tokens_per_second"] > 0
        assert gen["spiking"]["continuation"].replace("\n", " ") in report

    # energy: the summary's figures are the energy report's, and the plots it links exist
    e = figures["energy"]["classifier"]
    energy = json.loads((out / e["energy_json"]).read_text())
    for key in ("snn_mJ_per_sequence", "ann_mJ_per_sequence", "ratio", "mean_firing_rate"):
        assert e[key] == energy[key]
    assert 0 < e["mean_firing_rate"] < 1 and e["snn_mJ_per_sequence"] > 0
    for link in [*e["plots"], "summary.png"]:
        assert (out / link).is_file() and link in report
    for name in ("classifier", "llm"):
        e = figures["energy"][name]
        energy = json.loads((out / e["energy_json"]).read_text())
        for key in ("snn_mJ_per_sequence", "ann_mJ_per_sequence", "ratio", "mean_firing_rate"):
            assert e[key] == energy[key]
        assert 0 < e["mean_firing_rate"] < 1 and e["snn_mJ_per_sequence"] > 0
        assert f"{e['ratio']:.2f}x" in report
    assert figures["energy"]["llm"]["sequences"] == 2  # 1,024 perplexity tokens in windows of 512
    # the printed LLM energy line: the spiking / real-valued energy with the perplexity ratio beside it
    e = figures["energy"]["llm"]
    line = next(line for line in printed.splitlines() if line.startswith("LLM energy"))
    assert f"spiking / real-valued {e['snn_mJ_per_sequence'] / e['ann_mJ_per_sequence']:.2f}x" in line
    assert f"perplexity {g['perplexity']['ratio']:.2f}x" in line
    assert figures["peak_rss_mb"] > 0 and figures["seconds"]["total"] > 0

    # a second run reuses its own directory; a directory holding something else is refused
    assert main([*args, "--parts", "llm"]) == 0
    again = json.loads((out / "figures.json").read_text())
    assert again["settings"]["parts"] == ["llm"] and "classifier" not in again
    assert again["earlier"]["classifier"] == figures["classifier"]  # kept from the first run, marked as earlier
    assert again["earlier"]["energy"] == figures["energy"]


def test_test_accuracy_matches_predictions_to_labels_by_index(tmp_path):
    from spikelm.experiments.demo import labelled_accuracy

    labels = tmp_path / "test_labels.tsv"
    labels.write_text("index\tlabel\n0\t1\n1\t0\n2\t0\n3\t1\n")
    predictions = tmp_path / "SST-2.tsv"
    predictions.write_text("index\tprediction\n3\t1\n2\t1\n1\t0\n0\t0\n")  # another order: 3 and 1 right
    assert labelled_accuracy(predictions, labels) == 0.5
    predictions.write_text("index\tprediction\n0\t1\n1\t0\n")
    with pytest.raises(ValueError, match="no prediction for 2 of the 4"):
        labelled_accuracy(predictions, labels)


def test_the_installed_environment_reads_the_demos_llm_source():
    # `make demo` and `make test` share one install: the demo's LLM, smollm2-135m, is converted from a GGUF file on
    # first use, which needs the gguf package (the `convert` extra); without it a fresh machine's demo stops there
    import importlib.util

    assert importlib.util.find_spec("gguf") is not None, "gguf is missing: the Makefile must install '.[convert]'"
