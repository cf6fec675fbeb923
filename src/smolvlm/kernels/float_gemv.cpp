// y = x @ w^T for a few rows of x, w bfloat16 or float32: the decode GEMV of plain bf16 and float32 weights
// on x86 CPUs with AVX2 + FMA.
//
// x (M, K) in w's dtype, w (N, K) row-major (K % 8 == 0) -> y (M, N) in that dtype. Each weight is
// taken as float32 (a bf16 widened exactly: it is the high half of a float32), multiplied by x (also
// as float32) and summed in float32; each output is rounded to the dtype once. That is what a bf16 or
// float32 GEMM computes, up to summation order.
//
// Why, bf16: without AVX-512 there is no packed bf16 layout (oneDNN refuses one), so a bf16 model's decode
// step ran PyTorch's plain bf16 GEMV on every text linear. On a 2-core AMD EPYC with 128-bit FP units
// (Zen 1) a 256M step's 121 distinct layers took 30-43 ms that way against 16-20 ms here (8.7 against
// 16.5 GB/s; bench/ANALYSIS.md, thirteenth round). float32: on AVX-512 CPUs without AMX a float32
// model's text linears stay plain (oneDNN's packed float32 GEMV is no faster there), so its decode ran
// PyTorch's (MKL's) float32 GEMV at ~19 GB/s on an AMD EPYC Zen 5, against ~64 here (eighteenth round). Each thread
// streams one contiguous block of rows with a software prefetch, as the int8 GEMV does.
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <atomic>

#include <type_traits>

namespace {

using namespace smolvlm_kernels;

// 8 weights as float32: bfloat16 zero-extended to 32 bits and shifted into the high half; float32 as it is.
inline __m256 load8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// prefetch what 32 weights from p will read PF bytes ahead: one cache line of bf16, two of float32
template <typename W>
inline void prefetch32(const W* p) {
  const char* c = reinterpret_cast<const char*>(p) + PF;
  for (size_t b = 0; b < 32 * sizeof(W); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// Row r of w against R rows of x (from row m0): each 8 weights loaded once, then one FMA per row of x.
template <int R, typename W, typename Store>
void rows_of_x(const float* x, int64_t m0, const W* wr, void* y, Store store, int64_t r, int64_t K, int64_t N) {
  __m256 a[R], b[R];
  for (int i = 0; i < R; ++i) a[i] = b[i] = _mm256_setzero_ps();
  const float* xm = x + m0 * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (m0 == 0 && k % 32 == 0) prefetch32(wr + k);
    const __m256 w0 = load8(wr + k), w1 = load8(wr + k + 8);
    for (int i = 0; i < R; ++i) {
      a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + i * K + k), a[i]);
      b[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + i * K + k + 8), b[i]);
    }
  }
  if (k < K) {  // K % 16 == 8
    const __m256 w0 = load8(wr + k);
    for (int i = 0; i < R; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + i * K + k), a[i]);
  }
  for (int i = 0; i < R; ++i) store(y, (m0 + i) * N + r, hsum(_mm256_add_ps(a[i], b[i])));
}

// One row of x (decode): four FMA chains, 32 weights a step.
template <typename W, typename Store>
void one_row(const float* x, const W* wr, void* y, Store store, int64_t r, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch32(wr + k);
    a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load8(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load8(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k < K; k += 8) a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(x + k), a0);
  store(y, r, hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))));
}

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Whether one bf16 row takes the dot instruction below (and bf16 decode attention its own, bf16_decode_attention.cpp):
// set once by smolvlm/kernels/__init__.py from
// smolvlm.cpu (the CPU has AVX-512 BF16 and PyTorch runs at its AVX-512 level, so an AVX2-only run,
// ATEN_CPU_CAPABILITY=avx2, takes the widening loop as an AVX2-only CPU does); off until then.
std::atomic<bool> bf16_dot{false};

// One bf16 row of x against bf16 weights where the CPU has AVX-512 BF16: each vdpbf16ps multiplies 32
// pairs exactly (a bf16 product fits a float32) and adds them into float32 sums; four chains. Three
// instructions per 64 bytes of weights where the widening loop above takes about twenty (eighteenth
// round). K % 32 != 0: the last weights through a masked load. The instruction treats bf16 subnormals
// (below 1.2e-38 in magnitude) as zero, which no weight or activation of these models comes near.
AVX512BF16 inline __m512 dot(__m512 acc, const uint16_t* w, const uint16_t* v) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(v));
}

