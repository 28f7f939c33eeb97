"""The whole GPU run of issue 26 in one process: converted SmolLM2 on CUDA (correctness, speed), ternary T=4
distillation from the real model for a time budget, and the suite's CUDA tests; stops by itself inside its budget.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_run.py --payload DIR [DIR...] --out $OUT [--budget-seconds 480]
    python benchmarks/gpu_run.py --tiny --device cpu --out /tmp/x --budget-seconds 60     # the CPU test's run

``--payload``: the part folders written by ``benchmarks/gpu_payload.py`` (the float32 SmolLM2 is rebuilt from them
without ``gguf``, bit for bit, together with the uint16 ``pypi`` and Brown tokens). ``--tiny``: a tiny random LLaMA
built from a config (weights put on the Q4_1 / Q8_0 grids and sent through the same payload code) and random token
arrays, at tiny sizes: the whole flow in seconds on a CPU.

Sections, each skipped with ``--skip NAME`` and each recording its settings, and its errors as data:

* ``correctness``: each converted model (recipe ``gif``, the default; ``elastic``, ternary T=4) in float32 and
  bfloat16 on the device against the same model on the CPU, on the same input: logits (max |diff|, argmax flips)
  and the neurons' outputs (fraction of elements that differ); cached == uncached greedy generation on the device.
  The real-valued source is compared the same way, for scale.
* ``speed``: prefill and decode tokens/s of the real model and each converted model (bfloat16 by default), batch
  1 and 32, prompt 128 and 1,024, interleaved in one process (medians over repeats; prefill = generate(1),
  decode = (generate(n) - generate(1)) / (n - 1) steps), the device memory of each (parameters; peak during one
  generate), then the same at batch 1, prompt 128 with ``torch.compile`` of the forward (where it runs).
* ``distill``: ternary elastic T=4 student distilled from the real model (bfloat16 teacher, bfloat16 autocast,
  AdamW, a linear warm-up and decay over the section's time, not over steps) on the ``pypi`` training tokens;
  held-out KL and perplexity on ``pypi`` validation blocks and the Brown perplexity against tokens seen (JSON and
  ``distill_curve.png``), training tokens/s.
* ``cuda_tests``: ``pytest -m gpu`` on the test files that hold the suite's GPU tests (a subprocess, timed out).

Results: ``<out>/gpu_run.json``, written after every figure and at least every 30 s by a thread, so a run cut
short still leaves its numbers; it stops itself (a timer) ``--margin-seconds`` before ``--budget-seconds``.

Versions: written for the device machine's torch 2.11 and transformers 5.17 as well as this project's pins; the
APIs used are ones both have (``generate`` with ``max_new_tokens``/``min_new_tokens``/``use_cache``,
``torch.amp.autocast``, ``torch.compile``, ``torch.cuda`` memory statistics). Not checked here (no such
environment on the CPU machine): spikelm's conversion internals (its attention interface and cache layers, which
follow transformers' private modules) under transformers 5.17; any failure there is recorded as an error.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_payload  # noqa: E402  (this folder: numpy and the standard library only)

SECTIONS = ("correctness", "speed", "distill", "cuda_tests")
# each section's share of the time left after setup (the last one run takes all that is left)
SHARES = {"correctness": 0.15, "speed": 0.35, "distill": 0.35, "cuda_tests": 0.12}
GPU_TEST_FILES = ("tests/test_kernels.py", "tests/test_gif.py", "tests/test_monitor.py", "tests/test_rotation.py")
RESULTS = "gpu_run.json"
CURVE = "distill_curve.png"
TEST_LOG = "cuda_tests.log"


class OutOfTime(BaseException):
    """The run's (``whole``) or a section's time is up (raised by the timer, wherever the run is)."""

    def __init__(self, whole: bool):
        super().__init__("the run's time is up" if whole else "the section's time is up")
        self.whole = whole


class Clock:
    """The run's deadline and, inside a section, the section's: a SIGALRM timer raises :class:`OutOfTime`."""

    def __init__(self, budget: float, margin: float):
        self.start = time.monotonic()
        self.end = self.start + max(1.0, budget - margin)
        self.section_end = None
        signal.signal(signal.SIGALRM, self._fire)
        self._arm()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        end = self.end if self.section_end is None else min(self.end, self.section_end)
        return end - time.monotonic()

    def _arm(self):
        end = self.end if self.section_end is None else min(self.end, self.section_end)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, end - time.monotonic()))

    def _fire(self, signum, frame):
        now = time.monotonic()
        if now >= self.end - 0.005:
            raise OutOfTime(whole=True)
        if self.section_end is not None and now >= self.section_end - 0.005:
            self.section_end = None
            self._arm()
            raise OutOfTime(whole=False)
        self._arm()

    def section(self, seconds: float):
        self.section_end = time.monotonic() + max(0.0, seconds)
        self._arm()

    def end_section(self):
        self.section_end = None
        self._arm()

    def stop(self):
        signal.setitimer(signal.ITIMER_REAL, 0)


class Results:
    """The run's JSON: saved atomically after every figure and every 30 s by a thread."""

    def __init__(self, out: Path):
        self.path = out / RESULTS
        self.data: dict = {"status": "running", "sections": {}}
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(30):
            try:
                self.save()
            except (RuntimeError, ValueError, OSError):  # a dict changed under it: the next save will do
                pass

    def section(self, name: str) -> dict:
        with self.lock:
            return self.data["sections"].setdefault(name, {"status": "running"})

    def save(self):
        with self.lock:
            text = json.dumps(self.data, indent=1, default=_jsonable, allow_nan=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, self.path)

    def close(self):
        self._stop.set()
        self.save()


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def error_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:500]


