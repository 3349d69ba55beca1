// What binding.cpp calls: the lab's GEMMs by config id, instantiated in the translation units that
// cutlass_mixed_lab.py writes (each includes mixed_gemm.cuh).
#pragma once

#include <torch/extension.h>

namespace xverse_lab {

constexpr int kConfigs = 5;

template <int Config>
void int8_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y);

template <int Config>
void fp8_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y);

template <int Config>
void int4_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor const& zero,
                 int64_t group, at::Tensor& y);

}  // namespace xverse_lab
