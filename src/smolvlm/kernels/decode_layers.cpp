// One eager decode step through every decoder layer in one call: the Llama layer of model/text.py for
// one new token in each of B rows, composed of the other kernels here, with no Python between them.
//
// x (B, D) float32 or bfloat16 (the step's embeddings); cos and sin (B, hd) in x's dtype, each row's
// (layers.rope_tables: sin with its first half negated); pos: each row's slot. Per layer l:
// - norms[2l], norms[2l + 1]: the two RMSNorm weights (the list's last entry is the final norm's);
// - kinds[4l .. 4l + 3]: how q/k/v, o, gate/up and down are held (Kind below);
// - w and aux [7l .. 7l + 6] (q, k, v, o, gate, up, down): the weight and what rides along (int8's
//   float32 scales, or for PyTorch's int8 kernel its scales in x's dtype; int4's table; anything for
//   the others);
// - k_cache[l], v_cache[l]: (B, Hkv, S, hd) float32 or bfloat16.
// -> the final-norm hidden states (B, D). Row b's new k and v are written at slot pos[b] and it attends
// over its slots 0..pos[b]: one row, no mask; several, the per-row causal mask of text.build_mask over
// max(pos) + 1 slots (continuous batching's rows at their own positions). ``mask`` (B, 1, 1, L) bool,
// if given, replaces that: the slots each row attends (a left-padded batch's, text.build_mask's too).
//
// Numbers: the same as the layer-by-layer eager path, step for step. Each GEMV, RMSNorm and the
// attention is the same kernel; the elementwise steps round as PyTorch's kernels do (RoPE's two
// products each rounded to x's dtype before their sum, the residual adds and silu(gate) * up rounded
// once; silu itself is PyTorch's). tests/unit/test_fused_decode.py checks the result bit for bit.
//
// Why: an eager step of SmolVLM-256M runs about 2,000 PyTorch calls (views included) and ~20 Python
// module calls a layer around its 5 kernels a layer; on an AMD EPYC Zen 5 that was about 2.5 of its
// 11 ms (bench/ANALYSIS.md, eighteenth round).
#include "ops.h"

#include <algorithm>
#include <vector>

namespace {

using namespace smolvlm_kernels;

// PACKED: oneDNN's packed weight (model/packed.py), one for the whole group (q/k/v or gate/up fused), in
// the group's first slot; o and down add the residual inside oneDNN's call, as PackedLinear.forward_add.
enum Kind : int64_t { BF16 = 0, INT8 = 1, INT4 = 2, INT4_TORCH = 3, PACKED = 4, F32 = 5, INT8_TORCH = 6 };

// mkldnn::_linear_pointwise (and its .binary add), called as model/packed.py calls them from Python
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* residual) {
  static const c10::OperatorHandle plain =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  static const c10::OperatorHandle binary =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
  torch::jit::Stack stack;
  if (residual) {
    stack = {x, *residual, w, c10::IValue(), std::string("add")};
    binary.callBoxed(&stack);
  } else {
    stack = {x, w, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(), std::string("")};
    plain.callBoxed(&stack);
  }
  return stack[0].toTensor();
}

// The outputs of the layers w (one input x (1, K)) side by side, as Python's forward_together / forward.
at::Tensor linear(int64_t kind, const at::Tensor& x, at::TensorList w, at::TensorList aux) {
  switch (kind) {
    case BF16: return bf16_gemv_cat(x, w);
    case F32: return f32_gemv_cat(x, w);
    case INT8: return int8_gemv_cat(x, w, aux);
    case INT4: return int4_gemv_cat(x, w, aux);
    case INT4_TORCH: {  // PyTorch's kernel, one layer at a time; aux: its (G, N, 2) table
      std::vector<at::Tensor> ys;
      for (size_t i = 0; i < w.size(); ++i)
        ys.push_back(at::_weight_int4pack_mm_for_cpu(x, w[i], x.size(1) / aux[i].size(0), aux[i]));
      return ys.size() == 1 ? ys[0] : at::cat(ys, 1);
    }
    case INT8_TORCH: {  // PyTorch's kernel, one layer at a time; aux: its scales in x's dtype
      std::vector<at::Tensor> ys;
      for (size_t i = 0; i < w.size(); ++i) ys.push_back(at::_weight_int8pack_mm(x, w[i], aux[i]));
      return ys.size() == 1 ? ys[0] : at::cat(ys, 1);
    }
    case PACKED: return packed_linear(x, w[0], nullptr);
    default: TORCH_CHECK(false, "decode_layers: unknown weight kind ", kind);
  }
}

// a * b rounded to float32 on its own (never fused into a following add, as in PyTorch's mul kernel)
inline float product(float a, float b) {
  volatile float r = a * b;
  return r;
}

