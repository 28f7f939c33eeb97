"""C++ kernels for the decoding steps of spiking models on CPU: few-row linears, the neuron, the packed K/V cache.

At batch 1 a decoding step of a spiking model runs every spiking layer on M = B*T rows (the T copies of each of the
B tokens) and does ~30 tiny PyTorch operations per neuron; the real-valued model it is compared with runs one row
per linear and no neurons. On a CPU the step is bound by reading the weights and by the per-operation dispatch, not
by arithmetic. Four operations of one C++ extension (built on first use) take those costs out:

* :func:`few_rows_linear` -- :func:`spikelm.nn.exact.exact_linear` (``F.linear(x, W, b)`` accumulated in float64,
  rounded once to float32) for 1 to :data:`MAX_ROWS` rows: each weight row is read once, in order, for all M rows
  (the threads take contiguous blocks of outputs, so each streams one piece of the weight in ``nn.Linear``'s own
  layout; no copy), the M dot products in 4-wide float64 lanes. MKL's GEMM of 4 rows costs about two single-row
  products on this project's CPU; this costs about one. Its sums run in another order than the float64 GEMM's, but
  both round the (nearly) exact sum once, so they agree bit for bit but for values within ~1e-13 of a float32
  rounding midpoint (see :mod:`spikelm.nn.exact`).
* :func:`elastic_spikes` -- the elastic neuron's T steps in one pass (the arithmetic of
  :func:`spikelm.nn.neuron.spike_steps_inference`, operation for operation, compiled without fused multiply-adds):
  the same spikes, bit for bit.
* :func:`spike_pack5` / :func:`unpack5_steps_into_batch` -- a converted model's K/V neuron and the packed cache's
  append (codes 5 per byte, steps folded into the heads) in one call, and the cache's decoding straight into the
  model's (T*B, H, L, d) layout; bit for bit the codes and values of :mod:`spikelm.nn.packing`.

Where they are used: :func:`spike_linear` (the readers of an elastic neuron in native and converted models), the
neuron's no-gradient path on small CPU float32 inputs, and :class:`spikelm.conversion.cache.SpikeCodeLayer` at
decoding steps (5 codes per byte, the default). Each is taken only on CPU, for float32, without autograd; elsewhere
the PyTorch path runs, and a platform where a kernel would be taken but is not (no compiler, a CUDA tensor, another
dtype) is announced with one line, once per process.

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and
``ninja``; about a minute) and cached under ``$SPIKELM_CACHE/extensions`` (default ``~/.cache/spikelm``), named by a
hash of its source, flags, torch, Python and the CPU.

Switch: ``SPIKELM_CPU_KERNELS=0`` in the environment, or :func:`set_enabled` (``False``/``True``; ``None`` goes back
to the environment), turns all of them off; ``SPIKELM_CPU_KERNELS_MAX_ROWS=N`` moves the linear's row threshold.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings

import torch

from ..errors import UserError
from ..outputs import cache_dir
from .exact import exact_linear

ENV_VAR = "SPIKELM_CPU_KERNELS"
ROWS_ENV_VAR = "SPIKELM_CPU_KERNELS_MAX_ROWS"  # overrides MAX_ROWS (for measuring the threshold)
# At most this many rows take the few-row linear (its C++ template covers 1 to 8; batch 1 and 2 at T = 4).
MAX_ROWS = 8
VERSION = 5  # bump when the C++ source changes (part of the build's name)
FUNCTIONS = ["few_rows_linear", "elastic_spikes", "spike_pack5", "unpack5_steps_into_batch"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// ---------------------------------------------------------------------------------------------------------------
// Dense multi-row linear for a few rows: y (M, N) = x (M, K) @ w (N, K)^T + bias, w in nn.Linear's own layout,
// accumulated in float64 and rounded once to float32 (spikelm.nn.exact: every path of a spiking model computes the
// same bits whatever its summation order). Each weight row n is read once, in order, for all M input rows (the
// threads take contiguous blocks of outputs, so each streams one contiguous piece of the weight); the M dot products
// run in 4-wide float64 lanes (a float32 product is exact in float64). At batch 1 a decoding step is bound by
// reading the weights, so M = T rows cost about one.
// ---------------------------------------------------------------------------------------------------------------
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));

static inline v4d load4d(const float* p) {
  v4f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, v4d);
}

static inline v4d load4dd(const double* p) {
  v4d v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

static inline double hsum4(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }

template <int M, int NB>
static void rows_block(const double* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                       float* __restrict__ y, int64_t K, int64_t N, int64_t n) {
  v4d acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = v4d{0, 0, 0, 0};
  const int64_t K4 = K / 4 * 4;
  for (int64_t k = 0; k < K4; k += 4) {
    v4d wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load4d(w + (n + j) * K + k);
    for (int m = 0; m < M; ++m) {
      const v4d xv = load4dd(x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < NB; ++j) {
      double s = hsum4(acc[m][j]);
      for (int64_t k = K4; k < K; ++k) s += x[m * K + k] * static_cast<double>(w[(n + j) * K + k]);
      if (bias) s += static_cast<double>(bias[n + j]);
      y[m * N + n + j] = static_cast<float>(s);
    }
  }
}

template <int M>
static void rows_range(const double* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                       int64_t n0, int64_t n1) {
  constexpr int NB = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) rows_block<M, NB>(x, w, bias, y, K, N, n);
  for (; n < n1; ++n) rows_block<M, 1>(x, w, bias, y, K, N, n);
}

torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x must be (M, K) and w (N, K)");
  TORCH_CHECK(x.size(1) == w.size(1), "x's columns must equal w's columns");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "1 to 8 rows");
  auto xc = x.to(at::kDouble).contiguous();  // the rows once in float64 (M * K is small)
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  torch::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N, "bias must be float32 of N elements");
    bp = bc.data_ptr<float>();
  }
  const double* xp = xc.data_ptr<double>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // blocks of 16 outputs; a thread's grain is at least 64 KB of weight
  constexpr int64_t UNIT = 16;
  const int64_t units = (N + UNIT - 1) / UNIT;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * UNIT, 1));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t n0 = u0 * UNIT, n1 = std::min(N, u1 * UNIT);
    switch (M) {
      case 1: rows_range<1>(xp, wp, bp, yp, K, N, n0, n1); break;
      case 2: rows_range<2>(xp, wp, bp, yp, K, N, n0, n1); break;
      case 3: rows_range<3>(xp, wp, bp, yp, K, N, n0, n1); break;
      case 4: rows_range<4>(xp, wp, bp, yp, K, N, n0, n1); break;
      case 5: rows_range<5>(xp, wp, bp, yp, K, N, n0, n1); break;
      case 6: rows_range<6>(xp, wp, bp, yp, K, N, n0, n1); break;
      case 7: rows_range<7>(xp, wp, bp, yp, K, N, n0, n1); break;
      default: rows_range<8>(xp, wp, bp, yp, K, N, n0, n1); break;
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// The elastic neuron for inference, all T steps in one pass over the elements (the arithmetic of
// spike_steps_inference, operation for operation, in float32; compiled with -ffp-contract=off so that no multiply
// and add fuse): u_0 = x_0, u_t = (0.25 * u_{t-1}) * carry + x_t (membrane) or x_t (no membrane),
// q = clamp(round_half_even(u / alpha_t), low, 1), spike = q * alpha_t (or q), carry = alpha_t - spike (official
// ternary reset) or 1 - |q|.
// ---------------------------------------------------------------------------------------------------------------
#if defined(__has_builtin)
#if __has_builtin(__builtin_roundevenf)
#define SPIKELM_ROUND_EVEN(x) __builtin_roundevenf(x)
#endif
#endif
#ifndef SPIKELM_ROUND_EVEN
#define SPIKELM_ROUND_EVEN(x) std::nearbyint(x)  // round half to even in the default rounding mode
#endif

static inline float spike_level(float u, float a, float low) {
  float q = SPIKELM_ROUND_EVEN(u / a);
  q = q > 1.0f ? 1.0f : q;
  return q < low ? low : q;
}

torch::Tensor elastic_spikes(torch::Tensor x, torch::Tensor alpha, int64_t low, bool official, bool amplitude,
                             bool membrane) {
  TORCH_CHECK(x.dim() >= 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be float32 (T, ...)");
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == x.size(0) && alpha.scalar_type() == at::kFloat,
              "alpha must be float32 (T,)");
  auto xc = x.contiguous();
  auto ac = alpha.contiguous();
  const int64_t T = xc.size(0), R = xc.numel() / T;
  auto out = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* ap = ac.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lo = static_cast<float>(low);
  constexpr int64_t BLOCK = 1024;  // the membrane and carry of a block stay in L1 across the T steps
  at::parallel_for(0, R, 16384, [&](int64_t r0, int64_t r1) {
    float u[BLOCK], carry[BLOCK];
    for (int64_t b0 = r0; b0 < r1; b0 += BLOCK) {
      const int64_t n = std::min(BLOCK, r1 - b0);
      for (int64_t t = 0; t < T; ++t) {  // the steps outside, the elements inside: one vector loop per step
        const float a = ap[t];
        const float* __restrict__ xt = xp + t * R + b0;
        float* __restrict__ ot = op + t * R + b0;
        if (membrane && t > 0) {
          for (int64_t i = 0; i < n; ++i) u[i] = (u[i] * 0.25f) * carry[i] + xt[i];
        } else {
          for (int64_t i = 0; i < n; ++i) u[i] = xt[i];
        }
        for (int64_t i = 0; i < n; ++i) {
          const float q = spike_level(u[i], a, lo);
          const float sp = q * a;
          ot[i] = amplitude ? sp : q;
          carry[i] = official ? a - sp : 1.0f - std::fabs(q);
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// K / V of a converted model at a decoding step, into the packed spike cache: states (S*B, H, L, d) float32
// (S steps time-major in the batch axis) -> codes q = clamp(round(x / alpha_t), low, 1) packed 5 per byte in
// base 3 (digit q + 1, value i of a group of 5 times 3^i, the last group padded with q = 0), laid out (B, S*H, L,
// ceil(d / 5)) (steps folded into the heads, step-major): pack_ternary(fold_steps_into_heads(codes), 5).
// ---------------------------------------------------------------------------------------------------------------
torch::Tensor spike_pack5(torch::Tensor states, torch::Tensor alpha, int64_t low) {
  TORCH_CHECK(states.dim() == 4 && states.scalar_type() == at::kFloat && states.device().is_cpu(),
              "states must be float32 (S*B, H, L, d)");
  const int64_t S = alpha.size(0);
  TORCH_CHECK(alpha.dim() == 1 && alpha.scalar_type() == at::kFloat && states.size(0) % S == 0,
              "alpha must be float32 (S,) with S dividing the first axis");
  auto xc = states.contiguous();
  auto ac = alpha.contiguous();
  const int64_t B = xc.size(0) / S, H = xc.size(1), L = xc.size(2), d = xc.size(3), nb = (d + 4) / 5;
  auto out = torch::empty({B, S * H, L, nb}, xc.options().dtype(at::kByte));
  const float* xp = xc.data_ptr<float>();
  const float* ap = ac.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const float lo = static_cast<float>(low);
  at::parallel_for(0, S * B * H * L, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // i = ((t * B + b) * H + h) * L + l
      const int64_t l = i % L, h = (i / L) % H, b = (i / (L * H)) % B, t = i / (L * H * B);
      const float a = ap[t];
      const float* row = xp + i * d;
      uint8_t* dst = op + (((b * S + t) * H + h) * L + l) * nb;
      for (int64_t g = 0; g < nb; ++g) {
        int value = 0, weight = 1;
        for (int64_t j = 0; j < 5; ++j, weight *= 3) {
          const int64_t c = g * 5 + j;
          const int digit = c < d ? static_cast<int>(spike_level(row[c], a, lo)) + 1 : 1;
          value += digit * weight;
        }
        dst[g] = static_cast<uint8_t>(value);
      }
    }
  });
  return out;
}

// packed (B, S*H, L, nb) codes 5 per byte -> (S*B, H, L, width) float32 spikes q * scale_t (steps into the batch
// axis): the values of ternary_table / unpack_ternary(..., steps_into_batch=True), bit for bit.
torch::Tensor unpack5_steps_into_batch(torch::Tensor packed, torch::Tensor scale, int64_t width) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.device().is_cpu(),
              "packed must be uint8 (B, S*H, L, nb)");
  const int64_t S = scale.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && packed.size(1) % S == 0,
              "scale must be float32 (S,) with S dividing the head axis");
  auto pc = packed.contiguous();
  auto sc = scale.contiguous();
  const int64_t B = pc.size(0), H = pc.size(1) / S, L = pc.size(2), nb = pc.size(3);
  TORCH_CHECK(width <= nb * 5 && width > (nb - 1) * 5, "width does not match the packed bytes");
  std::vector<float> table(S * 256 * 5);
  for (int64_t t = 0; t < S; ++t) {
    const float a = sc.data_ptr<float>()[t];
    for (int byte = 0; byte < 256; ++byte) {
      int rest = byte;
      for (int j = 0; j < 5; ++j, rest /= 3) table[(t * 256 + byte) * 5 + j] = static_cast<float>(rest % 3 - 1) * a;
    }
  }
  auto out = torch::empty({S * B, H, L, width}, pc.options().dtype(at::kFloat));
  const uint8_t* pp = pc.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const float* tp = table.data();
  at::parallel_for(0, S * B * H * L, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // output row i = ((t * B + b) * H + h) * L + l
      const int64_t l = i % L, h = (i / L) % H, b = (i / (L * H)) % B, t = i / (L * H * B);
      const uint8_t* src = pp + (((b * S + t) * H + h) * L + l) * nb;
      const float* tt = tp + t * 256 * 5;
      float* dst = op + i * width;
      const int64_t full = width / 5;
      for (int64_t g = 0; g < full; ++g) {
        const float* v = tt + src[g] * 5;
        dst[g * 5] = v[0]; dst[g * 5 + 1] = v[1]; dst[g * 5 + 2] = v[2]; dst[g * 5 + 3] = v[3]; dst[g * 5 + 4] = v[4];
      }
      for (int64_t c = full * 5; c < width; ++c) dst[c] = tt[src[c / 5] * 5 + c % 5];
    }
  });
  return out;
}
"""

