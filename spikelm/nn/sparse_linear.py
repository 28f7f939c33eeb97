"""A sparse-input linear kernel for decoding steps on CPU: ``F.linear(x, W, b)`` when ``x`` has few rows of spikes.

A decoding step of a spiking model feeds every spiking linear layer M = B*T rows (the T copies of each of the B
tokens), and each row is a ternary spike train scaled by its step's amplitude: mostly zeros, the rest +-alpha_t.
MKL's float32 GEMM of 4 rows costs about 3 single-row products on this project's CPU, although reading the weight
(the bound at batch 1) is the same for 1 row and for 4. This kernel reads each weight row once for all M rows and
only where some input is nonzero:

    y[m, :] = b + sum over k with x[m, k] != 0 of x[m, k] * Wt[k, :]

with ``Wt`` the (in, out) transpose of the weight, contiguous, so that each row k is one contiguous stream,
vectorised over the outputs; the threads split the outputs (``at::parallel_for``); a weight row whose M inputs are
all zero is skipped (never read). With ternary spikes each product is +-alpha_t * W[k, n], an addition of a scaled
weight (the spiking model's accumulate).

The sums run in another order than MKL's, so results differ from ``F.linear`` in the last bits (tested close, not
equal); in a spiking model that can move a spike sitting exactly at a threshold downstream.

Where it is used (:func:`spike_linear`): the spiking linears of the native SpikeLM decoder (``SpikeLinear``) and of
converted models with the elastic neuron, on CPU, float32, without autograd, for at most :data:`MAX_ROWS` rows (the
decoding steps; prefill keeps the GEMM). GIF inputs are dense (its zero point), so GIF sites keep the GEMM.

The transposed weights are built lazily, once per weight (rebuilt if the weight changes in place), held outside the
state dict (:func:`transposed_bytes` says how much memory they take). The C++ extension is compiled on first use with
``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ``ninja``) and cached under
``$SPIKELM_CACHE/extensions`` (default ``~/.cache/spikelm``); if it cannot be built, or the tensors are not on the
CPU, spiking linears use the GEMM with a one-line notice (once per process).

Switch: ``SPIKELM_SPARSE_LINEAR=0`` in the environment, or :func:`set_enabled` (``False``/``True``; ``None`` goes
back to the environment), turns it off; ``SPIKELM_SPARSE_LINEAR_MAX_ROWS=N`` moves the row threshold.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..outputs import cache_dir

ENV_VAR = "SPIKELM_SPARSE_LINEAR"
ROWS_ENV_VAR = "SPIKELM_SPARSE_LINEAR_MAX_ROWS"  # overrides MAX_ROWS (for measuring the threshold)
# At most this many rows take the kernel: on this project's 2-core CPU (2 threads) it takes 0.43-0.95 x the time of
# MKL's GEMM on SmolLM2-135M's four linear shapes at 4 rows of spikes, 0.52-1.11 x at 8, 0.69-1.36 x at 16 and
# 0.95-1.65 x at 32 (benchmarks/sparse_linear.py; benchmarks/results/sparse_linear_cpu_omp.json).
MAX_ROWS = 8
VERSION = 1  # bump when the C++ source changes (part of the build's name)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

// y (M, N) = x (M, K) @ wt (K, N) + bias, reading only the rows k of wt where some x[:, k] is nonzero.
torch::Tensor sparse_input_linear(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2, "x must be (M, K) and wt (K, N)");
  TORCH_CHECK(x.size(1) == wt.size(0), "x's columns must equal wt's rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat && wt.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.device().is_cpu() && wt.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(wt.is_contiguous(), "wt must be contiguous");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wt.size(1);
  auto y = torch::empty({M, N}, xc.options());
  torch::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N, "bias must be float32 of N elements");
    bp = bc.data_ptr<float>();
  }
  const float* xp = xc.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // the nonzero inputs, column by column (k ascending): rows[p], vals[p] for p in [start[i], start[i + 1])
  std::vector<int64_t> ks;
  std::vector<int64_t> start;
  std::vector<int64_t> rows;
  std::vector<float> vals;
  ks.reserve(K);
  start.reserve(K + 1);
  rows.reserve(M * K);
  vals.reserve(M * K);
  start.push_back(0);
  for (int64_t k = 0; k < K; ++k) {
    const size_t before = rows.size();
    for (int64_t m = 0; m < M; ++m) {
      const float v = xp[m * K + k];
      if (v != 0.0f) {
        rows.push_back(m);
        vals.push_back(v);
      }
    }
    if (rows.size() != before) {
      ks.push_back(k);
      start.push_back(static_cast<int64_t>(rows.size()));
    }
  }
  const int64_t nk = static_cast<int64_t>(ks.size());
  // column blocks small enough that the M accumulator rows stay in L1 (16 KB), at least 64 columns
  int64_t block = (4096 / std::max<int64_t>(M, 1)) / 16 * 16;
  block = std::min<int64_t>(std::max<int64_t>(block, 64), 1024);
  constexpr int64_t UNIT = 16;  // threads split the outputs in units of 16 columns
  const int64_t units = (N + UNIT - 1) / UNIT;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(nk + M, 1) / UNIT);
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t n_end = std::min(N, u1 * UNIT);
    for (int64_t b0 = u0 * UNIT; b0 < n_end; b0 += block) {
      const int64_t len = std::min(block, n_end - b0);
      for (int64_t m = 0; m < M; ++m) {
        float* yr = yp + m * N + b0;
        if (bp) {
          std::memcpy(yr, bp + b0, len * sizeof(float));
        } else {
          std::fill(yr, yr + len, 0.0f);
        }
      }
      for (int64_t i = 0; i < nk; ++i) {
        const float* __restrict__ w = wp + ks[i] * N + b0;
        for (int64_t p = start[i]; p < start[i + 1]; ++p) {
          const float v = vals[p];
          float* __restrict__ yr = yp + rows[p] * N + b0;
#pragma GCC ivdep
          for (int64_t j = 0; j < len; ++j) {
            yr[j] += v * w[j];
          }
        }
      }
    }
  });
  return y;
}
"""