template <typename Store>
AVX512BF16 void one_row_bf16_dot(const uint16_t* x, const uint16_t* wr, void* y, Store store, int64_t r, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    const char* c = reinterpret_cast<const char*>(wr + k) + PF;
    for (int b = 0; b < 256; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
    a0 = dot(a0, wr + k, x + k);
    a1 = dot(a1, wr + k + 32, x + k + 32);
    a2 = dot(a2, wr + k + 64, x + k + 64);
    a3 = dot(a3, wr + k + 96, x + k + 96);
  }
  for (; k + 32 <= K; k += 32) a0 = dot(a0, wr + k, x + k);
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k), (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
  }
  store(y, r, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
}

// y (M, N_0 + N_1 + ...): the layers that read the same x (q/k/v, gate/up) side by side, in one call.
template <typename W>
at::Tensor gemv_cat(const at::Tensor& x, at::TensorList w, at::ScalarType dtype, const char* name,
                    const char* type) {
  TORCH_CHECK(!w.empty(), name, ": no weights");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == dtype, name, ": x (M, K) ", type);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0, name, ": K must be a multiple of 8");
  std::vector<int64_t> first{0};  // first output column of each part, then N
  std::vector<const W*> wp;
  for (const at::Tensor& wi : w) {
    TORCH_CHECK(wi.dim() == 2 && wi.scalar_type() == dtype && wi.size(1) == K,
                name, ": w (N, K) ", type, ", K as x's");
    TORCH_CHECK(wi.is_contiguous(), name, ": w must be contiguous");
    wp.push_back(static_cast<const W*>(wi.data_ptr()));
    first.push_back(first.back() + wi.size(0));
  }
  const int64_t N = first.back();
  at::Tensor y = at::empty({M, N}, x.options());
  void* yp = y.data_ptr();
  if (std::is_same<W, uint16_t>::value && M == 1 && bf16_dot.load(std::memory_order_relaxed)) {
    const at::Tensor xc = x.contiguous();
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr());
    with_store(x.scalar_type(), [&](auto store) {
      at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
        size_t p = 0;
        for (int64_t r = b; r < e; ++r) {
          while (r >= first[p + 1]) ++p;
          one_row_bf16_dot(xb, reinterpret_cast<const uint16_t*>(wp[p] + (r - first[p]) * K), yp, store, r, K);
        }
      });
    });
    return y;
  }
  std::vector<float> buf;
  const float* xp = as_float(x, buf);
  with_store(x.scalar_type(), [&](auto store) {
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {  // one contiguous block of rows per thread
      size_t p = 0;
      for (int64_t r = b; r < e; ++r) {
        while (r >= first[p + 1]) ++p;
        const W* wr = wp[p] + (r - first[p]) * K;
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

}  // namespace

namespace smolvlm_kernels {  // the entry points: ops.h

at::Tensor bf16_gemv_cat(const at::Tensor& x, at::TensorList w) {
  return gemv_cat<uint16_t>(x, w, at::kBFloat16, "bf16_gemv", "bfloat16");
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) { return bf16_gemv_cat(x, {w}); }

at::Tensor f32_gemv_cat(const at::Tensor& x, at::TensorList w) {
  return gemv_cat<float>(x, w, at::kFloat, "f32_gemv", "float32");
}

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w) { return f32_gemv_cat(x, {w}); }

void use_bf16_dot(bool on) { bf16_dot = on && __builtin_cpu_supports("avx512bf16"); }

bool bf16_dot_on() { return bf16_dot.load(std::memory_order_relaxed); }

}  // namespace smolvlm_kernels

TORCH_LIBRARY_FRAGMENT(smolvlm, m) {
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("bf16_gemv_cat(Tensor x, Tensor[] w) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("f32_gemv_cat(Tensor x, Tensor[] w) -> Tensor");
  m.def("use_bf16_dot(bool on) -> ()", &smolvlm_kernels::use_bf16_dot);  // no tensor: every dispatch key
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) {
  m.impl("bf16_gemv", smolvlm_kernels::bf16_gemv);
  m.impl("bf16_gemv_cat", smolvlm_kernels::bf16_gemv_cat);
  m.impl("f32_gemv", smolvlm_kernels::f32_gemv);
  m.impl("f32_gemv_cat", smolvlm_kernels::f32_gemv_cat);
}
