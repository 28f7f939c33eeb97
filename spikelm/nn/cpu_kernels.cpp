// The C++ kernels of spikelm's decoding steps on CPU (spikelm/nn/cpu_kernels.py builds this file on first use with
// torch.utils.cpp_extension.load_inline; spikelm/nn/kernels.py decides where each one runs). Each computes what its
// PyTorch path computes (tests/test_cpu_kernels.py: the neuron and cache kernels bit for bit, the few-row linear
// against the float64 definition of spikelm/nn/exact.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

#if defined(__AVX512F__)
// One input row (a decoding step at batch 1) with AVX-512: NB weight rows at a time, 16 floats of each per
// iteration widened to two 8-lane float64 vectors (vcvtps2pd) and fused-multiply-added into two accumulators per
// row (a float32 x float32 product is exact in float64, so a fused multiply-add rounds as the separate add does).
template <int NB>
static inline void one_row_block512(const double* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ bias, float* __restrict__ y, int64_t K, int64_t n) {
  __m512d acc0[NB], acc1[NB];
  for (int j = 0; j < NB; ++j) acc0[j] = acc1[j] = _mm512_setzero_pd();
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    const __m512d x0 = _mm512_loadu_pd(x + k), x1 = _mm512_loadu_pd(x + k + 8);
    for (int j = 0; j < NB; ++j) {
      const float* row = w + (n + j) * K + k;
      // the same columns of the next two blocks' rows (read next): more loads in flight than the hardware
      // prefetcher keeps for NB interleaved streams (a prefetch past the weight's end is harmless)
      _mm_prefetch(reinterpret_cast<const char*>(row + NB * K), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * NB * K), _MM_HINT_T1);
      acc0[j] = _mm512_fmadd_pd(x0, _mm512_cvtps_pd(_mm256_loadu_ps(row)), acc0[j]);
      acc1[j] = _mm512_fmadd_pd(x1, _mm512_cvtps_pd(_mm256_loadu_ps(row + 8)), acc1[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    double s = _mm512_reduce_add_pd(_mm512_add_pd(acc0[j], acc1[j]));
    for (int64_t k = K16; k < K; ++k) s += x[k] * static_cast<double>(w[(n + j) * K + k]);
    if (bias) s += static_cast<double>(bias[n + j]);
    y[n + j] = static_cast<float>(s);
  }
}
#endif

#if defined(__AVX512F__)
// M input rows (2 to 8) with AVX-512: NB weight rows at a time, 8 floats of each per iteration widened to one 8-lane
// float64 vector and fused-multiply-added into one accumulator per (row, weight row) (the product is exact in
// float64, as above); each weight block is read once for all M rows.
template <int M, int NB>
static inline void rows_block512(const double* __restrict__ x, const float* __restrict__ w,
                                 const float* __restrict__ bias, float* __restrict__ y, int64_t K, int64_t N,
                                 int64_t n) {
  __m512d acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_pd();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m512d wv[NB];
    for (int j = 0; j < NB; ++j) {
      const float* row = w + (n + j) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(row + NB * K), _MM_HINT_T0);
      wv[j] = _mm512_cvtps_pd(_mm256_loadu_ps(row));
    }
    for (int m = 0; m < M; ++m) {
      const __m512d xv = _mm512_loadu_pd(x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_pd(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) {
      double s = _mm512_reduce_add_pd(acc[m][j]);
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * static_cast<double>(w[(n + j) * K + k]);
      if (bias) s += static_cast<double>(bias[n + j]);
      y[m * N + n + j] = static_cast<float>(s);
    }
}
#endif

template <int M>
static void rows_range(const double* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                       int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  if (M == 1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) one_row_block512<4>(x, w, bias, y, K, n);
    for (; n < n1; ++n) one_row_block512<1>(x, w, bias, y, K, n);
    return;
  }
  {
    constexpr int NB512 = M <= 4 ? 4 : 2;
    int64_t n = n0;
    for (; n + NB512 <= n1; n += NB512) rows_block512<M, NB512>(x, w, bias, y, K, N, n);
    for (; n < n1; ++n) rows_block512<M, 1>(x, w, bias, y, K, N, n);
    return;
  }
#endif
  constexpr int NB = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) rows_block<M, NB>(x, w, bias, y, K, N, n);
  for (; n < n1; ++n) rows_block<M, 1>(x, w, bias, y, K, N, n);
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// rows_range for a runtime row count M in 1..16 (the template's instances; 9 to 16 rows as 8 and the rest, one after
// the other on the same block of weight rows, which the second reads from cache: every output is the same one-row
// dot product whichever pass computes it)
static inline void rows_range_of(int64_t M, const double* xp, const float* wp, const float* bp, float* yp, int64_t K,
                                 int64_t N, int64_t n0, int64_t n1) {
  if (M > 8) {
    rows_range_of(8, xp, wp, bp, yp, K, N, n0, n1);
    rows_range_of(M - 8, xp + 8 * K, wp, bp, yp + 8 * N, K, N, n0, n1);
    return;
  }
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
}

torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x must be (M, K) and w (N, K)");
  TORCH_CHECK(x.size(1) == w.size(1), "x's columns must equal w's columns");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 16, "1 to 16 rows");
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
    rows_range_of(M, xp, wp, bp, yp, K, N, n0, n1);
  });
  return y;
}

// The readers of one input in one call: y_i = x @ w_i^T + bias_i for each weight, exactly as few_rows_linear computes
// each (every output is one row's dot product, whichever block or thread computes it: the same bits), the rows
// converted to float64 once and the threads sharing the blocks of all the weights.
std::vector<torch::Tensor> few_rows_linears(torch::Tensor x, std::vector<torch::Tensor> ws,
                                            std::vector<c10::optional<torch::Tensor>> biases) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be float32 (M, K)");
  TORCH_CHECK(!ws.empty() && ws.size() == biases.size(), "one bias (or None) per weight");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= 16, "1 to 16 rows");
  auto xc = x.to(at::kDouble).contiguous();
  constexpr int64_t UNIT = 16;
  std::vector<torch::Tensor> ys, bcs;
  std::vector<int64_t> first{0};  // the first block of each weight
  for (size_t i = 0; i < ws.size(); ++i) {
    const auto& w = ws[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == at::kFloat && w.device().is_cpu() &&
                    w.is_contiguous(), "weights: contiguous float32 (N, K)");
    torch::Tensor bc;
    if (biases[i].has_value() && biases[i]->defined()) {
      bc = biases[i]->contiguous();
      TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == w.size(0), "bias must be float32 of N elements");
    }
    bcs.push_back(bc);
    ys.push_back(torch::empty({M, w.size(0)}, x.options()));
    first.push_back(first.back() + (w.size(0) + UNIT - 1) / UNIT);
  }
  const double* xp = xc.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * UNIT, 1));
  at::parallel_for(0, first.back(), grain, [&](int64_t u0, int64_t u1) {
    for (size_t i = 0; i < ws.size(); ++i) {
      const int64_t a = std::max(u0, first[i]), b = std::min(u1, first[i + 1]);
      if (a >= b) continue;
      const int64_t N = ws[i].size(0), n0 = (a - first[i]) * UNIT, n1 = std::min(N, (b - first[i]) * UNIT);
      const float* wp = ws[i].data_ptr<float>();
      const float* bp = bcs[i].defined() ? bcs[i].data_ptr<float>() : nullptr;
      float* yp = ys[i].data_ptr<float>();
      rows_range_of(M, xp, wp, bp, yp, K, N, n0, n1);
    }
  });
  return ys;
}

