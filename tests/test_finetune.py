"""`spikelm finetune` / `spikelm glue` end to end on GLUE-format fixtures with tiny models; starting points."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score

from spikelm import SpikeLMForPreTraining
from spikelm.commands.main import main
from spikelm.errors import UserError
from spikelm.evaluation.glue.models import load_starting_point
from spikelm.evaluation.glue.tasks import get_task

GLUE = Path(__file__).parent / "fixtures" / "glue"
VOCAB = 30522  # the shipped bert-base-uncased tokenizer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny SpikeLM with the pretraining heads and data-initialised alphas, saved."""
    torch.manual_seed(0)
    model = SpikeLMForPreTraining(tiny_config(vocab_size=VOCAB, max_position_embeddings=64, num_steps=2))
    with torch.no_grad():
        model(input_ids=torch.randint(1000, 5000, (4, 16)))
    path = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    path = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(path)
    return path


def read_tsv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def run_finetune(model, task, out, *extra):
    args = [
        "finetune",
        "--model",
        str(model),
        "--task",
        task,
        "--data-dir",
        str(GLUE / task_folder(task)),
        "--max-length",
        "32",
        "--batch-size",
        "8",
        "--learning-rate",
        "1e-3",
        "--output-dir",
        str(out),
        *extra,
    ]
    return main(args)


def task_folder(task):
    return get_task(task).folder


# ----------------------------------------------------------------------------------------------
# Starting points and baselines
# ----------------------------------------------------------------------------------------------


def test_bert_checkpoint_gives_the_same_ann_and_a_spiking_model_with_fresh_alphas(tiny_bert):
    from transformers import BertModel

    task = get_task("sst2")
    ann = load_starting_point(str(tiny_bert), task, {"spiking": False}).model.eval()
    bert = BertModel.from_pretrained(tiny_bert).eval()
    ids = torch.randint(1000, 5000, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ann.bert(input_ids=ids).last_hidden_state, bert(input_ids=ids).last_hidden_state)
    snn = load_starting_point(str(tiny_bert), task).model
    assert snn.config.spiking and snn.config.num_steps == 4 and not snn.alphas_initialized
    torch.testing.assert_close(
        snn.bert.encoder.layer[0].attention.self.qkv.weight, ann.bert.encoder.layer[0].attention.self.qkv.weight
    )
    with torch.no_grad():
        snn(input_ids=ids)
    assert snn.alphas_initialized


def test_eval_only_refuses_a_bert_checkpoint(tiny_bert):
    with pytest.raises(UserError, match="--eval-only needs a fine-tuned SpikeLM"):
        load_starting_point(str(tiny_bert), get_task("sst2"), eval_only=True)


def test_changing_spiking_settings_reinitialises_or_drops_alphas(pretrained):
    task = get_task("rte")
    saved = load_starting_point(str(pretrained), task)
    assert saved.model.alphas_initialized
    assert any("does not fit task 'rte'" in w for w in saved.warnings)
    reference = SpikeLMForPreTraining.from_pretrained(pretrained)
    torch.testing.assert_close(
        dict(saved.model.neurons())["bert.encoder.layer.0.output.dense.neuron"].alpha,
        dict(reference.neurons())["bert.encoder.layer.0.output.dense.neuron"].alpha,
    )
    for changes in ({"num_steps": 1}, {"spike_levels": "binary"}):
        start = load_starting_point(str(pretrained), task, changes)
        assert not start.model.alphas_initialized and start.model.neurons()
        assert any("re-initialises from the first training batch" in w for w in start.warnings)
        assert start.model.neurons()[0][1].num_steps == changes.get("num_steps", 2)
    ann = load_starting_point(str(pretrained), task, {"spiking": False})
    assert not ann.model.neurons() and any("alphas dropped" in w for w in ann.warnings)
    torch.testing.assert_close(
        ann.model.bert.encoder.layer[1].output.dense.weight, reference.bert.encoder.layer[1].output.dense.weight
    )


