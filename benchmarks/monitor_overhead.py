"""Overhead of FiringRateMonitor on a tiny SpikeLM masked-LM training loop (CPU or GPU).

Two measurements, each interleaving the variants so that drifts in machine load hit them alike:

1. per step (timed one by one, synchronised on a GPU): a plain step, a step inside
   ``monitor.record`` that is not recorded, and a recorded step; from these, the overhead projected
   for recording one step in N;
2. end to end: blocks of --block steps without a monitor and with monitors recording every 100 and
   every 10 steps (no synchronisation inside a block), median seconds per step of each.

Writes the figures to --output (JSON):

    python -m benchmarks.monitor_overhead --output benchmarks/results/monitor_overhead.json   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from spikelm import SpikeLMConfig, SpikeLMForMaskedLM
from spikelm.data.tokenization import load_bert_tokenizer, sample_text_path
from spikelm.training.monitor import FiringRateMonitor

SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)


def masked_lm_batch(tokenizer, batch_size: int, length: int) -> dict:
    ids = tokenizer(sample_text_path().read_text(), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids[: batch_size * length]).view(batch_size, length)
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.15
    labels = ids.masked_fill(~masked, -100)
    return {
        "input_ids": ids.masked_fill(masked, tokenizer.mask_token_id),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file to write the figures to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--single-steps", type=int, default=60, help="timed steps per variant in measurement 1")
    parser.add_argument("--block", type=int, default=100, help="steps per block in measurement 2")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per variant in measurement 2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=4, help="T")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokenizer = load_bert_tokenizer()
    config = SpikeLMConfig(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=128, num_steps=args.num_steps, **SHAPE
    )
    model = SpikeLMForMaskedLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: v.to(device) for k, v in masked_lm_batch(tokenizer, args.batch_size, args.length).items()}
    log_dir = tempfile.TemporaryDirectory()
    writer = SummaryWriter(log_dir.name)

    def train_step(monitor, step):
        if monitor is None:
            loss = model(**batch).loss
        else:
            with monitor.record(step):
                loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(5):  # warm-up (alpha initialisation, allocator)
        train_step(None, step)

    # 1. one step at a time
    single = {
        "plain": (None, 1),
        "monitor, step not recorded": (FiringRateMonitor(model, writer, every=10**9), 1),
        "monitor, step recorded": (FiringRateMonitor(model, writer, every=1), 0),
    }
    single_times = {name: [] for name in single}
    names = list(single)
    for i in range(args.single_steps):
        for name in names[i % 3 :] + names[: i % 3]:
            monitor, step = single[name]
            sync()
            start = time.perf_counter()
            train_step(monitor, step)
            if monitor is not None:
                monitor.flush()
            sync()
            single_times[name].append(time.perf_counter() - start)
    t = {name: statistics.median(v) for name, v in single_times.items()}
    plain, idle, recorded = t["plain"], t["monitor, step not recorded"], t["monitor, step recorded"]
    projected = {f"every={n}": ((recorded - plain) / n + (idle - plain) * (n - 1) / n) / plain for n in (1, 10, 100)}

    # 2. blocks of steps, no synchronisation inside a block
    blocks = {
        "none": None,
        "every=100": FiringRateMonitor(model, writer, every=100),
        "every=10": FiringRateMonitor(model, writer, every=10),
    }
    block_times = {name: [] for name in blocks}
    names = list(blocks)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            sync()
            start = time.perf_counter()
            for step in range(args.block):
                train_step(blocks[name], step)
            if blocks[name] is not None:
                blocks[name].flush()
            sync()
            block_times[name].append((time.perf_counter() - start) / args.block)
    b = {name: statistics.median(v) for name, v in block_times.items()}
    writer.close()

    results = {
        "benchmark": "FiringRateMonitor overhead on a tiny SpikeLM masked-LM training step "
        "(forward + backward + AdamW)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {**SHAPE, "T": args.num_steps, "batch": args.batch_size, "length": args.length},
        "single_step_seconds_median": t,
        "recorded_step_extra_seconds": recorded - plain,
        "projected_overhead": projected,
        "block_seconds_per_step_median": b,
        "block_overhead": {name: b[name] / b["none"] - 1 for name in ("every=100", "every=10")},
        "block": args.block,
        "rounds": args.rounds,
        "raw": {"single_step_seconds": single_times, "block_seconds_per_step": block_times},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"device {results['device']}, {results['threads']} threads")
    for name, seconds in t.items():
        print(f"single step, {name:<28} {seconds * 1e3:8.2f} ms")
    for name, value in projected.items():
        print(f"projected overhead, recording {name:<10} {value:+.2%}")
    for name, seconds in b.items():
        extra = f" ({results['block_overhead'][name]:+.2%})" if name != "none" else ""
        print(f"blocks of {args.block} steps, {name:<10} {seconds * 1e3:8.2f} ms/step{extra}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