// ---------------------------------------------------------------------------------------------------------------
// The elastic neuron for inference, all T steps in one pass over the elements (the arithmetic of
// spike_steps_inference, operation for operation, in float32; compiled with -ffp-contract=off so that no multiply
// and add fuse): u_0 = x_0, u_t = (0.25 * u_{t-1}) * carry + x_t (membrane) or x_t (no membrane),
// q = clamp(round_half_even(u / alpha_t), low, 1), spike = q * alpha_t (or q), carry = alpha_t - spike (official
// ternary reset) or 1 - |q|.
// ---------------------------------------------------------------------------------------------------------------
// round half to even in the default rounding mode, as PyTorch's round (std::nearbyint) does; a form the compiler
// vectorises (GCC has no vector form of __builtin_roundevenf, which kept the per-token code loops scalar)
#define SPIKELM_ROUND_EVEN(x) std::nearbyint(x)

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

// ---------------------------------------------------------------------------------------------------------------
// The per-token code of a GIF or signed neuron (spikelm/nn/neurons/gif.py, signed.py) in one pass per token: the
// ranges per range group, the rounding, the clamping (the saliency split is the groups: each channel's group has
// its own top code) and the dequantised value, each operation in float32 as the PyTorch path does it (compiled
// with -ffp-contract=off; the options come in as float32, as PyTorch casts a Python scalar against a float32
// tensor). x (R, C) float32; group (Rg, C) int32 in 0..G-1, row r of x reading group row (r / inner) % Rg (a K/V
// neuron's channel shape (H, 1, d) on (B, H, L, d) states: Rg = H, inner = L); top (G,) float32.
//   GIF (is_signed false): per token and group the min and max over its channels (a group without channels: 0, 0)
//     times clip; scale = max((max - min) / top, floor); zero = round(-min / scale);
//     code = max(min(round(x / scale) + zero, top), 0); x_hat = (code - zero) * scale.
//   signed: scale = max(max(0, max |x|) * clip / top, floor) (times factor[g] if given); u = x / scale;
//     code = min(max(round(u), -top), top), 0 where |u| < dead_zone (if dead_zone > 0); x_hat = code * scale;
//     with outlier_threshold > 0, a row whose max |x| exceeds it has x_hat = x (SignedNeuron's outlier tokens).
// Returns {x_hat (R, C) float32, code, grid}: code (R, C) int32 (empty unless want_code), or with pack_bits > 0 the
// codes plus code_offset as bit planes (R, pack_bits * ceil(C / 8)) uint8 (pack_bit_planes' layout); grid (R, 2G)
// each token's scales then zero points (GIF: spikelm.nn.neurons.gif.pack_grid's layout) or (R, G) its scales
// (signed).
// ---------------------------------------------------------------------------------------------------------------
// One row's integer codes (C) plus code_offset as pack_bits bit planes of nb = ceil(C / 8) bytes into bo (zeroed here):
// plane k holds bit k of each code, code c at bit c % 8 of byte c / 8 (spikelm.nn.packing.pack_bits' layout).
static inline void pack_planes(const int32_t* __restrict__ qv, int64_t C, int64_t code_offset, int64_t pack_bits,
                               int64_t nb, uint8_t* __restrict__ bo) {
  std::fill(bo, bo + pack_bits * nb, static_cast<uint8_t>(0));
  int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512VL__)
  // eight channels at a time: bit k of each of their codes, tested as one 8-bit mask, is byte c / 8 of plane k
  const __m256i offset = _mm256_set1_epi32(static_cast<int32_t>(code_offset));
  for (; c + 8 <= C; c += 8) {
    const __m256i v = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + c)), offset);
    for (int64_t k = 0; k < pack_bits; ++k)
      bo[k * nb + c / 8] = static_cast<uint8_t>(_mm256_test_epi32_mask(v, _mm256_set1_epi32(1 << k)));
  }
#endif
  for (; c < C; ++c) {
    const uint32_t v = static_cast<uint32_t>(qv[c] + code_offset);
    for (int64_t k = 0; k < pack_bits; ++k) bo[k * nb + c / 8] |= static_cast<uint8_t>(((v >> k) & 1u) << (c % 8));
  }
}

// One token of the signed pass below (the same operations in the same order): its group scales into s (G), its
// dequantised values (float32 products) into out as OutT, its codes into co (if not null) and, with pack_bits > 0,
// the codes plus code_offset as bit planes into bo (pack_bits * nb bytes, zeroed here). Scratch: hi (4 * G), divisor,
// channel_top, quant (C).
struct SignedRule {
  const int32_t* group;  // the token's group row (C)
  const float* top;      // each group's top code (G)
  const float* factor;   // each group's scale factor (G) or null
  int64_t C, G;
  float clip, floor_value, dead_zone;
  bool dead;
};

template <typename OutT>
static inline void signed_token(const float* __restrict__ row, const SignedRule& rule, float* __restrict__ s,
                                OutT* __restrict__ out, int32_t* __restrict__ co, uint8_t* __restrict__ bo,
                                int64_t pack_bits, int64_t nb, int64_t code_offset, float* __restrict__ hi,
                                float* __restrict__ dv, float* __restrict__ tt, int32_t* __restrict__ qv) {
  const int32_t* __restrict__ g = rule.group;
  const int64_t C = rule.C, G = rule.G;
  // each group's max |x| in four interleaved partial maxima (hi: 4 * G; consecutive channels, mostly of one group, then
  // update different entries instead of waiting on one another), then merged: a max is exact in any order
  for (int64_t j = 0; j < 4 * G; ++j) hi[j] = 0.0f;
  float* h1 = hi + G;
  float* h2 = hi + 2 * G;
  float* h3 = hi + 3 * G;
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const float a0 = std::fabs(row[c]), a1 = std::fabs(row[c + 1]), a2 = std::fabs(row[c + 2]),
                a3 = std::fabs(row[c + 3]);
    // a select, not a branch (which mispredicts at every group's new maximum); a NaN never replaces a maximum
    float* p0 = hi + g[c];
    float* p1 = h1 + g[c + 1];
    float* p2 = h2 + g[c + 2];
    float* p3 = h3 + g[c + 3];
    *p0 = *p0 < a0 ? a0 : *p0;
    *p1 = *p1 < a1 ? a1 : *p1;
    *p2 = *p2 < a2 ? a2 : *p2;
    *p3 = *p3 < a3 ? a3 : *p3;
  }
  for (; c < C; ++c) {
    const float a = std::fabs(row[c]);
    if (a > hi[g[c]]) hi[g[c]] = a;
  }
  for (int64_t j = 0; j < G; ++j) {
    if (h1[j] > hi[j]) hi[j] = h1[j];
    if (h2[j] > hi[j]) hi[j] = h2[j];
    if (h3[j] > hi[j]) hi[j] = h3[j];
  }
  for (int64_t j = 0; j < G; ++j) {
    float v = (hi[j] * rule.clip) / rule.top[j];
    v = v < rule.floor_value ? rule.floor_value : v;
    s[j] = rule.factor ? v * rule.factor[j] : v;
  }
  for (int64_t c = 0; c < C; ++c) {
    dv[c] = s[g[c]];
    tt[c] = rule.top[g[c]];
  }
  const bool dead = rule.dead;  // locals: a store through out must not make the loop read them again
  const float dead_zone = rule.dead_zone;
  for (int64_t c = 0; c < C; ++c) {
    const float t = tt[c];
    const float u = row[c] / dv[c];
    float q = SPIKELM_ROUND_EVEN(u);
    q = q < -t ? -t : q;
    q = q > t ? t : q;
    // the dead zone's 0 as a mask on the integer code (a select on q makes GCC branch, and the loop stays scalar)
    const int32_t keep = -static_cast<int32_t>(!(dead & (std::fabs(u) < dead_zone)));
    const int32_t qi = static_cast<int32_t>(q) & keep;
    qv[c] = qi;
    const float value = static_cast<float>(qi) * dv[c];
    out[c] = static_cast<OutT>(value);
  }
  if (co) std::copy(qv, qv + C, co);
  if (bo && pack_bits > 0) pack_planes(qv, C, code_offset, pack_bits, nb, bo);
}