_module: list = []  # [the built extension] or [None] once building failed
_build_error: list = []
_enabled_override: list = [None]
_warned: set = set()
_ON, _OFF = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")


def _notice(key: str, message: str) -> None:
    """One line, once per process, when the kernel is not taken where it would be (never silently)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def set_enabled(flag: bool | None) -> None:
    """Turn the kernels on or off for this process; ``None``: follow ``$SPIKELM_CPU_KERNELS`` (on unless "0")."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects True, False or None, got {flag!r}")
    _enabled_override[0] = flag


@contextlib.contextmanager
def forced(flag: bool | None):
    """The kernels switched on (True) or off (False) inside the block; None leaves the switch as it is."""
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
    """Whether the kernels may be taken (the switch, not whether they build)."""
    if _enabled_override[0] is not None:
        return _enabled_override[0]
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise UserError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1 (on, the default) or 0 (off)")


def max_rows() -> int:
    """The most rows that take the few-row linear: :data:`MAX_ROWS`, or ``$SPIKELM_CPU_KERNELS_MAX_ROWS`` (0 to 8)."""
    value = os.environ.get(ROWS_ENV_VAR)
    if value is None:
        return MAX_ROWS
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if not 0 <= rows <= 8:
        raise UserError(f"{ROWS_ENV_VAR}={value!r}: expected a whole number of rows from 0 to 8")
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
    # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds; without it the loop runs on one thread.
    # -ffp-contract=off: the neuron's u = (0.25 * u) * carry + x must round as PyTorch's three operations do
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]  # the neuron: no fused multiply-add
    return flags + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])


