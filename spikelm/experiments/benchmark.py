"""Speed and memory of a SpikeLM encoder against its own reference path and the real-valued BERT.

For each case (a model shape, batch, sequence length and T) three models are timed side by side,
interleaved, in one process:

* ``fused``: our model as users run it (``backend="auto"``: torch.compile'd neuron loop on CPU,
  Triton on CUDA);
* ``reference``: the same model on the readable per-step path, as autograd records it;
* ``bert``: ``transformers.BertModel`` of the same shape, the real-valued floor. A spiking layer
  does T times its matrix work, so the ratios divide by ``T x`` its time.

A training step is forward + backward of ``mean(last_hidden_state ** 2)`` in train mode (dropout
0.1, no optimizer step); inference is a forward in eval mode under ``torch.inference_mode``. Memory is
the bytes autograd saves for backward (parameters excluded), and on CUDA also each path's peak
allocation during a step.
Times are medians over interleaved repetitions.

Generation (:func:`measure_generation`): a causal SpikeLM and the real-valued decoder of the same
shape continue a prompt of L - n random tokens by n greedy tokens with ``generate()``, with and
without the key/value cache. Decode speed is (n - 1) / (t(n new tokens) - t(1 new token)), so the
prefill cancels out. Without the cache every new token re-runs the whole sequence; with it only the
new token runs and its cost grows with L only through attention over the cached keys and values.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from spikelm.errors import UserError
from spikelm.models.configuration_spikelm import SpikeLMConfig
from spikelm.models.modeling_spikelm import SpikeLMModel

PATHS = ("fused", "reference", "bert")


@dataclass(frozen=True)
class Case:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    batch_size: int = 8
    seq_len: int = 128
    num_steps: int = 4

    @property
    def name(self) -> str:
        return (
            f"h{self.hidden_size}-l{self.num_hidden_layers}-a{self.num_attention_heads}-f{self.intermediate_size}"
            f"-b{self.batch_size}x{self.seq_len}-T{self.num_steps}"
        )


# the configuration of the performance issue's headline figures
HEADLINE = Case()
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def cases_for(device: str, quick: bool) -> list[Case]:
    """The cases a run measures: the headline first; the full run adds T, sequence-length and size sweeps."""
    if device == "cuda":
        base = [HEADLINE, Case(**BERT_BASE, batch_size=32, num_steps=4)]
        if quick:
            return base
        # the per-step reference path at T=8 needs more than 80 GB at batch 32: batch 16 there
        return (
            base
            + [Case(**BERT_BASE, batch_size=32, num_steps=t) for t in (1, 2)]
            + [Case(**BERT_BASE, batch_size=16, num_steps=8), Case(**BERT_BASE, batch_size=8, seq_len=512, num_steps=4)]
        )
    if quick:
        return [HEADLINE]
    return (
        [HEADLINE]
        + [Case(num_steps=t) for t in (1, 2, 8)]
        + [
            Case(seq_len=64),
            Case(seq_len=256),
            Case(hidden_size=512, num_attention_heads=8, intermediate_size=2048),
        ]
    )


def _models(case: Case, device: str):
    from transformers import BertConfig, BertModel

    shape = dict(
        vocab_size=30522,
        hidden_size=case.hidden_size,
        num_hidden_layers=case.num_hidden_layers,
        num_attention_heads=case.num_attention_heads,
        intermediate_size=case.intermediate_size,
        max_position_embeddings=max(512, case.seq_len),
    )
    ours = SpikeLMModel(SpikeLMConfig(num_steps=case.num_steps, **shape)).to(device).train()
    bert = BertModel(BertConfig(**shape)).to(device).train()
    return ours, bert


def _saved_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``forward()``, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    alive = []  # every saved tensor stays alive until the end, so no address is reused and counted twice

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        alive.append(t)
        # the graph keeps nothing: a packed tensor that is the node's own output would tie the graph
        # into a cycle through C++ that the garbage collector cannot see (a leak of the whole graph)

    def unpack(_):
        raise RuntimeError("the graph of a saved-bytes measurement is not for backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = forward()
    del out, alive[:]
    return sum(saved.values())


def measure_case(case: Case, device: str, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    ours, bert = _models(case, device)
    ids = torch.randint(1, 30522, (case.batch_size, case.seq_len), device=device)
    cuda = device == "cuda"
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def use(path):
        if path != "bert":
            ours.set_neuron_backend("auto" if path == "fused" else "reference")
            return ours
        return bert

    def forward(path):
        with autocast():
            return use(path)(input_ids=ids).last_hidden_state

    def train(path):
        model = use(path)
        model.zero_grad(set_to_none=True)
        forward(path).float().square().mean().backward()

    def infer(path):
        model = use(path).eval()  # no dropout
        with torch.inference_mode():
            forward(path)
        model.train()

    def timed(fn, path):
        sync()
        start = time.perf_counter()
        fn(path)
        sync()
        return time.perf_counter() - start

    with torch.no_grad():
        forward("fused")  # data-initialise every alpha
    for path in PATHS:  # warm up: compilation, allocator, caches
        train(path)
        infer(path)
    times = {kind: {p: [] for p in PATHS} for kind in ("train", "infer")}
    for _ in range(repeats):
        for path in PATHS:
            times["train"][path].append(timed(train, path))
            times["infer"][path].append(timed(infer, path))
    train_s = {p: statistics.median(v) for p, v in times["train"].items()}
    infer_s = {p: statistics.median(v) for p, v in times["infer"].items()}
    saved = {p: _saved_bytes(use(p), lambda p=p: forward(p)) for p in PATHS}
    result = {
        "case": case.name,
        **asdict(case),
        "train_s": train_s,
        "infer_s": infer_s,
        "infer_tokens_per_s": {p: case.batch_size * case.seq_len / t for p, t in infer_s.items()},
        "saved_bytes": saved,
        "train_ratio_vs_ann": train_s["fused"] / (case.num_steps * train_s["bert"]),
        "infer_ratio_vs_ann": infer_s["fused"] / (case.num_steps * infer_s["bert"]),
        "reference_train_ratio_vs_ann": train_s["reference"] / (case.num_steps * train_s["bert"]),
        "reference_infer_ratio_vs_ann": infer_s["reference"] / (case.num_steps * infer_s["bert"]),
        "mem_ratio_vs_reference": saved["fused"] / saved["reference"],
        "repeats": repeats,
    }
    if cuda:
        peak = {}
        for path in PATHS:
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            train(path)
            sync()
            peak[path] = torch.cuda.max_memory_allocated() - before
        result["peak_bytes"] = peak
        result["peak_mem_ratio_vs_reference"] = peak["fused"] / peak["reference"]
    ours = bert = None  # free the models (the closures above hold their cells)
    if cuda:
        torch.cuda.empty_cache()
    return result


def machine_info(device: str) -> dict:
    info = {
        "processor": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(results: list[dict]) -> str:
    head = (
        f"{'case':<40} {'train s fused/ref/bert':>26} {'xANN':>6} {'ref xANN':>8} "
        f"{'infer s fused/bert':>19} {'xANN':>6} {'tok/s fused':>11} {'saved MB fused/ref':>19} {'mem':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        tr, inf, mb = r["train_s"], r["infer_s"], {k: v / 2**20 for k, v in r["saved_bytes"].items()}
        lines.append(
            f"{r['case']:<40} {tr['fused']:>8.3f}/{tr['reference']:>7.3f}/{tr['bert']:>7.3f}  "
            f"{r['train_ratio_vs_ann']:>6.3f} {r['reference_train_ratio_vs_ann']:>8.3f} "
            f"{inf['fused']:>9.4f}/{inf['bert']:>7.4f}  {r['infer_ratio_vs_ann']:>6.3f} "
            f"{r['infer_tokens_per_s']['fused']:>11.0f} {mb['fused']:>9.1f}/{mb['reference']:>8.1f}  "
            f"{r['mem_ratio_vs_reference']:>5.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Generation with and without the key/value cache
# ----------------------------------------------------------------------------------------------

GENERATION_SHAPE = dict(
    vocab_size=50257, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, num_steps=4
)


def _causal_model(spiking: bool, max_length: int, device: str):
    from spikelm.models.modeling_spikelm_causal import SpikeLMForCausalLM

    config = SpikeLMConfig(
        **GENERATION_SHAPE,
        max_position_embeddings=max_length,
        position_embedding_type="rotary",
        spiking=spiking,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(config).to(device).eval()
    with torch.no_grad():  # data-initialise the alphas, as a trained model has them
        model(torch.randint(0, config.vocab_size, (2, min(64, max_length)), device=device))
    return model


def _cache_bytes_per_token(model, device: str) -> float:
    """Bytes the model's own cache holds per token (all layers), from a real prefill."""
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device=device)
    with torch.no_grad():
        cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
    total = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )
    return total / prompt.numel()