def log(clock: Clock, message: str):
    print(f"[{clock.elapsed():6.1f} s] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Setup: the payload, the models
# ----------------------------------------------------------------------------------------------

TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def tiny_payload(folder: Path, seed: int = 0) -> list[Path]:
    """A tiny random LLaMA (weights on the Q4_1 grid, the embedding on Q8_0's) and random tokens, as a payload."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = tensor.detach().float().numpy().copy()
        if a.ndim == 2:
            a = gpu_payload.to_q8_0_grid(a) if "embed" in name else gpu_payload.to_q4_1_grid(a)
        state[name] = a
    tensors, streams = gpu_payload.pack_state_dict(state)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 20000), ("validation", 4000)):
        arrays[f"pypi_{split}"] = rng.integers(3, config.vocab_size, n).astype(np.uint16)
        arrays[f"pypi_{split}_offsets"] = np.array([0, n // 2, n], np.uint32)
    arrays["brown"] = rng.integers(3, config.vocab_size, 1024).astype(np.uint16)
    refs = gpu_payload.add_token_arrays(streams, arrays)
    files = {"config.json": config.to_json_string().encode()}
    gpu_payload.write_payload(folder, tensors, streams, files, {"model": "tiny-llama", "token_arrays": refs}, 8.0)
    return sorted(folder.glob("part*"))


def settings(args) -> dict:
    """Sizes of the run: the real one, or tiny ones (--tiny)."""
    if args.tiny:
        return {
            "calibration": (4, 32),
            "correctness_shape": (2, 16),
            "greedy": (12, 6),
            "speed_batches": (1, 2),
            "speed_prompts": (8, 16),
            "new_tokens": 4,
            "repeats": 1,
            "compile_case": (1, 8),
            "distill_length": 32,
            "distill_batch": 4,
            "eval_blocks": 2,
            "brown_window": 64,
            "brown_tokens": 256,
            "distill_evals": 3,
        }
    return {
        "calibration": (32, 512),
        "correctness_shape": (2, 128),
        "greedy": (32, 24),
        "speed_batches": (1, 32),
        "speed_prompts": (128, 1024),
        "new_tokens": 32,
        "repeats": 3,
        "compile_case": (1, 128),
        "distill_length": 512,
        "distill_batch": 16,
        "eval_blocks": 16,
        "brown_window": 512,
        "brown_tokens": 32768,
        "distill_evals": 5,
    }


def load_model(path, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    import spikelm  # noqa: F401  (a converted directory loads spiking)
    from spikelm.evaluation.loading import load_pretrained

    model = load_pretrained(AutoModelForCausalLM, path, dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    return model


def convert(source: Path, recipe_name: str, num_steps, calibration, device, out_dir: Path) -> Path:
    """Spikify the source (float32, on ``device``) with a named recipe, calibrated; saved to ``out_dir``."""
    import torch

    import spikelm.conversion as conversion
    from spikelm.conversion.recipes import recipe

    model = load_model(source, device, torch.float32)
    fields = recipe(recipe_name, num_steps)
    conversion.spikify(
        model, conversion.SpikeLMConversionConfig(**fields), calibration=[c.to(device) for c in calibration]
    )
    model.save_pretrained(out_dir)
    del model
    return out_dir


def _tokens(array: np.ndarray, rows: int, length: int, start: int = 0):
    import torch

    need = rows * length
    if len(array) - start < need:
        raise ValueError(f"{need} tokens asked from an array of {len(array) - start}")
    return torch.from_numpy(array[start : start + need].astype(np.int64)).view(rows, length)


def environment(device: str) -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_bytes=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    try:
        info["git_commit"] = (
            subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# (a) correctness
# ----------------------------------------------------------------------------------------------


def _neuron_outputs(model):
    from spikelm.conversion.placement import neurons

    captured, handles = {}, []
    for name, neuron in neurons(model):
        handles.append(
            neuron.register_forward_hook(
                lambda module, args, output, name=name: captured.__setitem__(
                    name, (output[0] if isinstance(output, tuple) else output).detach().float().cpu()
                )
            )
        )
    return captured, handles


def compare_paths(path, ids, device, dtype) -> dict:
    """Logits and neuron outputs of the model at ``path`` on ``device`` against the CPU, same dtype, same input."""
    import torch

    result = {}
    outputs = {}
    for where in ("cpu", device):
        model = load_model(path, where, dtype)
        captured, handles = _neuron_outputs(model)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(where), use_cache=False).logits.float().cpu()
        for h in handles:
            h.remove()
        outputs[where] = (logits, dict(captured))
        del model
    (a, na), (b, nb) = outputs["cpu"], outputs[device]
    diff = (a - b).abs()
    result.update(
        logits_max_abs_diff=float(diff.max()),
        logits_mean_abs_diff=float(diff.mean()),
        logits_max_abs=float(a.abs().max()),
        argmax_flips=int((a.argmax(-1) != b.argmax(-1)).sum()),
        positions=int(a.shape[0] * a.shape[1]),
        finite=bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
    )
    if na:
        differ = sum(int((na[k] != nb[k]).sum()) for k in na)
        total = sum(na[k].numel() for k in na)
        result.update(
            neurons=len(na),
            neuron_elements=total,
            neuron_elements_differing=differ,
            neuron_fraction_differing=differ / max(1, total),
        )
    return result


def greedy_cached_vs_uncached(path, prompt, new_tokens, device, dtype) -> dict:
    import torch

    model = load_model(path, device, dtype)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    outs = {}
    with torch.inference_mode():
        for cached in (True, False):
            outs[cached] = model.generate(
                prompt.to(device),
                attention_mask=torch.ones_like(prompt).to(device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=cached,
                pad_token_id=pad,
            )[:, prompt.shape[1] :].cpu()
    same = outs[True] == outs[False]
    first = int((~same[0]).nonzero()[0]) if not bool(same.all()) else None
    return {
        "equal": bool(same.all()),
        "new_tokens": new_tokens,
        "first_difference": first,
        "cached": outs[True][0].tolist(),
    }


def run_correctness(ctx, section: dict):
    import torch

    s = ctx["settings"]
    rows, length = s["correctness_shape"]
    ids = _tokens(ctx["tokens"]["pypi_validation"], rows, length)
    prompt_len, new_tokens = s["greedy"]
    prompt = _tokens(ctx["tokens"]["pypi_validation"], 1, prompt_len, start=rows * length)
    section["settings"] = {
        "input": f"{rows} x {length} tokens of the pypi validation split",
        "greedy_prompt": prompt_len,
        "greedy_new_tokens": new_tokens,
        "reference": "the same model on the CPU",
    }
    cases = section.setdefault("cases", [])
    for model_name, path in ctx["models"].items():
        for dtype in (torch.float32, torch.bfloat16):
            case = {"model": model_name, "dtype": str(dtype).replace("torch.", "")}
            cases.append(case)
            try:
                case.update(compare_paths(path, ids, ctx["device"], dtype))
                if model_name != "real":
                    case["greedy"] = greedy_cached_vs_uncached(path, prompt, new_tokens, ctx["device"], dtype)
            except Exception as err:  # noqa: BLE001 - an error is a result
                case["error"] = error_line(err)
            ctx["results"].save()
            log(
                ctx["clock"],
                f"correctness {model_name} {case['dtype']}: "
                f"{ {k: v for k, v in case.items() if k not in ('model', 'dtype')} }",
            )


# ----------------------------------------------------------------------------------------------
# (b) speed
# ----------------------------------------------------------------------------------------------


def _generate_seconds(model, prompt, new_tokens, device) -> float:
    import torch

    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    _sync(device)
    seconds = time.perf_counter() - start
    if out.shape[1] - prompt.shape[1] != new_tokens:
        raise RuntimeError(f"generate() made {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")
    return seconds


def _memory(model, prompt, new_tokens, device) -> dict:
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if not str(device).startswith("cuda"):
        return {"parameter_bytes": params}
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _generate_seconds(model, prompt, new_tokens, device)
    return {
        "parameter_bytes": params,
        "allocated_before_bytes": base,
        "peak_growth_bytes": torch.cuda.max_memory_allocated() - base,
    }


def measure_case(models: dict, batch, length, new_tokens, repeats, device, vocab, seed=0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(min(100, vocab - 1), vocab, (batch, length), generator=generator).to(device)
    for model in models.values():  # warm-up: allocator, kernels
        _generate_seconds(model, prompt, 2, device)
    times = {name: {"first": [], "full": []} for name in models}
    for _ in range(repeats):
        for name, model in models.items():  # interleaved
            times[name]["first"].append(_generate_seconds(model, prompt, 1, device))
            times[name]["full"].append(_generate_seconds(model, prompt, new_tokens, device))
    case = {"batch_size": batch, "prompt_length": length, "new_tokens": new_tokens, "repeats": repeats}
    for name in models:
        first, full = statistics.median(times[name]["first"]), statistics.median(times[name]["full"])
        resolved = full > first
        case[name] = {
            "prefill_s": first,
            "generate_s": full,
            "prefill_tokens_per_s": batch * length / first,
            "decode_ms_per_step": 1e3 * (full - first) / (new_tokens - 1) if resolved else None,
            "decode_tokens_per_s": batch * (new_tokens - 1) / (full - first) if resolved else None,
            "times_s": times[name],
        }
    for name, model in models.items():
        try:
            case[name]["memory"] = _memory(model, prompt, new_tokens, device)
        except Exception as err:  # noqa: BLE001
            case[name]["memory"] = {"error": error_line(err)}
    real = case.get("real", {})
    for name in models:
        if name != "real" and real.get("decode_tokens_per_s") and case[name]["decode_tokens_per_s"]:
            case[f"{name}_decode_ratio_vs_real"] = case[name]["decode_tokens_per_s"] / real["decode_tokens_per_s"]
        if name != "real" and real:
            case[f"{name}_prefill_ratio_vs_real"] = case[name]["prefill_tokens_per_s"] / real["prefill_tokens_per_s"]
    return case


def run_speed(ctx, section: dict):
    import torch

    s = ctx["settings"]
    dtype = getattr(torch, ctx["args"].speed_dtype)
    device = ctx["device"]
    section["settings"] = {
        "dtype": ctx["args"].speed_dtype,
        "batch_sizes": s["speed_batches"],
        "prompt_lengths": s["speed_prompts"],
        "new_tokens": s["new_tokens"],
        "repeats": s["repeats"],
        "timing": "medians; prefill = generate(1), decode = (generate(n) - generate(1)) / (n - 1); greedy; "
        "random prompt ids; models interleaved",
    }
    models = {name: load_model(path, device, dtype) for name, path in ctx["models"].items()}
    vocab = models["real"].config.vocab_size
    cases = section.setdefault("cases", [])
    for batch in s["speed_batches"]:
        for length in s["speed_prompts"]:
            try:
                case = measure_case(models, batch, length, s["new_tokens"], s["repeats"], device, vocab)
            except Exception as err:  # noqa: BLE001
                case = {"batch_size": batch, "prompt_length": length, "error": error_line(err)}
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            cases.append(case)
            ctx["results"].save()
            log(ctx["clock"], "speed " + json.dumps({k: v for k, v in case.items() if not isinstance(v, dict)}))
            for name in models:
                if isinstance(case.get(name), dict):
                    log(
                        ctx["clock"],
                        f"  {name}: prefill {case[name]['prefill_tokens_per_s']:.0f} tok/s, decode "
                        f"{case[name]['decode_tokens_per_s']} tok/s",
                    )
    # torch.compile of the forward, one case (the compile time is recorded, not timed as speed)
    batch, length = s["compile_case"]
    compiled = section.setdefault(
        "compiled", {"batch_size": batch, "prompt_length": length, "mode": ctx["args"].compile_mode}
    )
    if ctx["args"].no_compile:
        compiled["status"] = "skipped (--no-compile)"
        return
    for name, model in models.items():
        entry = compiled.setdefault(name, {})
        try:
            started = time.perf_counter()
            model.forward = torch.compile(model.forward, mode=ctx["args"].compile_mode, dynamic=True)
            vocab = model.config.vocab_size
            case = measure_case({name: model}, batch, length, s["new_tokens"], s["repeats"], device, vocab)
            entry.update(case[name], wall_s_with_compile=time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001
            entry["error"] = error_line(err)
        ctx["results"].save()
        log(ctx["clock"], f"compiled {name}: {entry.get('error') or entry.get('decode_tokens_per_s')}")


# ----------------------------------------------------------------------------------------------
# (c) distillation
# ----------------------------------------------------------------------------------------------


def _kl(student_logits, teacher_logits):
    """Mean over tokens of KL(teacher || student), float32."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _evaluate(student, teacher, blocks, brown, window, device, teacher_cache) -> dict:
    """Held-out KL and perplexities on ``blocks`` (rows of tokens), the student's Brown perplexity (disjoint windows
    of ``window``, each scoring the tokens after its first)."""
    import torch
    import torch.nn.functional as F

    student.eval()
    kl_sum = nll_s = nll_t = 0.0
    count = 0
    with torch.inference_mode():
        for i in range(0, len(blocks), 4):
            ids = blocks[i : i + 4].to(device)
            s = student(input_ids=ids, use_cache=False).logits.float()
            t = teacher(input_ids=ids, use_cache=False).logits.float()
            n = ids.shape[0] * (ids.shape[1] - 1)
            kl_sum += float(_kl(s[:, :-1], t[:, :-1])) * n
            target = ids[:, 1:].reshape(-1)
            nll_s += float(F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), target, reduction="sum"))
            nll_t += float(F.cross_entropy(t[:, :-1].reshape(-1, t.shape[-1]), target, reduction="sum"))
            count += n

        def brown_nll(model):
            total, scored = 0.0, 0
            for i in range(0, len(brown), 4):
                ids = brown[i : i + 4].to(device)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                total += float(
                    F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                    )
                )
                scored += ids.shape[0] * (ids.shape[1] - 1)
            return total / scored, scored

        brown_s, scored = brown_nll(student)
        if "brown" not in teacher_cache:
            teacher_cache["brown"] = brown_nll(teacher)[0]
    student.train()
    return {
        "heldout_kl": kl_sum / count,
        "val_perplexity": math.exp(nll_s / count),
        "teacher_val_perplexity": math.exp(nll_t / count),
        "brown_perplexity": math.exp(brown_s),
        "teacher_brown_perplexity": math.exp(teacher_cache["brown"]),
        "brown_tokens_scored": scored,
        "heldout_tokens": count,
    }


