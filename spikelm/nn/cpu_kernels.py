"""C++ kernels for the decoding steps of spiking models on CPU: few-row linears, the neuron, the packed K/V cache.

At batch 1 a decoding step of a spiking model runs every spiking layer on M = B*T rows (the T copies of each of the
B tokens) and does ~30 tiny PyTorch operations per neuron; the real-valued model it is compared with runs one row
per linear and no neurons. On a CPU the step is bound by reading the weights and by the per-operation dispatch, not
by arithmetic. Four operations of one C++ extension (built on first use) take those costs out:

* :func:`few_rows_linear` -- :func:`spikelm.nn.exact.exact_linear` (``F.linear(x, W, b)`` accumulated in float64,
  rounded once to float32) for 1 to 16 rows: each weight row is read once, in order, for all M rows
  (the threads take contiguous blocks of outputs, so each streams one piece of the weight in ``nn.Linear``'s own
  layout; no copy), the M dot products in 8-wide float64 lanes with AVX-512 (9 to 16 rows as 8 and the rest on the
  same weight block; 4-wide lanes without AVX-512). At 8 rows SmolLM2's linears cost a third of the float64 GEMM
  and less than MKL's float32 GEMM on this project's CPU (docs/BENCHMARKS.md). Its sums run in another order
  than the float64 GEMM's, but both round the (nearly) exact sum once, so they agree bit for bit but for values
  within ~1e-13 of a float32 rounding midpoint (see :mod:`spikelm.nn.exact`).
* :func:`elastic_spikes` -- the elastic neuron's T steps in one pass (the arithmetic of
  :func:`spikelm.nn.neuron.spike_steps_inference`, operation for operation, compiled without fused multiply-adds):
  the same spikes, bit for bit.
* :func:`spike_pack5` / :func:`unpack5_steps_into_batch` -- a converted model's K/V neuron and the packed cache's
  append (codes 5 per byte, steps folded into the heads) in one call, and the cache's decoding straight into the
  model's (T*B, H, L, d) layout; bit for bit the codes and values of :mod:`spikelm.nn.packing`.

Where each runs, the switch and the fallback notices: :mod:`spikelm.nn.kernels` (the one dispatcher); this module
only builds the extension and calls it. The C++ source is ``cpu_kernels.cpp`` next to this file (package data).

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and
``ninja``; about a minute) and cached under ``$SPIKELM_CACHE/extensions`` (default ``~/.cache/spikelm``), named by a
hash of :data:`VERSION`, the source's text, the flags, torch, Python and the CPU.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from ..outputs import cache_dir

SOURCE_FILE = Path(__file__).with_name("cpu_kernels.cpp")  # shipped as package data (pyproject.toml)
VERSION = 5  # bump when the build changes in a way the source's text does not show (part of the build's name)
FUNCTIONS = [
    "few_rows_linear",
    "few_rows_linears",
    "elastic_spikes",
    "spike_pack5",
    "unpack5_steps_into_batch",
    "token_codes",
    "has_avx512",
    "pack_bit_planes",
    "online_hadamard",
    "one_query_attention",
    "token_values_linears",
    "kv_codes_append",
    "rms_norm",
    "rotary_embedding",
]

_module: list = []  # [the built extension] or [None] once building failed
_build_error: list = []  # [the exception] once building failed


def source() -> str:
    """The C++ source (``cpu_kernels.cpp``)."""
    return SOURCE_FILE.read_text(encoding="utf-8")


def _cpu_signature() -> str:
    """The CPU's model and flags (the build uses -march=native: a cache shared by another CPU must not reuse it)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return text


def _flags() -> list[str]:
    # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds; without it the loop runs on one thread.
    # -ffp-contract=off: the neuron's u = (0.25 * u) * carry + x must round as PyTorch's three operations do
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]  # the neuron: no fused multiply-add
    return flags + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])


def build_name(text: str | None = None) -> str:
    """The extension's name: a hash of everything that makes one build differ from another."""
    text = source() if text is None else text
    key = f"{VERSION}|{text}|{FUNCTIONS}|{_flags()}|{torch.__version__}|{sys.version_info[:2]}|{_cpu_signature()}"
    return f"spikelm_cpu_kernels_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _build():
    from torch.utils import cpp_extension

    try:  # the pip package's ninja, when the virtual environment's bin is not on PATH
        import ninja

        bin_dir = getattr(ninja, "BIN_DIR", None)
        if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    text = source()
    name = build_name(text)
    directory = cache_dir() / "extensions" / name
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{name}*.so")):
        print(f"spikelm: building the CPU decoding kernels once (about a minute) in {directory}", file=sys.stderr)
    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[text],
        functions=FUNCTIONS,
        extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


