// y = (x @ w^T) * scale for a few rows of x: the int8 decode GEMV on x86 CPUs with AVX2 + FMA.
//
// x (M, K) float32/bfloat16/float16, w (N, K) int8 row-major (values in [-128, 127]), scale (N,)
// float32 -> y (M, N) in x's dtype. Two ways, chosen by x's dtype:
// - float32 x: activations stay float32; every product is exact and summed in float32, so the result
//   is the dequantized linear up to summation order.
// - bfloat16/float16 x (K % 32 == 0): x is quantized to int8 per group of 32, llama.cpp's Q8_0 x Q8_0
//   dot: d = max|x_g| / 127, q = round-half-even(x * (1 / d)), y = s * sum_g d_g * sum_{k in g} q_k w_k
//   with the inner sums exact in int32 (maddubs). The rounding adds at most d_g / 2 per activation,
//   the same order as bf16's own 2^-9 relative rounding of those activations, and it halves the
//   instructions per weight, which is what limits the float path on a CPU whose FP units are narrow
//   (ANALYSIS, eleventh round). A non-finite activation sends the call down the float path.
//
// Why not PyTorch's _weight_int8pack_mm: decode reads each weight once per token, so the GEMV is a
// memory stream, and on a 2-core AMD EPYC (AVX2) that kernel streamed 7-9.5 GB/s over a decode
// step's 121 distinct layers against 22 GB/s here. What makes the difference: each thread reads one
// contiguous block of rows, row after row (one stream; a 4-row tile, four interleaved streams, ran
// at 14 GB/s), with a software prefetch PF bytes ahead. Measurements: bench/ANALYSIS.md, ninth round.
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

namespace {

using namespace smolvlm_kernels;

// 16 int8 weights -> two vectors of 8 float32
inline void widen16(const int8_t* p, __m256& lo, __m256& hi) {
  __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
}

// Row r of w against every row of x (K % 16 == 0): the row's K bytes stay in L1 between the rows
// of x, so the weights are read from memory once. 32 columns a step, 4 independent FMA chains.
template <typename Store>
void row(const float* x, int64_t M, const int8_t* wr, float sr, void* y, Store store, int64_t r, int64_t K,
         int64_t N) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, lo, hi, lo2, hi2;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PF, _MM_HINT_T0);
      widen16(wr + k, lo, hi);
      widen16(wr + k + 16, lo2, hi2);
      a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm + k), a0);
      a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + k + 8), a1);
      a2 = _mm256_fmadd_ps(lo2, _mm256_loadu_ps(xm + k + 16), a2);
      a3 = _mm256_fmadd_ps(hi2, _mm256_loadu_ps(xm + k + 24), a3);
    }
    if (k < K) {  // K % 32 == 16
      widen16(wr + k, lo, hi);
      a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm + k), a0);
      a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + k + 8), a1);
    }
    store(y, m * N + r, hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) * sr);
  }
}

// 32 int8 weights . 32 int8 activations -> 8 int32 partial sums, exact: maddubs takes an unsigned
// first operand, so |w| (128 for -128, still right as unsigned) against x carrying w's sign;
// each int16 pair sum is at most 2 * 128 * 127 < 2^15.
inline __m256i dot32(const int8_t* w, const int8_t* x) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// Row r of w against every quantized row of x: as row() (one stream, prefetch), two groups a step.
template <typename Store>
void row_q8(const int8_t* xq, const float* d, int64_t M, const int8_t* wr, float sr, void* y, Store store,
            int64_t r, int64_t K, int64_t N) {
  const int64_t G = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xm = xq + m * K;
    const float* dm = d + m * G;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
      if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + g * 32) + PF, _MM_HINT_T0);
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(wr + g * 32, xm + g * 32)), _mm256_broadcast_ss(dm + g), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(wr + g * 32 + 32, xm + g * 32 + 32)),
                           _mm256_broadcast_ss(dm + g + 1), a1);
    }
    if (g < G) a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(wr + g * 32, xm + g * 32)), _mm256_broadcast_ss(dm + g), a0);
    store(y, m * N + r, hsum(_mm256_add_ps(a0, a1)) * sr);
  }
}

}  // namespace

namespace smolvlm_kernels {  // the entry points: ops.h

// y (M, N_0 + N_1 + ...) = [(x @ w_0^T) * s_0, (x @ w_1^T) * s_1, ...]: the layers that read the same x
// (q/k/v, gate/up) in one call, their rows streamed one after another; x is quantized once.
at::Tensor int8_gemv_cat(const at::Tensor& x, at::TensorList w, at::TensorList scale) {
  TORCH_CHECK(!w.empty() && w.size() == scale.size(), "int8_gemv: as many scales as weights");
  TORCH_CHECK(x.dim() == 2, "int8_gemv: x (M, K), w (N, K), scale (N,)");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> first{0};  // first output column of each part, then N
  std::vector<const int8_t*> wp;
  std::vector<const float*> sp;
  for (size_t i = 0; i < w.size(); ++i) {
    TORCH_CHECK(w[i].dim() == 2 && scale[i].dim() == 1, "int8_gemv: x (M, K), w (N, K), scale (N,)");
    TORCH_CHECK(w[i].scalar_type() == at::kChar && scale[i].scalar_type() == at::kFloat, "int8_gemv: w int8, scale float32");
    TORCH_CHECK(w[i].size(1) == K && scale[i].size(0) == w[i].size(0), "int8_gemv: shapes do not match");
    TORCH_CHECK(w[i].is_contiguous() && scale[i].is_contiguous(), "int8_gemv: w and scale must be contiguous");
    first.push_back(first.back() + w[i].size(0));
    wp.push_back(w[i].data_ptr<int8_t>());
    sp.push_back(scale[i].data_ptr<float>());
  }
  TORCH_CHECK(K % 16 == 0, "int8_gemv: K must be a multiple of 16");
  const int64_t N = first.back();
  std::vector<float> buf;
  const float* xp = as_float(x, buf);
  at::Tensor y = at::empty({M, N}, x.options());
  void* yp = y.data_ptr();
  std::vector<int8_t> xq;
  std::vector<float> d;
  bool q8 = x.scalar_type() != at::kFloat && K % 32 == 0;
  if (q8) {
    xq.resize(M * K);
    d.resize(M * K / 32);
    q8 = quantize_rows(xp, M, K, xq.data(), d.data());
  }
  with_store(x.scalar_type(), [&](auto store) {
    // Each thread streams one contiguous block of rows: one memory stream per thread.
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      size_t p = 0;
      for (int64_t r = b; r < e; ++r) {
        while (r >= first[p + 1]) ++p;
        const int8_t* wr = wp[p] + (r - first[p]) * K;
        const float sr = sp[p][r - first[p]];
        if (q8) row_q8(xq.data(), d.data(), M, wr, sr, yp, store, r, K, N);
        else row(xp, M, wr, sr, yp, store, r, K, N);
      }
    });
  });
  return y;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return int8_gemv_cat(x, {w}, {scale});
}

}  // namespace smolvlm_kernels

TORCH_LIBRARY(smolvlm, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_gemv_cat(Tensor x, Tensor[] w, Tensor[] scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) {
  m.impl("int8_gemv", smolvlm_kernels::int8_gemv);
  m.impl("int8_gemv_cat", smolvlm_kernels::int8_gemv_cat);
}
