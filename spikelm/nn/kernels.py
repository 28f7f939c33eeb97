"""The one kernel dispatcher: which implementation runs each operation of a spiking layer.

Each operation has a readable PyTorch path and may have fast kernels that compute the same bits (tested:
tests/test_cpu_kernels.py, tests/test_kernels.py, tests/test_path_agreement.py). This module alone decides which one
runs; the layers (:mod:`spikelm.nn.neuron`, :mod:`spikelm.conversion.placement`, :mod:`spikelm.conversion.cache`)
ask it and run the answer. The kernels themselves live in :mod:`spikelm.nn.cpu_kernels` (C++, source in
``cpu_kernels.cpp``) and :mod:`spikelm.nn.kernels_triton` (Triton).

========================================  ===========================================  ===============================
operation (asked through)                 fast kernel, where it is taken               otherwise (the PyTorch path)
========================================  ===========================================  ===============================
spike linear (:func:`spike_linear`)       C++ ``few_rows_linear``: CPU float32, no     ``exact_linear`` (float64 GEMM)
                                          autograd, at most :func:`max_rows` rows
neuron without autograd                   C++ ``elastic_spikes``: CPU float32,         as with autograd, below
(:func:`neuron_kernel`)                   ``backend="auto"``
neuron with autograd                      Triton: CUDA float32/bf16/fp16;              the fused loop in PyTorch ops
(:func:`choose_kernel`)                   torch.compile: CPU, >= COMPILE_MIN_ELEMENTS  (``"fused"``)
K/V append of a converted model's         C++ ``spike_pack5`` and                      :mod:`spikelm.nn.packing`
packed cache (:func:`kv_append_kernel`)   ``unpack5_steps_into_batch``: CPU float32
                                          (the cache checks its neurons are plain)
per-token code neuron (GIF, signed)       C++ ``token_codes``: CPU float32, no         the neuron's quantiser
(:func:`token_code_kernel`)               autograd (the neuron checks its layout)
online Hadamard of a decoding step        C++ ``online_hadamard``: CPU float32, no      the same operations from
(:func:`rotation_kernel`,                 autograd, at most :data:`ROTATION_MAX_ROWS`   Python
:func:`rotation_loops`)                   rows; its own loops where checked (below),
                                          else its ATen operations from C++
attention of a decoding step              C++ ``one_query_attention``: one float32      ``exact_attention``'s float64
(:func:`attention_kernel`,                query on the cache's float64 K/V, no          PyTorch operations
:func:`attention_order`)                  autograd; its own loops for the products
                                          where checked (below), else ATen's
========================================  ===========================================  ===============================

**The switch**, one for all of them: ``SPIKELM_KERNELS=0`` in the environment, :func:`set_enabled` (``False`` /
``True``; ``None`` goes back to the environment) or the block :func:`forced` turns the C++ and Triton kernels off
wherever the choice is automatic (a neuron's ``backend="auto"``): every operation then runs its PyTorch path, with
the same results. A neuron's explicit ``backend`` is honoured whatever the switch; torch.compile (PyTorch's own
compiler of the PyTorch loop) is not switched. ``SPIKELM_CPU_KERNELS=0``, the earlier switch, still turns the C++
kernels off (only them). ``SPIKELM_CPU_KERNELS_MAX_ROWS=N`` (0 to 16) moves the few-row linear's threshold.

**The summation-order check**: the float64 products of the online Hadamard and the decoding-step attention round,
so their bits depend on the order of the sums. The C++ loops sum in the order this project's CPU's MKL sums (as
PyTorch calls it; ``cpu_kernels.cpp`` describes it), without its cost per call; they are taken only where a one-time
check per process and shape (:func:`rotation_loops`, :func:`attention_order`: random operands, float64 results
before the last rounding compared with the ATen operations bit for bit; another order differs in hundreds of
places) finds them equal. Elsewhere (another BLAS, another CPU) the C++ call runs the ATen operations, announced.

**The fallback notice**: where a fast kernel would be taken but cannot be (no C++ compiler, triton not importable,
torch.compile failing, a CUDA tensor or another dtype for a CPU float32 kernel) the PyTorch path runs and
:func:`fallback` says so in one line, once per process and cause (a warning), never silently.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ..errors import UserError
from . import cpu_kernels
from .exact import exact_linear

ENV_VAR = "SPIKELM_KERNELS"  # the switch
CPU_ENV_VAR = "SPIKELM_CPU_KERNELS"  # the earlier switch: the C++ kernels only
ROWS_ENV_VAR = "SPIKELM_CPU_KERNELS_MAX_ROWS"  # overrides MAX_ROWS (for measuring the threshold)
# At most this many rows take the few-row linear (its C++ template covers 1 to 8 rows, and 9 to 16 as two passes over
# each block of weight rows; a decoding step up to batch 16, or 4 at T = 4).
MAX_ROWS = 16
# At most this many rows take the C++ online Hadamard (a decoding step up to batch 16; for a prefill's many rows
# Python's cost per operation does not matter)
ROTATION_MAX_ROWS = 16
# Below this many elements per call torch.compile's guards and first-call compilation cost more than the plain
# loop; above it the compiled pass is several times faster.
COMPILE_MIN_ELEMENTS = 1 << 16
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 stays on the PyTorch loop

# the implementations an operation can run on
CPP = "cpp"  # spikelm.nn.cpu_kernels
TRITON = "triton"  # spikelm.nn.kernels_triton
COMPILED = "compiled"  # the PyTorch loop through torch.compile
FUSED = "fused"  # the neuron's PyTorch loop, as written
PYTORCH = "pytorch"  # an operation's PyTorch path (the linear's float64 GEMM, the cache's packing module)

_override: list = [None]
_warned: set = set()  # the fallbacks already announced
_triton_error: list = []  # [None] once triton imported, [the ImportError] once it failed
_compiled: dict = {}
_compile_failed = False
_ON, _OFF = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")


# ----------------------------------------------------------------------------------------------
# The switch and the notice
# ----------------------------------------------------------------------------------------------


def set_enabled(flag: bool | None) -> None:
    """Turn the fast kernels on or off for this process; ``None``: follow the environment (on unless
    ``$SPIKELM_KERNELS`` is "0"; ``$SPIKELM_CPU_KERNELS=0`` turns the C++ kernels off)."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects True, False or None, got {flag!r}")
    _override[0] = flag


