"""The few-row linear kernel against MKL's GEMM on SmolLM2-135M's linear shapes (CPU, float32).

For each (in, out) shape and row count M, interleaved (1-row GEMM, M-row GEMM, M-row kernel, repeated), medians of
--rounds rounds of --calls calls each:

* ``gemm_1``: ``F.linear`` of one row (the real-valued model's decoding step at batch 1);
* ``gemm_M``: ``F.linear`` of the M rows of spikes (the spiking model's step without the kernel);
* ``kernel_M``: :func:`spikelm.nn.cpu_kernels.few_rows_linear` of the same M rows.

With ``--model-weights`` each call runs the shape's linear of all 30 blocks in turn (30 different weights, 14-106 MB:
read from DRAM, as in a decoding step) instead of one weight (which a repeated call reads from the L3 cache).

The M rows are spikes of the elastic neuron (ternary, T=4, alphas from the batch itself) on heavy-tailed currents
(Student t with 3 degrees of freedom, per-channel scales from a log-normal), M/4 tokens x 4 steps, so the rows of
one token are correlated in time as in the model; the firing rate they have is printed. Writes a JSON of every
median and the ratios (``kernel_M / gemm_M``: below 1 the kernel wins; ``kernel_M / gemm_1``: the cost of the M rows
in single-row products):

    python -m benchmarks.cpu_kernels --threads 2 --model-weights --output benchmarks/results/cpu_kernels_dram.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from spikelm.nn import cpu_kernels
from spikelm.nn.neuron import ElasticBiSpikingNeuron

# SmolLM2-135M: hidden 576, 9 query heads / 3 K-V heads of 64, MLP 1536 (q/o, k/v, gate/up, down)
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))


def spikes(rows: int, features: int, generator: torch.Generator, steps: int = 4) -> torch.Tensor:
    tokens = max(1, rows // steps)
    scale = torch.exp(0.5 * torch.randn(features, generator=generator))
    t = torch.distributions.StudentT(3.0).sample((tokens, features)) * scale
    drift = 0.3 * torch.randn(steps, tokens, features, generator=generator)
    current = (t.unsqueeze(0) + drift * scale).contiguous()  # (T, tokens, features): the same token at each step
    neuron = ElasticBiSpikingNeuron(steps)
    with torch.no_grad():
        out = neuron(current).reshape(steps * tokens, features)
    return out[:rows].contiguous()


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="JSON file to write the figures to")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--model-weights", action="store_true", help="cycle through 30 weights per shape (DRAM)")
    parser.add_argument("--blocks", type=int, default=30, help="weights per shape with --model-weights")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    cpu_kernels.kernel()
    results = []
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(
        f"{'in':>5} {'out':>5} {'M':>3} {'fire':>5} {'gemm_1 us':>10} {'gemm_M us':>10} {'kernel_M us':>12} "
        f"{'kern/gemmM':>10} {'gemmM/gemm1':>11} {'kern/gemm1':>10}"
    )
    for k, n in SHAPES:
        weights = [torch.randn(n, k) / k**0.5 for _ in range(args.blocks if args.model_weights else 1)]
        one = spikes(4, k, generator)[:1]
        for m in args.rows:
            x = spikes(m, k, generator)
            rate = float((x != 0).float().mean())
            variants = {
                "gemm_1": lambda one=one, ws=weights: [F.linear(one, w) for w in ws],
                "gemm_M": lambda x=x, ws=weights: [F.linear(x, w) for w in ws],
                "kernel_M": lambda x=x, ws=weights: [cpu_kernels.few_rows_linear(x, w) for w in ws],
            }
            for fn in variants.values():
                timed(fn, 5)
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    times[name].append(timed(fn, args.calls))
            med = {name: 1e6 * statistics.median(v) for name, v in times.items()}
            row = {
                "in": k,
                "out": n,
                "rows": m,
                "firing_rate": rate,
                **{f"{name}_us": v for name, v in med.items()},
                "kernel_over_gemm_M": med["kernel_M"] / med["gemm_M"],
                "gemm_M_over_gemm_1": med["gemm_M"] / med["gemm_1"],
                "kernel_M_over_gemm_1": med["kernel_M"] / med["gemm_1"],
            }
            results.append(row)
            print(
                f"{k:>5} {n:>5} {m:>3} {rate:>5.2f} {med['gemm_1']:>10.1f} {med['gemm_M']:>10.1f} "
                f"{med['kernel_M']:>12.1f} {row['kernel_over_gemm_M']:>10.3f} {row['gemm_M_over_gemm_1']:>11.2f} "
                f"{row['kernel_M_over_gemm_1']:>10.2f}",
                flush=True,
            )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "threads": args.threads,
                    "weights_per_call": len(weights),
                    "torch": torch.__version__,
                    "rounds": args.rounds,
                    "calls": args.calls,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