def kernel():
    """The compiled extension (built on first call), or None if it cannot be built (:func:`build_error` says why;
    the dispatcher, :mod:`spikelm.nn.kernels`, announces it)."""
    if not _module:
        try:
            _module.append(_build())
        except Exception as err:  # no compiler, no ninja, an unsupported platform: the PyTorch paths
            _module.append(None)
            _build_error.append(err)
    return _module[0]


def build_error() -> BaseException | None:
    """Why the extension could not be built (None: built, or not tried yet)."""
    return _build_error[0] if _build_error else None


def _call(name: str, *args):
    """``kernel().<name>(*args)``, named in torch.profiler's tables (an extension call is not an aten op)."""
    module = _module[0] if _module else kernel()
    if module is None:
        raise RuntimeError(f"the CPU decoding kernels are unavailable: {_build_error[0]}")
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(f"spikelm::{name}"):
            return getattr(module, name)(*args)
    return getattr(module, name)(*args)


class _Named:
    """The extension's functions, each call named in torch.profiler's tables as :func:`_call` names it."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        function = getattr(self._module, name)

        def call(*args):
            with torch.profiler.record_function(f"spikelm::{name}"):
                return function(*args)

        return call


def direct():
    """The compiled functions themselves, for a caller that has already resolved every argument (a block's planned
    decoding step, :mod:`spikelm.conversion.decode_step`): the extension, or while torch.profiler records, the same
    functions named in its tables. Positional arguments as the C++ signatures take them."""
    module = _module[0] if _module else kernel()
    if module is None:
        raise RuntimeError(f"the CPU decoding kernels are unavailable: {_build_error[0]}")
    return _Named(module) if torch.autograd._profiler_enabled() else module


# ----------------------------------------------------------------------------------------------
# The kernels themselves (float32 CPU tensors; spikelm.nn.kernels decides when they run)
# ----------------------------------------------------------------------------------------------


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``exact_linear(x, weight, bias)`` for float32 CPU tensors with 1 to 16 rows (any leading shape).

    Raises ``RuntimeError`` if the extension cannot be built (:func:`spikelm.nn.kernels.spike_linear` dispatches)."""
    shape = x.shape
    w = weight if weight.is_contiguous() else weight.contiguous()
    out = _call("few_rows_linear", x.reshape(-1, shape[-1]), w, bias)
    return out.view(*shape[:-1], weight.shape[0])


