// What the quantized GEMVs (int8_gemv.cpp, int4_gemv.cpp) share: reading x as float32, writing y in
// x's dtype, the horizontal sum, the prefetch distance and llama.cpp's per-32 int8 activations.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <vector>

namespace smolvlm_kernels {

constexpr int64_t PF = 2048;  // bytes ahead (22 GB/s; 1 KiB 19.5, none 16-19)

inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_hadd_ps(a, a);
  a = _mm_hadd_ps(a, a);
  return _mm_cvtss_f32(a);
}

// x (M, K) as contiguous float32 (widening bf16/fp16 is exact), converted here rather than by an ATen
// cast: at ~7 us each, a cast of x and one of y per layer were ~3 ms of a 211-layer decode step.
inline const float* as_float(const at::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.data_ptr<float>();
  const int64_t M = x.size(0), K = x.size(1);
  buf.resize(M * K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "as_float", [&] {
    auto a = x.accessor<scalar_t, 2>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) buf[m * K + k] = static_cast<float>(a[m][k]);
  });
  return buf.data();
}

// Calls f(store), store(y, i, v) writing float v as element i of y in dtype t (rounded once).
template <typename F>
inline void with_store(at::ScalarType t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "store", [&] {
    f([](void* y, int64_t i, float v) { static_cast<scalar_t*>(y)[i] = static_cast<scalar_t>(v); });
  });
}

// Quantizes M rows of K float32 activations (K % 32 == 0) to int8 per group of 32, scales in d
// (M, K / 32). False if any value is not finite (then nothing in q/d is meaningful).
inline bool quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes packs' lane interleaving
  for (int64_t i = 0; i < M * K; i += 32) {
    __m256 v[4], amax = zero, bad = zero;
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + i + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_mul_ps(v[j], zero), zero, _CMP_NEQ_UQ));  // inf, NaN
    }
    if (_mm256_movemask_ps(bad)) return false;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float dg = _mm_cvtss_f32(h) / 127.0f;
    const __m256 id = _mm256_set1_ps(dg > 0.0f ? 1.0f / dg : 0.0f);
    d[i / 32] = dg;
    __m256i r[4];
    for (int j = 0; j < 4; ++j) r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // nearest, ties even
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
  }
  return true;
}

}  // namespace smolvlm_kernels
