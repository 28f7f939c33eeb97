"""Generation speed of a converted (spikified) causal LM against its real-valued source, side by side.

``spikelm benchmark --generation --model SRC`` loads the source twice in float32, converts one copy with a recipe
(``spikify``, calibrated on a few sequences: speed does not depend on how good the alphas are), and times greedy
``generate()`` of both in one process, interleaved (real, spiking, real, spiking, ...), for every batch size and
prompt length asked:

* prefill: ``t1``, the time of ``generate(max_new_tokens=1)`` (the prompt's forward pass and one token);
  prefill tokens/s = B * L / t1;
* decode: ``tn``, the time of ``generate(max_new_tokens=n, min_new_tokens=n)``; decode tokens/s =
  B * (n - 1) / (tn - t1), so the prefill cancels out.

Both models run with the same threads, the same attention implementation and no ``torch.compile`` of the model
(the spiking neurons compile their own elementwise loop for inputs of at least 65,536 elements on CPU, i.e. in
prefill; decoding steps take the plain in-place loop). Times are medians over the repeats. The ratios are computed
from the medians, which the table prints in milliseconds:

* ``decode_ratio`` = spiking decode tokens/s / real decode tokens/s;
* ``prefill_ratio_vs_T`` = t1(spiking) / (T x t1(real)), T the number of network copies (1 for GIF).

Cache bytes per token are measured from the tensors of the cache each model's last ``generate(n)`` returned
(L + n - 1 tokens per row, all layers; for the spiking model the packed codes, per-token grids (GIF, signed) and
per-step magnitudes, and, on a CPU float32 run of a per-token code recipe, the float64 decoded copy its cache keeps
at its allocated capacity, reported apart as ``cache_decoded_bytes_per_token``), and compared with a float16 cache
of the real-valued model (2 bytes per element of its K/V cache).
Peak memory is the growth of the resident set during one more, untimed ``generate(n)`` per model (Linux ``/proc``,
sampled every 2 ms, freed heap returned to the OS before it; the sampler thread would take a core from a timed run).
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import threading
import time

import torch

from spikelm.errors import UserError
from spikelm.nn import kernels

DEFAULT_BATCH_SIZES = (1, 16)
DEFAULT_PROMPT_LENGTHS = (128, 1024)
DEFAULT_NEW_TOKENS = 128
MODELS = ("real", "spiking")


def load_pair(source: str, fields: dict, calibration, dtype=torch.float32):
    """(real-valued model, spiking model) from ``source``: two float32 copies, the second spikified with ``fields``
    and calibrated on ``calibration`` (token id batches)."""
    from transformers import AutoModelForCausalLM

    import spikelm.conversion as conversion
    from spikelm.evaluation.loading import load_pretrained

    real = load_pretrained(AutoModelForCausalLM, source, dtype=dtype).eval()
    spiking = load_pretrained(AutoModelForCausalLM, source, dtype=dtype).eval()
    try:
        config = conversion.SpikeLMConversionConfig(**fields)
        conversion.spikify(spiking, config, calibration=calibration)
    except (TypeError, ValueError) as err:
        raise UserError(f"--model {source}: {err}") from None
    # the spiking model's attention is spikelm's float64 one over the same masks (spikelm.conversion.attention: the
    # same codes on every path); the real-valued model keeps the one it was loaded with (both are reported)
    if spiking.config._attn_implementation != conversion.SPIKING_ATTENTION:
        raise RuntimeError(f"the spiking model runs {spiking.config._attn_implementation!r}, not spikelm's attention")
    return real, spiking


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return None


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


_trim = None


def _release_heap() -> None:
    """Return freed heap to the OS (glibc ``malloc_trim``), so that the next resident-set baseline is honest."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


class PeakRSS:
    """Context manager: ``growth`` is the peak resident set during the block minus the one before it (bytes)."""

    def __enter__(self):
        _release_heap()
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        if self.base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss

    def __exit__(self, *exc):
        self._stop.set()
        if self.base is not None:
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
        return False

    @property
    def growth(self) -> int | None:
        return None if self.base is None else self.peak - self.base