std::vector<torch::Tensor> token_codes(torch::Tensor x, torch::Tensor group, torch::Tensor top, int64_t inner,
                                       double clip, double dead_zone, double floor_value,
                                       c10::optional<torch::Tensor> factor, bool is_signed, bool want_code,
                                       int64_t pack_bits, int64_t code_offset, double outlier_threshold) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be float32 (R, C)");
  TORCH_CHECK(group.dim() == 2 && group.scalar_type() == at::kInt && group.size(1) == x.size(1),
              "group must be int32 (Rg, C)");
  TORCH_CHECK(top.dim() == 1 && top.scalar_type() == at::kFloat, "top must be float32 (G,)");
  TORCH_CHECK(inner >= 1, "inner must be positive");
  TORCH_CHECK(pack_bits >= 0 && pack_bits <= 31, "pack_bits must be 0 to 31");
  auto xc = x.contiguous();
  auto gc = group.contiguous();
  auto tc = top.contiguous();
  const int64_t R = xc.size(0), C = xc.size(1), Rg = gc.size(0), G = tc.size(0), nb = (C + 7) / 8;
  torch::Tensor fc;
  const float* fp = nullptr;
  if (factor.has_value() && factor->defined()) {
    fc = factor->contiguous();
    TORCH_CHECK(fc.scalar_type() == at::kFloat && fc.numel() == G, "factor must be float32 (G,)");
    fp = fc.data_ptr<float>();
  }
  const bool packing = want_code && pack_bits > 0;
  auto xhat = torch::empty({R, C}, xc.options());
  auto code = !want_code ? torch::Tensor()
              : packing  ? torch::empty({R, pack_bits * nb}, xc.options().dtype(at::kByte))
                         : torch::empty({R, C}, xc.options().dtype(at::kInt));
  const int64_t width = is_signed ? G : 2 * G;
  auto grid = torch::empty({R, width}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int32_t* gp = gc.data_ptr<int32_t>();
  const float* tp = tc.data_ptr<float>();
  float* hp = xhat.data_ptr<float>();
  int32_t* cp = want_code && !packing ? code.data_ptr<int32_t>() : nullptr;
  uint8_t* bp = packing ? code.data_ptr<uint8_t>() : nullptr;
  float* gridp = grid.data_ptr<float>();
  const float clip_f = static_cast<float>(clip), dead_f = static_cast<float>(dead_zone);
  const float floor_f = static_cast<float>(floor_value);
  const bool dead = dead_zone > 0;
  // the signed neuron's outlier tokens: a row whose max |x| exceeds the threshold (compared in float32, as PyTorch
  // compares a float32 tensor with a Python number) passes real-valued (x_hat = x); its codes and grid are kept
  const bool outliers = is_signed && outlier_threshold > 0;
  const float outlier_f = static_cast<float>(outlier_threshold);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < Rg * C; ++i) TORCH_CHECK(gp[i] >= 0 && gp[i] < G, "group index out of range");
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> lo(G), hi(4 * G);  // hi: signed_token's four partial maxima (GIF: the first G)
    // the signed pass per channel: its group's scale (the divisor) and top code, gathered once per row so that the
    // division, rounding and clamping run as one loop the compiler vectorises (the same operations per element)
    std::vector<float> divisor(is_signed ? C : 0), channel_top(is_signed ? C : 0);
    std::vector<int32_t> quant(C);  // a row's codes, copied out and packed after its pass
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * C;
      const int32_t* g = gp + ((r / inner) % Rg) * C;
      float* s = gridp + r * width;
      float* out = hp + r * C;
      int32_t* co = cp ? cp + r * C : nullptr;
      uint8_t* bo = bp ? bp + r * pack_bits * nb : nullptr;
      if (is_signed) {
        const SignedRule rule{g, tp, fp, C, G, clip_f, floor_f, dead_f, dead};
        signed_token<float>(row, rule, s, out, co, bo, pack_bits, nb, code_offset, hi.data(), divisor.data(),
                            channel_top.data(), quant.data());
        if (outliers) {
          float top_abs = 0.0f;
          bool nan = false;
          for (int64_t c = 0; c < C; ++c) {
            const float a = std::fabs(row[c]);
            nan |= a != a;
            top_abs = a > top_abs ? a : top_abs;
          }
          if (!nan && top_abs > outlier_f) std::copy(row, row + C, out);
        }
      } else {
        float* z = s + G;
        for (int64_t j = 0; j < G; ++j) lo[j] = inf, hi[j] = -inf;
        for (int64_t c = 0; c < C; ++c) {
          const float v = row[c];
          const int32_t j = g[c];
          if (v < lo[j]) lo[j] = v;
          if (v > hi[j]) hi[j] = v;
        }
        for (int64_t j = 0; j < G; ++j) {
          const bool present = lo[j] != inf;  // a group with a channel (inputs are finite)
          const float mn = (present ? lo[j] : 0.0f) * clip_f, mx = (present ? hi[j] : 0.0f) * clip_f;
          float v = (mx - mn) / tp[j];
          v = v < floor_f ? floor_f : v;
          s[j] = v;
          z[j] = SPIKELM_ROUND_EVEN(-mn / v);
        }
        int32_t* qv = quant.data();
        for (int64_t c = 0; c < C; ++c) {
          const int32_t j = g[c];
          float q = SPIKELM_ROUND_EVEN(row[c] / s[j]) + z[j];
          q = q < tp[j] ? q : tp[j];
          q = q < 0.0f ? 0.0f : q;
          const int32_t qi = static_cast<int32_t>(q);
          qv[c] = qi;
          out[c] = (static_cast<float>(qi) - z[j]) * s[j];
        }
        if (co) std::copy(qv, qv + C, co);
        if (bo) pack_planes(qv, C, code_offset, pack_bits, nb, bo);
      }
    }
  });
  return {xhat, code, grid};
}

// Integer codes (R, d) int32 in [0, 2^bits) -> (R, bits * ceil(d / 8)) uint8 bit planes: plane k of a row holds bit
// k of each code, code c at bit c % 8 of byte c / 8 (the last byte padded with zeros): spikelm.nn.packing.pack_bits
// flattened over its last two axes, bit for bit.
torch::Tensor pack_bit_planes(torch::Tensor codes, int64_t bits) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kInt && codes.device().is_cpu(),
              "codes must be int32 (R, d)");
  TORCH_CHECK(bits >= 1 && bits <= 31, "bits must be 1 to 31");
  auto cc = codes.contiguous();
  const int64_t R = cc.size(0), d = cc.size(1), nb = (d + 7) / 8;
  auto out = torch::empty({R, bits * nb}, cc.options().dtype(at::kByte));
  const int32_t* cp = cc.data_ptr<int32_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, R, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      pack_planes(cp + r * d, d, 0, bits, nb, op + r * bits * nb);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Float64 products summed in the order of this machine's BLAS. The readable paths (OnlineHadamard.forward in
