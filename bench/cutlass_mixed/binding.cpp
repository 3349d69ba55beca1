#include <type_traits>

#include "api.h"

namespace {

// call(std::bool_constant<shuffled>, std::integral_constant<int, config>) for a layout and config id given at run time
template <class Call>
void by_config(bool shuffled, int64_t config, Call&& call) {
  auto with = [&](auto c) {
    if (shuffled) return call(std::true_type{}, c);
    return call(std::false_type{}, c);
  };
  switch (config) {
    case 0: return with(std::integral_constant<int, 0>{});
    case 1: return with(std::integral_constant<int, 1>{});
    case 2: return with(std::integral_constant<int, 2>{});
    case 3: return with(std::integral_constant<int, 3>{});
    case 4: return with(std::integral_constant<int, 4>{});
    default: TORCH_CHECK(false, "config ids are 0-", xverse_lab::kConfigs - 1, ", got ", config);
  }
}

void int8_gemm(bool shuffled, int64_t config, at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
               at::Tensor& y) {
  by_config(shuffled, config, [&](auto s, auto c) {
    xverse_lab::int8_config<decltype(s)::value, decltype(c)::value>(x, weight, scale, y);
  });
}

void fp8_gemm(bool shuffled, int64_t config, at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
              at::Tensor& y) {
  by_config(shuffled, config, [&](auto s, auto c) {
    xverse_lab::fp8_config<decltype(s)::value, decltype(c)::value>(x, weight, scale, y);
  });
}

void int4_gemm(bool shuffled, int64_t config, at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
               at::Tensor const& zero, int64_t group, at::Tensor& y) {
  by_config(shuffled, config, [&](auto s, auto c) {
    xverse_lab::int4_config<decltype(s)::value, decltype(c)::value>(x, weight, scale, zero, group, y);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemm", &int8_gemm, "y = x (weight * scale)^T: int8 weight [N, K], bf16 scale [1, N], y [M, N]");
  m.def("fp8_gemm", &fp8_gemm, "y = x (weight * scale)^T: fp8 e4m3 weight [N, K], bf16 scale [1, N], y [M, N]");
  m.def("int4_gemm", &int4_gemm,
        "y = x (q * scale + zero)^T: packed uint4 weight [N, K / 2], bf16 scale and zero [K / group, N], y [M, N]");
  m.def("reorder", &xverse_lab::reorder, "a weight (int8, int4 or fp8: scheme) in the shuffled layout, as a new tensor");
}
