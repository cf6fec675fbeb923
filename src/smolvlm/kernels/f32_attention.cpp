// float32 attention of a whole sequence (the vision encoder's SDPA and a prompt's), x86 AVX-512.
//
// The same call as bf16_attention.cpp, in float32: q (B, Hq, T, D), k and v (B, Hkv, L, D) float32 (any
// strides but a contiguous last dim), Hq a multiple of Hkv (``enable_gqa``), mask (Bm, 1, 1 or T, L) bool or
// None (True = may attend), causal: query i sees keys j <= i (T == L) -> (B, T, Hq * D) float32, contiguous.
// D at most 256; scale D^-1/2.
//
// Numbers: fp32 SDPA's up to summation order and exp's ~2 ulp: q.k, the softmax and the product with v
// all in float32, the exps divided by their float32 sum at the end. A row with no visible key gives zeros.
//
// Why: PyTorch's flash-attention kernel runs its products through MKL, whose code on a non-Intel CPU is
// AVX2's: one 512 px tile's 12 heads (1024 x 1024, D = 64) took 17.5 ms on an AMD EPYC Zen 5, about a
// third of a float32 256M vision tile, and a 900-token causal prompt 7.8 ms a layer (bench/ANALYSIS.md,
// twenty-second round). Here every product is a 16-lane FMA, the scores of a block of 8 queries stay in
// cache, the exps are vectorised, and a causal block computes only the keys it can see.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention.h"
#include "seq_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int R = smolvlm_kernels::SEQ_R;  // queries per block (seq_attention.h)
constexpr int KB = 16;  // keys per vector of scores
constexpr int DMAX = 256;

// K of one head packed for the scores: per block of 16 keys, per channel d, the 16 keys' values (one
// vector). Keys past T are zero (and masked).
void pack_k(const float* k, int64_t ks, int64_t T, int64_t D, float* out) {
  const int64_t nb = (T + KB - 1) / KB;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t d = 0; d < D; ++d) {
      float* o = out + (b * D + d) * KB;
      for (int64_t j = 0; j < KB; ++j) {
        const int64_t t = b * KB + j;
        o[j] = t < T ? k[t * ks + d] : 0.0f;
      }
    }
}

// V of one head, rows of Dp (D rounded up to 16) channels, zero past D; keys past T are zero rows.
void pack_v(const float* v, int64_t vs, int64_t T, int64_t Tp, int64_t D, int64_t Dp, float* out) {
  for (int64_t t = 0; t < Tp; ++t) {
    float* o = out + t * Dp;
    if (t < T) {
      std::memcpy(o, v + t * vs, D * sizeof(float));
      std::fill(o + D, o + Dp, 0.0f);
    } else {
      std::fill(o, o + Dp, 0.0f);
    }
  }
}

// Scores of n <= R query rows (each D floats) against keys [0, Lr) (Lr a multiple of 32): s (R, Tp), times
// scale, hidden keys -inf (attention.h's hide_keys).
SMOLVLM_AVX512 void scores(const float* const* q, int n, const float* kp, int64_t T, int64_t Lr, int64_t Tp,
                           int64_t D, const bool* const* mask, int64_t ms, int64_t causal_t0, float scale, float* s) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < Lr; j0 += 2 * KB) {
    const float* k0 = kp + (j0 / KB) * D * KB;  // Tp is whole pairs of key vectors
    const float* k1 = k0 + D * KB;
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m512 a = _mm512_loadu_ps(k0 + d * KB);
      const __m512 b = _mm512_loadu_ps(k1 + d * KB);
      for (int r = 0; r < R; ++r) {  // rows past n repeat row 0 (their results are dropped)
        const __m512 qr = _mm512_set1_ps(q[r][d]);
        acc[r][0] = _mm512_fmadd_ps(qr, a, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(qr, b, acc[r][1]);
      }
    }
    for (int r = 0; r < n; ++r) {
      _mm512_storeu_ps(s + r * Tp + j0, _mm512_mul_ps(acc[r][0], sc));
      _mm512_storeu_ps(s + r * Tp + j0 + KB, _mm512_mul_ps(acc[r][1], sc));
    }
  }
  smolvlm_kernels::hide_keys(s, n, T, Lr, Tp, mask, ms, causal_t0);
}