def _generation_speed(model, length: int, new_tokens: int, use_cache: bool, repeats: int, device: str) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (1, length - new_tokens), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def seconds(n):
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(
                    prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0
                )
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    full, first = seconds(new_tokens), seconds(1)
    decode = max(full - first, 1e-9) / (new_tokens - 1)
    return {
        "length": length,
        "use_cache": use_cache,
        "seconds_total": full,
        "seconds_prefill_and_first": first,
        "ms_per_decoded_token": 1e3 * decode,
        "decode_tokens_per_s": 1 / decode,
    }


def measure_generation(lengths: list[int], device: str, repeats: int = 3, new_tokens: int = 16) -> dict:
    """Decode tokens/s with and without the cache at each total length, spiking vs real-valued decoder."""
    if min(lengths) <= new_tokens:
        raise UserError(f"generation lengths must exceed the {new_tokens} generated tokens, got {lengths}")
    report = {
        "shape": GENERATION_SHAPE,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "models": {},
        # a real-valued fp16 cache: K and V of hidden_size each, 2 bytes, per layer
        "fp16_real_valued_cache_bytes_per_token": 2
        * 2
        * GENERATION_SHAPE["hidden_size"]
        * GENERATION_SHAPE["num_hidden_layers"],
    }
    for name, spiking in (("spiking", True), ("real_valued", False)):
        model = _causal_model(spiking, max(lengths), device)
        for use_cache in (True, False):  # warm up both paths (allocator, compilation, caches)
            _generation_speed(model, min(lengths), new_tokens, use_cache, 1, device)
        runs = [
            _generation_speed(model, length, new_tokens, use_cache, repeats, device)
            for length in lengths
            for use_cache in (True, False)
        ]
        report["models"][name] = {
            "num_steps": model.config.effective_num_steps,
            "cache_bytes_per_token": _cache_bytes_per_token(model, device),
            "runs": runs,
        }
        del model
    return report


def format_generation_table(report: dict) -> str:
    lines = [
        f"{'decoder':<12} {'length':>6} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speed-up':>9} "
        f"{'cache ms/tok':>13} {'cache B/token':>14}"
    ]
    lines.append("-" * len(lines[0]))
    for name, model in report["models"].items():
        for length in sorted({r["length"] for r in model["runs"]}):
            cached, uncached = (
                next(r for r in model["runs"] if r["length"] == length and r["use_cache"] == c) for c in (True, False)
            )
            lines.append(
                f"{name:<12} {length:>6} {cached['decode_tokens_per_s']:>12.1f} "
                f"{uncached['decode_tokens_per_s']:>15.1f} "
                f"{cached['decode_tokens_per_s'] / uncached['decode_tokens_per_s']:>8.1f}x "
                f"{cached['ms_per_decoded_token']:>13.2f} {model['cache_bytes_per_token']:>14.0f}"
            )
    lines.append(f"(a real-valued fp16 cache holds {report['fp16_real_valued_cache_bytes_per_token']} bytes/token)")
    return "\n".join(lines)