def build_name() -> str:
    key = f"{VERSION}|{_SOURCE}|{_flags()}|{torch.__version__}|{sys.version_info[:2]}|{_cpu_signature()}"
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
    name = build_name()
    directory = cache_dir() / "extensions" / name
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{name}*.so")):
        print(f"spikelm: building the CPU decoding kernels once (about a minute) in {directory}", file=sys.stderr)
    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[_SOURCE],
        functions=FUNCTIONS,
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
        except Exception as err:  # no compiler, no ninja, an unsupported platform: the PyTorch paths
            _module.append(None)
            _build_error.append(err)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _notice(
                "build",
                f"spikelm: the CPU decoding kernels could not be built ({type(err).__name__}: {first}); "
                f"spiking layers use the PyTorch path (set {ENV_VAR}=0 to skip the attempt)",
            )
    return _module[0]


def _call(name: str, *args):
    """``kernel().<name>(*args)``, named in torch.profiler's tables (an extension call is not an aten op)."""
    module = kernel()
    if module is None:
        raise RuntimeError(f"the CPU decoding kernels are unavailable: {_build_error[0]}")
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(f"spikelm::{name}"):
            return getattr(module, name)(*args)
    return getattr(module, name)(*args)


def usable(*tensors: torch.Tensor | None, what: str = "spiking layers") -> bool:
    """Whether the kernels may run on ``tensors`` here: switched on, built, CPU, float32, no gradient to record.

    A CUDA tensor or another dtype is announced (one line, once per process), never skipped silently. (Called for
    every spiking layer of a decoding step: plain loops, no generators.)"""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if grad and t.requires_grad:
            return False
        if t.dtype is not torch.float32 or t.device.type != "cpu":
            return _announce_platform(tensors, what)
    return enabled() and kernel() is not None


