"""BIG-bench multiple-choice tasks for zero-shot evaluation with lm-eval, built from the packaged BIG-bench data.

The examples come from the ``bigbench==1.0.0`` sdist on PyPI (:func:`spikelm.data.sources.bigbench_task`,
fetched once and cached). Each task keeps a deterministic test subset, ordered by a hash of the input and
cut at :data:`MAX_EXAMPLES`; where the offline fine-tuning suite (:mod:`spikelm.evaluation.glue.offline`) already
splits a task, its test split is the one used, so a model fine-tuned on that suite's train split is never
scored on its training examples. A prompt is the task's own BIG-bench framing (``task_prefix``, input and
output prefixes); the choices are the keys of ``target_scores``, scored by lm-eval as the continuation
after one space.

Test subsets (n), chance (1 / number of choices) and majority-class rate:

- ``spikelm_hyperbaton``: ``hyperbaton``, which of two sentences orders its adjectives correctly (a or b);
  n = 1,000, chance 0.5, majority 0.504.
- ``spikelm_epistemic``: ``epistemic_reasoning``, entailment or non-entailment (the offline suite's
  ``epistemic-rte`` test split); n = 193, chance 0.5, majority 0.617.
- ``spikelm_vitaminc``: ``vitaminc_fact_verification``, a claim True, False or Neither given a Wikipedia
  passage (the offline suite's ``vitaminc`` test pairs); n = 1,000, chance 1/3, majority 0.501.
- ``spikelm_fever``: ``fact_checker/fever``, a Wikipedia claim true or false; n = 616, chance 0.5,
  majority 0.506.
- ``spikelm_goal_inference``: ``goal_step_wikihow/goal_inference``, which of four wikiHow goals a step serves
  (cloze: each goal scored as the continuation); n = 1,000, chance 0.25 (one example has five choices),
  majority (the first position) 0.278.

(:func:`task_summary` recomputes n and the majority-class rates.) BIG-bench files carry a canary asking
that they never appear in training corpora: these tasks are for evaluation only.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..data import sources
from ..data.splits import SplitRule

MAX_EXAMPLES = 1000


@dataclass(frozen=True)
class ChoiceTask:
    """One BIG-bench multiple-choice task: where its examples come from and how a prompt is written."""

    name: str  # the lm-eval task name
    bigbench: str  # the BIG-bench task directory
    in_test: Callable[[str], bool]  # input text -> belongs to the test subset
    prompt: Callable[[str], str]  # input text -> the prompt the choices continue


def _split_rule_test(rule: SplitRule) -> Callable[[str], bool]:
    return lambda text: rule.split_of(text) == "test"


def _vitaminc_test(text: str) -> bool:
    """The offline suite's held-out test pairs (``test_matched`` and ``test_mismatched``)."""
    from .glue.offline import VITAMINC_CLAIMS, VITAMINC_PAGES

    evidence, claim = text.split("\nClaim: ", 1)
    page = evidence.split(": ", 1)[0] if ": " in evidence else evidence
    held_page = VITAMINC_PAGES.split_of(page)
    return held_page == "test" or (held_page == "train" and VITAMINC_CLAIMS.split_of(claim) == "test")


def _epistemic_test(text: str) -> bool:
    from .glue.offline import EPISTEMIC

    return EPISTEMIC.split_of(text) == "test"


EPISTEMIC_PREFIX = (
    "Identify the relation between the following premises and hypotheses, choosing from the options "
    "'entailment' or 'non-entailment'.\n"
)
VITAMINC_PREFIX = (
    "Based only on the information contained in a brief quote from Wikipedia, answer whether the "
    "related claim is True, False or Neither. Use Neither when the Wikipedia quote does not provide the "
    "necessary information to resolve the question.\n\n"
)

TASKS = {
    task.name: task
    for task in (
        ChoiceTask(
            "spikelm_hyperbaton",
            "hyperbaton",
            _split_rule_test(SplitRule(salt="lm-eval-hyperbaton")),
            lambda text: f"Q: {text}\nA:",
        ),
        ChoiceTask(
            "spikelm_epistemic",
            "epistemic_reasoning",
            _epistemic_test,
            lambda text: f"{EPISTEMIC_PREFIX}\n{text}\nRelation:",
        ),
        ChoiceTask(
            "spikelm_vitaminc",
            "vitaminc_fact_verification",
            _vitaminc_test,
            lambda text: f"{VITAMINC_PREFIX}Passage: {text}\nTrue, False, or Neither?",
        ),
        ChoiceTask(
            "spikelm_fever",
            "fact_checker/fever",
            _split_rule_test(SplitRule(salt="lm-eval-fever")),
            lambda text: f"{text}\nA:",
        ),
        # cloze: "The most reasonable goal of 'Have the butcher make them' is" + " Buy Burger Patties"; no task uses it
        # for fine-tuning, so every example is a candidate
        ChoiceTask(
            "spikelm_goal_inference", "goal_step_wikihow/goal_inference", lambda text: True, lambda text: text.rstrip()
        ),
    )
}


def _order(name: str, text: str) -> bytes:
    return hashlib.sha256(f"{name}:{text}".encode()).digest()


def task_examples(name: str, max_examples: int = MAX_EXAMPLES, task_json: dict | None = None) -> list[dict]:
    """The test subset of task ``name`` (a key of :data:`TASKS`) as lm-eval documents: ``input`` (the BIG-bench
    text), ``prompt``, ``choices`` (the ``target_scores`` keys, in the file's order) and ``label`` (index of the one
    choice scored 1). ``task_json``: the BIG-bench ``task.json`` contents (default: read from the package)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if max_examples < 1:
        raise ValueError(f"max_examples must be at least 1, got {max_examples}")
    task = TASKS[name]
    data = task_json if task_json is not None else sources.bigbench_task(task.bigbench)
    docs, seen = [], set()
    for example in data["examples"]:
        text = example["input"]
        if text in seen or not task.in_test(text):
            continue
        seen.add(text)
        choices = list(example["target_scores"])
        winners = [i for i, c in enumerate(choices) if example["target_scores"][c] == 1]
        if len(winners) != 1:
            raise ValueError(f"{task.bigbench}: an example without exactly one correct answer: {text[:80]!r}")
        docs.append({"input": text, "prompt": task.prompt(text), "choices": choices, "label": winners[0]})
    docs.sort(key=lambda doc: _order(name, doc["input"]))
    return docs[:max_examples]


def task_dataset(spikelm_task: str, max_examples: int = MAX_EXAMPLES, **_metadata):
    """:func:`task_examples` of task ``spikelm_task`` as a ``datasets.DatasetDict`` with one ``test`` split: the
    ``custom_dataset`` of the task files in ``spikelm/resources/lm_eval_tasks`` (lm-eval calls it with the task's
    ``dataset_kwargs`` and metadata as keyword arguments; the metadata is ignored)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(task_examples(spikelm_task, max_examples))})


def task_summary(name: str, docs: list[dict] | None = None) -> dict:
    """n, number of choices, chance (1 / choices) and the majority-class rate of a task's test subset (by answer
    position where the choices differ from one example to the next)."""
    docs = task_examples(name) if docs is None else docs
    fixed = all(doc["choices"] == docs[0]["choices"] for doc in docs)
    labels = Counter(doc["choices"][doc["label"]] if fixed else doc["label"] for doc in docs)
    num_choices = len(docs[0]["choices"])
    return {
        "task": name,
        "n": len(docs),
        "choices": num_choices,
        "chance": 1 / num_choices,
        "majority": max(labels.values()) / len(docs),
        "labels": dict(labels),
    }
