// Attention of one new token per row over an fp32 or bf16 KV cache: the decode step's SDPA, x86 AVX2 + FMA
// (a bf16 query over a bf16 cache goes to bf16_decode_attention.cpp where the CPU has AVX-512 BF16).
//
// q (B, Hq, 1, D) float32/bfloat16/float16, k and v (B, Hkv, L, D) float32 or bfloat16, both the same
// (any strides but a contiguous last dim: slices of the static cache; bf16 values are widened exactly), mask (Bm, 1, 1, L) bool or None (True = may
// attend; Bm is B or 1; None: every slot) -> (B, Hq, 1, D) in q's dtype, contiguous. Query head h reads KV head h / (Hq / Hkv), as
// ``enable_gqa``; scale D^-1/2. The softmax is taken in float32 over the visible slots only
// (masked slots cost nothing) and the result is rounded once; a row with no visible slot gives zeros,
// as PyTorch's SDPA does.
//
// Why: a decode step makes one such call per layer (30 at 256M), and PyTorch's flash-attention CPU
// kernel, built for long queries, took 66-69 us a call for 9 heads over 256 slots on a 2-core AMD
// EPYC (AVX2), 171 over 1024, against 37-40 and 107 here (ANALYSIS, eleventh round).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// exp of 8 floats (attention.h's polynomial), inputs clamped to +-88.4
inline __m256 exp8(__m256 x) {
  using namespace smolvlm_kernels::exp_poly;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), x);
  __m256 y = _mm256_set1_ps(P[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(P[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The 8 sums of 8 vectors, in order: one vector of 8 dot products without 8 horizontal sums.
inline __m256 sums8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // lanes: 0123|0123, 4567|4567 halves
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 8 cache values as floats: float32 as they are, bf16 widened exactly (into the high half of each lane)
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// out[0, 8 NB) = inv * sum_j p[j] v[j][0, 8 NB), slots with p[j] == 0 skipped.
template <int NB, typename T>
inline void pv_columns(const float* p, const T* v, int64_t vs, int64_t L, __m256 inv, float* out) {
  __m256 acc[NB];
  for (int i = 0; i < NB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    if (p[j] == 0.0f) continue;
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int i = 0; i < NB; ++i) acc[i] = _mm256_fmadd_ps(pj, load8(v + j * vs + 8 * i), acc[i]);
  }
  for (int i = 0; i < NB; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inv));
}

// One query row q (D floats, D % 8 == 0) against L keys/values of stride ks/vs floats; p: L rounded
// up to 8 floats of scratch; out: D floats. Keys in blocks of 8: their scores as one vector, one
// vectorised exp; blocks with no visible slot are skipped.
template <typename T>
void attend(const float* q, const T* k, int64_t ks, const T* v, int64_t vs, const bool* mask, int64_t ms,
            int64_t L, int64_t D, float scale, float* p, float* out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float mx = neg_inf;
  bool any = false;
  for (int64_t j0 = 0; j0 < L; j0 += 8) {
    bool block = false;
    for (int64_t j = j0; j < std::min<int64_t>(j0 + 8, L); ++j) block |= !mask || mask[j * ms];
    if (!block) {
      for (int64_t j = j0; j < j0 + 8; ++j) p[j] = neg_inf;
      continue;
    }
    const T* kr[8];  // a last, partial block reads its last key again and drops the copies
    for (int i = 0; i < 8; ++i) kr[i] = k + std::min<int64_t>(j0 + i, L - 1) * ks;
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qd, load8(kr[i] + d), a[i]);
    }
    _mm256_storeu_ps(p + j0, _mm256_mul_ps(sums8(a), _mm256_set1_ps(scale)));
    for (int64_t j = j0; j < j0 + 8; ++j) {
      if (j < L && (!mask || mask[j * ms])) {
        mx = p[j] > mx ? p[j] : mx;
        any = true;
      } else {
        p[j] = neg_inf;
      }
    }
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  if (!any) return;
  __m256 sum = _mm256_setzero_ps();
  const __m256 m = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(neg_inf);
  for (int64_t j0 = 0; j0 < L; j0 += 8) {  // masked slots (-inf) give exactly 0
    const __m256 s = _mm256_loadu_ps(p + j0);
    __m256 e = _mm256_blendv_ps(exp8(_mm256_sub_ps(s, m)), _mm256_setzero_ps(), _mm256_cmp_ps(s, ninf, _CMP_EQ_OQ));
    e = _mm256_blendv_ps(e, s, _mm256_cmp_ps(s, s, _CMP_UNORD_Q));  // a NaN score stays NaN (exp8 clamps it)
    _mm256_storeu_ps(p + j0, e);
    sum = _mm256_add_ps(sum, e);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  const __m256 inv = _mm256_set1_ps(1.0f / _mm_cvtss_f32(h));
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pv_columns<8>(p, v + d0, vs, L, inv, out + d0);  // 8 accumulators in registers
  for (; d0 < D; d0 += 8) pv_columns<1>(p, v + d0, vs, L, inv, out + d0);
}

}  // namespace

namespace smolvlm_kernels {  // the entry points: ops.h

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask_opt) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q (B, Hq, 1, D), k and v (B, Hkv, L, D)");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query per row");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0,
              "decode_attention: k, v must be (B, Hkv, L, D) with Hq a multiple of Hkv");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: k, v both float32 or both bfloat16");
  const smolvlm_kernels::KeyMask mask = smolvlm_kernels::key_mask(mask_opt, B, 1, L, "decode_attention");
  TORCH_CHECK(D % 8 == 0 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: D % 8 == 0, contiguous last dim");
  if (q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && D % 32 == 0 && bf16_dot_on())
    return bf16_decode_attention(q, k, v, mask);  // AVX-512 BF16: bf16_decode_attention.cpp
  // q widened to float32 here, the result rounded to q's dtype at the end: no ATen casts (~7 us each)
  std::vector<float> q32(B * Hq * D);
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());
  std::vector<float> out32(B * Hq * D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_q", [&] {
    auto a = q.accessor<scalar_t, 4>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t d = 0; d < D; ++d) q32[(b * Hq + h) * D + d] = static_cast<float>(a[b][h][0][d]);
  });
  const float* qp = q32.data();
  float* op = out32.data();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t group = Hq / Hkv;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L * D));  // small work: one thread
  auto run = [&](auto* kp, auto* vp) {
    at::parallel_for(0, B * Hq, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> p((L + 7) / 8 * 8);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / Hq, h = i % Hq, g = h / group;
        attend(qp + i * D, kp + b * k.stride(0) + g * k.stride(1), k.stride(2), vp + b * v.stride(0) + g * v.stride(1),
               v.stride(2), mask.row(b), mask.key_stride, L, D, scale, p.data(), op + i * D);
      }
    });
  };
  if (k.scalar_type() == at::kFloat)
    run(k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B * Hq * D; ++i) o[i] = static_cast<scalar_t>(out32[i]);
  });
  return out;
}

}  // namespace smolvlm_kernels

TORCH_LIBRARY_FRAGMENT(smolvlm, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor"); }
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) { m.impl("decode_attention", smolvlm_kernels::decode_attention); }