def _announce_platform(tensors, what: str) -> bool:
    if not enabled():
        return False
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in present):
        device = next(t.device.type for t in present if t.device.type != "cpu")
        _notice(f"device-{device}", f"spikelm: the C++ decoding kernels are CPU-only; {what} on {device} use PyTorch")
        return False
    dtype = next(t.dtype for t in present if t.dtype != torch.float32)
    _notice(f"dtype-{dtype}", f"spikelm: the C++ decoding kernels are float32-only; {dtype} {what} use PyTorch")
    return False


# ----------------------------------------------------------------------------------------------
# The few-row linear
# ----------------------------------------------------------------------------------------------


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel itself: ``F.linear(x, weight, bias)`` for float32 CPU tensors with 1 to 8 rows (any leading shape).

    Raises ``RuntimeError`` if the extension cannot be built (use :func:`spike_linear` for the dispatch)."""
    rows = x.reshape(-1, x.shape[-1])
    w = weight if weight.is_contiguous() else weight.contiguous()
    out = _call("few_rows_linear", rows, w, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def takes_linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`spike_linear` runs the few-row kernel for these tensors (announcing, once, a platform it
    skips)."""
    if x.dim() < 1 or x.numel() == 0 or x.numel() // x.shape[-1] > max_rows():
        return False
    return usable(x, weight, bias, what="spiking linears")


def spike_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a spiking input: :func:`spikelm.nn.exact.exact_linear` (float64
    accumulation, one rounding: the same bits on every path), by the few-row kernel where it pays (CPU, float32, no
    autograd, at most :func:`max_rows` rows: a decoding step), else the float64 GEMM."""
    if takes_linear_kernel(x, weight, bias):
        return few_rows_linear(x, weight, bias)
    return exact_linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------
# The neuron and the packed cache
# ----------------------------------------------------------------------------------------------


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
