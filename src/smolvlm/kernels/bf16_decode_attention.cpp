// Attention of one bf16 query per row over a bf16 KV cache where the CPU has AVX-512 BF16: the decode
// step's attention (decode_attention.cpp sends these calls here; it keeps every other dtype and the AVX2 CPUs).
//
// Numbers: fp32 SDPA's over the cache's values up to summation order, rounded once to bf16, as the AVX2
// loop computes them. Each vdpbf16ps multiplies 32 pairs of bf16 exactly (a product fits a float32) and adds
// them into float32 sums; it reads bf16 subnormals (below 1.2e-38) as zero, which no query or key of these
// models comes near.
//
// Why: the AVX2 loop widens every key and value once per query head (9 heads read 3 KV heads at 256M) and
// splits 9 heads over 2 threads as 5 + 4; a decode step at a 900-token context spent 1.0 of its 6.2 ms there.
// Here a KV head's query heads (up to MAXG) share each key and value load, the scores are pair dot products
// summed 16 keys at a time, and the work is split into (row, KV head, CHUNK keys) units whose partial
// softmaxes (max, sum, weighted values) are merged at the end, so 2 threads get equal halves. One 900-key
// layer (9 over 3 heads) 23.0 -> 11.8 us with its cache in L2 (AMD EPYC Zen 5, 2 threads,
// bench/decode_attention.py). In a decode step the caches come from memory
// and the gain shows at long contexts: a 256M step at 4,000 tokens 11.7-12.1 -> 10.5-10.8 ms, at 900 within
// 1% (bench/ANALYSIS.md, twenty-third round).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

using smolvlm_kernels::exp16;

constexpr int64_t CHUNK = 256;  // keys per work unit: fixed, so a row's numbers never depend on the batch
constexpr int MAXG = 4;         // query heads of one KV head per pass (16 accumulators of PV, 4 values)

// The 16 sums of 16 vectors, in order (a transposing tree: 42 instructions for 16 sums)
AVX512BF16 inline __m512 sums16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 f0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 f1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f0, f1, 0x88), _mm512_shuffle_f32x4(f0, f1, 0xDD));
}

AVX512BF16 inline __m512 widen16(const uint16_t* x) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
}

// G query heads (q: G rows of D bf16, D % 32 == 0) over keys [0, n) of one chunk (n <= CHUNK); per head g:
// m[g] its largest visible score (-inf: none), s[g] the sum of exp(score - m[g]) over visible keys,
// acc[g * D ..] the sum of exp(score - m[g]) * v.
template <int G>
AVX512BF16 void chunk(const uint16_t* q, const uint16_t* k, int64_t ks, const uint16_t* v, int64_t vs, const bool* mask,
                      int64_t ms, int64_t n, int64_t D, float scale, float* m, float* s, float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  alignas(64) float p[G][CHUNK];
  const __m512 ninf = _mm512_set1_ps(neg_inf), sc = _mm512_set1_ps(scale);
  __m512 mx[G];
  for (int g = 0; g < G; ++g) mx[g] = ninf;
  bool any = false;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    __mmask16 seen = 0;
    for (int i = 0; i < 16; ++i)
      if (j0 + i < n && (!mask || mask[(j0 + i) * ms])) seen |= static_cast<__mmask16>(1u << i);
    if (!seen) {
      for (int g = 0; g < G; ++g) _mm512_store_ps(p[g] + j0, ninf);
      continue;
    }
    any = true;
    const uint16_t* kr[16];  // a last, partial block reads its last key again and drops the copies
    for (int i = 0; i < 16; ++i) kr[i] = k + std::min<int64_t>(j0 + i, n - 1) * ks;
    for (int g = 0; g < G; ++g) {
      __m512 a[16];
      for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        const __m512bh qd = (__m512bh)_mm512_loadu_si512(q + g * D + d);
        for (int i = 0; i < 16; ++i) a[i] = _mm512_dpbf16_ps(a[i], qd, (__m512bh)_mm512_loadu_si512(kr[i] + d));
      }
      const __m512 x = _mm512_mask_blend_ps(seen, ninf, _mm512_mul_ps(sums16(a), sc));
      _mm512_store_ps(p[g] + j0, x);
      mx[g] = _mm512_max_ps(x, mx[g]);  // a NaN score is left out of the max (max_ps keeps its second operand)
    }
  }
  for (int g = 0; g < G; ++g) {
    m[g] = _mm512_reduce_max_ps(mx[g]);
    s[g] = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] = 0.0f;
  }
  if (!any) return;
  const int64_t n16 = (n + 15) / 16 * 16;
  for (int g = 0; g < G; ++g) {
    const __m512 mg = _mm512_set1_ps(m[g]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < n16; j0 += 16) {  // hidden keys (-inf) give exactly 0; a NaN score stays NaN
      const __m512 x = _mm512_load_ps(p[g] + j0);
      __m512 e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_EQ_OQ), exp16(_mm512_sub_ps(x, mg)),
                                      _mm512_setzero_ps());
      e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), e, x);
      _mm512_store_ps(p[g] + j0, e);
      sum = _mm512_add_ps(sum, e);
    }
    s[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 64 columns of every head: 4G accumulators
    const int nv = static_cast<int>(std::min<int64_t>(4, (D - d0) / 16));
    __m512 o[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) o[g][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      bool skip = true;
      for (int g = 0; g < G; ++g) skip &= p[g][j] == 0.0f;
      if (skip) continue;
      __m512 vv[4];
      for (int i = 0; i < nv; ++i) vv[i] = widen16(v + j * vs + d0 + 16 * i);
      for (int g = 0; g < G; ++g) {
        const __m512 pj = _mm512_set1_ps(p[g][j]);
        for (int i = 0; i < nv; ++i) o[g][i] = _mm512_fmadd_ps(pj, vv[i], o[g][i]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < nv; ++i) _mm512_storeu_ps(acc + g * D + d0 + 16 * i, o[g][i]);
  }
}

void chunk_any(int G, const uint16_t* q, const uint16_t* k, int64_t ks, const uint16_t* v, int64_t vs, const bool* mask,
               int64_t ms, int64_t n, int64_t D, float scale, float* m, float* s, float* acc) {
  switch (G) {
    case 1: return chunk<1>(q, k, ks, v, vs, mask, ms, n, D, scale, m, s, acc);
    case 2: return chunk<2>(q, k, ks, v, vs, mask, ms, n, D, scale, m, s, acc);
    case 3: return chunk<3>(q, k, ks, v, vs, mask, ms, n, D, scale, m, s, acc);
    default: return chunk<4>(q, k, ks, v, vs, mask, ms, n, D, scale, m, s, acc);
  }
}

}  // namespace