// RoPE of one head: x * cos + roll(x, hd / 2) * signed_sin, each product rounded to T, then the sum.
template <typename T>
void rotate(const T* x, const T* c, const T* s, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) {
    const T a = static_cast<T>(product(static_cast<float>(x[d]), static_cast<float>(c[d])));
    const T b = static_cast<T>(product(static_cast<float>(x[(d + half) % hd]), static_cast<float>(s[d])));
    out[d] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}

// q/k/v (B, (Hq + 2 Hkv) hd) -> attention output (B, Hq hd) over the first L slots; row b's k, v written
// into the caches at pos[b].
template <typename T>
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kc,
                  const at::Tensor& vc, at::IntArrayRef pos, int64_t L, const c10::optional<at::Tensor>& mask,
                  int64_t hq, int64_t hkv, int64_t hd) {
  const int64_t B = qkv.size(0), width = qkv.size(1), heads = hq + hkv;
  at::Tensor rot;  // the rotated q and k heads, (B, hq + hkv, hd) contiguous
  if (B > 1) {  // several rows: PyTorch's elementwise kernels, as layers.apply_rope runs them
    const at::Tensor qk = qkv.narrow(1, 0, heads * hd).view({B, heads, hd});
    rot = at::add(at::mul(qk, cos.view({B, 1, hd})), at::mul(at::roll(qk, {hd / 2}, {-1}), sin.view({B, 1, hd})));
  } else {  // one row: ~24 short heads, cheaper here than ~4 PyTorch calls
    rot = at::empty({B, heads, hd}, qkv.options());
    for (int64_t h = 0; h < heads; ++h)
      rotate(qkv.data_ptr<T>() + h * hd, cos.data_ptr<T>(), sin.data_ptr<T>(), hd, rot.data_ptr<T>() + h * hd);
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, kc.scalar_type(), "decode_layers_cache", [&] {
    for (int64_t b = 0; b < B; ++b) {
      const T* k = rot.data_ptr<T>() + (b * heads + hq) * hd;
      const T* v = qkv.data_ptr<T>() + b * width + heads * hd;
      scalar_t* kp = kc.data_ptr<scalar_t>() + b * kc.stride(0) + pos[b] * kc.stride(2);
      scalar_t* vp = vc.data_ptr<scalar_t>() + b * vc.stride(0) + pos[b] * vc.stride(2);
      for (int64_t h = 0; h < hkv; ++h)
        for (int64_t d = 0; d < hd; ++d) {
          kp[h * kc.stride(1) + d] = static_cast<scalar_t>(static_cast<float>(k[h * hd + d]));
          vp[h * vc.stride(1) + d] = static_cast<scalar_t>(static_cast<float>(v[h * hd + d]));
        }
    }
  });
  const at::Tensor q = rot.narrow(1, 0, hq).unsqueeze(2);  // (B, hq, 1, hd)
  return decode_attention(q, kc.narrow(2, 0, L), vc.narrow(2, 0, L), mask).view({B, hq * hd});
}

template <typename T>
at::Tensor add(const at::Tensor& a, const at::Tensor& b) {  // the residual add, rounded once
  // Several rows: PyTorch's own add (vectorized; its call costs ~5 us, which one 576-wide row does not repay)
  if (a.size(0) > 1) return at::add(a, b);
  at::Tensor y = at::empty_like(a);
  const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for (int64_t i = 0; i < a.numel(); ++i) yp[i] = static_cast<T>(static_cast<float>(ap[i]) + static_cast<float>(bp[i]));
  return y;
}

// residual + linear(x): one oneDNN call for a packed layer (PackedLinear.forward_add), else the add rounded once
template <typename T>
at::Tensor linear_add(int64_t kind, const at::Tensor& x, const at::Tensor& residual, at::TensorList w, at::TensorList aux) {
  if (kind == PACKED) return packed_linear(x, w[0], &residual);
  return add<T>(residual, linear(kind, x, w, aux));
}

template <typename T>
at::Tensor gated(const at::Tensor& gate_up) {  // silu(gate) * up of (B, 2I) -> (B, I)
  const int64_t B = gate_up.size(0), n = gate_up.size(1) / 2;
  const at::Tensor g = at::silu(gate_up.narrow(1, 0, n)).contiguous();
  if (B > 1) return at::mul(g, gate_up.narrow(1, n, n));  // several rows: PyTorch's mul, as add above
  at::Tensor y = at::empty({B, n}, gate_up.options());
  for (int64_t b = 0; b < B; ++b) {
    const T *gp = g.data_ptr<T>() + b * n, *up = gate_up.data_ptr<T>() + b * 2 * n + n;
    T* yp = y.data_ptr<T>() + b * n;
    for (int64_t i = 0; i < n; ++i) yp[i] = static_cast<T>(product(static_cast<float>(gp[i]), static_cast<float>(up[i])));
  }
  return y;
}