# ----------------------------------------------------------------------------------------------
# End to end: a single-sentence task, a pair task, the regression task
# ----------------------------------------------------------------------------------------------


def check_outputs(out, task_name):
    task = get_task(task_name)
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"task", "best", "last", "settings"} and results["task"] == task_name
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert results["last"]["epoch"] == len(history) == results["settings"]["epochs"]
    best = max(history, key=lambda h: -np.inf if h[task.metric] is None else h[task.metric])
    assert results["best"]["epoch"] == best["epoch"]
    # the saved dev predictions are the best epoch's: recompute its metrics from them and the gold file
    _, predictions = read_tsv(out / "dev_predictions.tsv")
    header, gold_rows = read_tsv(GLUE / task.folder / "dev.tsv")
    gold = [r[header.index(task.label_column)] for r in gold_rows]
    assert [r[2] for r in predictions] == ([repr(float(g)) for g in gold] if task.is_regression else gold)
    if task.is_regression:
        p, y = np.array([float(r[1]) for r in predictions]), np.array([float(g) for g in gold])
        expected = {"pearson": pearsonr(p, y)[0], "spearmanr": spearmanr(p, y)[0]}
    else:
        p, y = [int(r[1]) for r in predictions], [int(g) for g in gold]
        expected = {"accuracy": accuracy_score(y, p)}
        if task_name == "mrpc":
            expected["f1"] = f1_score(y, p, zero_division=0)
    for name, value in expected.items():
        assert 0 <= abs(value) <= 1
        assert results["best"][name] == pytest.approx(value, abs=1e-6)
    # a GLUE submission file for the test split
    sub_header, sub = read_tsv(out / "predictions" / f"{task.folder}.tsv")
    assert sub_header == ["index", "prediction"] and len(sub) == len(read_tsv(GLUE / task.folder / "test.tsv")[1])
    return results


@pytest.mark.parametrize("task_name", ["sst2", "mrpc", "stsb"])
def test_finetune_end_to_end(pretrained, tmp_path, task_name, capsys):
    assert run_finetune(pretrained, task_name, tmp_path / "out", "--epochs", "2") == 0
    results = check_outputs(tmp_path / "out", task_name)
    assert "does not fit" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    # the saved model is the best epoch's: evaluating it again reproduces the best dev metrics
    assert run_finetune(tmp_path / "out", task_name, tmp_path / "again", "--eval-only") == 0
    again = json.loads((tmp_path / "again" / "eval_results.json").read_text())
    assert again["best"]["epoch"] is None
    for name, value in results["best"].items():
        if name != "epoch":
            assert again["best"][name] == pytest.approx(value, abs=1e-5)