def plot_curve(curve: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return error_line(err)
    tokens = [p["tokens"] for p in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(tokens, [p["heldout_kl"] for p in curve], "o-")
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("held-out KL (nats/token)")
    ax2.plot(tokens, [p["brown_perplexity"] for p in curve], "o-", label="student")
    ax2.axhline(curve[0]["teacher_brown_perplexity"], color="gray", ls="--", label="teacher")
    ax2.set_yscale("log")
    ax2.set_xlabel("training tokens")
    ax2.set_ylabel("Brown perplexity")
    ax2.legend()
    fig.suptitle("ternary elastic T=4 student distilled from its real-valued source")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _train_step(teacher, student, optimizer, ids, amp):
    import torch

    with torch.no_grad(), torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    with torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
        s_logits = student(input_ids=ids, use_cache=False).logits
    loss = _kl(s_logits[:, :-1], t_logits[:, :-1])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_distill(ctx, section: dict):
    import torch

    args, s, device, clock = ctx["args"], ctx["settings"], ctx["device"], ctx["clock"]
    length, batch = s["distill_length"], args.distill_batch or s["distill_batch"]
    seconds = clock.left()
    train = ctx["tokens"]["pypi_train"]
    val = ctx["tokens"]["pypi_validation"]
    blocks = _tokens(val, min(s["eval_blocks"], len(val) // length), length)
    window = s["brown_window"]
    brown_tokens = ctx["tokens"]["brown"][: s["brown_tokens"]]
    brown = _tokens(brown_tokens, len(brown_tokens) // window, window)
    amp = device.startswith("cuda")
    section["settings"] = {
        "student": "recipe elastic, T=4 (ternary, symmetric reset, Hadamard rotations), float32 weights",
        "teacher": "the real-valued source, " + ("bfloat16" if amp else "float32"),
        "autocast": "bfloat16" if amp else "none",
        "loss": "KL(teacher || student) per token, temperature 1",
        "optimizer": f"AdamW lr {args.lr} peak, betas (0.9, 0.999), weight decay 0, grad clip 1.0",
        "schedule": f"linear warm-up over {args.warmup_fraction} of the section's time, then linear decay to 0 at "
        "its end (time-based)",
        "block_length": length,
        "batch_size": batch,
        "train_tokens_available": int(len(train)),
        "heldout": f"{len(blocks)} blocks x {length} tokens of the pypi validation split",
        "brown": f"{brown.numel()} tokens in {len(brown)} disjoint windows of {window}",
        "section_seconds": seconds,
    }
    gc.collect()  # the speed section's models
    if amp:
        torch.cuda.empty_cache()
    teacher = load_model(ctx["models"]["real"], device, torch.bfloat16 if amp else torch.float32)
    teacher.requires_grad_(False)
    student = load_model(ctx["models"]["elastic"], device, torch.float32)
    for p in student.parameters():
        p.requires_grad_(True)
    for module in student.modules():
        if isinstance(getattr(module, "learn_alpha", None), bool) and getattr(module, "use_amplitude", True):
            module.learn_alpha = True
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    curve = section.setdefault("curve", [])
    teacher_cache = {}
    rng = np.random.default_rng(0)
    starts = rng.permutation(len(train) // length) * length
    tokens_seen = steps = 0
    train_seconds = 0.0
    eval_cost = 0.0

    def evaluate():
        nonlocal eval_cost
        t0 = time.perf_counter()
        point = {
            "step": steps,
            "tokens": tokens_seen,
            "train_seconds": train_seconds,
            **_evaluate(student, teacher, blocks, brown, window, device, teacher_cache),
        }
        eval_cost = time.perf_counter() - t0
        point["eval_seconds"] = eval_cost
        curve.append(point)
        section.update(
            tokens_seen=tokens_seen,
            steps=steps,
            train_seconds=train_seconds,
            tokens_per_s=tokens_seen / train_seconds if train_seconds else None,
        )
        ctx["results"].save()
        log(
            clock,
            f"distill step {steps}, {tokens_seen} tokens: held-out KL {point['heldout_kl']:.4f}, Brown "
            f"perplexity {point['brown_perplexity']:.2f} (teacher {point['teacher_brown_perplexity']:.2f})",
        )

    evaluate()
    # the schedule runs over what is left of the section once the models are loaded and the first point taken
    t_start = time.perf_counter()
    end = t_start + clock.left() - 2 * eval_cost - 3
    eval_every = (end - t_start) / max(1, s["distill_evals"])
    next_eval = t_start + eval_every
    section["train_window_s"] = end - t_start
    position = 0
    while time.perf_counter() < end:
        frac = (time.perf_counter() - t_start) / max(1e-9, end - t_start)
        lr = args.lr * (
            frac / args.warmup_fraction
            if frac < args.warmup_fraction
            else max(0.0, (1 - frac) / (1 - args.warmup_fraction))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = []
        for _ in range(batch):
            rows.append(starts[position % len(starts)])
            position += 1
        ids = torch.stack([torch.from_numpy(train[r : r + length].astype(np.int64)) for r in rows]).to(device)
        _sync(device)
        t0 = time.perf_counter()
        try:
            loss = _train_step(teacher, student, optimizer, ids, amp)
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            loss = None
        if loss is None:  # out of memory: half the batch, the step not taken
            gc.collect()
            torch.cuda.empty_cache()
            if batch == 1:
                raise RuntimeError("out of GPU memory at batch 1")
            batch //= 2
            section.setdefault("notes", []).append(f"out of memory at step {steps + 1}: batch now {batch}")
            section["batch_size_used"] = batch
            continue
        _sync(device)
        train_seconds += time.perf_counter() - t0
        steps += 1
        tokens_seen += ids.numel()
        value = float(loss.detach())
        if not math.isfinite(value):
            section["error"] = f"the loss became {value} at step {steps}"
            break
        section.setdefault("train_loss", []).append([steps, tokens_seen, value, lr])
        if time.perf_counter() >= next_eval:
            evaluate()
            next_eval = time.perf_counter() + eval_every
    if not curve or curve[-1]["step"] != steps:
        evaluate()


# ----------------------------------------------------------------------------------------------
# (d) the suite's CUDA tests
# ----------------------------------------------------------------------------------------------


def run_cuda_tests(ctx, section: dict):
    root = Path(__file__).resolve().parent.parent
    files = [f for f in ctx["args"].test_files if (root / f).is_file()]
    timeout = max(5.0, ctx["clock"].left() - 3)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    log_path = Path(ctx["args"].out) / TEST_LOG
    section["settings"] = {
        "command": " ".join(cmd[1:]),
        "timeout_s": timeout,
        "log": TEST_LOG,
        "note": "the tests marked gpu; they skip without CUDA",
    }
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        with open(log_path, "w") as log_file:
            res = subprocess.run(cmd, cwd=root, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        section["returncode"] = res.returncode
    except subprocess.TimeoutExpired:
        section["error"] = f"pytest did not finish in {timeout:.0f} s"
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.is_file() else []
    section.update(summary=lines[-1] if lines else "", tail=lines[-25:])


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--payload", nargs="*", default=[], help="payload part folders, or folders holding them (gpu_payload.py)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default $OUT)")
    parser.add_argument("--budget-seconds", type=float, default=480.0)
    parser.add_argument(
        "--margin-seconds",
        type=float,
        default=None,
        help="stop this long before the budget (default 5 %% of it, at least 3 s)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaMA and random tokens (CPU test)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    parser.add_argument("--speed-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile case in the speed section")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default 'default')")
    parser.add_argument("--lr", type=float, default=1e-4, help="distillation peak learning rate")
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--distill-batch", type=int, default=None)
    parser.add_argument(
        "--shares",
        default=",".join(f"{k}={v}" for k, v in SHARES.items()),
        help="each section's share of the time left after setup, NAME=FRACTION,... (default %(default)s)",
    )
    parser.add_argument("--test-files", nargs="*", default=list(GPU_TEST_FILES))
    parser.add_argument("--work-dir", default=None, help="where the model directories go (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        shares = dict(SHARES)
        for item in filter(None, args.shares.split(",")):
            name, _, value = item.partition("=")
            if name not in SHARES or not float(value) > 0:
                raise ValueError(item)
            shares[name] = float(value)
        args.shares = shares
    except ValueError as err:
        parser.error(f"--shares: expected NAME=FRACTION (NAME one of {', '.join(SECTIONS)}, FRACTION > 0), got {err}")
    if not args.out:
        parser.error("--out is required where $OUT is not set")
    if not args.tiny and not args.payload:
        parser.error("give --payload PART_DIR... (benchmarks/gpu_payload.py) or --tiny")
    return args


def setup(ctx, work: Path):
    import torch

    args, clock, results = ctx["args"], ctx["clock"], ctx["results"]
    setup_info = results.data.setdefault("setup", {})
    dirs = gpu_payload.expand_dirs(args.payload)
    if args.tiny:
        dirs = tiny_payload(work / "tiny_payload")
    t0 = time.perf_counter()
    model_dir = work / "real"
    index, streams = gpu_payload.unpack_model(dirs, model_dir)
    names = [n for n in index["token_arrays"] if not n.endswith("_offsets")]
    ctx["tokens"] = {n: gpu_payload.token_array(index, streams, n) for n in names}
    setup_info.update(
        model=index.get("model"),
        payload_parts=[str(d) for d in dirs],
        unpack_s=time.perf_counter() - t0,
        tokens={n: int(len(a)) for n, a in ctx["tokens"].items()},
    )
    log(clock, f"payload unpacked into {model_dir} ({setup_info['unpack_s']:.1f} s): {setup_info['tokens']}")
    s = ctx["settings"]
    calib = _tokens(ctx["tokens"]["pypi_train"], *s["calibration"])
    calibration = list(calib.split(4))
    ctx["models"] = {"real": model_dir}
    conversions = setup_info.setdefault("conversions", {})
    for name, recipe_name, steps in (("gif", "gif", None), ("elastic", "elastic", 4)):
        t0 = time.perf_counter()
        try:
            ctx["models"][name] = convert(model_dir, recipe_name, steps, calibration, ctx["device"], work / name)
            conversions[name] = {
                "recipe": recipe_name,
                "num_steps": steps,
                "seconds": time.perf_counter() - t0,
                "calibration": f"{calib.shape[0]} x {calib.shape[1]} pypi training tokens",
            }
        except Exception as err:  # noqa: BLE001
            conversions[name] = {"error": error_line(err), "traceback": traceback.format_exc()[-2000:]}
        results.save()
        log(clock, f"converted {name}: {conversions[name]}")
    if str(ctx["device"]).startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    margin = args.margin_seconds if args.margin_seconds is not None else max(3.0, 0.05 * args.budget_seconds)
    clock = Clock(args.budget_seconds, margin)
    results = Results(out)
    results.data["args"] = vars(args)
    results.data["budget"] = {"seconds": args.budget_seconds, "margin_seconds": margin}
    ctx = {"args": args, "clock": clock, "results": results}
    work_tmp = None
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ctx["device"] = device
        ctx["settings"] = settings(args)
        results.data["environment"] = environment(device)
        results.data["settings"] = copy.deepcopy(ctx["settings"])
        results.save()
        log(clock, f"environment: {results.data['environment']}")
        if args.work_dir:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work_tmp = tempfile.TemporaryDirectory(prefix="gpu_run-")
            work = Path(work_tmp.name)
        setup(ctx, work)
        runners = {
            "correctness": run_correctness,
            "speed": run_speed,
            "distill": run_distill,
            "cuda_tests": run_cuda_tests,
        }
        needs_models = {"correctness": ("real",), "speed": ("real",), "distill": ("real", "elastic")}
        todo = [name for name in SECTIONS if name not in args.skip]
        for name in SECTIONS:
            if name in args.skip:
                results.section(name).update(status="skipped (--skip)")
        for i, name in enumerate(todo):
            section = results.section(name)
            missing = [m for m in needs_models.get(name, ()) if m not in ctx["models"]]
            if missing:
                section.update(status=f"not run: no {', '.join(missing)} model (see setup)")
                continue
            share = args.shares[name] / (sum(args.shares[n] for n in todo[i:]))
            seconds = clock.left() * share
            section["time_given_s"] = seconds
            log(clock, f"section {name}: {seconds:.0f} s")
            clock.section(seconds)
            t0 = time.perf_counter()
            try:
                runners[name](ctx, section)
                section["status"] = "done"
            except OutOfTime as err:
                if err.whole:
                    section["status"] = "stopped: the run's time was up"
                    raise
                section["status"] = "stopped: the section's time was up"
            except Exception as err:  # noqa: BLE001 - recorded, the next section runs
                section.update(status="error", error=error_line(err), traceback=traceback.format_exc()[-3000:])
            finally:
                clock.end_section()
                section["seconds"] = time.perf_counter() - t0
                results.save()
            if name == "distill" and section.get("curve"):
                problem = plot_curve(section["curve"], out / CURVE)
                section["curve_png"] = CURVE if problem is None else f"not drawn: {problem}"
            log(clock, f"section {name}: {section['status']} ({section['seconds']:.1f} s)")
        results.data["status"] = "done"
    except OutOfTime:
        results.data["status"] = "stopped: the run's time was up"
        for name in SECTIONS:
            section = results.section(name)
            if section.get("status") == "running":
                section["status"] = (
                    "not reached: the run's time was up" if len(section) == 1 else ("stopped: the run's time was up")
                )
        log(clock, "out of time: stopping")
    except Exception as err:  # noqa: BLE001
        results.data.update(status="error", error=error_line(err), traceback=traceback.format_exc()[-3000:])
        log(clock, f"error: {error_line(err)}")
    finally:
        clock.stop()
        results.data["elapsed_s"] = clock.elapsed()
        results.close()
        if work_tmp is not None:
            work_tmp.cleanup()
    print(f"results: {out / RESULTS} ({results.data['status']}, {clock.elapsed():.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