// spikelm/conversion/rotation.py, _one_query_attention in spikelm/nn/exact.py) multiply in float64 with
// torch.matmul; its products and partial sums round, so a sum in another order gives other bits wherever the last
// bit matters. Cache-cold, between the weight-streaming linears of a decoding step, MKL's small float64 products
// cost several times their arithmetic (packing buffers, waking threads), so the two functions below take `hand`:
// false runs the ATen operations themselves (the readable path's bits by construction); true runs loops written to
// sum in the order that MKL (as PyTorch calls it) sums on this project's CPU, as measured on random operands and
// with +-2^80 pairs that reveal the summation tree:
//   * each factor of the Hadamard (K = f <= 384, any number of rows): per output one chain of fused multiply-adds
//     over k in ascending order, from 0;
//   * q @ K^T of the attention (both operands contiguous along k = d), by the g query rows per K/V head: g = 2, 3
//     (order 0): 8 lanes, lane r the fused chain over k = r, r + 8, ... from 0, then a_r = l_r + l_{r+4} and
//     ((a0 + a1) + (a2 + a3)); g >= 4 (order 1): one fused chain over k; g = 1 (order 2, MKL's matrix-vector
//     product): two accumulators of 8 lanes taking alternate runs of 8 k, b = acc0 + acc1, then
//     ((b0 + b2) + (b1 + b3)) + ((b4 + b6) + (b5 + b7));
//   * probs @ V: per output fused chains over l from 0 in MKL's k blocks of `block` (block while at least twice
//     that remains, then the rest in two, the larger first; 384 for g >= 3 rows, one block for g <= 2), the block
//     sums added in order;
//   * a bmm of fewer than 400 multiply-adds per batch item (ATen's own loop, baddbmm_cpu_kernel, both products of
//     the attention at small L): a plain chain s = s + a * b from 0 (not fused: -ffp-contract=off).
// spikelm.nn.kernels takes the loops only where a one-time check on random operands of the same shapes finds them
// equal to the ATen operations bit for bit in float64 (another BLAS or CPU sums otherwise: the ATen operations run
// there, announced once); tests/test_cpu_kernels.py compares both with the readable paths.
// ---------------------------------------------------------------------------------------------------------------
// a loop over a register tile: unrolled completely before GCC's scalar replacement, so that the accumulators stay in
// registers (without it GCC may keep the tile's array in memory and store it at every step: twice the time)
#define UNROLLED _Pragma("GCC unroll 16")

#if defined(__AVX512F__)
static inline __mmask8 lanes_mask(int64_t n) {
  return n >= 8 ? static_cast<__mmask8>(0xFF) : (n <= 0 ? static_cast<__mmask8>(0) : static_cast<__mmask8>((1u << n) - 1));
}

// A register tile of fused chains: out[r * out_row + c] = sum_k a[r * a_row + k * a_k] * b[k * b_k + c] for rows
// r < NR and columns c < n (n <= 32: 4 vectors of 8 lanes; NR x 4 accumulators, each b row loaded once for the NR
// rows), per output one fused multiply-add chain over k = k0 .. k1 - 1 from 0 (the lanes run across outputs)
template <int NR>
static inline void fma_tile(const double* __restrict__ a, int64_t a_row, int64_t a_k, const double* __restrict__ b,
                            int64_t b_k, double* __restrict__ out, int64_t out_row, int64_t n, int64_t k0,
                            int64_t k1) {
  __m512d acc[NR][4];
  __mmask8 mk[4];
  UNROLLED for (int v = 0; v < 4; ++v) mk[v] = lanes_mask(n - 8 * v);
  UNROLLED for (int r = 0; r < NR; ++r)
    UNROLLED for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_pd();
  for (int64_t k = k0; k < k1; ++k) {
    __m512d bv[4];
    UNROLLED for (int v = 0; v < 4; ++v) bv[v] = _mm512_maskz_loadu_pd(mk[v], b + k * b_k + 8 * v);
    UNROLLED for (int r = 0; r < NR; ++r) {
      const __m512d ab = _mm512_set1_pd(a[r * a_row + k * a_k]);
      UNROLLED for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_pd(ab, bv[v], acc[r][v]);
    }
  }
  UNROLLED for (int r = 0; r < NR; ++r)
    UNROLLED for (int v = 0; v < 4; ++v) _mm512_mask_storeu_pd(out + r * out_row + 8 * v, mk[v], acc[r][v]);
}

// out[o, j] = sum_k y[o, k] M[k, j] (the last axis) for rows o .. o + NR - 1, outputs j0 .. j0 + 31 (6 rows by 32
// outputs: 24 accumulators), the chain over k = k0 .. k1 - 1
template <int NR>
static inline void factor_last_tile(const double* y, double* out, const double* M, int64_t f, int64_t o, int64_t j0,
                                    int64_t nj, int64_t k0, int64_t k1) {
  fma_tile<NR>(y + o * f, f, 1, M + j0, f, out + o * f + j0, f, nj, k0, k1);
}

// out[o, j, i] = sum_k M[k, j] y[o, k, i] (an inner axis) for j0 .. j0 + NJ - 1, i0 .. i0 + ni - 1 (ni <= 32)
template <int NJ>
static inline void factor_inner_tile(const double* y, double* out, const double* M, int64_t f, int64_t inner,
                                     int64_t o, int64_t j0, int64_t i0, int64_t ni) {
  fma_tile<NJ>(M + j0, 1, f, y + o * f * inner + i0, inner, out + (o * f + j0) * inner + i0, inner, ni, 0, f);
}
#endif

// One factor M (f, f) of the Hadamard on the view (outer, f, inner): out[o, j, i] = sum_k M[k, j] y[o, k, i], per
// output one fused chain over k ascending from 0 (the vector lanes run across outputs, never across k). halves: a
// single row on the last axis (outer = inner = 1, a matrix-vector product for MKL) with f >= 128 sums as MKL's
// matrix-vector product on two threads does: chains over the first ceil(f / 2) k and over the rest, then added.
static void hadamard_factor(const double* __restrict__ y, double* __restrict__ out, const double* __restrict__ M,
                            int64_t outer, int64_t f, int64_t inner, bool halves) {
  const bool split = halves && outer == 1 && inner == 1 && f >= 128;
  const int64_t h = split ? (f + 1) / 2 : f;
#if defined(__AVX512F__)
  if (inner == 1) {
    int64_t o = 0;
    for (; o + 6 <= outer; o += 6)
      for (int64_t j0 = 0; j0 < f; j0 += 32)
        factor_last_tile<6>(y, out, M, f, o, j0, std::min<int64_t>(32, f - j0), 0, f);
    for (; o + 3 <= outer; o += 3)
      for (int64_t j0 = 0; j0 < f; j0 += 32)
        factor_last_tile<3>(y, out, M, f, o, j0, std::min<int64_t>(32, f - j0), 0, f);
    for (; o < outer; ++o)
      for (int64_t j0 = 0; j0 < f; j0 += 32)
        factor_last_tile<1>(y, out, M, f, o, j0, std::min<int64_t>(32, f - j0), 0, h);
    if (split) {
      std::vector<double> rest(f);
      for (int64_t j0 = 0; j0 < f; j0 += 32)
        factor_last_tile<1>(y, rest.data(), M, f, 0, j0, std::min<int64_t>(32, f - j0), h, f);
      for (int64_t j = 0; j < f; ++j) out[j] = out[j] + rest[j];
    }
    return;
  }
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i0 = 0; i0 < inner; i0 += 32) {
      const int64_t ni = std::min<int64_t>(32, inner - i0);
      int64_t j = 0;
      for (; j + 4 <= f; j += 4) factor_inner_tile<4>(y, out, M, f, inner, o, j, i0, ni);
      for (; j < f; ++j) factor_inner_tile<1>(y, out, M, f, inner, o, j, i0, ni);
    }
  }
#else
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t j = 0; j < f; ++j)
      for (int64_t i = 0; i < inner; ++i) {
        double s = 0.0, t = 0.0;
        for (int64_t k = 0; k < h; ++k) s = std::fma(M[k * f + j], y[(o * f + k) * inner + i], s);
        for (int64_t k = h; k < f; ++k) t = std::fma(M[k * f + j], y[(o * f + k) * inner + i], t);
        out[(o * f + j) * inner + i] = split ? s + t : s;
      }
#endif
}

// Ask for tensors' bytes into L2 (a hint, no effect on results)
static void prefetch_l2(const std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors) {
    const char* p = static_cast<const char*>(t.data_ptr());
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 2);
  }
}

