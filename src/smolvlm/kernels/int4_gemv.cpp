// y = x @ w^T for a few rows of x, w group-wise int4: the int4 decode GEMV on x86 CPUs with AVX2 + FMA.
//
// w (N, K/2) uint8: two 4-bit values q (0..15) a byte, channel 2j in the low nibble of byte j (the saved
// layout, quantization/int4.py's pack_nibbles). table (N, G, 2) float32 or bfloat16: [scale, zero] of
// each group of g = K / G channels (g % 32 == 0), so w[n, k] = (q - 8) * scale + zero = q * scale + lo
// with lo = zero - 8 * scale. x (M, K) bfloat16/float16 -> y (M, N) in x's dtype.
//
// llama.cpp's Q4_1 x Q8_1 dot: x quantized to int8 per block of 32 (quantize_rows, as the int8 GEMV),
// the 32 products q * xq of a block summed exactly in int32 (maddubs), then
//   y = sum over blocks b of d_b * (scale * sum_b(q * xq) + lo * sum_b(xq)),
// which is the dequantized weights times the quantized activations (d_b * xq). So beyond float32
// arithmetic the only error is the activations' rounding, at most d_b / 2 each, times |w|. (Taking
// the exact sum of x for the lo term instead was about twice as far off: its error then multiplies
// q * scale, which is larger than w.) A non-finite activation sends the call down a plain float loop,
// so the row shows it.
//
// Why: PyTorch's _weight_int4pack_mm turns every 4-bit weight into a float, and on a 2-core AMD EPYC
// (AVX2, 128-bit FP units) that conversion is the cost: a SmolLM2-135M decode step's 121 layers took
// 33 ms with it against 17 ms here (bench/ANALYSIS.md, twelfth round).
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <type_traits>

namespace {

using namespace smolvlm_kernels;

// Puts each block's 32 int8 activations in the order its 16 weight bytes unpack to: the 16 even
// channels (low nibbles) then the 16 odd ones (high nibbles).
void even_then_odd(int8_t* q, int64_t n) {
  const __m256i pick = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t i = 0; i < n; i += 32) {
    const __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)), pick);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permute4x64_epi64(v, _MM_SHUFFLE(3, 1, 2, 0)));
  }
}

// d_b * sum_b(xq) of each block: its quantized activations' sum, what lo multiplies.
void block_sums(const int8_t* q, const float* d, int64_t n, float* s) {
  for (int64_t i = 0; i < n; i += 32) {
    int sum = 0;
    for (int j = 0; j < 32; ++j) sum += q[i + j];
    s[i / 32] = d[i / 32] * static_cast<float>(sum);
  }
}

struct Part {
  const uint8_t* w;  // (rows, K/2)
  const void* table;  // (rows, G, 2), float32 or bfloat16 (all parts alike)
  int shift;  // log2 of the 32-channel blocks per group
};

// sum over the 32 channels of block b of q * xq, as 8 lanes; q from the row's 16 bytes of block b,
// low nibbles in the low 128 bits, high nibbles in the high 128 bits (llama.cpp's bytes_from_nibbles_32).
inline __m256 dot_block(const uint8_t* wr, const int8_t* xm, int64_t b) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + b * 16));
  const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * 32));
  // q <= 15 and |xq| <= 127: a pair sums to at most 3810, inside int16 (maddubs saturates)
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), _mm256_set1_epi16(1)));
}

// Row tr of the table (G x [scale, zero]) against every quantized row of x, the row's weights wr: one
// memory stream per thread, as int8_gemv.cpp; two blocks a step into two accumulators (one chain of
// dependent FMAs would wait on each other). lo = zero - 8 * scale.
template <typename T, typename Store>
void row_q8(const int8_t* xq, const float* d, const float* xs, int64_t M, const uint8_t* wr, const T* tr, int shift,
            void* y, Store store, int64_t col, int64_t K, int64_t N) {
  const int64_t B = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xm = xq + m * K;
    const float* dm = d + m * B;
    const float* sm = xs + m * B;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    float o0 = 0.0f, o1 = 0.0f;
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {
      if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + b * 16) + PF, _MM_HINT_T0);
      const T* t0 = tr + (b >> shift) * 2;
      const T* t1 = tr + ((b + 1) >> shift) * 2;
      const float s0 = static_cast<float>(t0[0]), s1 = static_cast<float>(t1[0]);
      a0 = _mm256_fmadd_ps(dot_block(wr, xm, b), _mm256_set1_ps(s0 * dm[b]), a0);
      a1 = _mm256_fmadd_ps(dot_block(wr, xm, b + 1), _mm256_set1_ps(s1 * dm[b + 1]), a1);
      o0 += (static_cast<float>(t0[1]) - 8.0f * s0) * sm[b];
      o1 += (static_cast<float>(t1[1]) - 8.0f * s1) * sm[b + 1];
    }
    if (b < B) {
      const T* t0 = tr + (b >> shift) * 2;
      const float s0 = static_cast<float>(t0[0]);
      a0 = _mm256_fmadd_ps(dot_block(wr, xm, b), _mm256_set1_ps(s0 * dm[b]), a0);
      o0 += (static_cast<float>(t0[1]) - 8.0f * s0) * sm[b];
    }
    store(y, m * N + col, hsum(_mm256_add_ps(a0, a1)) + (o0 + o1));
  }
}

