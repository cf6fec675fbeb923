// The driver the two whole-sequence attention kernels share (bf16_attention.cpp, f32_attention.cpp): the
// checks, K and V packed once per KV head, then blocks of a kernel's R queries of one head over the keys
// they can see (attention.h's block_keys), split over torch's threads. A kernel is a Kind:
//   using Elem;                           q, k, v and out elements (uint16_t for bf16, float)
//   NAME, DTYPE, DTYPE_NAME               its name and dtype
//   bool cpu_ok(); CPU_NEED               the instruction set it runs on, named for the error
//   bool head_dim_ok(D); HEAD_DIM_RULE    the head sizes it takes, named for the error
//   pack_k(k, ks, L, D, out), pack_v(v, vs, L, Tp, D, Dp, out)   one head's K and V into Tp * D and Tp * Dp Elems
//   struct Scratch(Tp, Dp)                one thread's buffers
//   block(q rows, n, kp, vp, L, Lr, Tp, D, Dp, mask rows, key stride, causal t0 or -1, scale, scratch,
//         out rows)                       n <= R queries' outputs, each D Elems at out[r]
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace smolvlm_kernels {

constexpr int SEQ_R = 8;             // queries per block: their scores (R x L floats) stay in L1/L2
constexpr int64_t SEQ_KEY_STEP = 32;  // keys per step of the scores: two vectors of 16

template <class Kind>
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask_opt, bool is_causal) {
  using Elem = typename Kind::Elem;
  constexpr int R = SEQ_R;
  const std::string name = Kind::NAME;
  TORCH_CHECK(Kind::cpu_ok(), name, ": this CPU lacks ", Kind::CPU_NEED);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
                  k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              name, ": q (B, Hq, T, D), k and v (B, Hkv, L, D) with Hq a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == Kind::DTYPE && k.scalar_type() == Kind::DTYPE && v.scalar_type() == Kind::DTYPE,
              name, ": q, k, v ", Kind::DTYPE_NAME);
  TORCH_CHECK(!is_causal || k.size(2) == q.size(2), name, ": causal needs as many keys as queries");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  const int64_t group = H / Hkv;
  TORCH_CHECK(Kind::head_dim_ok(D) && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              name, ": ", Kind::HEAD_DIM_RULE, ", contiguous last dim");
  const KeyMask mask = key_mask(mask_opt, B, T, L, Kind::NAME, true);
  at::Tensor out = at::empty({B, T, H * D}, q.options());
  if (B * H * T == 0) return out;
  TORCH_CHECK(L > 0, name, ": no keys");
  const int64_t Tp = (L + SEQ_KEY_STEP - 1) / SEQ_KEY_STEP * SEQ_KEY_STEP;  // keys padded to whole steps
  const int64_t Dp = (D + 15) / 16 * 16;
  const int64_t kn = Tp * D, vn = Tp * Dp;  // packed sizes per head
  std::vector<Elem> kpack(B * Hkv * kn), vpack(B * Hkv * vn);  // zeroed: keys past L stay zero
  const auto* qd = reinterpret_cast<const Elem*>(q.data_ptr());
  const auto* kd = reinterpret_cast<const Elem*>(k.data_ptr());
  const auto* vd = reinterpret_cast<const Elem*>(v.data_ptr());
  auto* od = reinterpret_cast<Elem*>(out.data_ptr());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      Kind::pack_k(kd + b * k.stride(0) + h * k.stride(1), k.stride(2), L, D, kpack.data() + i * kn);
      Kind::pack_v(vd + b * v.stride(0) + h * v.stride(1), v.stride(2), L, Tp, D, Dp, vpack.data() + i * vn);
    }
  });
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t nq = (T + R - 1) / R;  // query blocks per head
  at::parallel_for(0, B * H * nq, 1, [&](int64_t begin, int64_t end) {
    typename Kind::Scratch scratch(Tp, Dp);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / nq, b = i / H, h = i % H, t0 = (w % nq) * R, kvh = b * Hkv + h / group;
      const int n = static_cast<int>(std::min<int64_t>(R, T - t0));
      const bool* mrows[R];
      const int64_t Lr = block_keys<R>(mask, b, t0, n, L, is_causal, Tp, SEQ_KEY_STEP, mrows);
      const Elem* qr[R];
      Elem* orows[R];
      for (int r = 0; r < R; ++r) {  // rows past n repeat row 0 (their results are dropped)
        qr[r] = qd + b * q.stride(0) + h * q.stride(1) + (t0 + (r < n ? r : 0)) * q.stride(2);
        orows[r] = od + ((b * T + t0 + std::min(r, n - 1)) * H + h) * D;
      }
      Kind::block(qr, n, kpack.data() + kvh * kn, vpack.data() + kvh * vn, L, Lr, Tp, D, Dp, mrows, mask.key_stride,
                  is_causal ? t0 : -1, scale, scratch, orows);
    }
  });
  return out;
}

}  // namespace smolvlm_kernels
