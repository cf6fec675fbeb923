// bf16 attention of a whole sequence (the vision encoder's SDPA and a prompt's), x86 AVX-512 BF16.
//
// q (B, Hq, T, D), k and v (B, Hkv, L, D) bfloat16 (any strides but a contiguous last dim: the heads of
// one fused q/k/v projection), Hq a multiple of Hkv (query head h reads KV head h / (Hq / Hkv), as
// ``enable_gqa``), mask (Bm, 1, 1, L) or (Bm, 1, T, L) bool or None (True = may attend; Bm is B or 1;
// a key mask, or one per query: a prompt over a cache prefix, a batch of prompts), causal: query i sees
// keys j <= i (T == L, SDPA's ``is_causal``) -> (B, T, Hq * D) bfloat16,
// contiguous: the layout the output projection reads, so no transpose copy follows. D even, at most
// 256; scale D^-1/2.
//
// Numbers: as PyTorch's flash-attention CPU kernel for bf16 (the reference's SDPA): q.k summed in
// float32 from exact bf16 products, the softmax in float32, exp(s - max) rounded to bf16 for the product
// with v (summed in float32), divided by the float32 sum of the unrounded exps, rounded once. A row with
// no visible key gives zeros, as SDPA does.
//
// Why: PyTorch's flash-attention kernel spent 18.8 ms on one 512 px tile's 12 heads (1024 x 1024,
// D = 64) on an AVX-512 BF16 AMD EPYC (Zen 5) without AMX, 52% of the 256M vision encoder, where
// OpenVINO's fused attention takes 6.4 (bench/ANALYSIS.md, fifteenth round), and 11.8 ms a layer, half
// of a 1141-token 256M prompt. Here every product is one vdpbf16ps (32 multiply-adds), the scores of a
// block of 8 queries stay in cache, the exps are vectorised, and a causal block computes only the keys
// it can see.
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

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

constexpr int R = smolvlm_kernels::SEQ_R;  // queries per block (seq_attention.h)
constexpr int KB = 16;    // keys per vector of scores
constexpr int DMAX = 256;

// K of one head packed for the scores: per block of 16 keys, per pair of channels (d, d + 1), the 16
// keys' two values interleaved (32 bf16, one vector). Keys past T are zero (and masked).
void pack_k(const uint16_t* k, int64_t ks, int64_t T, int64_t D, uint16_t* out) {
  const int64_t P = D / 2, nb = (T + KB - 1) / KB;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t p = 0; p < P; ++p) {
      uint16_t* o = out + (b * P + p) * 2 * KB;
      for (int64_t j = 0; j < KB; ++j) {
        const int64_t t = b * KB + j;
        o[2 * j] = t < T ? k[t * ks + 2 * p] : 0;
        o[2 * j + 1] = t < T ? k[t * ks + 2 * p + 1] : 0;
      }
    }
}

// V of one head packed for the product: per pair of keys (t, t + 1), per channel d (D rounded up to
// 16), the two keys' values interleaved. A key past T is zero.
void pack_v(const uint16_t* v, int64_t vs, int64_t T, int64_t D, int64_t Dp, uint16_t* out) {
  for (int64_t t2 = 0; t2 < (T + 1) / 2; ++t2) {
    uint16_t* o = out + t2 * Dp * 2;
    const uint16_t* a = v + 2 * t2 * vs;
    const bool second = 2 * t2 + 1 < T;
    for (int64_t d = 0; d < Dp; ++d) {
      o[2 * d] = d < D ? a[d] : 0;
      o[2 * d + 1] = (second && d < D) ? a[vs + d] : 0;
    }
  }
}

// Scores of n <= R query rows (each D bf16 = D/2 pairs, as uint32) against keys [0, Lr) (Lr a multiple
// of 32): s (R, Tp) floats, times scale; masked keys (row r's mask: mask[r], or none), keys past T and,
// for a causal block whose first query is t0, keys past t0 + r are -inf.
AVX512BF16 void scores(const uint32_t* const* q, int n, const uint16_t* kp, int64_t T, int64_t Lr, int64_t Tp,
                       int64_t D, const bool* const* mask, int64_t ms, int64_t causal_t0, float scale, float* s) {
  const int64_t P = D / 2;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < Lr; j0 += 2 * KB) {
    const uint16_t* k0 = kp + (j0 / KB) * P * 2 * KB;  // Tp is whole pairs of key vectors
    const uint16_t* k1 = k0 + P * 2 * KB;
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + p * 2 * KB);
      const __m512bh b = (__m512bh)_mm512_loadu_si512(k1 + p * 2 * KB);
      for (int r = 0; r < R; ++r) {  // rows past n repeat row 0 (their results are dropped)
        const __m512bh qr = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r][p]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qr, a);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qr, b);
      }
    }
    for (int r = 0; r < n; ++r) {
      _mm512_storeu_ps(s + r * Tp + j0, _mm512_mul_ps(acc[r][0], sc));
      _mm512_storeu_ps(s + r * Tp + j0 + KB, _mm512_mul_ps(acc[r][1], sc));
    }
  }
  smolvlm_kernels::hide_keys(s, n, T, Lr, Tp, mask, ms, causal_t0);
}

