#include "api.h"

namespace {

void int8_gemm(int64_t config, at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y) {
  switch (config) {
    case 0: return xverse_lab::int8_config<0>(x, weight, scale, y);
    case 1: return xverse_lab::int8_config<1>(x, weight, scale, y);
    case 2: return xverse_lab::int8_config<2>(x, weight, scale, y);
    case 3: return xverse_lab::int8_config<3>(x, weight, scale, y);
    default: TORCH_CHECK(false, "config ids are 0-", xverse_lab::kConfigs - 1, ", got ", config);
  }
}

void fp8_gemm(int64_t config, at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y) {
  switch (config) {
    case 0: return xverse_lab::fp8_config<0>(x, weight, scale, y);
    case 1: return xverse_lab::fp8_config<1>(x, weight, scale, y);
    case 2: return xverse_lab::fp8_config<2>(x, weight, scale, y);
    case 3: return xverse_lab::fp8_config<3>(x, weight, scale, y);
    default: TORCH_CHECK(false, "config ids are 0-", xverse_lab::kConfigs - 1, ", got ", config);
  }
}

void int4_gemm(int64_t config, at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
               at::Tensor const& zero, int64_t group, at::Tensor& y) {
  switch (config) {
    case 0: return xverse_lab::int4_config<0>(x, weight, scale, zero, group, y);
    case 1: return xverse_lab::int4_config<1>(x, weight, scale, zero, group, y);
    case 2: return xverse_lab::int4_config<2>(x, weight, scale, zero, group, y);
    case 3: return xverse_lab::int4_config<3>(x, weight, scale, zero, group, y);
    default: TORCH_CHECK(false, "config ids are 0-", xverse_lab::kConfigs - 1, ", got ", config);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemm", &int8_gemm, "y = x (weight * scale)^T: int8 weight [N, K], bf16 scale [1, N], y [M, N]");
  m.def("fp8_gemm", &fp8_gemm, "y = x (weight * scale)^T: fp8 e4m3 weight [N, K], bf16 scale [1, N], y [M, N]");
  m.def("int4_gemm", &int4_gemm,
        "y = x (q * scale + zero)^T: packed uint4 weight [N, K / 2], bf16 scale and zero [K / group, N], y [M, N]");
}
