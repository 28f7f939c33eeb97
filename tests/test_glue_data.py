"""GLUE task readers (TSV layout, hub, custom files), metrics and the offline suite builders (no downloads)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from spikelm.data.splits import BBC_TOPICS, BIBLE_MRPC
from spikelm.errors import UserError
from spikelm.evaluation.glue import offline
from spikelm.evaluation.glue.metrics import compute_metrics
from spikelm.evaluation.glue.report import average, markdown_table, resolve_tasks
from spikelm.evaluation.glue.tasks import TASKS, get_task, load_custom, load_glue_folder

GLUE = Path(__file__).parent / "fixtures" / "glue"


def rows(path, header=True):
    with open(path, encoding="utf-8-sig", newline="") as f:
        data = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return (data[0], data[1:]) if header else ([], data)


def test_sst2_layout():
    data = load_glue_folder(get_task("sst2"), GLUE / "SST-2")
    _, body = rows(GLUE / "SST-2" / "dev.tsv")
    dev = data.splits["dev"]
    assert dev.texts == [(r[0],) for r in body] and dev.labels == [int(r[1]) for r in body]
    header, test_rows = rows(GLUE / "SST-2" / "test.tsv")
    assert data.splits["test"].labels is None and data.splits["test"].ids == [r[0] for r in test_rows]


def test_cola_has_no_header_in_train_but_one_in_test():
    data = load_glue_folder(get_task("cola"), GLUE / "CoLA")
    _, body = rows(GLUE / "CoLA" / "train.tsv", header=False)
    assert len(data.splits["train"]) == len(body)
    assert data.splits["train"].texts[0] == (body[0][3],) and data.splits["train"].labels == [int(r[1]) for r in body]
    assert len(data.splits["test"]) == len(rows(GLUE / "CoLA" / "test.tsv")[1])


def test_mrpc_pair_columns_and_bom():
    data = load_glue_folder(get_task("mrpc"), GLUE)  # the GLUE root also works: it holds MRPC/
    header, body = rows(GLUE / "MRPC" / "train.tsv")
    assert header[0] == "Quality"  # the BOM is not part of the column name
    assert data.splits["train"].texts[3] == (body[3][3], body[3][4])
    assert data.splits["train"].labels == [int(r[0]) for r in body]


def test_mnli_matched_and_mismatched():
    task = get_task("mnli")
    data = load_glue_folder(task, GLUE / "MNLI")
    assert set(data.splits) == {"train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"}
    header, body = rows(GLUE / "MNLI" / "dev_mismatched.tsv")
    gold = header.index("gold_label")
    assert data.splits["dev_mismatched"].labels == [task.tsv_labels.index(r[gold]) for r in body]


def test_stsb_scores_are_floats():
    data = load_glue_folder(get_task("stsb"), GLUE / "STS-B")
    header, body = rows(GLUE / "STS-B" / "dev.tsv")
    assert data.splits["dev"].labels == [float(r[header.index("score")]) for r in body]


def test_hub_split_maps_to_the_same_examples(monkeypatch):
    datasets = pytest.importorskip("datasets")
    tsv = load_glue_folder(get_task("mrpc"), GLUE / "MRPC")

    def fake_load_dataset(name, config):
        assert (name, config) == ("nyu-mll/glue", "mrpc")

        def split(ex):
            labels = ex.labels if ex.labels is not None else [-1] * len(ex)
            return datasets.Dataset.from_dict(
                {
                    "sentence1": [t[0] for t in ex.texts],
                    "sentence2": [t[1] for t in ex.texts],
                    "label": labels,
                    "idx": list(range(len(ex))),
                }
            )

        return {
            "train": split(tsv.splits["train"]),
            "validation": split(tsv.splits["dev"]),
            "test": split(tsv.splits["test"]),
        }

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from spikelm.evaluation.glue.tasks import load_glue_hub

    hub = load_glue_hub(get_task("mrpc"))
    assert hub.splits["dev"].texts == tsv.splits["dev"].texts and hub.splits["dev"].labels == tsv.splits["dev"].labels
    assert hub.splits["test"].labels is None


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing_train", "has no train.tsv"),
        ("wrong_header", "no label column 'label'"),
        ("label_outside", "label '2' is not one of task sst2's labels"),
        ("short_row", "tab-separated fields, expected 2"),
    ],
)
def test_bad_glue_folders(tmp_path, problem, message):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    train = {
        "wrong_header": "sentence\tsentiment\ngood film\t1\n",
        "label_outside": "sentence\tlabel\ngood film\t2\n",
        "short_row": "sentence\tlabel\ngood film\n",
    }.get(problem)
    if train is not None:
        (tmp_path / "train.tsv").write_text(train)
    with pytest.raises(UserError, match=message):
        load_glue_folder(get_task("sst2"), tmp_path)


def test_unknown_task():
    with pytest.raises(UserError, match="not a GLUE task"):
        get_task("sst5")


def test_custom_jsonl_and_csv(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "y": "xyz"[i % 3]}) + "\n" for i in range(6))
    )
    (tmp_path / "dev.csv").write_text('q,a,y\n"hello, there",a,z\nq,a,x\n')
    data = load_custom(tmp_path, ("q", "a"), "y", regression=False)
    assert data.task.label_names == ("x", "y", "z") and data.task.num_labels == 3
    assert data.splits["dev"].texts[0] == ("hello, there", "a") and data.splits["dev"].labels == [2, 0]
    with pytest.raises(UserError, match="no label column 'label'"):
        load_custom(tmp_path, ("q",), "label", regression=False)
    (tmp_path / "dev.csv").write_text("q,a,y\nq,a,w\n")
    with pytest.raises(UserError, match="label 'w' is not one of"):
        load_custom(tmp_path, ("q",), "y", regression=False)


def test_metrics_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    m = compute_metrics(TASKS["mrpc"], p, y)
    assert m["accuracy"] == pytest.approx((p == y).mean()) and m["f1"] == pytest.approx(f1_score(y, p))
    assert compute_metrics(TASKS["cola"], p, y)["matthews_correlation"] == pytest.approx(matthews_corrcoef(y, p))
    s, t = rng.random(30) * 5, rng.random(30) * 5
    m = compute_metrics(TASKS["stsb"], s, t)
    assert m["pearson"] == pytest.approx(pearsonr(s, t)[0]) and m["spearmanr"] == pytest.approx(spearmanr(s, t)[0])
    assert compute_metrics(TASKS["stsb"], np.ones(5), t[:5]) == {"pearson": None, "spearmanr": None}
    # F1 by hand: one true positive, one false positive, one false negative -> precision = recall = 1/2
    assert compute_metrics(TASKS["qqp"], [1, 1, 0, 0], [1, 0, 0, 1])["f1"] == pytest.approx(0.5)


def test_table_average_counts_mnli_twice_and_skips_wnli():
    tasks = resolve_tasks("mnli,sst2,wnli")
    results = {
        "mnli": {"best": {"accuracy": 0.8, "accuracy_mismatched": 0.7}},
        "sst2": {"best": {"accuracy": 0.9}},
        "wnli": {"best": {"accuracy": 0.1}},
    }
    assert average(tasks, results) == pytest.approx((0.8 + 0.7 + 0.9) / 3)
    table = markdown_table(tasks, {"x": results})
    assert "80.0/70.0" in table and "| 80.0 |" in table


# ----------------------------------------------------------------------------------------------
# The offline suite, on made-up source data
# ----------------------------------------------------------------------------------------------


def test_bible_mrpc_pairs_respect_the_shared_split():
    kjv = {("Genesis", c, v): f"kjv {c}:{v}" for c in (1, 2) for v in range(1, 41)}
    web = {k: f"web {k[1]}:{k[2]}" for k in kjv}
    splits = offline.bible_mrpc_pairs(kjv, web)
    assert sum(len(r) for r in splits.values()) == len(kjv)
    labels = {r.label for rs in splits.values() for r in rs}
    assert labels == {"0", "1"}
    for split, pairs in splits.items():
        for row in pairs:
            first, second = row.fields["#1 ID"], row.fields["#2 ID"]
            assert BIBLE_MRPC.split_of(first) == split == BIBLE_MRPC.split_of(second)
            assert (row.label == "1") == (first == second)
            assert first.split(":")[0] == second.split(":")[0]  # same chapter
            assert row.fields["#2 String"] == "web " + second.split(" ")[1]


def _fake_bigbench(task):
    if task == "vitaminc_fact_verification":
        examples = [
            {
                "input": f"Page {i % 40}: evidence {i} .\nClaim: claim {i // 2} .",
                "target_scores": {"True": int(i % 3 == 0), "False": int(i % 3 == 1), "Neither": int(i % 3 == 2)},
            }
            for i in range(600)
        ]
    elif task == "multiemo/all_sentence_en":
        examples = [
            {
                "input": f"review {i}",
                "target_scores": {
                    "positive": int(i % 4 == 0),
                    "negative": int(i % 4 == 1),
                    "neutral": int(i % 4 == 2),
                    "ambivalent": int(i % 4 == 3),
                },
            }
            for i in range(400)
        ]
        examples.append(
            {"input": "review 0", "target_scores": {"positive": 0, "negative": 1, "neutral": 0, "ambivalent": 0}}
        )
    else:
        examples = [
            {
                "input": f"Premise: p{i} knows q. Hypothesis: q{i}.",
                "target_scores": {"entailment": i % 2, "non-entailment": 1 - i % 2},
            }
            for i in range(200)
        ]
    return {"examples": examples}


@pytest.mark.parametrize("name", ["vitaminc", "multiemo-sst2", "epistemic-rte", "bbc-topics"])
def test_offline_tasks_read_back_through_their_glue_layout(tmp_path, monkeypatch, name):
    monkeypatch.setattr(offline.sources, "bigbench_task", lambda task: _fake_bigbench(task))
    articles = [
        (f"bbcnews/data/{t}/{i:03d}.txt", t, f"{t} story {i}\n\nbody\ttext")
        for t in ("business", "sports", "tech")
        for i in range(60)
    ]
    monkeypatch.setattr(offline.sources, "bbc_articles", lambda: articles)
    summary = offline.prepare_offline_suite([name], tmp_path)
    task = offline.OFFLINE_TASKS[name]
    folder = tmp_path / name
    if task.analogue == "custom":
        data = load_custom(folder, ("text",), "label", regression=False)
        _, body = rows(folder / "dev.tsv")
        assert all(BBC_TOPICS.split_of(r[1]) == "dev" for r in body)
        assert data.task.label_names == ("business", "sports", "tech")
    else:
        data = load_glue_folder(TASKS[task.analogue], folder)
    for split, info in summary[name]["splits"].items():
        if not split.startswith("test"):
            assert len(data.splits[split]) == info["examples"]
    if name == "vitaminc":  # mismatched pages never occur in training; one claim never straddles splits
        genre = {s: {r[3] for r in rows(folder / f"{s}.tsv")[1]} for s in ("train", "dev_matched", "dev_mismatched")}
        assert not genre["dev_mismatched"] & genre["train"] and genre["dev_matched"] <= genre["train"]
        claims = {s: {t[1] for t in data.splits[s].texts} for s in ("train", "dev_matched")}
        assert not claims["train"] & claims["dev_matched"]
    if name == "multiemo-sst2":  # "review 0" had both labels and is dropped
        assert all(t != ("review 0",) for s in ("train", "dev") for t in data.splits[s].texts)
    labels_file = folder / ("test_matched_labels.tsv" if name == "vitaminc" else "test_labels.tsv")
    assert labels_file.is_file()


@pytest.mark.parametrize(
    "name, header, rows_, labels",
    [
        (
            "qqp",
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            [["7", "1", "2", "how old is he?", "what is his age?", "1"], ["8", "3", "4", "a?", "b?", "0"]],
            [1, 0],
        ),
        (
            "qnli",
            "index\tquestion\tsentence\tlabel",
            [["0", "who won?", "the red team won .", "entailment"], ["1", "when?", "it rained .", "not_entailment"]],
            [0, 1],
        ),
        (
            "rte",
            "index\tsentence1\tsentence2\tlabel",
            [["0", "a b c .", "a b .", "not_entailment"], ["1", "x y .", "x y .", "entailment"]],
            [1, 0],
        ),
        (
            "wnli",
            "index\tsentence1\tsentence2\tlabel",
            [["0", "he ran .", "it ran .", "0"], ["1", "s .", "s .", "1"]],
            [0, 1],
        ),
    ],
)
def test_pair_task_layouts(tmp_path, name, header, rows_, labels):
    task = get_task(name)
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in rows_))
    data = load_glue_folder(task, tmp_path)
    columns = header.split("\t")
    assert data.splits["dev"].labels == labels
    assert data.splits["dev"].texts == [tuple(r[columns.index(c)] for c in task.text_columns) for r in rows_]


def test_custom_task_bad_encoding_and_eval_only_without_labels_are_user_errors(tmp_path):
    """An undecodable file is named; --eval-only of a model with no labels is a refusal, not KeyError('train')."""
    from spikelm.errors import UserError
    from spikelm.evaluation.glue.tasks import load_custom

    (tmp_path / "train.tsv").write_bytes("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    (tmp_path / "dev.tsv").write_text("text\tlabel\nok\t1\nno\t0\n")
    with pytest.raises(UserError, match=r"train.tsv is not UTF-8"):
        load_custom(tmp_path, ("text",), "label", regression=False)
    with pytest.raises(UserError, match="records no class labels"):
        load_custom(tmp_path, ("text",), "label", regression=False, need_train=False)
