// y = x @ w^T for a few rows of x, w bfloat16: the bf16 decode GEMV on x86 CPUs with AVX2 + FMA.
//
// x (M, K) bfloat16, w (N, K) bfloat16 row-major (K % 8 == 0) -> y (M, N) bfloat16. Each weight is
// widened to float32 (exact: a bf16 is the high half of a float32), multiplied by x (also widened,
// exact) and summed in float32; each output is rounded to bf16 once. That is what a bf16 GEMM
// computes, up to summation order.
//
// Why: without AVX-512 there is no packed bf16 layout (oneDNN refuses one), so a bf16 model's decode
// step ran PyTorch's plain bf16 GEMV on every text linear. On a 2-core AMD EPYC with 128-bit FP units
// (Zen 1) a 256M step's 121 distinct layers took 30-43 ms that way against 16-20 ms here (8.7 against
// 16.5 GB/s; bench/ANALYSIS.md, thirteenth round). Each thread streams one contiguous block of rows
// with a software prefetch, as the int8 GEMV does.
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

namespace {

using namespace smolvlm_kernels;

// 8 bfloat16 -> 8 float32: zero-extend to 32 bits, shift into the high half.
inline __m256 widen8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// Row r of w against R rows of x (from row m0): each 8 weights widened once, then one FMA per row of x.
template <int R, typename Store>
void rows_of_x(const float* x, int64_t m0, const uint16_t* wr, void* y, Store store, int64_t r, int64_t K,
               int64_t N) {
  __m256 a[R], b[R];
  for (int i = 0; i < R; ++i) a[i] = b[i] = _mm256_setzero_ps();
  const float* xm = x + m0 * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (m0 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PF, _MM_HINT_T0);
    const __m256 w0 = widen8(wr + k), w1 = widen8(wr + k + 8);
    for (int i = 0; i < R; ++i) {
      a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + i * K + k), a[i]);
      b[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + i * K + k + 8), b[i]);
    }
  }
  if (k < K) {  // K % 16 == 8
    const __m256 w0 = widen8(wr + k);
    for (int i = 0; i < R; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + i * K + k), a[i]);
  }
  for (int i = 0; i < R; ++i) store(y, (m0 + i) * N + r, hsum(_mm256_add_ps(a[i], b[i])));
}

// One row of x (decode): four FMA chains, 32 weights a step.
template <typename Store>
void one_row(const float* x, const uint16_t* wr, void* y, Store store, int64_t r, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PF, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(widen8(wr + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(widen8(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(widen8(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(widen8(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k < K; k += 8) a0 = _mm256_fmadd_ps(widen8(wr + k), _mm256_loadu_ps(x + k), a0);
  store(y, r, hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))));
}

}  // namespace

namespace smolvlm_kernels {  // the entry points: ops.h

// y (M, N_0 + N_1 + ...): the layers that read the same x (q/k/v, gate/up) side by side, in one call.
at::Tensor bf16_gemv_cat(const at::Tensor& x, at::TensorList w) {
  TORCH_CHECK(!w.empty(), "bf16_gemv: no weights");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16_gemv: x (M, K) bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0, "bf16_gemv: K must be a multiple of 8");
  std::vector<int64_t> first{0};  // first output column of each part, then N
  std::vector<const uint16_t*> wp;
  for (const at::Tensor& wi : w) {
    TORCH_CHECK(wi.dim() == 2 && wi.scalar_type() == at::kBFloat16 && wi.size(1) == K,
                "bf16_gemv: w (N, K) bfloat16, K as x's");
    TORCH_CHECK(wi.is_contiguous(), "bf16_gemv: w must be contiguous");
    wp.push_back(reinterpret_cast<const uint16_t*>(wi.data_ptr<at::BFloat16>()));
    first.push_back(first.back() + wi.size(0));
  }
  const int64_t N = first.back();
  std::vector<float> buf;
  const float* xp = as_float(x, buf);
  at::Tensor y = at::empty({M, N}, x.options());
  void* yp = y.data_ptr();
  with_store(x.scalar_type(), [&](auto store) {
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {  // one contiguous block of rows per thread
      size_t p = 0;
      for (int64_t r = b; r < e; ++r) {
        while (r >= first[p + 1]) ++p;
        const uint16_t* wr = wp[p] + (r - first[p]) * K;
        if (M == 1) {
          one_row(xp, wr, yp, store, r, K);
          continue;
        }
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) rows_of_x<4>(xp, m, wr, yp, store, r, K, N);
        switch (M - m) {
          case 3: rows_of_x<3>(xp, m, wr, yp, store, r, K, N); break;
          case 2: rows_of_x<2>(xp, m, wr, yp, store, r, K, N); break;
          case 1: rows_of_x<1>(xp, m, wr, yp, store, r, K, N); break;
          default: break;
        }
      }
    });
  });
  return y;
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) {
  return bf16_gemv_cat(x, {w});
}

}  // namespace smolvlm_kernels

TORCH_LIBRARY_FRAGMENT(smolvlm, m) {
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("bf16_gemv_cat(Tensor x, Tensor[] w) -> Tensor");
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) {
  m.impl("bf16_gemv", smolvlm_kernels::bf16_gemv);
  m.impl("bf16_gemv_cat", smolvlm_kernels::bf16_gemv_cat);
}
