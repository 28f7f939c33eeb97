"""The C++ online Hadamard and decoding-step attention: their ATen operations against their own loops (CPU).

Both compute the same bits (``cpu_kernels.cpp``: the loops sum in the order this machine's MKL sums, taken where
:mod:`spikelm.nn.kernels` checked it). Per call, median microseconds of interleaved rounds:

* ``hot``: the call repeated (its operands and MKL's buffers in cache);
* ``cold``: each call after reading a 16 MB tensor (``--flush-mb``), as between the weight-streaming linears of a
  decoding step.

Shapes: SmolLM2-135M's (the Hadamard of the down projection's input, n = 1536 = 12 x 128, on --rows rows; the
attention of 9 query heads on 3 K/V heads of 64 against a float64 cache of --lengths tokens, batch 1):

    python -m benchmarks.order_kernels --threads 2 --output benchmarks/results/order_kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from spikelm.conversion.rotation import _online_operands
from spikelm.nn import cpu_kernels, kernels


def per_call_us(call, rounds: int, calls: int, flush: list[torch.Tensor] | None) -> float:
    """Median over ``rounds`` of the mean microseconds of ``calls`` calls (each after reading ``flush``, if given;
    the reading not timed)."""
    means = []
    for _ in range(rounds):
        total = 0.0
        for i in range(calls):
            if flush:
                flush[i % len(flush)].sum()
            start = time.perf_counter()
            call()
            total += time.perf_counter() - start
        means.append(total / calls * 1e6)
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="JSON file to write the figures to")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 160, 512, 1056, 2048])
    parser.add_argument("--flush-mb", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.kernel() is None:
        raise SystemExit(f"the C++ kernels cannot be built here: {cpu_kernels.build_error()}")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    g = torch.Generator().manual_seed(0)
    flush = [torch.randn(args.flush_mb * (1 << 18), generator=g) for _ in range(2)]
    rows = []
    signs, mats = _online_operands("hadamard", 1536, 0, "cpu", torch.float64)
    for count in args.rows:
        x = torch.randn(count, 1, 1536, generator=g)
        loops = kernels.rotation_loops(x, signs, mats)
        for name, hand in (("aten", False), ("loops", True)):
            if hand and not loops:
                print(f"hadamard rows {count}: the loops do not reproduce this machine's BLAS; not timed")
                continue

            def call(hand=hand, x=x):
                cpu_kernels.online_hadamard(x, signs, mats, hand=hand)

            for state, flushed in (("hot", None), ("cold", flush)):
                us = per_call_us(call, args.rounds, args.calls, flushed)
                rows.append(dict(op="online_hadamard", rows=count, path=name, state=state, us=us))
                print(f"hadamard 1536 rows {count:3d} {name:5s} {state:4s} {us:8.1f} us", flush=True)
    for length in args.lengths:
        buffer = torch.randn(2, 1, 3, length + 64, 64, generator=g, dtype=torch.float64)
        key, value = buffer[0, :, :, :length], buffer[1, :, :, :length]
        query = torch.randn(1, 9, 1, 64, generator=g)
        found = kernels.attention_order(query, key, value)
        for name, order in (("aten", None), ("loops", found)):
            if name == "loops" and order is None:
                print(f"attention L {length}: the loops do not reproduce this machine's BLAS; not timed")
                continue

            def call(order=order, key=key, value=value, query=query):
                o, b = (0, None) if order is None else order
                cpu_kernels.one_query_attention(query, key, value, None, 0.125, order=o, block=b)

            for state, flushed in (("hot", None), ("cold", flush)):
                us = per_call_us(call, args.rounds, args.calls, flushed)
                rows.append(dict(op="one_query_attention", length=length, path=name, state=state, us=us))
                print(f"attention L {length:5d} {name:5s} {state:4s} {us:8.1f} us", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                dict(
                    threads=torch.get_num_threads(),
                    torch=torch.__version__,
                    machine=platform.processor() or platform.machine(),
                    rounds=args.rounds,
                    calls=args.calls,
                    flush_mb=args.flush_mb,
                    figures=rows,
                ),
                f,
                indent=1,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