def cache_tensor_bytes(cache) -> int:
    """Bytes of every tensor a cache's layers hold (codes, grids, per-step magnitudes, or float K/V); a per-token code
    layer's own count (``held_bytes``: its buffers at their allocated capacity)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "held_bytes"):
            held = layer.held_bytes()
            total += held["codes"] + held["decoded"]
            continue
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def cache_decoded_bytes(cache) -> int:
    """Of :func:`cache_tensor_bytes`, the bytes of the decoded copies a per-token code cache keeps for fast CPU decoding
    (float64, their whole allocated capacity; 0 for other caches): the rest are the codes and their grids."""
    return sum(layer.held_bytes()["decoded"] for layer in cache.layers if hasattr(layer, "held_bytes"))


def cache_fp16_bytes(cache) -> int:
    """What a float16 cache of the same K/V elements would hold (2 bytes per element)."""
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _generate_seconds(model, prompt, new_tokens: int, memory: PeakRSS | None = None, make_cache=None):
    """Seconds of one greedy ``generate()``, and the cache it returned (``make_cache()``'s, if given)."""
    kwargs = dict(
        past_key_values=None if make_cache is None else make_cache(),
        return_dict_in_generate=True,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
    )
    with torch.inference_mode():
        start = time.perf_counter()
        if memory is None:
            out = model.generate(prompt, **kwargs)
        else:
            with memory:
                out = model.generate(prompt, **kwargs)
        seconds = time.perf_counter() - start
    made = out.sequences.shape[1] - prompt.shape[1]
    if made != new_tokens:
        raise RuntimeError(f"generate() made {made} tokens, not {new_tokens}")
    return seconds, out.past_key_values


def measure_pair(
    real,
    spiking,
    batch_sizes=DEFAULT_BATCH_SIZES,
    prompt_lengths=DEFAULT_PROMPT_LENGTHS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    repeats: int = 3,
    seed: int = 0,
    log=print,
    compare_unpacked: bool = False,
    compare_pytorch: bool = False,
) -> dict:
    """Prefill and decode speed, peak memory and cache bytes of both models at every (batch, prompt length).

    ``compare_unpacked``: also time the spiking model with its cache unpacked (one code per byte), as
    ``spiking_unpacked``, interleaved with the others; ``compare_pytorch``: also time the spiking model with the
    C++ decoding kernels off (PyTorch operations and MKL's GEMM only), as ``spiking_pytorch``."""
    if new_tokens < 2:
        raise UserError(f"--new-tokens must be at least 2 (decode speed needs a second token), got {new_tokens}")
    models = {"real": real, "spiking": spiking}
    caches = {}
    if compare_unpacked:
        from spikelm.conversion import spike_code_cache

        models["spiking_unpacked"] = spiking
        caches["spiking_unpacked"] = lambda: spike_code_cache(spiking, packing=None)
    switches = {}
    if compare_pytorch:
        models["spiking_pytorch"] = spiking
        switches["spiking_pytorch"] = False
    names = list(models)
    steps = spiking._spikelm.steps
    vocab = real.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    cases = []
    if _rss_bytes() is None:
        log("notice: no /proc/self/statm on this platform: peak memory is not measured")
    for batch in batch_sizes:
        for length in prompt_lengths:
            prompt = torch.randint(min(100, vocab - 1), vocab, (batch, length), generator=generator)
            log(f"  batch {batch}, prompt {length}, {new_tokens} new tokens: warming up...")
            for name, model in models.items():  # allocator, caches, the neurons' compiled loop
                with kernels.forced(switches.get(name)):
                    _generate_seconds(model, prompt, 2, make_cache=caches.get(name))
            times = {name: {"first": [], "full": []} for name in names}
            peak = {name: [] for name in names}
            cache_bytes, cache_fp16, cache_decoded = {}, {}, {}
            for repeat in range(repeats):
                for name, model in models.items():
                    make = caches.get(name)
                    with kernels.forced(switches.get(name)):
                        times[name]["first"].append(_generate_seconds(model, prompt, 1, make_cache=make)[0])
                        seconds, cache = _generate_seconds(model, prompt, new_tokens, make_cache=make)
                    times[name]["full"].append(seconds)
                    cached_tokens = batch * cache.get_seq_length()  # L + n - 1 per row
                    cache_bytes[name] = cache_tensor_bytes(cache) / cached_tokens
                    cache_fp16[name] = cache_fp16_bytes(cache) / cached_tokens
                    cache_decoded[name] = cache_decoded_bytes(cache) / cached_tokens
                    del cache
                log(
                    f"    repeat {repeat + 1}/{repeats}: "
                    + ", ".join(f"{n} {times[n]['first'][-1]:.2f} s + {times[n]['full'][-1]:.2f} s" for n in names)
                )
            # peak memory in one more generate(n) per model, not timed: the sampler thread (waking every 2 ms)
            # would take a core from the timed runs on a small machine
            for name, model in models.items():
                memory = PeakRSS()
                with kernels.forced(switches.get(name)):
                    _generate_seconds(model, prompt, new_tokens, memory, make_cache=caches.get(name))
                if memory.growth is not None:
                    peak[name].append(memory.growth)
            case = {"batch_size": batch, "prompt_length": length, "new_tokens": new_tokens, "repeats": repeats}
            for name in names:
                first = statistics.median(times[name]["first"])
                full = statistics.median(times[name]["full"])
                resolved = full > first  # else the prefill's spread hides the decoding steps: no decode figure
                if not resolved:
                    log(
                        f"    notice: {name}: generate({new_tokens}) took no longer than generate(1) in the medians "
                        f"({full:.2f} s vs {first:.2f} s): decode speed not resolved (more --new-tokens or --repeats)"
                    )
                case[name] = {
                    "prefill_s": first,
                    "generate_s": full,
                    "decode_ms_per_step": 1e3 * (full - first) / (new_tokens - 1) if resolved else None,
                    "prefill_tokens_per_s": batch * length / first,
                    "decode_tokens_per_s": batch * (new_tokens - 1) / (full - first) if resolved else None,
                    "peak_rss_growth_bytes": max(peak[name]) if peak[name] else None,
                    "cache_bytes_per_token": cache_bytes[name],
                    "cache_decoded_bytes_per_token": cache_decoded[name],  # of the above: the kept decoded copy
                    "times_s": times[name],
                }
            case["real_fp16_cache_bytes_per_token"] = cache_fp16["real"]
            case.update(ratios(case, steps))
            cases.append(case)
    return {"num_steps": steps, "cases": cases}


def ratios(case: dict, steps: int) -> dict:
    """The headline ratios of one case, from its median times (what the table prints)."""
    real, spiking = case["real"], case["spiking"]
    return {
        "decode_ratio": None
        if real["decode_ms_per_step"] is None or spiking["decode_ms_per_step"] is None
        else real["decode_ms_per_step"] / spiking["decode_ms_per_step"],
        "prefill_ratio_vs_T": spiking["prefill_s"] / (steps * real["prefill_s"]),
        "cache_ratio_vs_fp16": spiking["cache_bytes_per_token"] / case["real_fp16_cache_bytes_per_token"],
    }


def format_pair_table(report: dict) -> str:
    head = (
        f"{'batch':>5} {'prompt':>6} {'model':<16} {'prefill ms':>11} {'decode ms/step':>15} {'prefill tok/s':>14} "
        f"{'decode tok/s':>13} {'peak MB':>8} {'cache B/tok':>12}"
    )
    lines = [head, "-" * len(head)]
    steps = report["num_steps"]
    for case in report["cases"]:
        for name in [n for n in case if isinstance(case[n], dict) and "prefill_s" in case[n]]:
            r = case[name]
            peak = "-" if r["peak_rss_growth_bytes"] is None else f"{r['peak_rss_growth_bytes'] / 2**20:.0f}"
            step = "-" if r["decode_ms_per_step"] is None else f"{r['decode_ms_per_step']:.3f}"
            speed = "-" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.2f}"
            lines.append(
                f"{case['batch_size']:>5} {case['prompt_length']:>6} {name:<16} {1e3 * r['prefill_s']:>11.2f} "
                f"{step:>15} {r['prefill_tokens_per_s']:>14.1f} "
                f"{speed:>13} {peak:>8} {r['cache_bytes_per_token']:>12.1f}"
            )
        decode = "not resolved" if case["decode_ratio"] is None else f"{case['decode_ratio']:.3f}"
        lines.append(
            f"{'':>5} {'':>6} ratios: decode spiking/real {decode} "
            f"(= real ms/step / spiking ms/step); prefill spiking / (T={steps} x real) "
            f"{case['prefill_ratio_vs_T']:.3f}; cache spiking / real fp16 "
            f"({case['real_fp16_cache_bytes_per_token']:.0f} B/tok) {case['cache_ratio_vs_fp16']:.3f}"
        )
    return "\n".join(lines)


def threads_line() -> str:
    return f"torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}, torch {torch.__version__}"
