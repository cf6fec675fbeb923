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

}  // namespace smolvlm_kernels
