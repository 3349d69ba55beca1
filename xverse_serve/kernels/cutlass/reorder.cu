// The weights in the shuffled layout that the `Shuffled` GEMMs read (mixed_gemm.cuh, WeightLayout).
#include "mixed_gemm.cuh"

namespace xverse_cutlass {

at::Tensor reorder(std::string const& scheme, at::Tensor const& weight, int64_t k) {
  TORCH_CHECK(weight.is_cuda() && weight.is_contiguous(), "reorder takes a contiguous CUDA weight");
  c10::cuda::CUDAGuard device(weight.device());
  int const n = weight.size(0);
  if (scheme == "int8") return WeightLayout<int8_t, true>::reorder(weight, n, k);
  if (scheme == "fp8") return WeightLayout<cutlass::float_e4m3_t, true>::reorder(weight, n, k);
  TORCH_CHECK(scheme == "int4", "reorder takes int8, int4 or fp8, got ", scheme);
  return WeightLayout<cutlass::uint4b_t, true>::reorder(weight, n, k);
}

}  // namespace xverse_cutlass