template <typename T>
at::Tensor run(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList norms,
               at::IntArrayRef kinds, at::TensorList w, at::TensorList aux, at::TensorList kc, at::TensorList vc,
               at::IntArrayRef pos, const c10::optional<at::Tensor>& given, int64_t hq, int64_t hkv, double eps) {
  const int64_t B = x.size(0), hd = cos.size(1);
  const int64_t L = given ? given->size(3) : *std::max_element(pos.begin(), pos.end()) + 1;
  c10::optional<at::Tensor> mask = given;  // one row sees every slot up to its own; rows: build_mask's (B, 1, 1, L)
  if (B > 1 && !given) {
    mask = at::empty({B, 1, 1, L}, x.options().dtype(at::kBool));
    bool* m = mask->data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < L; ++j) m[b * L + j] = j <= pos[b];
  }
  at::Tensor h = x;
  for (size_t l = 0; l < kc.size(); ++l) {
    const int64_t* kind = kinds.data() + 4 * l;
    const size_t p = 7 * l;  // q, k, v, o, gate, up, down
    at::Tensor qkv = linear(kind[0], rms_norm(h, norms[2 * l], eps), w.slice(p, 3), aux.slice(p, 3));
    at::Tensor att = attend<T>(qkv, cos, sin, kc[l], vc[l], pos, L, mask, hq, hkv, hd);
    h = linear_add<T>(kind[1], att, h, w.slice(p + 3, 1), aux.slice(p + 3, 1));
    at::Tensor gate_up = linear(kind[2], rms_norm(h, norms[2 * l + 1], eps), w.slice(p + 4, 2), aux.slice(p + 4, 2));
    h = linear_add<T>(kind[3], gated<T>(gate_up), h, w.slice(p + 6, 1), aux.slice(p + 6, 1));
  }
  return rms_norm(h, norms[norms.size() - 1], eps);
}

at::Tensor decode_layers(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList norms,
                         at::IntArrayRef kinds, at::TensorList w, at::TensorList aux, at::TensorList kc,
                         at::TensorList vc, at::IntArrayRef pos, const c10::optional<at::Tensor>& mask, int64_t heads,
                         int64_t kv_heads, double eps) {
  const size_t L = kc.size();
  TORCH_CHECK(L > 0 && vc.size() == L && norms.size() == 2 * L + 1 && kinds.size() == 4 * L && w.size() == 7 * L &&
                  aux.size() == 7 * L,
              "decode_layers: per layer 2 norms (+1), 4 kinds, 7 weights and 7 aux, one k and one v cache");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.is_contiguous(), "decode_layers: x (B, D) contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "decode_layers: x float32 or bfloat16");
  const int64_t B = x.size(0);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == B && sin.sizes() == cos.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() &&
                  cos.size(1) % 8 == 0,
              "decode_layers: cos and sin (B, hd) contiguous in x's dtype, hd % 8 == 0");
  const int64_t hd = cos.size(1);
  TORCH_CHECK(static_cast<int64_t>(pos.size()) == B, "decode_layers: one slot per row");
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(0) == B && mask->size(1) == 1 &&
                    mask->size(2) == 1 && mask->is_contiguous(),
                "decode_layers: mask (B, 1, 1, L) bool, contiguous");
    for (int64_t p : pos) TORCH_CHECK(p < mask->size(3), "decode_layers: slot ", p, " outside the mask's ", mask->size(3));
  }
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "decode_layers: heads a multiple of kv_heads");
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor &k = kc[l], &v = vc[l];
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == kv_heads && k.size(3) == hd &&
                    k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type(),
                "decode_layers: caches (B, kv_heads, S, hd), contiguous last dim");
    for (int64_t p : pos) TORCH_CHECK(p >= 0 && p < k.size(2), "decode_layers: slot ", p, " outside the cache's ", k.size(2));
  }
  if (x.scalar_type() == at::kFloat)
    return run<float>(x, cos, sin, norms, kinds, w, aux, kc, vc, pos, mask, heads, kv_heads, eps);
  return run<at::BFloat16>(x, cos, sin, norms, kinds, w, aux, kc, vc, pos, mask, heads, kv_heads, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smolvlm, m) {
  m.def("decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor[] norms, int[] kinds, Tensor[] w, Tensor[] aux, "
        "Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, int[] pos, Tensor? mask, int heads, int kv_heads, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(smolvlm, CPU, m) { m.impl("decode_layers", decode_layers); }
// oneDNN's packed weights are MkldnnCPU tensors, which pick the dispatch key of a call that takes them
TORCH_LIBRARY_IMPL(smolvlm, MkldnnCPU, m) { m.impl("decode_layers", decode_layers); }
