// Llama's RMSNorm as one call: y = w * dtype(x * rsqrt(mean(x^2) + eps)), rows of x (..., D) float32,
// bfloat16 or float16, w (D,) in x's dtype -> y like x (contiguous).
//
// Numbers: as the reference (``LlamaRMSNorm``: the float32 cast of x normalised, cast back to x's
// dtype, then times the weight in that dtype, one rounding each). The mean of squares is summed in
// double here, so it is at least as close to the exact value as PyTorch's float32 reduction; the
// two can differ in the last bit of that float32 mean, which moves a rounded output by one unit
// at most, and rarely.
//
// Why: an eager decode step runs 2 per layer + 1 (61 for SmolLM2-135M). PyTorch's composite
// ``F.rms_norm`` (pow, mean, add, rsqrt, mul) plus the two casts around it took about 11 us for one
// 576-wide bf16 row on an AMD EPYC Zen 5 (0.7 ms of an 8 ms int8 step); here about 3 (bench/ANALYSIS.md,
// seventeenth round). Compiled steps keep PyTorch's: Inductor fuses it with its neighbours.
#include "ops.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace smolvlm_kernels {  // the entry point: ops.h

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: x (..., D), w (D,)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must have the same dtype");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  at::Tensor y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, R, 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* xr = xp + r * D;
        scalar_t* yr = yp + r * D;
        double ss = 0.0;
        for (int64_t i = 0; i < D; ++i) {
          const double v = static_cast<float>(xr[i]);
          ss += v * v;
        }
        const float mean = static_cast<float>(ss / static_cast<double>(D));
        const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
        for (int64_t i = 0; i < D; ++i) {
          const scalar_t h = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv);  // back to x's dtype
          yr[i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * static_cast<float>(h));
        }
      }
    });
  });
  return y;
}

}  // namespace smolvlm_kernels

TORCH_LIBRARY_FRAGMENT(smolvlm, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) {
  m.impl("rms_norm", smolvlm_kernels::rms_norm);
}