namespace smolvlm_kernels {  // the entry point: ops.h

// q (B, Hq, 1, D) bf16, k and v (B, Hkv, L, D) bf16 with a contiguous last dim, D % 32 == 0, mask as
// decode_attention's (checked there) -> (B, Hq, 1, D) bf16, contiguous
at::Tensor bf16_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const KeyMask& mask) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  const at::Tensor qc = q.contiguous();
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t group = Hq / Hkv, passes = (group + MAXG - 1) / MAXG;
  const int64_t chunks = std::max<int64_t>(1, (L + CHUNK - 1) / CHUNK);
  // per (row, query head, chunk): the chunk's largest score, its sum of exps and its D weighted values
  std::vector<float> part(B * Hq * chunks * (D + 2));
  auto at_part = [&](int64_t b, int64_t h, int64_t c) { return part.data() + ((b * Hq + h) * chunks + c) * (D + 2); };
  const int64_t units = B * Hkv * passes * chunks;
  const int64_t grain = L * D * group >= 8192 ? 1 : units;  // small work: one thread
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    float m[MAXG], s[MAXG];
    std::vector<float> acc(MAXG * D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t c = u % chunks, pass = u / chunks % passes, g = u / (chunks * passes) % Hkv;
      const int64_t b = u / (chunks * passes * Hkv);
      const int64_t h0 = g * group + pass * group / passes, h1 = g * group + (pass + 1) * group / passes;
      const int64_t j0 = c * CHUNK, n = std::min(CHUNK, L - j0);
      const bool* mr = mask.row(b);
      chunk_any(static_cast<int>(h1 - h0), qp + (b * Hq + h0) * D,
                kp + b * k.stride(0) + g * k.stride(1) + j0 * k.stride(2), k.stride(2),
                vp + b * v.stride(0) + g * v.stride(1) + j0 * v.stride(2), v.stride(2),
                mr ? mr + j0 * mask.key_stride : nullptr, mask.key_stride, n, D, scale, m, s, acc.data());
      for (int64_t h = h0; h < h1; ++h) {
        float* pp = at_part(b, h, c);
        pp[0] = m[h - h0];
        pp[1] = s[h - h0];
        std::copy(acc.begin() + (h - h0) * D, acc.begin() + (h - h0 + 1) * D, pp + 2);
      }
    }
  });
  // each head's chunks merged: weights exp(max_c - max), the sums and values scaled by them; a row with no
  // visible key gives zeros (as SDPA), a NaN score spreads to the whole row
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  std::vector<float> y(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      float top = neg_inf, sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, at_part(b, h, c)[0]);
      std::fill(y.begin(), y.end(), 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* pp = at_part(b, h, c);
        const float wc = chunks == 1 ? 1.0f : pp[0] == neg_inf ? 0.0f : std::exp(pp[0] - top);
        if (wc == 0.0f && pp[1] == pp[1]) continue;  // nothing visible there (a NaN sum still counts)
        sum += wc * pp[1];
        for (int64_t d = 0; d < D; ++d) y[d] += wc * pp[2 + d];
      }
      const float inv = sum > 0.0f || sum != sum ? 1.0f / sum : 0.0f;
      for (int64_t d = 0; d < D; ++d) o[(b * Hq + h) * D + d] = static_cast<at::BFloat16>(y[d] * inv);
    }
  return out;
}

}  // namespace smolvlm_kernels
