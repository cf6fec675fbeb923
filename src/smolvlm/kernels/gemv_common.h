// What the decode GEMVs share (int8_gemv.cpp; the next ones too): activations read in their own dtype
// (no ATen cast per call: at ~7 us each, two casts per layer were ~3 ms of a 211-layer decode step),
// results written in it, horizontal sums, and the software prefetch distance.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#include <vector>

namespace smolvlm_kernels {

constexpr int64_t PF = 2048;  // prefetch this many bytes ahead of the weight row being read

inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_hadd_ps(a, a);
  a = _mm_hadd_ps(a, a);
  return _mm_cvtss_f32(a);
}

// x (M, K) float32/bfloat16/float16 as contiguous float32 (widening is exact). `buf` holds the copy
// when x is not already contiguous float32.
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

// Calls f(store) with store(y, i, v) writing float v as element i of y in x's dtype (rounded once).
template <typename F>
inline void with_store(at::ScalarType t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "store", [&] {
    f([](void* y, int64_t i, float v) { static_cast<scalar_t*>(y)[i] = static_cast<scalar_t>(v); });
  });
}

}  // namespace smolvlm_kernels