// One row of scores (Lr, a multiple of 16) -> exp(s - max) in place, returns their sum (0: nothing visible).
SMOLVLM_AVX512 float softmax_row(float* s, int64_t Lr) {
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < Lr; j += KB) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
  const float mx = _mm512_reduce_max_ps(mv);
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::fill(s, s + Lr, 0.0f);
    return 0.0f;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < Lr; j += KB) {
    const __m512 x = smolvlm_kernels::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    sum = _mm512_add_ps(sum, x);
    _mm512_storeu_ps(s + j, x);
  }
  return _mm512_reduce_add_ps(sum);
}

// out rows (n <= 4) = e rows (Lr) @ V, divided by their sums: NV vectors of 16 channels at d0.
template <int NV>
SMOLVLM_AVX512 void weighted_values(const float* const* e, int n, const float* vp, int64_t Lr, int64_t Dp,
                                    int64_t d0, const float* inv, float* out, int64_t os) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < Lr; ++t) {
    const float* vr = vp + t * Dp + d0;
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_ps(vr + i * KB);
    for (int r = 0; r < 4; ++r) {
      const __m512 er = _mm512_set1_ps(e[r][t]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(er, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < NV; ++i)
      _mm512_storeu_ps(out + r * os + d0 + i * KB, _mm512_mul_ps(acc[r][i], _mm512_set1_ps(inv[r])));
}

SMOLVLM_AVX512 void values(const float* const* e, int n, const float* vp, int64_t Lr, int64_t Dp, const float* inv,
                           float* out, int64_t os) {
  int64_t d0 = 0;
  for (; d0 + 4 * KB <= Dp; d0 += 4 * KB) weighted_values<4>(e, n, vp, Lr, Dp, d0, inv, out, os);
  for (; d0 < Dp; d0 += KB) weighted_values<1>(e, n, vp, Lr, Dp, d0, inv, out, os);
}

// float32 for seq_attention.h's driver
struct F32 {
  using Elem = float;
  static constexpr const char* NAME = "f32_attention";
  static constexpr at::ScalarType DTYPE = at::kFloat;
  static constexpr const char* DTYPE_NAME = "float32";
  static constexpr const char* CPU_NEED = "AVX-512";
  static constexpr const char* HEAD_DIM_RULE = "D at most 256";
  static bool cpu_ok() { return __builtin_cpu_supports("avx512f"); }
  static bool head_dim_ok(int64_t D) { return D > 0 && D <= DMAX; }
  static void pack_k(const float* k, int64_t ks, int64_t L, int64_t D, float* out) { ::pack_k(k, ks, L, D, out); }
  static void pack_v(const float* v, int64_t vs, int64_t L, int64_t Tp, int64_t D, int64_t Dp, float* out) {
    ::pack_v(v, vs, L, Tp, D, Dp, out);
  }
  struct Scratch {
    std::vector<float> s, o;  // the scores become the exps in place
    Scratch(int64_t Tp, int64_t Dp) : s(R * Tp), o(R * Dp) {}
  };
  SMOLVLM_AVX512 static void block(const float* const* q, int n, const float* kp, const float* vp, int64_t L,
                                   int64_t Lr, int64_t Tp, int64_t D, int64_t Dp, const bool* const* mask, int64_t ms,
                                   int64_t causal_t0, float scale, Scratch& w, float* const* out) {
    scores(q, n, kp, L, Lr, Tp, D, mask, ms, causal_t0, scale, w.s.data());
    float inv[R];
    for (int r = 0; r < n; ++r) {
      const float sum = softmax_row(w.s.data() + r * Tp, Lr);
      inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    for (int r0 = 0; r0 < n; r0 += 4) {
      const float* er[4];
      for (int r = 0; r < 4; ++r)  // rows past n repeat the last one (their results are dropped)
        er[r] = w.s.data() + (r0 + std::min(r, n - 1 - r0)) * Tp;
      values(er, std::min(4, n - r0), vp, Lr, Dp, inv + r0, w.o.data() + r0 * Dp, Dp);
    }
    for (int r = 0; r < n; ++r) std::memcpy(out[r], w.o.data() + r * Dp, D * sizeof(float));
  }
};

at::Tensor f32_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask_opt, bool is_causal) {
  return smolvlm_kernels::attend<F32>(q, k, v, mask_opt, is_causal);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smolvlm, m) {
  m.def("f32_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal) -> Tensor");
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) { m.impl("f32_attention", f32_attention); }