@contextlib.contextmanager
def forced(flag: bool | None):
    """The fast kernels switched on (True) or off (False) inside the block; None leaves the switch as it is."""
    if flag is None:
        yield
        return
    before = _override[0]
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(before)


def environment_switch(name: str) -> bool:
    """The on/off switch in ``$name`` (on when unset or empty); a bad value is a :class:`UserError` naming it."""
    value = os.environ.get(name, "1").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise UserError(f"{name}={os.environ[name]!r}: expected 1 (on, the default) or 0 (off)")


def enabled(family: str = CPP) -> bool:
    """Whether the ``family`` of kernels (:data:`CPP` or :data:`TRITON`) may be taken: the switch, not whether they
    build. A bad value in the environment is a :class:`UserError` naming the variable."""
    if _override[0] is not None:
        return _override[0]
    on = environment_switch(ENV_VAR)
    cpu_on = environment_switch(CPU_ENV_VAR)  # read (and checked) whatever the family
    return on and (cpu_on or family != CPP)


def max_rows() -> int:
    """The most rows that take the few-row linear: :data:`MAX_ROWS`, or ``$SPIKELM_CPU_KERNELS_MAX_ROWS`` (0 to 16)."""
    raw = _raw_environment(ROWS_ENV_VAR)
    if raw is None:
        return MAX_ROWS
    if raw == _rows_seen[0]:
        return _rows_seen[1]
    _rows_seen[:] = [raw, _parse_rows(os.environ[ROWS_ENV_VAR])]
    return _rows_seen[1]


