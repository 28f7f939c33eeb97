"""Runs that give the same numbers run after run: the same seed, thread count and inputs give the same weights and
metrics, bit for bit.

What used to move between runs, and what this module does about it:

* **the seed came too late.** torch seeds its default generator from the OS on start-up (every process draws other
  numbers), so anything random created before the seed (``finetune``'s new classification head) differed in every
  run. :func:`reproducible` seeds Python, NumPy and torch (every device); callers enter it before they build a model.
* **nondeterministic kernels.** Some CUDA kernels (atomic adds in embedding and index backward passes, cuBLAS's
  split reductions) sum in an order that varies from run to run. On a machine with CUDA, :func:`reproducible` makes
  torch pick its deterministic implementations (``torch.use_deterministic_algorithms(True, warn_only=True)``: an
  operation that has none warns once instead of failing) and gives cuBLAS a fixed workspace
  (``CUBLAS_WORKSPACE_CONFIG``, unless set); uninitialised memory is not filled (that would cost time, and nothing
  here reads memory it did not write). On the CPU the switch is left alone: the CPU kernels used here are already
  deterministic for a given thread count (the seed alone made two fine-tunings equal bit for bit), and the switch
  makes ``torch.compile`` compile the neuron's graphs anew (other graphs), a cost for nothing.
* **thread count.** A float sum split over N threads is added in another order than over M threads, so the last
  bits (and, after training, more) depend on the number of threads: the same thread count is part of "the same
  run" (``torch.get_num_threads()``, recorded in ``finetune``'s ``eval_results.json``; set it with
  ``OMP_NUM_THREADS``).
* **memory alignment.** MKL may take another code path for a buffer of another alignment; torch allocates every
  tensor 64-byte aligned, the same in every run, so this does not move our figures (the tests compare runs bit for
  bit).

With CUDA, the previous settings are restored on exit, so a library user's process keeps its own.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


@contextmanager
def reproducible(seed: int):
    """Seed everything with ``seed``; with CUDA, also select torch's deterministic algorithms for the ``with`` block
    (restored after it)."""
    from accelerate.utils import set_seed

    set_seed(seed)
    if not torch.cuda.is_available():
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]