def few_rows_linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``[few_rows_linear(x, w, b) for w, b in zip(weights, biases)]`` in one call (the same bits: each output is one
    row's dot product): the readers of one neuron's output at a decoding step. Contiguous float32 weights."""
    shape = x.shape
    outs = _call("few_rows_linears", x.reshape(-1, shape[-1]), weights, biases)
    lead = shape[:-1]
    return [out.view(*lead, out.shape[-1]) for out in outs]


def has_avx512() -> bool:
    """Whether the build uses the AVX-512 loop of the one-row linear (else the portable 4-lane loop: slower, same
    definition)."""
    return bool(_call("has_avx512"))


def code_rows(channel_shape: tuple[int, ...], shape: torch.Size) -> tuple[int, int] | None:
    """``(Rg, inner)`` for :func:`token_codes`: a neuron of ``channel_shape`` on an input of ``shape`` reads row
    ``(r / inner) % Rg`` of its channel groups for row r of the input's (..., C) rows; None where that layout is not
    one of the two the kernel knows (one channel row, or a K/V neuron's (H, 1, d) on (B, H, L, d) states)."""
    if len(channel_shape) == 1 or all(c == 1 for c in channel_shape[:-1]):
        return 1, 1
    if len(channel_shape) == 3 and channel_shape[1] == 1 and len(shape) == 4 and shape[1] == channel_shape[0]:
        return channel_shape[0], shape[2]
    return None


class TokenCodes(NamedTuple):
    """What :func:`token_codes` returns: ``x_hat`` shaped ``x``; ``code`` shaped ``x`` int32 (or, packed, the bit
    planes (..., bits * ceil(C / 8)) uint8; None unless asked for); ``grid`` (..., 2G) each token's scales then zero
    points (GIF, :func:`spikelm.nn.neurons.gif.pack_grid`'s layout) or (..., G) its scales (signed); ``scale`` and
    ``zero`` views of it (``zero`` None for signed)."""

    x_hat: torch.Tensor
    code: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor | None
    grid: torch.Tensor


def token_codes(
    x: torch.Tensor,
    group: torch.Tensor,
    top: torch.Tensor,
    inner: int,
    clip_ratio: float,
    *,
    signed: bool = False,
    dead_zone: float = 0.0,
    floor: float,
    factor: torch.Tensor | None = None,
    want_code: bool = False,
    pack_bits: int = 0,
    code_offset: int = 0,
    outlier_threshold: float = 0.0,
) -> TokenCodes:
    """A per-token code neuron's pass in one call (``cpu_kernels.cpp``, ``token_codes``): float32 ``x`` (..., C),
    ``group`` int32 (Rg, C) each channel's range group per group row, ``top`` float32 (G,) each group's top code,
    ``inner`` (see :func:`code_rows`). The GIF quantiser of :func:`spikelm.nn.neurons.gif.quantize_per_group` and its
    dequantised value, or the signed one of :func:`spikelm.nn.neurons.signed.quantize_signed`, bit for bit; with
    ``want_code`` and ``pack_bits`` > 0 the codes plus ``code_offset`` come as :func:`pack_bit_planes` would pack them.
    ``outlier_threshold`` > 0 (signed only): a row whose max |x| exceeds it (in float32) passes real-valued, ``x_hat``
    equal to ``x`` (:meth:`spikelm.nn.neurons.signed.SignedNeuron.real_rows`); its codes and grid are still given.
    See :class:`TokenCodes`."""
    rows = x.reshape(-1, x.shape[-1])
    xhat, code, grid = _call(
        "token_codes",
        rows,
        group,
        top,
        int(inner),
        float(clip_ratio),
        float(dead_zone),
        float(floor),
        factor,
        bool(signed),
        bool(want_code),
        int(pack_bits),
        int(code_offset),
        float(outlier_threshold),
    )
    lead = x.shape[:-1]
    width = top.shape[0]
    grid = grid.view(*lead, grid.shape[-1])
    if want_code:
        code = code.view(*lead, code.shape[-1])
    return TokenCodes(
        xhat.view(x.shape),
        code if want_code else None,
        grid if signed else grid[..., :width],
        None if signed else grid[..., width:],
        grid,
    )


def online_hadamard(
    x: torch.Tensor,
    signs: torch.Tensor,
    factors: list[torch.Tensor],
    *,
    hand: int = 0,
    keep_double: bool = False,
) -> torch.Tensor:
    """:class:`spikelm.conversion.rotation.OnlineHadamard`'s randomised Hadamard of ``x`` (..., n): float64 ``signs``
    (n,) and factor matrices (f, f) whose orders multiply to n (``cpu_kernels.cpp``, ``online_hadamard``).
    ``hand=0``: the ATen operations of its Python forward, called from C++ (its bits by construction); ``hand=1``
    (float32 ``x``): loops that sum each factor's products in the order of this machine's float64 GEMM (one fused
    multiply-add chain per output), without its cost per call; ``hand=2``: those, a one-row last factor of 128 or
    more summed in two halves (MKL's matrix-vector product on two threads) -- the same bits only where
    :func:`spikelm.nn.kernels.rotation_loops` has checked that they are. ``keep_double``: the float64 product before
    its rounding to ``x``'s dtype."""
    return _call("online_hadamard", x, signs, factors, int(hand), bool(keep_double))


def one_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    *,
    order: int = 0,
    block: int | None = None,
    keep_double: bool = False,
) -> torch.Tensor:
    """:func:`spikelm.nn.exact.exact_attention` of one query per head (a decoding step), transposed as transformers'
    attention functions return it: ``query`` (B, H, 1, d), ``key`` / ``value`` (B, Hkv, L, d), ``attention_mask``
    None, bool (True = attend) or additive, (B|1, H|1, 1, L) -> (B, 1, H, d) in the query's dtype
    (``cpu_kernels.cpp``, ``one_query_attention``). ``block=None``: the ATen operations of the Python function,
    called from C++ (its bits by construction); an int (float64 K/V contiguous along d, d a multiple of 8, of 16
    for ``order`` 2): the two products by loops summing in the order of this machine's float64 GEMM (``order``: the
    scores' summation order, 0 eight lanes, 1 one chain, 2 two accumulators of eight lanes; ``block``: its blocks
    over the keys in probs @ V, 0 for one chain), the same bits only where
    :func:`spikelm.nn.kernels.attention_order` has checked that they are. ``keep_double``: the float64 output before
    its rounding."""
    return _call(
        "one_query_attention",
        query,
        key,
        value,
        attention_mask,
        float(scaling),
        0.0 if softcap is None else softcap,
        int(order),
        -1 if block is None else int(block),
        bool(keep_double),
    )


def token_values(
    x: torch.Tensor,
    group: torch.Tensor,
    top: torch.Tensor,
    inner: int,
    clip_ratio: float,
    dead_zone: float,
    floor: float,
    signed: bool,
    outlier_threshold: float = 0.0,
) -> torch.Tensor:
    """:func:`token_codes`' ``x_hat`` alone (no codes, no scale factors; the Python numbers already ``float`` /
    ``int``): a neuron's forward value at a decoding step, with the fewest Python steps."""
    shape = x.shape
    out = _call(
        "token_codes",
        x.reshape(-1, shape[-1]),
        group,
        top,
        inner,
        clip_ratio,
        dead_zone,
        floor,
        None,
        signed,
        False,
        0,
        0,
        outlier_threshold,
    )
    return out[0].view(shape)


def token_values_linears(
    x: torch.Tensor, plan: tuple, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(token_values(x, *plan), few_rows_linears(that, weights, biases))`` in one call (the same functions: the
    same bits): a linear input's neuron and its readers at a decoding step. ``plan``: a neuron's
    :meth:`~spikelm.nn.neurons.base.SpikingNeuron.value_plan`."""
    shape = x.shape
    outs = _call("token_values_linears", x.reshape(-1, shape[-1]), *plan, weights, biases)
    lead = shape[:-1]
    return outs[0].view(shape), [out.view(*lead, out.shape[-1]) for out in outs[1:]]


def kv_codes_append(
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    key_plan: tuple,
    value_plan: tuple,
    floor: float,
    pack_bits: int,
    code_offset: int,
    buffers: list[torch.Tensor],
    code_at: int,
    decoded_at: int,
) -> None:
    """The signed K/V cache's decoding step in one call (``cpu_kernels.cpp``, ``kv_codes_append``): K and V
    (B, H, n, d) through :func:`token_codes` (signed, the codes plus ``code_offset`` packed as ``pack_bits`` bit
    planes) with the neurons' :meth:`~spikelm.nn.neurons.signed.SignedNeuron.kv_plan`, and the codes, scales and
    float64 values written into ``buffers`` (key codes, key scales, value codes, value scales: (B, H, capacity, w)
    at token ``code_at``; decoded keys, values: (B, H, capacity, d) at ``decoded_at``)."""
    _call(
        "kv_codes_append",
        key_states,
        value_states,
        *key_plan,
        *value_plan,
        float(floor),
        int(pack_bits),
        int(code_offset),
        buffers,
        int(code_at),
        int(decoded_at),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` forward of float32 ``x`` with ``weight`` and ``eps`` (``cpu_kernels.cpp``,
    ``rms_norm``): the squares' mean by ATen (its reduction order), the rest in one loop rounding as ATen's float32
    kernels do: the same bits without Python's cost per operation."""
    return _call("rms_norm", x, weight, float(eps))


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (LLaMA's) for float32 CPU tensors, q (B, H, n, d), k
    (B, Hk, n, d), cos / sin (1 or B, n, d): one elementwise pass (``cpu_kernels.cpp``, ``rotary_embedding``) whose
    products and sums round as PyTorch's do, so the same bits. Contiguous outputs."""
    out = _call("rotary_embedding", q, k, cos, sin)
    return out[0], out[1]


def pack_bit_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 codes (..., d) in [0, 2^bits) -> (..., bits * ceil(d / 8)) uint8:
    ``spikelm.nn.packing.pack_bits(codes, bits).flatten(-2)``, bit for bit."""
    rows = codes.reshape(-1, codes.shape[-1])
    out = _call("pack_bit_planes", rows, int(bits))
    return out.view(*codes.shape[:-1], out.shape[-1])


def elastic_spikes(
    x: torch.Tensor, alpha: torch.Tensor, low: int, official: bool, use_amplitude: bool, membrane: bool
) -> torch.Tensor:
    """The elastic neuron's spikes of time-major float32 ``x`` (T, ...) with floored ``alpha`` (T,) in one call;
    :func:`spikelm.nn.neuron.spike_steps_inference`'s arithmetic (``low`` -1 ternary / 0 binary, ``official`` the
    released ternary reset), bit for bit."""
    return _call("elastic_spikes", x, alpha, int(low), bool(official), bool(use_amplitude), bool(membrane))


def spike_pack5(states: torch.Tensor, alpha: torch.Tensor, low: int) -> torch.Tensor:
    """K or V (T*B, H, L, d) float32 through a per-step neuron without membrane (floored ``alpha`` (T,)), its codes
    packed 5 per byte in the cache's (B, T*H, L, ceil(d / 5)) layout:
    ``pack_ternary(fold_steps_into_heads(codes, T), 5)``."""
    return _call("spike_pack5", states, alpha, int(low))


def unpack5_steps_into_batch(packed: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T*H, L, w) codes packed 5 per byte -> (T*B, H, L, width) float32 values ``q * scale_t``:
    :func:`spikelm.nn.packing.unpack_ternary` with ``steps_into_batch``, bit for bit."""
    return _call("unpack5_steps_into_batch", packed, scale, int(width))
