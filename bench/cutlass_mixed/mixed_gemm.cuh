// y = x W^T for int8 and int4 weights on Hopper through CUTLASS's mixed-input GEMM (a lab: bench/cutlass_mixed_lab.py
// builds and times it; nothing here is served).
//
// CUTLASS's mixed-input mainloop takes the narrow operand through the registers, where it is converted (and scaled)
// before warpgroup MMAs, with a producer warp copying tiles by TMA beside the consumers: what Triton could not do
// for us (docs/quantization.md). It wants that operand first and K-major, so the kernel computes D = W x^T
// (N x M): W [N, K] row-major is A, x [M, K] row-major is B as a column-major K x M matrix, and D column-major is
// y [M, N] row-major.
#pragma once

#include "api.h"

#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace xverse_lab {

using namespace cute;

// Weight: int8_t or float_e4m3_t (its scale per row: one group spanning K) or uint4b_t (scale and zero per group of K:
// w = q * scale + zero, q in 0..15, our int4 format). Scales and zeros are bf16, the MMA's type, laid out
// [groups, N] (N contiguous: CUTLASS reads them MN-major).
template <class Weight, bool WithZero, class Tile, class Schedule, class EpilogueSchedule,
          class Scheduler = void>
struct MixedGemm {
  using Act = cutlass::bfloat16_t;
  using Scale = cutlass::bfloat16_t;
  using LayoutW = cutlass::layout::RowMajor;
  using LayoutX = cutlass::layout::ColumnMajor;
  using LayoutY = cutlass::layout::ColumnMajor;
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Weight>::value;
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<Act>::value;
  using Cluster = Shape<_1, _1, _1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutY, kAlignX,  // no source C: D = acc
      Act, LayoutY, kAlignX, EpilogueSchedule>::CollectiveOp;

  using WeightAndScales = cute::conditional_t<WithZero, cute::tuple<Weight, Scale, Scale>, cute::tuple<Weight, Scale>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      WeightAndScales, LayoutW, kAlignW,
      Act, LayoutX, kAlignX,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // x [M, K] bf16, weight [N, K] int8 or [N, K / 2] uint8 (two nibbles a byte, k = 2j low), scale and zero
  // [K / group, N] bf16, y [M, N] bf16.
  static void run(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
                  c10::optional<at::Tensor> const& zero, int64_t group, at::Tensor& y) {
    int const m = x.size(0), k = x.size(1), n = y.size(1);
    auto stride_w = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(n, k, 1));
    auto stride_x = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(m, k, 1));
    auto stride_y = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(n, m, 1));
    auto stride_s = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{},
                                                     make_shape(n, static_cast<int>(k / group), 1));
    auto const* w = reinterpret_cast<Weight const*>(weight.data_ptr());
    auto const* xs = reinterpret_cast<Act const*>(x.data_ptr());
    auto const* s = reinterpret_cast<Scale const*>(scale.data_ptr());
    auto* out = reinterpret_cast<Act*>(y.data_ptr());
    typename Mainloop::Arguments mainloop{w, stride_w, xs, stride_x, s, stride_s, static_cast<int>(group)};
    if constexpr (WithZero) {
      mainloop.ptr_Z = reinterpret_cast<Scale const*>(zero.value().data_ptr());
    }
    typename Gemm::Arguments arguments{cutlass::gemm::GemmUniversalMode::kGemm, {n, m, k, 1}, mainloop,
                                       {{1.0f, 0.0f}, nullptr, stride_y, out, stride_y}};
    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(arguments) == cutlass::Status::kSuccess,
                "this CUTLASS mixed-input GEMM cannot multiply these shapes (alignment, group size)");
    auto workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(arguments))},
                               x.options().dtype(at::kByte));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(arguments, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
                "CUTLASS mixed-input GEMM: initialize failed");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "CUTLASS mixed-input GEMM: run failed");
  }
};

using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CooperativeEpilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpilogue = cutlass::epilogue::TmaWarpSpecialized;

// The tiles the lab times, (weight rows, tokens, K), by config id (api.h). Each (format, config) is instantiated in
// a translation unit of its own, which cutlass_mixed_lab.py writes, so that they compile in parallel.
template <class Weight, bool WithZero, int Config>
void run_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
                c10::optional<at::Tensor> const& zero, int64_t group, at::Tensor& y) {
  if constexpr (Config == 0) {
    MixedGemm<Weight, WithZero, Shape<_128, _128, _64>, Cooperative, CooperativeEpilogue>::run(x, weight, scale, zero,
                                                                                                group, y);
  } else if constexpr (Config == 1) {
    MixedGemm<Weight, WithZero, Shape<_128, _256, _64>, Cooperative, CooperativeEpilogue>::run(x, weight, scale, zero,
                                                                                                group, y);
  } else if constexpr (Config == 2) {
    MixedGemm<Weight, WithZero, Shape<_64, _128, _64>, Pingpong, PingpongEpilogue>::run(x, weight, scale, zero, group,
                                                                                         y);
  } else if constexpr (Config == 3) {
    MixedGemm<Weight, WithZero, Shape<_128, _64, _64>, Cooperative, CooperativeEpilogue>::run(x, weight, scale, zero,
                                                                                               group, y);
  } else {
    // Stream-K: at 64 tokens an N of 4,096 makes 32 output tiles for 132 SMs; K is shared out among the CTAs.
    static_assert(Config == 4, "config ids are 0-4");
    MixedGemm<Weight, WithZero, Shape<_128, _64, _64>, Cooperative, CooperativeEpilogue,
              cutlass::gemm::StreamKScheduler>::run(x, weight, scale, zero, group, y);
  }
}

template <int Config>
void int8_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y) {
  run_config<int8_t, false, Config>(x, weight, scale, c10::nullopt, x.size(1), y);
}

template <int Config>
void fp8_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor& y) {
  run_config<cutlass::float_e4m3_t, false, Config>(x, weight, scale, c10::nullopt, x.size(1), y);
}

template <int Config>
void int4_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale, at::Tensor const& zero,
                 int64_t group, at::Tensor& y) {
  run_config<cutlass::uint4b_t, true, Config>(x, weight, scale, zero, group, y);
}

}  // namespace xverse_lab
