"""Paired comparison of two lm-eval runs on the same documents, from their ``--log_samples`` files.

    python benchmarks/lm_eval_paired.py REAL_SAMPLES.jsonl SPIKING_SAMPLES.jsonl

Prints, per metric (acc, acc_norm): documents right in both runs, only in the first, only in the second, and the
exact McNemar p-value (two-sided binomial test on the discordant documents, p = 1/2); then how many documents get
the same answer (the choice of highest log-likelihood).
"""

import json
import math
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        return {row["doc_id"]: row for row in map(json.loads, f)}


def mcnemar_exact(k: int, n: int) -> float:
    """Two-sided exact p of k of n discordant pairs going one way."""
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n)


def answer(row) -> int:
    scores = [float(resp[0]) for resp in row["filtered_resps"]]
    return max(range(len(scores)), key=scores.__getitem__)


def main(first_path, second_path):
    first, second = load(first_path), load(second_path)
    if first.keys() != second.keys() or any(first[d]["doc"] != second[d]["doc"] for d in first):
        sys.exit("the two runs did not score the same documents")
    for metric in ("acc", "acc_norm"):
        both = sum(bool(first[d][metric]) and bool(second[d][metric]) for d in first)
        only_first = sum(bool(first[d][metric]) and not second[d][metric] for d in first)
        only_second = sum(bool(second[d][metric]) and not first[d][metric] for d in first)
        p = mcnemar_exact(only_second, only_first + only_second)
        print(f"{metric}: n {len(first)}, both {both}, only first {only_first}, only second {only_second}, p {p:.4f}")
    same = sum(answer(first[d]) == answer(second[d]) for d in first)
    print(f"same answer: {same} / {len(first)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