// The online randomised Hadamard (OnlineHadamard.forward for the Hadamard kind): y = (x in float64) * signs on the
// view (lead..., f_1, ..., f_K), each factor's product on its axis in turn (the last axis y @ M, the others M^T @ y
// along theirs), one rounding to x's dtype at the end. x (..., n); signs (n,) and the factors (f, f) float64,
// n = f_1 * ... * f_K. hand: 0 the ATen operations of the readable path; 1 the loops above (float32 x); 2 the loops,
// a one-row last factor of f >= 128 in two halves (MKL's matrix-vector product on two threads).
// keep_double: return the float64 product before the rounding (for the dispatcher's check). Returns x's shape.
torch::Tensor online_hadamard(torch::Tensor x, torch::Tensor signs, std::vector<torch::Tensor> factors, int64_t hand,
                              bool keep_double) {
  TORCH_CHECK(x.dim() >= 1 && !factors.empty(), "x (..., n) and at least one factor");
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> split(lead);
  int64_t product = 1, rows = 1;
  for (auto& f : factors) {
    TORCH_CHECK(f.dim() == 2 && f.size(0) == f.size(1) && f.scalar_type() == at::kDouble, "factors: float64 (f, f)");
    split.push_back(f.size(0));
    product *= f.size(0);
  }
  for (auto s : lead) rows *= s;
  TORCH_CHECK(product == x.size(-1), "the factors' orders must multiply to n");
  const auto dtype = keep_double ? at::kDouble : x.scalar_type();
  if (!hand) {
    auto y = (x.to(at::kDouble) * signs).reshape(split);
    const int64_t last = y.dim() - 1;
    int64_t axis = static_cast<int64_t>(lead.size());
    for (auto& mat : factors) {
      if (axis == last)
        y = at::matmul(y, mat);
      else if (axis == last - 1)  // the same products without moving the axis
        y = at::matmul(mat.t(), y);
      else
        y = at::matmul(y.movedim(axis, -1), mat).movedim(-1, axis);
      ++axis;
    }
    return y.reshape(x.sizes()).to(dtype);
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "the hand-written loops take float32 CPU x");
  TORCH_CHECK(signs.scalar_type() == at::kDouble && signs.numel() == product, "signs: float64 (n,)");
  const int64_t n = product;
  auto xc = x.contiguous();
  auto sc = signs.contiguous();
  std::vector<torch::Tensor> mats;
  int64_t work = 0;  // multiply-adds per row
  for (auto& f : factors) {
    mats.push_back(f.contiguous());
    work += n * f.size(0);
  }
  prefetch_l2(mats);  // a decoding step runs this cache-cold: the factors' misses overlapped, not one row at a time
  auto buffers = torch::empty({2, rows, n}, xc.options().dtype(at::kDouble));
  auto out = torch::empty(x.sizes(), xc.options().dtype(dtype));
  const float* xp = xc.data_ptr<float>();
  const double* sp = sc.data_ptr<double>();
  double* b0 = buffers.data_ptr<double>();
  double* b1 = b0 + rows * n;
  // a thread takes at least ~1M multiply-adds (a few rows of n = 1536): fewer are not worth waking one
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(work, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    double* y = b0 + r0 * n;
    double* z = b1 + r0 * n;
    for (int64_t r = 0; r < r1 - r0; ++r)  // (x in float64) * signs: exact
      for (int64_t i = 0; i < n; ++i) y[r * n + i] = static_cast<double>(xp[(r0 + r) * n + i]) * sp[i];
    int64_t before = 1, after = n;
    for (auto& mat : mats) {
      const int64_t f = mat.size(0);
      after /= f;
      hadamard_factor(y, z, mat.data_ptr<double>(), (r1 - r0) * before, f, after, hand == 2);
      std::swap(y, z);
      before *= f;
    }
    if (keep_double) {
      std::copy(y, y + (r1 - r0) * n, out.data_ptr<double>() + r0 * n);
    } else {
      float* o = out.data_ptr<float>() + r0 * n;
      for (int64_t i = 0; i < (r1 - r0) * n; ++i) o[i] = static_cast<float>(y[i]);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The attention of a decoding step (spikelm/nn/exact.py, _one_query_attention): scores = (q @ K^T) * scale over
// (B, Hkv, g, L) (the g query heads of a K/V head as g rows), softcap tanh, mask, softmax, nan_to_num(0),
// probs @ V, rounded to float32. q (B, H, 1, d) float32; k, v (B, Hkv, L, d) float64 (the cache's decoded copy,
// contiguous along d); mask: none, or bool (True = attend) / additive, (B|1, H|1, 1, L). block < 0: the ATen
// operations of the readable path; block >= 0: the products by the loops above (order: the scores' summation
// order, 0, 1 or 2; block: MKL's k block of probs @ V, 0 for one chain), the softcap, mask and softmax by the same
// ATen operations. Returns (B, 1, H, d) (the layout transformers' attention functions return) in the query's dtype,
// or float64 with keep_double.
// ---------------------------------------------------------------------------------------------------------------
static inline int64_t k_block(int64_t rest, int64_t block) {  // the next block of MKL's loop over k
  if (block <= 0 || rest <= block) return rest;
  return rest >= 2 * block ? block : (rest + 1) / 2;
}

#if defined(__AVX512F__)
static inline double lane_tree(__m512d acc) {  // ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))
  const __m256d a = _mm256_add_pd(_mm512_castpd512_pd256(acc), _mm512_extractf64x4_pd(acc, 1));
  const __m128d lo = _mm256_castpd256_pd128(a), hi = _mm256_extractf128_pd(a, 1);
  const double s01 = _mm_cvtsd_f64(lo) + _mm_cvtsd_f64(_mm_unpackhi_pd(lo, lo));
  const double s23 = _mm_cvtsd_f64(hi) + _mm_cvtsd_f64(_mm_unpackhi_pd(hi, hi));
  return s01 + s23;
}

static inline double half_sum(__m256d x) {  // (x0 + x2) + (x1 + x3)
  const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(t) + _mm_cvtsd_f64(_mm_unpackhi_pd(t, t));
}

static inline double pair_tree(__m512d acc0, __m512d acc1) {  // b = acc0 + acc1; half_sum(b_lo) + half_sum(b_hi)
  const __m512d b = _mm512_add_pd(acc0, acc1);
  return half_sum(_mm512_castpd512_pd256(b)) + half_sum(_mm512_extractf64x4_pd(b, 1));
}

// scores of IB query rows against keys l0 .. l0 + LB - 1. ORDER 0: 8 lanes (d a multiple of 8); 2: two
// accumulators of 8 lanes taking alternate runs of 8 (d a multiple of 16)
template <int IB, int LB, int ORDER>
static inline void scores_tile(const double* __restrict__ q, const double* __restrict__ k, int64_t sl, int64_t d,
                               int64_t l0, double scale, double* __restrict__ s, int64_t L) {
  constexpr int NA = ORDER == 2 ? 2 : 1;
  __m512d acc[NA][IB][LB];
  UNROLLED for (int a = 0; a < NA; ++a)
    UNROLLED for (int i = 0; i < IB; ++i)
      UNROLLED for (int m = 0; m < LB; ++m) acc[a][i][m] = _mm512_setzero_pd();
  for (int64_t c = 0; c < d; c += 8 * NA) {
    UNROLLED for (int a = 0; a < NA; ++a) {
      __m512d qv[IB];
      UNROLLED for (int i = 0; i < IB; ++i) qv[i] = _mm512_loadu_pd(q + i * d + c + 8 * a);
      UNROLLED for (int m = 0; m < LB; ++m) {
        const __m512d kv = _mm512_loadu_pd(k + (l0 + m) * sl + c + 8 * a);
        UNROLLED for (int i = 0; i < IB; ++i) acc[a][i][m] = _mm512_fmadd_pd(qv[i], kv, acc[a][i][m]);
      }
    }
  }
  UNROLLED for (int i = 0; i < IB; ++i)
    UNROLLED for (int m = 0; m < LB; ++m)
      s[i * L + l0 + m] = (ORDER == 2 ? pair_tree(acc[0][i][m], acc[NA - 1][i][m]) : lane_tree(acc[0][i][m])) * scale;
}

template <int IB, int ORDER>
static void scores_rows(const double* q, const double* k, int64_t sl, int64_t d, int64_t L, double scale, double* s) {
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) scores_tile<IB, 8, ORDER>(q, k, sl, d, l, scale, s, L);
  for (; l < L; ++l) scores_tile<IB, 1, ORDER>(q, k, sl, d, l, scale, s, L);
}

// ORDER 1: per output one fused chain over k (8 keys per vector: their rows transposed through a small buffer)
static void scores_chain(const double* q, const double* k, int64_t sl, int64_t g, int64_t d, int64_t L, double scale,
                         double* s) {
  std::vector<double> kt(d * 8);
  for (int64_t l0 = 0; l0 < L; l0 += 8) {
    const int64_t nl = std::min<int64_t>(8, L - l0);
    for (int64_t m = 0; m < 8; ++m)
      for (int64_t c = 0; c < d; ++c) kt[c * 8 + m] = m < nl ? k[(l0 + m) * sl + c] : 0.0;
    const __mmask8 mk = static_cast<__mmask8>(nl >= 8 ? 0xFF : (1u << nl) - 1);
    for (int64_t i = 0; i < g; ++i) {
      __m512d acc = _mm512_setzero_pd();
      for (int64_t c = 0; c < d; ++c) acc = _mm512_fmadd_pd(_mm512_set1_pd(q[i * d + c]), _mm512_loadu_pd(&kt[c * 8]), acc);
      _mm512_mask_storeu_pd(s + i * L + l0, mk, _mm512_mul_pd(acc, _mm512_set1_pd(scale)));
    }
  }
}

// out[i, j] for IB rows and NV vectors of 8 outputs from j0: blocks of fused chains over l, the block sums added
template <int IB, int NV>
static void pv_tile(const double* __restrict__ p, const double* __restrict__ v, int64_t sl, int64_t L,
                    int64_t block, int64_t j0, double* __restrict__ out, int64_t d) {
  for (int64_t s0 = 0; s0 < L;) {
    const int64_t s1 = s0 + k_block(L - s0, block);
    __m512d acc[IB][NV];
    UNROLLED for (int i = 0; i < IB; ++i)
      UNROLLED for (int w = 0; w < NV; ++w) acc[i][w] = _mm512_setzero_pd();
    for (int64_t l = s0; l < s1; ++l) {
      __m512d pb[IB];
      UNROLLED for (int i = 0; i < IB; ++i) {
        const double pv = p[i * L + l];
        pb[i] = _mm512_set1_pd(pv != pv ? 0.0 : pv);  // nan_to_num(0): a row with every key masked
      }
      UNROLLED for (int w = 0; w < NV; ++w) {
        const __m512d vv = _mm512_loadu_pd(v + l * sl + j0 + 8 * w);
        UNROLLED for (int i = 0; i < IB; ++i) acc[i][w] = _mm512_fmadd_pd(pb[i], vv, acc[i][w]);
      }
    }
    UNROLLED for (int i = 0; i < IB; ++i)
      UNROLLED for (int w = 0; w < NV; ++w) {
        double* o = out + i * d + j0 + 8 * w;
        _mm512_storeu_pd(o, s0 == 0 ? acc[i][w] : _mm512_add_pd(_mm512_loadu_pd(o), acc[i][w]));
      }
    s0 = s1;
  }
}

template <int IB>
static void pv_rows(const double* p, const double* v, int64_t sl, int64_t L, int64_t block, int64_t d, double* out) {
  for (int64_t j0 = 0; j0 < d; j0 += 64) {
    switch (std::min<int64_t>(8, (d - j0) / 8)) {
      case 1: pv_tile<IB, 1>(p, v, sl, L, block, j0, out, d); break;
      case 2: pv_tile<IB, 2>(p, v, sl, L, block, j0, out, d); break;
      case 3: pv_tile<IB, 3>(p, v, sl, L, block, j0, out, d); break;
      case 4: pv_tile<IB, 4>(p, v, sl, L, block, j0, out, d); break;
      case 5: pv_tile<IB, 5>(p, v, sl, L, block, j0, out, d); break;
      case 6: pv_tile<IB, 6>(p, v, sl, L, block, j0, out, d); break;
      case 7: pv_tile<IB, 7>(p, v, sl, L, block, j0, out, d); break;
      default: pv_tile<IB, 8>(p, v, sl, L, block, j0, out, d); break;
    }
  }
}
#endif

// The scores of one K/V head: s (g, L) = (q (g, d) @ K^T) * scale, K rows sl apart, summed in `order` (0: 8 lanes,
// 1: one chain, 2: two accumulators of 8 lanes; see above)
static void head_scores(const double* q, const double* k, int64_t sl, int64_t g, int64_t d, int64_t L, double scale,
                        double* s, bool small, int64_t order) {
  if (small) {  // ATen's own bmm loop
    for (int64_t i = 0; i < g; ++i)
      for (int64_t l = 0; l < L; ++l) {
        double acc = 0.0;
        for (int64_t c = 0; c < d; ++c) acc = acc + q[i * d + c] * k[l * sl + c];
        s[i * L + l] = acc * scale;
      }
    return;
  }
#if defined(__AVX512F__)
  if (order == 1) {
    scores_chain(q, k, sl, g, d, L, scale, s);
    return;
  }
  int64_t i = 0;
  if (order == 2) {
    for (; i + 2 <= g; i += 2) scores_rows<2, 2>(q + i * d, k, sl, d, L, scale, s + i * L);
    if (g - i == 1) scores_rows<1, 2>(q + i * d, k, sl, d, L, scale, s + i * L);
    return;
  }
  for (; i + 3 <= g; i += 3) scores_rows<3, 0>(q + i * d, k, sl, d, L, scale, s + i * L);
  if (g - i == 2) scores_rows<2, 0>(q + i * d, k, sl, d, L, scale, s + i * L);
  if (g - i == 1) scores_rows<1, 0>(q + i * d, k, sl, d, L, scale, s + i * L);
#else
  const int64_t lanes = order == 2 ? 16 : 8;
  for (int64_t i = 0; i < g; ++i)
    for (int64_t l = 0; l < L; ++l) {
      double lane[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
      double chain = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        if (order == 1)
          chain = std::fma(q[i * d + c], k[l * sl + c], chain);
        else
          lane[c % lanes] = std::fma(q[i * d + c], k[l * sl + c], lane[c % lanes]);
      }
      double total = chain;
      if (order == 0) {
        const double a0 = lane[0] + lane[4], a1 = lane[1] + lane[5], a2 = lane[2] + lane[6], a3 = lane[3] + lane[7];
        total = (a0 + a1) + (a2 + a3);
      } else if (order == 2) {
        double b[8];
        for (int r = 0; r < 8; ++r) b[r] = lane[r] + lane[r + 8];
        total = ((b[0] + b[2]) + (b[1] + b[3])) + ((b[4] + b[6]) + (b[5] + b[7]));
      }
      s[i * L + l] = total * scale;
    }
#endif
}

// The output of one K/V head: out (g, d) = nan_to_num(p (g, L)) @ V, V rows sl apart
static void head_values(const double* p, const double* v, int64_t sl, int64_t g, int64_t d, int64_t L,
                        int64_t block, double* out, bool small) {
  if (small) {  // ATen's own bmm loop
    for (int64_t i = 0; i < g; ++i)
      for (int64_t j = 0; j < d; ++j) {
        double acc = 0.0;
        for (int64_t l = 0; l < L; ++l) {
          const double pv = p[i * L + l];
          acc = acc + (pv != pv ? 0.0 : pv) * v[l * sl + j];
        }
        out[i * d + j] = acc;
      }
    return;
  }
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i + 3 <= g; i += 3) pv_rows<3>(p + i * L, v, sl, L, block, d, out + i * d);
  if (g - i == 2) pv_rows<2>(p + i * L, v, sl, L, block, d, out + i * d);
  if (g - i == 1) pv_rows<1>(p + i * L, v, sl, L, block, d, out + i * d);
#else
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double total = 0.0;
      for (int64_t s0 = 0; s0 < L;) {
        const int64_t s1 = s0 + k_block(L - s0, block);
        double acc = 0.0;
        for (int64_t l = s0; l < s1; ++l) {
          const double pv = p[i * L + l];
          acc = std::fma(pv != pv ? 0.0 : pv, v[l * sl + j], acc);
        }
        total = s0 == 0 ? acc : total + acc;
        s0 = s1;
      }
      out[i * d + j] = total;
    }
#endif
}

