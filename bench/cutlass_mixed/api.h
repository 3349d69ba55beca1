// What binding.cpp calls: the lab's GEMMs by layout and config id, instantiated in the translation units that
// cutlass_mixed_lab.py writes (each includes mixed_gemm.cuh), and the weight shuffle (reorder.cu).
#pragma once

#include <string>

#include <torch/extension.h>

namespace xverse_lab {

constexpr int kConfigs = 5;

template <bool Shuffled, int Config>
void int8_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y);

template <bool Shuffled, int Config>
void fp8_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y);

template <bool Shuffled, int Config>
void int4_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor const& zero,
                 int64_t group, at::Tensor& y);

// weight ([N, K] int8 or fp8, [N, K / 2] packed uint4) in the shuffled layout, as a new tensor
at::Tensor reorder(std::string const& scheme, at::Tensor const& weight, int64_t k);

}  // namespace xverse_lab