_rows_seen: list = [None, MAX_ROWS]  # (the environment's value, its parse): asked at every spiking linear


def _parse_rows(value: str) -> int:
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if not 0 <= rows <= 16:
        raise UserError(f"{ROWS_ENV_VAR}={value!r}: expected a whole number of rows from 0 to 16")
    return rows


def fallback(key: str, kernel: str, reason: str, what: str, hint: str = "") -> None:
    """The one fallback notice: ``kernel`` cannot run ``what`` (``reason``), which runs on the PyTorch path instead.
    One line, once per process for each ``key``."""
    if key in _warned:
        return
    _warned.add(key)
    reason = reason.strip().splitlines()[0] if reason.strip() else reason
    message = f"spikelm: {kernel}: {reason}; {what} run on the PyTorch path" + (f" ({hint})" if hint else "")
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _error_text(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# ----------------------------------------------------------------------------------------------
# The C++ kernels: CPU, float32, no autograd, switched on and built
# ----------------------------------------------------------------------------------------------


def cpp_built() -> bool:
    """Whether the C++ extension is built (building it on first call); if it cannot be, says so once. A build
    without AVX-512 (another CPU or compiler) is announced once too: its one-row linear runs the portable 4-lane
    loop (the same definition, slower)."""
    if cpu_kernels.kernel() is not None:
        if "cpp-avx512" not in _warned:
            _warned.add("cpp-avx512")
            if not cpu_kernels.has_avx512():
                warnings.warn(
                    "spikelm: the C++ one-row linear: no AVX-512 on this CPU or compiler; its portable 4-lane loop "
                    "runs (the same results, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return True
    fallback(
        "cpp-build",
        "the C++ decoding kernels",
        f"could not be built ({_error_text(cpu_kernels.build_error())})",
        "spiking layers",
        f"set {ENV_VAR}=0 to skip the attempt",
    )
    return False


def _cpp_usable(*tensors: torch.Tensor | None, what: str) -> bool:
    """Whether the C++ kernels may run on ``tensors``: switched on, built, CPU, float32, no gradient to record. A CUDA
    tensor or another dtype is announced, never skipped silently. (Called for every spiking layer of a decoding
    step: plain loops, no generators.)"""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if grad and t.requires_grad:
            return False
        if t.dtype is not torch.float32 or t.device.type != "cpu":
            if enabled(CPP):
                _announce_platform(tensors, what)
            return False
    return cpp_on()


_cpp_seen: list = [None, False]  # (the switch's state, whether the C++ kernels run): asked at every spiking layer


def _environment_reader():
    """A fast ``os.environ.get`` for the switches asked at every spiking layer: the environment's own mapping looked
    up with pre-encoded keys (``os.environ.get`` encodes the key on each call); ``os.environ.get`` where that
    mapping is not there."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if not isinstance(data, dict) or encode is None:
        return lambda name: os.environ.get(name)
    keys = {name: encode(name) for name in (ENV_VAR, CPU_ENV_VAR, ROWS_ENV_VAR)}
    return lambda name: data.get(keys[name])  # the raw (encoded) value: compared, never parsed, here


_raw_environment = _environment_reader()


def cpp_on() -> bool:
    """Whether the C++ kernels run where the dispatchers would take them: ``enabled(CPP) and cpp_built()``,
    recomputed only when the switch or its environment variables change."""
    built = cpu_kernels._module  # the extension's holder (a new, empty one means not built yet)
    key = (_override[0], _raw_environment(ENV_VAR), _raw_environment(CPU_ENV_VAR), id(built), len(built))
    if key != _cpp_seen[0]:
        on = enabled(CPP) and cpp_built()  # a bad value raises here, each time it is asked
        _cpp_seen[:] = [key, on]
    return _cpp_seen[1]


def _announce_platform(tensors, what: str) -> None:
    present = [t for t in tensors if t is not None]
    device = next((t.device.type for t in present if t.device.type != "cpu"), None)
    if device is not None:
        fallback(f"cpp-device-{device}", "the C++ decoding kernels", "CPU-only", f"{what} on {device}")
        return
    dtype = next(t.dtype for t in present if t.dtype != torch.float32)
    fallback(f"cpp-dtype-{dtype}", "the C++ decoding kernels", "float32-only", f"{dtype} {what}")


# ----------------------------------------------------------------------------------------------
# The operations
# ----------------------------------------------------------------------------------------------


def linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """Where :func:`spike_linear` runs: :data:`CPP` (the few-row kernel) or :data:`PYTORCH` (the float64 GEMM)."""
    if x.dim() < 1 or x.numel() == 0 or x.numel() // x.shape[-1] > max_rows():
        return PYTORCH
    if (  # the common case of a decoding step, asked at every spiking linear: the checks of _cpp_usable inline
        x.dtype is _FLOAT32
        and weight.dtype is _FLOAT32
        and x.is_cpu
        and weight.is_cpu
        and (bias is None or (bias.dtype is _FLOAT32 and bias.is_cpu))
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad)
        )
    ):
        return CPP if cpp_on() else PYTORCH
    return CPP if _cpp_usable(x, weight, bias, what="spiking linears") else PYTORCH


_FLOAT32 = torch.float32


def linears_kernel(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> str:
    """Where the readers of one spiking input run together (:func:`spikelm.nn.cpu_kernels.few_rows_linears`, one
    call for all; placement's read-ahead at a decoding step): :data:`CPP` where :func:`linear_kernel` takes the
    few-row kernel for every reader and the weights are contiguous, else :data:`PYTORCH` (each reader then runs
    :func:`spike_linear` itself)."""
    for weight, bias in zip(weights, biases, strict=True):
        if not weight.is_contiguous() or linear_kernel(x, weight, bias) != CPP:
            return PYTORCH
    return CPP


def spike_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a spiking input: :func:`spikelm.nn.exact.exact_linear` (float64
    accumulation, one rounding: the same bits on every path), by the few-row kernel where it pays (CPU, float32, no
    autograd, at most :func:`max_rows` rows: a decoding step), else the float64 GEMM."""
    if linear_kernel(x, weight, bias) == CPP:
        return cpu_kernels.few_rows_linear(x, weight, bias)
    return exact_linear(x, weight, bias)


def token_code_kernel(x: torch.Tensor) -> str:
    """Where a per-token code neuron (GIF, signed) codes and dequantises ``x`` outside autograd: :data:`CPP` (the
    C++ ``token_codes``, one pass per token) for a CPU float32 input, else :data:`PYTORCH` (the neuron's own
    quantiser; other dtypes and devices keep it by design, as the elastic neuron's loop does)."""
    if not x.is_cpu or x.dtype is not _FLOAT32 or (torch.is_grad_enabled() and x.requires_grad):
        return PYTORCH
    return CPP if cpp_on() else PYTORCH  # _cpp_usable(x)'s remaining check


def rotation_kernel(x: torch.Tensor) -> str:
    """Where the online Hadamard (:class:`spikelm.conversion.rotation.OnlineHadamard`) rotates ``x`` outside
    autograd: :data:`CPP` (``online_hadamard``: the same float64 products in one C++ call, by its own loops where
    :func:`rotation_loops` says so) for a CPU float32 input of at most :data:`ROTATION_MAX_ROWS` rows, else
    :data:`PYTORCH` (the operations from Python)."""
    if x.device.type != "cpu" or x.dtype is not torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
        return PYTORCH
    if x.dim() < 1 or x.numel() == 0 or x.numel() // x.shape[-1] > ROTATION_MAX_ROWS:
        return PYTORCH
    return CPP if _cpp_usable(x, what="online rotations") else PYTORCH


def attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """Where a converted model's attention runs (:mod:`spikelm.conversion.attention`) outside autograd: :data:`CPP`
    (``one_query_attention``; its products by its own loops where :func:`attention_order` says so) for one
    float32 query per head on CPU against float64 K/V (the spike-code cache's decoded copy, a fast decoding step),
    else :data:`PYTORCH` (:func:`spikelm.nn.exact.exact_attention`)."""
    if query.dim() != 4 or query.shape[2] != 1 or key.dtype is not torch.float64 or value.dtype is not torch.float64:
        return PYTORCH
    if key.device.type != "cpu" or value.device.type != "cpu" or key.stride(-1) != 1 or value.stride(-1) != 1:
        return PYTORCH
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return PYTORCH
    return CPP if _cpp_usable(query, what="decoding-step attention") else PYTORCH


def norm_kernel(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Where a LLaMA-layout block's RMSNorm runs at a decoding step (:mod:`spikelm.conversion.decode_step`):
    :data:`CPP` (``rms_norm``: the squares' mean by ATen, the rest in one C++ loop) for CPU float32 ``x`` and
    ``weight`` outside autograd, else :data:`PYTORCH` (the norm module)."""
    return CPP if _cpp_usable(x, weight, what="decoding-step norms") else PYTORCH


def rotary_kernel(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str:
    """Where a LLaMA-layout block's rotary embedding runs at a decoding step: :data:`CPP` (``rotary_embedding``, one
    elementwise pass) for CPU float32 q (B, H, n, d), k (B, Hk, n, d) and cos / sin (1 or B, n, d) outside autograd,
    else :data:`PYTORCH` (transformers' function)."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return PYTORCH
    if cos.shape[1:] != q.shape[2:] or k.shape[2:] != q.shape[2:] or cos.shape[0] not in (1, q.shape[0]):
        return PYTORCH
    return CPP if _cpp_usable(q, k, cos, sin, what="decoding-step rotary embeddings") else PYTORCH


# the summation-order checks: {key: the verdict}
_rotation_orders: dict = {}
_attention_orders: dict = {}
# the cache lengths of the attention's check: ATen's own loop (below 400 multiply-adds per K/V head), one chain,
# MKL's blocks of the keys in probs @ V (split in two, odd, several)
ATTENTION_CHECK_LENGTHS = (1, 2, 3, 7, 64, 385, 513, 768, 769, 1001, 2051)
CHECK_OUTPUTS = 4096  # at least this many float64 outputs compared per check
CHECK_CACHE_ELEMENTS = 1 << 22  # the attention's check skips lengths whose K (or V) would exceed this (32 MB)


def rotation_loops(x: torch.Tensor, signs: torch.Tensor, mats: list[torch.Tensor]) -> int:
    """How the C++ online Hadamard (:data:`CPP` by :func:`rotation_kernel`) computes ``x``'s products: its own loops
    (1, or 2 with a one-row last factor summed in halves; see :func:`spikelm.nn.cpu_kernels.online_hadamard`) or its
    ATen operations (0). Checked once per process, shape, factor orders and thread count against the ATen operations
    (random float32 rows of that shape, float64 results bit for bit); where no loop matches, the ATen operations
    (announced once)."""
    key = (x.shape, tuple(m.shape[0] for m in mats), torch.get_num_threads())
    verdict = _rotation_orders.get(key)
    if verdict is None:
        verdict = _rotation_orders[key] = _check_rotation(x.shape, signs, mats)
    return verdict


def _check_rotation(shape: torch.Size, signs: torch.Tensor, mats: list[torch.Tensor]) -> int:
    g = torch.Generator().manual_seed(0)
    numel = max(1, int(torch.Size(shape).numel()))
    candidates = [1, 2]  # the halves only where MKL's matrix-vector product runs on several threads
    if numel // shape[-1] == 1 and len(mats) == 1 and torch.get_num_threads() > 1:
        candidates = [2, 1]
    with torch.no_grad():
        for _ in range(max(1, CHECK_OUTPUTS // numel)):
            probe = (torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))).float()
            want = cpu_kernels.online_hadamard(probe, signs, mats, keep_double=True)
            candidates = [
                hand
                for hand in candidates
                if torch.equal(want, cpu_kernels.online_hadamard(probe, signs, mats, hand=hand, keep_double=True))
            ]
    if candidates:
        return candidates[0]
    orders = " x ".join(str(m.shape[0]) for m in mats)
    fallback(
        "cpp-order-rotation",
        "the C++ online Hadamard's own loops",
        f"they do not sum as this machine's float64 matmul does (factors {orders}, shape {tuple(shape)})",
        "its products",
        "the same results, slower",
    )
    return 0


def attention_order(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int] | None:
    """How the C++ decoding-step attention (:data:`CPP` by :func:`attention_kernel`) computes its two products:
    ``(order, block)`` for its own loops (the scores' summation order, probs @ V's blocks over the keys; see
    :func:`spikelm.nn.cpu_kernels.one_query_attention`), or None for its ATen operations. Checked once per process,
    (batch, K/V heads, query heads per K/V head, head size) and thread count against the ATen operations at the
    cache lengths :data:`ATTENTION_CHECK_LENGTHS` (random operands, float64 outputs bit for bit); where no order
    matches, the ATen operations (announced once)."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:  # not grouped-query attention: the C++ call's ATen operations say so
        return None
    shape = (batch, kv_heads, heads // kv_heads, dim, torch.get_num_threads())
    if shape not in _attention_orders:
        _attention_orders[shape] = _check_attention(*shape[:4])
    return _attention_orders[shape]


def _attention_candidates(groups: int, dim: int) -> list[tuple[int, int]]:
    """The (order, block) pairs to try, the one measured on this project's CPU first (cpu_kernels.cpp)."""
    measured = (2 if groups == 1 else 0 if groups <= 3 else 1, 384 if groups >= 3 else 0)
    pairs = [(order, block) for order in (0, 1, 2) for block in (384, 0) if order != 2 or dim % 16 == 0]
    return [measured] + [pair for pair in pairs if pair != measured] if measured in pairs else pairs


def _check_attention(batch: int, kv_heads: int, groups: int, dim: int) -> tuple[int, int] | None:
    multiple = 16 if groups == 1 else 8  # one query head per K/V head: MKL's matrix-vector order, runs of 16
    if dim % multiple:
        fallback(
            "cpp-order-attention-dim",
            "the C++ decoding-step attention's own loops",
            f"they cover head sizes that are multiples of {multiple}"
            f"{' with one query head per K/V head' if groups == 1 else ''}, not {dim}",
            "its products",
            "the same results, slower",
        )
        return None
    candidates = _attention_candidates(groups, dim)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for length in ATTENTION_CHECK_LENGTHS:
            if not candidates or (length > 769 and batch * kv_heads * length * dim > CHECK_CACHE_ELEMENTS):
                break  # (up to 769 every regime of the orders is covered)
            buffer = torch.randn(2, batch, kv_heads, length + 7, dim, generator=g, dtype=torch.float64)
            key, value = buffer[0, :, :, :length], buffer[1, :, :, :length]
            query = torch.randn(batch, kv_heads * groups, 1, dim, generator=g)
            want = cpu_kernels.one_query_attention(query, key, value, None, dim**-0.5, keep_double=True)
            candidates = [
                (order, block)
                for order, block in candidates
                if torch.equal(
                    want,
                    cpu_kernels.one_query_attention(
                        query, key, value, None, dim**-0.5, order=order, block=block, keep_double=True
                    ),
                )
            ]
    if candidates:
        return candidates[0]
    fallback(
        "cpp-order-attention",
        "the C++ decoding-step attention's own loops",
        f"they do not sum as this machine's float64 matmul does (batch {batch}, {kv_heads} K/V heads of "
        f"{groups} query heads, head size {dim})",
        "its products",
        "the same results, slower",
    )
    return None


def kv_append_kernel(key_states: torch.Tensor, value_states: torch.Tensor) -> str:
    """Where a converted model's packed cache spikes, appends and decodes K/V at a decoding step whose neurons are
    plain (the cache checks that): :data:`CPP` or :data:`PYTORCH`."""
    return CPP if _cpp_usable(key_states, value_states, what="spike-cache updates") else PYTORCH


def _triton_available() -> bool:
    if not _triton_error:
        try:
            from . import kernels_triton  # noqa: F401  (imports triton)
        except ImportError as err:
            _triton_error.append(err)
        else:
            _triton_error.append(None)
    return _triton_error[0] is None


def choose_kernel(x: torch.Tensor, backend: str) -> str:
    """The kernel a neuron's fused ``backend`` runs ``x`` on: :data:`FUSED` (the PyTorch loop), :data:`COMPILED` or
    :data:`TRITON`. An explicit backend is honoured (``"triton"`` where it cannot run is an error); ``"auto"``:
    Triton on CUDA (switched on, importable; without it the PyTorch loop, announced once), torch.compile for CPU
    inputs of at least :data:`COMPILE_MIN_ELEMENTS` elements, else the PyTorch loop."""
    if backend == "auto":
        if x.is_cuda:
            if x.dtype not in TRITON_DTYPES or not enabled(TRITON):  # float64: the PyTorch loop by design
                return FUSED
            if _triton_available():
                return TRITON
            fallback(
                "triton",
                "the Triton neuron kernel",
                f"not importable ({_error_text(_triton_error[0])})",
                "CUDA neurons",
                "slower; install triton for the fused kernel",
            )
            return FUSED
        if x.numel() >= COMPILE_MIN_ELEMENTS and not _compile_failed:
            return COMPILED
        return FUSED
    if backend == TRITON and not (x.is_cuda and x.dtype in TRITON_DTYPES and _triton_available()):
        raise RuntimeError(
            f"backend='triton' needs a CUDA float32/bfloat16/float16 tensor and the triton package; got a "
            f"{x.device.type} {x.dtype} tensor{'' if _triton_available() else ' and triton is not importable'}. "
            "Use backend='auto'."
        )
    return backend


def neuron_kernel(x: torch.Tensor, backend: str) -> str:
    """The kernel of a neuron's pass without autograd: :data:`CPP` (the elastic neuron's T steps in one C++ pass) for
    CPU float32 input under ``backend="auto"`` (other dtypes keep the PyTorch loop by design), else
    :func:`choose_kernel`'s."""
    if backend == "auto" and x.device.type == "cpu" and x.dtype == torch.float32 and _cpp_usable(x, what="neurons"):
        return CPP
    return choose_kernel(x, backend)


def run_compiled(fn, *args):
    """``fn(*args)`` through torch.compile; the plain loop (with the one notice) if compilation fails, and from then
    on :func:`choose_kernel` no longer picks :data:`COMPILED`."""
    global _compile_failed
    if not _compile_failed:
        try:
            if fn not in _compiled:
                _compiled[fn] = torch.compile(fn)
            # each option set, dtype and layout is a separate specialisation: allow more than dynamo's default 8
            with torch._dynamo.config.patch(recompile_limit=64):
                return _compiled[fn](*args)
        except Exception as err:  # no torch.compile here, a missing or broken C++ compiler, an unsupported platform
            _compile_failed = True
            fallback("compile", "torch.compile of the neuron", f"failed ({_error_text(err)})", "neurons", "uncompiled")
    return fn(*args)