def test_finetune_bad_input(pretrained, tmp_path, capsys):
    assert (
        main(
            [
                "finetune",
                "--model",
                str(pretrained),
                "--task",
                "sst5",
                "--data-dir",
                str(GLUE / "SST-2"),
                "--output-dir",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "not a GLUE task" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        main(
            [
                "finetune",
                "--model",
                str(pretrained),
                "--task",
                "sst2",
                "--data-dir",
                str(tmp_path / "empty"),
                "--output-dir",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "has no train.tsv" in capsys.readouterr().err
    assert run_finetune(pretrained, "sst2", tmp_path / "c", "--eval-only") == 2
    err = capsys.readouterr().err
    assert "--eval-only" in err and "does not fit task 'sst2'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_eval_only_rejects_a_head_for_another_task(pretrained, tmp_path, capsys):
    assert run_finetune(pretrained, "sst2", tmp_path / "sst2", "--epochs", "1") == 0
    capsys.readouterr()
    # CoLA also has two labels, but a sentiment head does not fit it
    assert run_finetune(tmp_path / "sst2", "cola", tmp_path / "cola", "--eval-only") == 2
    assert "task 'sst2'" in capsys.readouterr().err


@pytest.mark.slow
def test_glue_command_compares_variants_and_evaluates_its_output(pretrained, tmp_path, capsys):
    out = tmp_path / "glue"
    assert (
        main(
            [
                "glue",
                "--model",
                str(pretrained),
                "--tasks",
                "sst2,mnli",
                "--data-dir",
                str(GLUE),
                "--variants",
                "ann,lif,spikelm-t1",
                "--epochs",
                "1",
                "--max-length",
                "32",
                "--batch-size",
                "8",
                "--padding",
                "longest",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    table = (out / "glue_results.md").read_text()
    assert "| ann | - |" in table and "| lif | 4 |" in table and "| spikelm-t1 | 1 |" in table
    results = json.loads((out / "glue_results.json").read_text())["results"]
    assert results["lif"]["sst2"]["settings"]["spike_levels"] == "binary"
    assert results["ann"]["mnli"]["settings"]["spiking"] is False
    assert (out / "lif" / "mnli" / "predictions" / "MNLI-mm.tsv").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "glue",
                "--model",
                str(out),
                "--tasks",
                "sst2,mnli",
                "--data-dir",
                str(GLUE),
                "--variants",
                "ann,lif,spikelm-t1",
                "--eval-only",
                "--max-length",
                "32",
                "--padding",
                "longest",
                "--output-dir",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "eval" / "glue_results.json").read_text())["results"]
    for variant in ("ann", "lif", "spikelm-t1"):
        assert again[variant]["mnli"]["best"]["accuracy_mismatched"] == pytest.approx(
            results[variant]["mnli"]["best"]["accuracy_mismatched"], abs=1e-6
        )


@pytest.mark.slow
def test_training_loss_falls_on_sst2_fixture(pretrained, tmp_path):
    # the fixture's sentiment words decide its labels: the real-valued tiny model learns them
    assert (
        run_finetune(
            pretrained, "sst2", tmp_path / "out", "--epochs", "10", "--spiking", "false", "--learning-rate", "2e-3"
        )
        == 0
    )
    history = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["best"]["accuracy"] >= 0.8


def test_custom_task_end_to_end(pretrained, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    words = {"sport": "match goal team", "tech": "phone chip software", "politics": "vote party minister"}
    for split, n in (("train", 24), ("dev", 9), ("test", 6)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = sorted(words)[i % 3]
                record = {"text": f"{words[label]} story {i}"} | ({} if split == "test" else {"label": label})
                f.write(json.dumps(record) + "\n")
    common = ["--model", str(pretrained), "--task", "custom", "--data-dir", str(data), "--max-length", "16"]
    assert main(["finetune", *common, "--epochs", "1", "--output-dir", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    _, predictions = read_tsv(tmp_path / "out" / "dev_predictions.tsv")
    labels = ["politics", "sport", "tech"]  # sorted training labels are the class ids
    assert [r[2] for r in predictions] == [labels[i % 3] for i in range(9)]
    assert results["best"]["accuracy"] == pytest.approx(np.mean([r[1] == r[2] for r in predictions]), abs=1e-6)
    assert results["best"]["f1"] == pytest.approx(
        f1_score([r[2] for r in predictions], [r[1] for r in predictions], average="macro", zero_division=0), abs=1e-6
    )
    _, test = read_tsv(tmp_path / "out" / "predictions" / "test.tsv")
    assert len(test) == 6 and {r[1] for r in test} <= set(labels)
    common[1] = str(tmp_path / "out")
    assert main(["finetune", *common, "--eval-only", "--output-dir", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert again["best"]["accuracy"] == pytest.approx(results["best"]["accuracy"])


def test_prepare_glue_offline_rejects_unknown_tasks(tmp_path, capsys):
    assert main(["data", "prepare-glue-offline", "--tasks", "imdb", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown task(s) ['imdb']" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_an_mlm_checkpoint_gets_a_new_pooler_and_head(tmp_path):
    from spikelm import SpikeLMForMaskedLM

    SpikeLMForMaskedLM(tiny_config(vocab_size=VOCAB, max_position_embeddings=64)).save_pretrained(tmp_path)
    start = load_starting_point(str(tmp_path), get_task("qnli"))
    assert any("SpikeLMForMaskedLM" in w and "does not fit task 'qnli'" in w for w in start.warnings)
    assert any("pooler is newly initialised" in w for w in start.warnings)
    assert start.model.config.id2label == {0: "entailment", 1: "not_entailment"}


def test_a_classifier_saved_with_the_public_api_is_a_starting_point(tmp_path):
    """SpikeLMForSequenceClassification(SpikeLMConfig(...)).save_pretrained(d): transformers 5 does not set
    config.finetuning_task, which must not be an AttributeError (issue 14)."""
    from spikelm import SpikeLMForSequenceClassification
    from spikelm.data.tokenization import load_bert_tokenizer
    from spikelm.evaluation.glue.models import describe_head, load_starting_point
    from spikelm.evaluation.glue.tasks import get_task

    tok = load_bert_tokenizer()
    SpikeLMForSequenceClassification(tiny_config(vocab_size=len(tok), num_labels=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    start = load_starting_point(str(tmp_path), get_task("sst2"))
    assert start.model.config.finetuning_task == "sst2" and start.model.config.num_labels == 2
    from spikelm import SpikeLMConfig

    assert "for task None" in describe_head(SpikeLMConfig(architectures=["SpikeLMForSequenceClassification"]))


def test_length_sorted_evaluation_predicts_in_file_order(pretrained, tmp_path):
    # --padding longest serves dev in order of length; the written predictions must still be in file order, equal
    # to each sentence classified alone (no padding at all)
    from transformers import AutoTokenizer

    from spikelm import SpikeLMForSequenceClassification

    # trained until its predictions differ between sentences (else a shuffled file could not be told apart)
    train = ("--epochs", "10", "--spiking", "false", "--learning-rate", "2e-3")
    assert run_finetune(pretrained, "sst2", tmp_path / "model", *train) == 0
    assert run_finetune(tmp_path / "model", "sst2", tmp_path / "sorted", "--eval-only", "--padding", "longest") == 0
    _, rows = read_tsv(tmp_path / "sorted" / "dev_predictions.tsv")
    _, dev = read_tsv(GLUE / "SST-2" / "dev.tsv")
    assert [int(r[0]) for r in rows] == list(range(len(dev)))
    model = SpikeLMForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    lengths = set()
    with torch.no_grad():
        for (index, prediction, label), (sentence, gold) in zip(rows, dev, strict=True):
            ids = tokenizer(sentence, truncation=True, max_length=32, return_tensors="pt")
            lengths.add(ids["input_ids"].shape[1])
            alone = model(**ids).logits.argmax(-1).item()
            assert int(prediction) == alone, index
            assert label == gold
    assert len(lengths) > 1  # the fixture's sentences differ in length, so sorting reorders them
    assert len({r[1] for r in rows}) == 2


def test_group_by_length_trains_and_needs_longest_padding(pretrained, tmp_path, capsys):
    args = ("--epochs", "1", "--padding", "longest", "--group-by-length")
    assert run_finetune(pretrained, "sst2", tmp_path / "grouped", *args) == 0
    settings = json.loads((tmp_path / "grouped" / "eval_results.json").read_text())["settings"]
    assert settings["group_by_length"] is True
    history = [json.loads(line) for line in (tmp_path / "grouped" / "train_log.jsonl").read_text().splitlines()]
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    capsys.readouterr()
    assert run_finetune(pretrained, "sst2", tmp_path / "bad", "--epochs", "1", "--group-by-length") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-by-length needs --padding longest" in err[0]
    assert not (tmp_path / "bad").exists()