static torch::Tensor masked_scores(torch::Tensor scores, const c10::optional<torch::Tensor>& mask, double softcap,
                                   int64_t Hkv, int64_t g) {
  if (softcap > 0) scores = at::tanh(scores / softcap) * softcap;
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dim() == 4, "attention mask must be 4-D (batch, heads, queries, keys)");
    const int64_t mb = m.size(0), mh = m.size(1);
    auto mv = (mh == 1 ? m.view({mb, 1, 1, m.size(2), m.size(3)}) : m.view({mb, Hkv, g, m.size(2), m.size(3)}))
                  .squeeze(-2);
    if (mv.scalar_type() == at::kBool)
      scores = scores.masked_fill(mv.logical_not(), -std::numeric_limits<double>::infinity());
    else
      scores = scores + mv.to(at::kDouble);
  }
  return scores;
}

torch::Tensor one_query_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value,
                                  c10::optional<torch::Tensor> mask, double scale, double softcap, int64_t order,
                                  int64_t block, bool keep_double) {
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1 && key.dim() == 4 && value.dim() == 4,
              "query (B, H, 1, d), key and value (B, Hkv, L, d)");
  const int64_t B = query.size(0), H = query.size(1), d = query.size(3), Hkv = key.size(1), L = key.size(2);
  TORCH_CHECK(H % Hkv == 0, "the query heads must be a multiple of the key/value heads");
  const int64_t g = H / Hkv;
  const auto dtype = keep_double ? at::kDouble : query.scalar_type();
  auto q = query.to(at::kDouble).view({B, Hkv, g, d});
  if (block < 0 || L == 0) {
    auto scores = at::matmul(q, key.to(at::kDouble).transpose(-1, -2)) * scale;  // (B, Hkv, g, L)
    scores = masked_scores(scores, mask, softcap, Hkv, g);
    auto probs = at::softmax(scores, -1).nan_to_num(0.0);  // a row with every key masked: zeros
    auto out = at::matmul(probs, value.to(at::kDouble));  // (B, Hkv, g, d)
    return out.reshape({B, H, 1, d}).to(dtype).transpose(1, 2).contiguous();
  }
  TORCH_CHECK(key.scalar_type() == at::kDouble && value.scalar_type() == at::kDouble && key.stride(3) == 1 &&
                  value.stride(3) == 1 && value.size(3) == d && value.size(2) == L && d % (order == 2 ? 16 : 8) == 0,
              "the hand-written loops take float64 K/V contiguous along d, d a multiple of 8 (of 16 for order 2)");
  TORCH_CHECK(order >= 0 && order <= 2, "order: 0, 1 or 2");
  auto qc = q.contiguous();
  auto scores = torch::empty({B, Hkv, g, L}, qc.options());
  const bool small = g * d * L < 400;  // ATen's bmm runs its own loop below this size
  const double* qp = qc.data_ptr<double>();
  const double* kp = key.data_ptr<double>();
  const double* vp = value.data_ptr<double>();
  double* sp = scores.data_ptr<double>();
  const int64_t ksb = key.stride(0), ksh = key.stride(1), ksl = key.stride(2);
  const int64_t vsb = value.stride(0), vsh = value.stride(1), vsl = value.stride(2);
  // a thread per few K/V heads from ~8k multiply-adds a head: a decoding step runs this cache-cold, and two cores
  // read the cache's K/V from memory faster than one
  const int64_t grain = std::max<int64_t>(1, (1 << 13) / std::max<int64_t>(g * d * L, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      head_scores(qp + bh * g * d, kp + b * ksb + h * ksh, ksl, g, d, L, scale, sp + bh * g * L, small, order);
    }
  });
  auto probs = at::softmax(masked_scores(scores, mask, softcap, Hkv, g), -1).contiguous();
  auto out = torch::empty({B, 1, H, d}, qc.options().dtype(at::kDouble));  // (B, 1, Hkv * g, d): (B, Hkv, g, d)
  const double* pp = probs.data_ptr<double>();
  double* op = out.data_ptr<double>();
  at::parallel_for(0, B * Hkv, grain, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      head_values(pp + bh * g * L, vp + b * vsb + h * vsh, vsl, g, d, L, block, op + bh * g * d, small);
    }
  });
  return keep_double ? out : out.to(dtype);
}

