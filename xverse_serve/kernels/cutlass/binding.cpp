// The extension's Python functions: the registered GEMMs by key, the keys built, and the weight shuffle.
#include <map>

#include "api.h"

namespace xverse_cutlass {
namespace {

// Filled by the translation units' static initializers as the library loads: a function's static, so that it
// exists before the first of them runs, whatever order the units initialize in.
std::map<std::string, GemmFn>& registry() {
  static std::map<std::string, GemmFn> gemms;
  return gemms;
}

void gemm(std::string const& key, at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
          c10::optional<at::Tensor> const& zero, int64_t group, at::Tensor& y) {
  auto found = registry().find(key);
  TORCH_CHECK(found != registry().end(), "no CUTLASS GEMM ", key, " in this build");
  found->second(x, weight, scale, zero, group, y);
}

std::vector<std::string> keys() {
  std::vector<std::string> built;
  for (auto const& entry : registry()) built.push_back(entry.first);
  return built;
}

}  // namespace

bool add_gemm(std::string const& key, GemmFn gemm) {
  registry()[key] = gemm;
  return true;
}

}  // namespace xverse_cutlass

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &xverse_cutlass::gemm,
        "y = x W^T by the GEMM registered as key: int8 / fp8 weight [N, K] with a float32 scale [N], or packed uint4 "
        "[N, K / 2] with bf16 scale and zero [K / group, N]; y [M, N] bf16");
  m.def("keys", &xverse_cutlass::keys, "the keys of the GEMMs in this build");
  m.def("reorder", &xverse_cutlass::reorder,
        "a weight (int8, int4 or fp8: scheme) in the shuffled layout, as a new tensor");
}