// One row of scores -> its exps rounded to bf16 in e (Tp, even), returns their float32 sum (0: nothing
// visible).
AVX512BF16 float softmax_row(const float* s, int64_t Tp, uint16_t* e) {
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < Tp; j += KB) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
  const float mx = _mm512_reduce_max_ps(mv);
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::memset(e, 0, Tp * sizeof(uint16_t));
    return 0.0f;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < Tp; j += KB) {
    const __m512 x = smolvlm_kernels::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    sum = _mm512_add_ps(sum, x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + j), (__m256i)_mm512_cvtneps_pbh(x));
  }
  return _mm512_reduce_add_ps(sum);
}

// out rows (n <= 4) = e rows (bf16, Tp) @ V, divided by their sums: NV vectors of 16 channels at d0.
template <int NV>
AVX512BF16 void weighted_values(const uint32_t* const* e, int n, const uint16_t* vp, int64_t Tp2, int64_t Dp,
                                int64_t d0, const float* inv, float* out, int64_t os) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t t2 = 0; t2 < Tp2; ++t2) {
    const uint16_t* vr = vp + (t2 * Dp + d0) * 2;
    __m512bh vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = (__m512bh)_mm512_loadu_si512(vr + i * 2 * KB);
    for (int r = 0; r < 4; ++r) {
      const __m512bh er = (__m512bh)_mm512_set1_epi32(static_cast<int>(e[r][t2]));
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], er, vv[i]);
    }
  }
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < NV; ++i)
      _mm512_storeu_ps(out + r * os + d0 + i * KB, _mm512_mul_ps(acc[r][i], _mm512_set1_ps(inv[r])));
}

AVX512BF16 void values(const uint32_t* const* e, int n, const uint16_t* vp, int64_t Tp2, int64_t Dp,
                       const float* inv, float* out, int64_t os) {
  int64_t d0 = 0;
  for (; d0 + 4 * KB <= Dp; d0 += 4 * KB) weighted_values<4>(e, n, vp, Tp2, Dp, d0, inv, out, os);
  for (; d0 < Dp; d0 += KB) weighted_values<1>(e, n, vp, Tp2, Dp, d0, inv, out, os);
}

AVX512BF16 void round_row(const float* x, int64_t D, uint16_t* y) {
  int64_t d = 0;
  for (; d + KB <= D; d += KB)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + d)));
  if (d < D) {
    const __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1);
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + d));
    _mm256_mask_storeu_epi16(y + d, m, (__m256i)r);
  }
}

// bf16 for seq_attention.h's driver
struct Bf16 {
  using Elem = uint16_t;
  static constexpr const char* NAME = "bf16_attention";
  static constexpr at::ScalarType DTYPE = at::kBFloat16;
  static constexpr const char* DTYPE_NAME = "bfloat16";
  static constexpr const char* CPU_NEED = "AVX-512 BF16";
  static constexpr const char* HEAD_DIM_RULE = "D even and at most 256";
  static bool cpu_ok() { return __builtin_cpu_supports("avx512bf16"); }
  static bool head_dim_ok(int64_t D) { return D % 2 == 0 && D <= DMAX; }
  static void pack_k(const uint16_t* k, int64_t ks, int64_t L, int64_t D, uint16_t* out) { ::pack_k(k, ks, L, D, out); }
  static void pack_v(const uint16_t* v, int64_t vs, int64_t L, int64_t, int64_t D, int64_t Dp, uint16_t* out) {
    ::pack_v(v, vs, L, D, Dp, out);
  }
  struct Scratch {
    std::vector<float> s, o;
    std::vector<uint16_t> e;
    Scratch(int64_t Tp, int64_t Dp) : s(R * Tp), o(R * Dp), e(R * Tp) {}
  };
  AVX512BF16 static void block(const uint16_t* const* q, int n, const uint16_t* kp, const uint16_t* vp, int64_t L,
                               int64_t Lr, int64_t Tp, int64_t D, int64_t Dp, const bool* const* mask, int64_t ms,
                               int64_t causal_t0, float scale, Scratch& w, uint16_t* const* out) {
    const uint32_t* qr[R];  // each row's channel pairs
    for (int r = 0; r < R; ++r) qr[r] = reinterpret_cast<const uint32_t*>(q[r]);
    scores(qr, n, kp, L, Lr, Tp, D, mask, ms, causal_t0, scale, w.s.data());
    float inv[R];
    for (int r = 0; r < n; ++r) {
      const float sum = softmax_row(w.s.data() + r * Tp, Lr, w.e.data() + r * Tp);
      inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    for (int r0 = 0; r0 < n; r0 += 4) {
      const uint32_t* er[4];
      for (int r = 0; r < 4; ++r)  // rows past n repeat the last one (their results are dropped)
        er[r] = reinterpret_cast<const uint32_t*>(w.e.data() + (r0 + std::min(r, n - 1 - r0)) * Tp);
      values(er, std::min(4, n - r0), vp, Lr / 2, Dp, inv + r0, w.o.data() + r0 * Dp, Dp);
    }
    for (int r = 0; r < n; ++r) round_row(w.o.data() + r * Dp, D, out[r]);
  }
};

at::Tensor bf16_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& mask_opt, bool is_causal) {
  return smolvlm_kernels::attend<Bf16>(q, k, v, mask_opt, is_causal);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smolvlm, m) {
  m.def("bf16_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal) -> Tensor");
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) { m.impl("bf16_attention", bf16_attention); }
