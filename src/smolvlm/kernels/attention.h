// What the attention kernels (decode_attention.cpp, bf16_attention.cpp, f32_attention.cpp) share: exp's
// polynomial and reading an optional mask (Bm, 1, 1 or T, L) bool, True = may attend, Bm is B or 1 (one mask
// for every row), 1 or T (one for every query, or one per query); and, for the two whole-sequence kernels,
// the AVX-512 exp, hiding keys from a block's scores and the keys a block computes.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <limits>

#define SMOLVLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace smolvlm_kernels {

// exp(x) = 2^n * p(f), n = round(x log2 e), f = x - n ln 2 (ln 2 in two parts, the first exact), p
// Cephes' polynomial (as in avx_mathfun): ~2 ulp. Each kernel evaluates it with its own vectors.
namespace exp_poly {
constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                        4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_poly

// exp of 16 floats (the polynomial above); -inf gives 0, inputs clamped at 88.7
SMOLVLM_AVX512 inline __m512 exp16(__m512 x) {
  using namespace exp_poly;
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7228391f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), f);
  __m512 y = _mm512_set1_ps(P[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(P[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  // scalef: y * 2^n without building exponent bits; n = -inf (x = -inf) gives +0, NaN stays NaN
  return _mm512_scalef_ps(y, n);
}

struct KeyMask {
  const bool* data = nullptr;  // nullptr: every key is visible
  int64_t batch_stride = 0;    // 0 when one mask serves every row
  int64_t query_stride = 0;    // 0 when one mask serves every query (a key mask)
  int64_t key_stride = 0;

  const bool* row(int64_t b, int64_t t = 0) const { return data ? data + b * batch_stride + t * query_stride : nullptr; }
};

// mask (Bm, 1, 1, L), or (Bm, 1, T, L) where queries_too (a mask per query), bool
inline KeyMask key_mask(const c10::optional<at::Tensor>& mask_opt, int64_t B, int64_t T, int64_t L, const char* kernel,
                        bool queries_too = false) {
  KeyMask m;
  if (!mask_opt.has_value()) return m;
  const at::Tensor& mask = *mask_opt;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && (mask.size(0) == B || mask.size(0) == 1) &&
                  mask.size(1) == 1 && (mask.size(2) == 1 || (queries_too && mask.size(2) == T)) &&
                  mask.size(3) == L,
              kernel, queries_too ? ": mask must be bool (B or 1, 1, 1 or T, L)" : ": mask must be bool (B or 1, 1, 1, L)");
  m.data = mask.data_ptr<bool>();
  m.batch_stride = mask.size(0) == 1 ? 0 : mask.stride(0);
  m.query_stride = mask.size(2) == 1 ? 0 : mask.stride(2);
  m.key_stride = mask.stride(3);
  return m;
}

// Scores of n query rows (s: row r at s + r * Tp, keys [0, Lr)): -inf where row r's mask (mask[r], or none)
// hides a key, for keys past T, and, for a causal block whose first query is causal_t0 (>= 0), keys past
// causal_t0 + r. (The whole-sequence kernels, bf16_attention.cpp and f32_attention.cpp.)
SMOLVLM_AVX512 inline void hide_keys(float* s, int n, int64_t T, int64_t Lr, int64_t Tp, const bool* const* mask,
                                     int64_t ms, int64_t causal_t0) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(neg_inf);
  for (int r = 0; r < n; ++r) {
    float* sr = s + r * Tp;
    const int64_t Lm = std::min(Lr, T);  // keys past T: -inf below
    int64_t j = 0;
    if (mask[r] && ms == 1)  // 16 mask bytes at a time: their zeros become -inf scores
      for (; j + 16 <= Lm; j += 16) {
        const __mmask16 hide = _mm_cmpeq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask[r] + j)),
                                                   _mm_setzero_si128());
        _mm512_mask_storeu_ps(sr + j, hide, ninf);
      }
    if (mask[r])
      for (; j < Lm; ++j)
        if (!mask[r][j * ms]) sr[j] = neg_inf;
    for (j = Lm; j < Lr; ++j) sr[j] = neg_inf;
  }
  if (causal_t0 >= 0)
    for (int r = 0; r < n; ++r)
      for (int64_t j = causal_t0 + r + 1; j < Lr; ++j) s[r * Tp + j] = neg_inf;
}

// The keys a block of n queries from t0 computes: those up to the last one any of them may see, rounded up
// to a multiple of `step` (at most Tp); fills rows[R] with each query's mask row (rows past n repeat the last).
template <int R>
inline int64_t block_keys(const KeyMask& mask, int64_t b, int64_t t0, int n, int64_t L, bool causal, int64_t Tp,
                          int64_t step, const bool* (&rows)[R]) {
  int64_t last = causal ? t0 + n - 1 : L - 1;
  if (mask.query_stride) {  // a mask per query: up to the last key one of them sees
    last = -1;
    for (int r = 0; r < n; ++r) {
      const bool* m = mask.row(b, t0 + r);
      for (int64_t j = L - 1; j > last; --j)
        if (m[j * mask.key_stride]) {
          last = j;
          break;
        }
    }
  }
  for (int r = 0; r < R; ++r) rows[r] = mask.row(b, t0 + std::min(r, n - 1));
  return std::min(Tp, std::max<int64_t>(last + step, step) / step * step);
}

}  // namespace smolvlm_kernels
