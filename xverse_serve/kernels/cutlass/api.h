// What binding.cpp and the translation units share: a registry of the GEMMs that were built (one per weight format,
// layout and tile; each unit that kernels/cutlass_mixed.py writes adds its own as the library loads), and the weight
// shuffle (reorder.cu).
#pragma once

#include <string>
#include <vector>

#include <torch/extension.h>

namespace xverse_cutlass {

// y [M, N] bf16 = x [M, K] bf16 times the weight's transpose (mixed_gemm.cuh, MixedGemm::run)
using GemmFn = void (*)(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
                        c10::optional<at::Tensor> const& zero, int64_t group, at::Tensor& y);

// Adds a GEMM under `key` ("int4 plain 0": format, layout, config id); returns true, for a static initializer.
bool add_gemm(std::string const& key, GemmFn gemm);

// weight ([N, K] int8 or fp8, [N, K / 2] packed uint4) in the shuffled layout, as a new tensor
at::Tensor reorder(std::string const& scheme, at::Tensor const& weight, int64_t k);

}  // namespace xverse_cutlass