// A linear input's neuron and its readers in one call (a decoding step): x_hat = token_codes(x, ...)'s value, then
// few_rows_linears(x_hat, ws, biases): the same functions, so the same bits. Returns {x_hat, y_0, y_1, ...}.
std::vector<torch::Tensor> token_values_linears(torch::Tensor x, torch::Tensor group, torch::Tensor top, int64_t inner,
                                                double clip, double dead_zone, double floor_value, bool is_signed,
                                                double outlier_threshold, std::vector<torch::Tensor> ws,
                                                std::vector<c10::optional<torch::Tensor>> biases) {
  auto coded = token_codes(x, group, top, inner, clip, dead_zone, floor_value, c10::nullopt, is_signed, false, 0, 0,
                           outlier_threshold);
  auto ys = few_rows_linears(coded[0], ws, biases);
  ys.insert(ys.begin(), coded[0]);
  return ys;
}

// A decoding step of the signed K/V cache (spikelm/conversion/cache.py, SignedCodeLayer._fast_update) in one call:
// K and V (B, H, n, d) float32 each through token_codes' signed pass (signed_token: codes plus offset packed as
// pack_bits bit planes), each token's codes, scales and dequantised values written straight into the cache's
// buffers at token code_at (codes, scales: (B, H, capacity, w)) and decoded_at (values, float64 (B, H, capacity,
// d)): what token_codes returns, copied in, so the same bits. Plans: (group, top, inner, clip, dead_zone) each. buffers: key codes, key
// scales, value codes, value scales, decoded keys, decoded values.
void kv_codes_append(torch::Tensor k, torch::Tensor v, torch::Tensor kgroup, torch::Tensor ktop, int64_t kinner,
                     double kclip, double kdead, torch::Tensor vgroup, torch::Tensor vtop, int64_t vinner, double vclip,
                     double vdead, double floor_value, int64_t pack_bits, int64_t code_offset,
                     std::vector<torch::Tensor> buffers, int64_t code_at, int64_t decoded_at) {
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "k and v must be (B, H, n, d), the same shape");
  TORCH_CHECK(buffers.size() == 6, "six buffers: key codes, key scales, value codes, value scales, decoded k, v");
  const int64_t B = k.size(0), H = k.size(1), n = k.size(2), d = k.size(3);
  const torch::Tensor* states[2] = {&k, &v};
  const torch::Tensor* groups[2] = {&kgroup, &vgroup};
  const torch::Tensor* tops[2] = {&ktop, &vtop};
  const int64_t inners[2] = {kinner, vinner};
  const double clips[2] = {kclip, vclip}, deads[2] = {kdead, vdead};
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.device().is_cpu() &&
                  v.device().is_cpu(), "k and v must be float32 CPU tensors");
  TORCH_CHECK(pack_bits >= 1 && pack_bits <= 31, "pack_bits must be 1 to 31");
  const int64_t nb = (d + 7) / 8;
  // each token straight into the buffers (token_codes' signed pass, the same function: the same bits as the
  // tensors token_codes returns, copied in)
  for (int i = 0; i < 2; ++i) {
    const auto& codes = buffers[2 * i];
    const auto& scales = buffers[2 * i + 1];
    const auto& decoded = buffers[4 + i];
    const auto& group = *groups[i];
    const auto& top = *tops[i];
    TORCH_CHECK(group.dim() == 2 && group.scalar_type() == at::kInt && group.size(1) == d && group.is_contiguous(),
                "group must be contiguous int32 (Rg, d)");
    TORCH_CHECK(top.dim() == 1 && top.scalar_type() == at::kFloat && top.is_contiguous(), "top must be float32 (G,)");
    const int64_t G = top.size(0), Rg = group.size(0);
    TORCH_CHECK(inners[i] >= 1, "inner must be positive");
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.size(3) == pack_bits * nb &&
                    codes.stride(3) == 1, "code buffers: uint8 (B, H, capacity, pack_bits * ceil(d / 8))");
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 4 && scales.size(3) == G &&
                    scales.stride(3) == 1, "scale buffers: float32 (B, H, capacity, G)");
    TORCH_CHECK(decoded.scalar_type() == at::kDouble && decoded.dim() == 4 && decoded.size(3) == d &&
                    decoded.stride(3) == 1, "decoded buffers: float64 (B, H, capacity, d)");
    for (const auto* buffer : {&codes, &scales, &decoded})
      TORCH_CHECK(buffer->size(0) == B && buffer->size(1) == H, "buffers: the states' batch and heads");
    TORCH_CHECK(code_at >= 0 && code_at + n <= codes.size(2) && code_at + n <= scales.size(2),
                "no room in the code buffers");
    TORCH_CHECK(decoded_at >= 0 && decoded_at + n <= decoded.size(2), "no room in the decoded buffers");
    const int32_t* gp = group.data_ptr<int32_t>();
    for (int64_t j = 0; j < Rg * d; ++j) TORCH_CHECK(gp[j] >= 0 && gp[j] < G, "group index out of range");
    auto x = states[i]->reshape({-1, d}).contiguous();
    const float* xp = x.data_ptr<float>();
    const float* tp = top.data_ptr<float>();
    uint8_t* cb = codes.data_ptr<uint8_t>();
    float* sb = scales.data_ptr<float>();
    double* db = decoded.data_ptr<double>();
    const int64_t cs[3] = {codes.stride(0), codes.stride(1), codes.stride(2)};
    const int64_t ss[3] = {scales.stride(0), scales.stride(1), scales.stride(2)};
    const int64_t ds[3] = {decoded.stride(0), decoded.stride(1), decoded.stride(2)};
    const int64_t inner = inners[i];
    const float clip = static_cast<float>(clips[i]), dead = static_cast<float>(deads[i]);
    at::parallel_for(0, B * H * n, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
      std::vector<float> hi(4 * G), divisor(d), channel_top(d);
      std::vector<int32_t> quant(d);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (H * n), h = (r / n) % H, t = r % n;
        const SignedRule rule{gp + ((r / inner) % Rg) * d, tp, nullptr, d, G, clip, static_cast<float>(floor_value),
                              dead, deads[i] > 0};
        signed_token<double>(xp + r * d, rule, sb + b * ss[0] + h * ss[1] + (code_at + t) * ss[2],
                             db + b * ds[0] + h * ds[1] + (decoded_at + t) * ds[2], nullptr,
                             cb + b * cs[0] + h * cs[1] + (code_at + t) * cs[2], pack_bits, nb, code_offset, hi.data(),
                             divisor.data(), channel_top.data(), quant.data());
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Two pieces of a LLaMA-layout block's decoding step (spikelm/conversion/decode_step.py), called from here instead of
// from Python, the same arithmetic:
// * rms_norm: transformers' LlamaRMSNorm.forward on float32 (h = x; variance = h.pow(2).mean(-1, keepdim=True);
//   h = h * rsqrt(variance + eps); weight * h): the squares and their mean by ATen (a reduction: its order kept),
//   the elementwise rest in one loop rounding as ATen's float32 kernels do, so the same bits.
// * rotary_embedding: apply_rotary_pos_emb (q * cos + rotate_half(q) * sin, the same for k; cos and sin (Bc, n, d)
//   broadcast over the heads, Bc 1 or B; rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])) as one elementwise loop:
//   each output is one float32 product of each pair and one sum (compiled without fused multiply-adds), rounded as
//   PyTorch's separate multiplications and addition round, so the same bits. q (B, H, n, d), k (B, Hk, n, d) any
//   strides; returns contiguous (B, H, n, d) and (B, Hk, n, d).
// ---------------------------------------------------------------------------------------------------------------
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  weight.size(0) == x.size(-1), "float32 x (..., C) and weight (C,)");
  auto h = x.contiguous();
  auto variance = h.pow(2).mean(-1, true).contiguous();  // ATen's reduction, its order kept
  // the elementwise rest in one loop, each step rounded as ATen's float32 kernels round it: variance + eps (the
  // Python float cast to float32, as a float32 tensor's add does), rsqrt = 1 / sqrt (ATen's float rsqrt), h * that,
  // then weight * it
  auto out = torch::empty_like(h);
  const int64_t C = h.size(-1), R = h.numel() / std::max<int64_t>(C, 1);
  const float* hp = h.data_ptr<float>();
  const float* vp = variance.data_ptr<float>();
  const float* wp = weight.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t r = 0; r < R; ++r) {
    const float inv = 1.0f / std::sqrt(vp[r] + e);
    for (int64_t c = 0; c < C; ++c) {
      const float scaled = hp[r * C + c] * inv;
      op[r * C + c] = wp[c] * scaled;
    }
  }
  return out;
}