_module: list = []  # [the built extension] or [None] once building failed
_build_error: list = []
_enabled_override: list = [None]
_warned: set = set()
_ON, _OFF = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")
_transposed = None  # WeakIdKeyDictionary: weight -> (version, data_ptr, transposed copy)


def _notice(key: str, message: str) -> None:
    """One line, once per process, when the kernel is not taken where it would be (never silently)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def set_enabled(flag: bool | None) -> None:
    """Turn the kernel on or off for this process; ``None``: follow ``$SPIKELM_SPARSE_LINEAR`` (on unless "0")."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects True, False or None, got {flag!r}")
    _enabled_override[0] = flag


@contextlib.contextmanager
def forced(flag: bool | None):
    """The kernel switched on (True) or off (False) inside the block; None leaves the switch as it is."""
    if flag is None:
        yield
        return
    before = _enabled_override[0]
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(before)


def enabled() -> bool:
    """Whether spiking linears may take the kernel (the switch, not whether it builds)."""
    if _enabled_override[0] is not None:
        return _enabled_override[0]
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise UserError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1 (on, the default) or 0 (off)")


def max_rows() -> int:
    """The most rows that take the kernel: :data:`MAX_ROWS`, or ``$SPIKELM_SPARSE_LINEAR_MAX_ROWS``."""
    value = os.environ.get(ROWS_ENV_VAR)
    if value is None:
        return MAX_ROWS
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if rows < 0:
        raise UserError(f"{ROWS_ENV_VAR}={value!r}: expected a whole number of rows (0 or more)")
    return rows


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
    # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds; without it the loop runs on one thread
    flags = ["-O3", "-fopenmp"]
    return flags + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])


def build_name() -> str:
    key = f"{VERSION}|{_SOURCE}|{_flags()}|{torch.__version__}|{sys.version_info[:2]}|{_cpu_signature()}"
    return f"spikelm_sparse_linear_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _build():
    from torch.utils import cpp_extension

    try:  # the pip package's ninja, when the virtual environment's bin is not on PATH
        import ninja

        bin_dir = getattr(ninja, "BIN_DIR", None)
        if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    name = build_name()
    directory = cache_dir() / "extensions" / name
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{name}*.so")):
        print(f"spikelm: building the sparse-input linear kernel once (about a minute) in {directory}", file=sys.stderr)
    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[_SOURCE],
        functions=["sparse_input_linear"],
        extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


def kernel():
    """The compiled extension (built on first call), or None if it cannot be built (with a one-line notice)."""
    if not _module:
        try:
            _module.append(_build())
        except Exception as err:  # no compiler, no ninja, an unsupported platform: the GEMM path
            _module.append(None)
            _build_error.append(err)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _notice(
                "build",
                f"spikelm: the sparse-input linear kernel could not be built ({type(err).__name__}: {first}); "
                f"spiking linears use the GEMM path (set {ENV_VAR}=0 to skip the attempt)",
            )
    return _module[0]


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight.t().contiguous()`` (in, out), built once per weight and rebuilt when it changes in place."""
    global _transposed
    if _transposed is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _transposed = WeakIdKeyDictionary()
    key = (weight._version, weight.data_ptr(), tuple(weight.shape))
    held = _transposed.get(weight)
    if held is None or held[0] != key:
        held = (key, weight.detach().t().contiguous())
        _transposed[weight] = held
    return held[1]


def transposed_bytes() -> int:
    """Bytes held by the transposed weight copies now (extra memory the kernel costs)."""
    if _transposed is None:
        return 0
    return sum(held[1].numel() * held[1].element_size() for held in _transposed.values())


def sparse_input_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel itself: ``F.linear(x, weight, bias)`` for float32 CPU tensors, any leading shape of ``x``.

    Raises ``RuntimeError`` if the extension cannot be built (use :func:`spike_linear` for the dispatch)."""
    module = kernel()
    if module is None:
        raise RuntimeError(f"the sparse-input linear kernel is unavailable: {_build_error[0]}")
    rows = x.reshape(-1, x.shape[-1])
    if torch.autograd._profiler_enabled():  # named in torch.profiler's tables (an extension call is not an aten op)
        with torch.profiler.record_function("spikelm::sparse_input_linear"):
            out = module.sparse_input_linear(rows, transposed_weight(weight), bias)
    else:
        out = module.sparse_input_linear(rows, transposed_weight(weight), bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def takes_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`spike_linear` runs the kernel for these tensors (announcing, once, a platform it skips)."""
    if not enabled() or x.dim() < 1 or x.numel() == 0:
        return False
    rows = x.numel() // x.shape[-1]
    if rows > max_rows():
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False  # training: the autograd path
    if x.device.type != "cpu" or weight.device.type != "cpu":
        _notice(
            "device",
            f"spikelm: the sparse-input linear kernel is CPU-only; spiking linears on {x.device.type} use the GEMM "
            "path",
        )
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        _notice(
            f"dtype-{x.dtype}-{weight.dtype}",
            f"spikelm: the sparse-input linear kernel is float32-only; {x.dtype} spiking linears use the GEMM path",
        )
        return False
    return kernel() is not None


def spike_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a spiking input: the sparse-input kernel where it pays (CPU, float32, no
    autograd, at most :func:`max_rows` rows), else the GEMM."""
    if takes_kernel(x, weight, bias):
        return sparse_input_linear(x, weight, bias)
    return F.linear(x, weight, bias)
