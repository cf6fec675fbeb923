// What the two attention kernels (decode_attention.cpp, bf16_attention.cpp) share: exp's polynomial
// and reading an optional mask (Bm, 1, 1 or T, L) bool, True = may attend, Bm is B or 1 (one mask for
// every row), 1 or T (one for every query, or one per query).
#pragma once

#include <torch/extension.h>

namespace smolvlm_kernels {

// exp(x) = 2^n * p(f), n = round(x log2 e), f = x - n ln 2 (ln 2 in two parts, the first exact), p
// Cephes' polynomial (as in avx_mathfun): ~2 ulp. Each kernel evaluates it with its own vectors.
namespace exp_poly {
constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                        4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_poly

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

}  // namespace smolvlm_kernels
