// The kernels' entry points, for the ops that compose them (decode_layers.cpp); each is also
// registered as torch.ops.smolvlm.<name> by its own file.
#pragma once

#include <torch/extension.h>

namespace smolvlm_kernels {

at::Tensor bf16_gemv_cat(const at::Tensor& x, at::TensorList w);
at::Tensor f32_gemv_cat(const at::Tensor& x, at::TensorList w);
at::Tensor int8_gemv_cat(const at::Tensor& x, at::TensorList w, at::TensorList scale);
at::Tensor int4_gemv_cat(const at::Tensor& x, at::TensorList w, at::TensorList table);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
// whether the AVX-512 BF16 dot products run (``use_bf16_dot``, set by kernels/__init__.py from smolvlm.cpu)
bool bf16_dot_on();
struct KeyMask;  // attention.h
at::Tensor bf16_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const KeyMask& mask);

}  // namespace smolvlm_kernels