// The same row with float activations, for calls holding an inf or NaN: slow, and only for them.
template <typename T, typename Store>
void row_float(const float* x, int64_t M, const uint8_t* wr, const T* tr, int shift, void* y, Store store,
               int64_t col, int64_t K, int64_t N) {
  const int64_t g = 32 << shift;
  for (int64_t m = 0; m < M; ++m) {
    float sum = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float scale = static_cast<float>(tr[k / g * 2]), zero = static_cast<float>(tr[k / g * 2 + 1]);
      const int q = k % 2 ? wr[k / 2] >> 4 : wr[k / 2] & 0x0F;
      sum += x[m * K + k] * ((q - 8) * scale + zero);
    }
    store(y, m * N + col, sum);
  }
}

}  // namespace

namespace smolvlm_kernels {  // the entry points: ops.h

// y (M, N_0 + N_1 + ...): the parts (q/k/v, gate/up: layers of the same x) side by side, in one call.
at::Tensor int4_gemv_cat(const at::Tensor& x, at::TensorList w, at::TensorList table) {
  TORCH_CHECK(!w.empty() && w.size() == table.size(), "int4_gemv: as many tables as weights");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "int4_gemv: x (M, K) bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "int4_gemv: K must be a multiple of 32");
  std::vector<int64_t> first{0};  // first output column of each part, then N
  std::vector<Part> parts;
  for (size_t i = 0; i < w.size(); ++i) {
    const at::Tensor &wi = w[i], &ti = table[i];
    TORCH_CHECK(wi.dim() == 2 && ti.dim() == 3 && ti.size(2) == 2, "int4_gemv: w (N, K/2), table (N, G, 2)");
    TORCH_CHECK(wi.scalar_type() == at::kByte, "int4_gemv: w uint8 (two 4-bit values a byte)");
    TORCH_CHECK(ti.scalar_type() == at::kFloat || ti.scalar_type() == at::kBFloat16,
                "int4_gemv: table float32 or bfloat16");
    TORCH_CHECK(wi.size(1) * 2 == K && ti.size(0) == wi.size(0), "int4_gemv: shapes do not match");
    const int64_t G = ti.size(1);
    const int64_t blocks = G > 0 && (K / 32) % G == 0 ? K / 32 / G : 0;  // 32-channel blocks a group
    TORCH_CHECK(blocks > 0 && (blocks & (blocks - 1)) == 0, "int4_gemv: the group size must be 32 times a power of two");
    TORCH_CHECK(wi.is_contiguous() && ti.is_contiguous(), "int4_gemv: w and table must be contiguous");
    TORCH_CHECK(ti.scalar_type() == table[0].scalar_type(), "int4_gemv: the tables' dtypes differ");
    parts.push_back({wi.data_ptr<uint8_t>(), ti.data_ptr(), __builtin_ctzll(static_cast<unsigned long long>(blocks))});
    first.push_back(first.back() + wi.size(0));
  }
  const int64_t N = first.back();
  std::vector<float> buf, d(M * K / 32), xs(M * K / 32);
  std::vector<int8_t> xq(M * K);
  const float* xp = as_float(x, buf);
  const bool q8 = quantize_rows(xp, M, K, xq.data(), d.data());
  if (q8) {
    block_sums(xq.data(), d.data(), M * K, xs.data());
    even_then_odd(xq.data(), M * K);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  void* yp = y.data_ptr();
  with_store(x.scalar_type(), [&](auto store) {
    auto run = [&](auto* type) {  // the tables' dtype
      using T = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
      at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
        size_t p = 0;
        for (int64_t r = b; r < e; ++r) {
          while (r >= first[p + 1]) ++p;
          const Part& part = parts[p];
          const int64_t i = r - first[p], G = (K / 32) >> part.shift;
          const uint8_t* wr = part.w + i * (K / 2);
          const T* tr = static_cast<const T*>(part.table) + i * G * 2;
          if (q8) row_q8(xq.data(), d.data(), xs.data(), M, wr, tr, part.shift, yp, store, r, K, N);
          else row_float(xp, M, wr, tr, part.shift, yp, store, r, K, N);
        }
      });
    };
    if (table[0].scalar_type() == at::kBFloat16) run(static_cast<at::BFloat16*>(nullptr));
    else run(static_cast<float*>(nullptr));
  });
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& table) {
  return int4_gemv_cat(x, {w}, {table});
}

}  // namespace smolvlm_kernels

TORCH_LIBRARY_FRAGMENT(smolvlm, m) {
  m.def("int4_gemv(Tensor x, Tensor w, Tensor table) -> Tensor");
  m.def("int4_gemv_cat(Tensor x, Tensor[] w, Tensor[] table) -> Tensor");
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) {
  m.impl("int4_gemv", smolvlm_kernels::int4_gemv);
  m.impl("int4_gemv_cat", smolvlm_kernels::int4_gemv_cat);
}