static void rotate_heads(const torch::Tensor& x, const float* cosp, const float* sinp, int64_t cos_batch_stride,
                         torch::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), d = x.size(3), h = d / 2, h2 = d - h;
  auto xa = x.accessor<float, 4>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t t = 0; t < n; ++t) {
        const float* c = cosp + b * cos_batch_stride + t * d;
        const float* s = sinp + b * cos_batch_stride + t * d;
        auto row = xa[b][hd][t];
        float* o = op + ((b * H + hd) * n + t) * d;
        for (int64_t i = 0; i < d; ++i) {
          const float rotated = i < h2 ? -row[h + i] : row[i - h2];
          const float a = row[i] * c[i];
          const float r = rotated * s[i];
          o[i] = a + r;
        }
      }
}

std::vector<torch::Tensor> rotary_embedding(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes(),
              "q (B, H, n, d), k (B, Hk, n, d), cos and sin (Bc, n, d)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat, "float32 only");
  const int64_t B = q.size(0), n = q.size(2), d = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == n && k.size(3) == d && cos.size(1) == n && cos.size(2) == d &&
                  (cos.size(0) == 1 || cos.size(0) == B), "shapes do not broadcast as apply_rotary_pos_emb's");
  auto cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t stride = cc.size(0) == 1 ? 0 : n * d;
  auto qo = torch::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto ko = torch::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  rotate_heads(q, cc.data_ptr<float>(), sc.data_ptr<float>(), stride, qo);
  rotate_heads(k, cc.data_ptr<float>(), sc.data_ptr<float>(), stride, ko);
  return {qo, ko};
}
