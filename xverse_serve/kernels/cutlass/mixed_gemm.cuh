// y = x W^T for int8, int4 and fp8 weights on Hopper through CUTLASS's mixed-input GEMM. kernels/cutlass_mixed.py
// builds it (one translation unit per weight format, layout and tile, each adding its GEMM to api.h's registry);
// a start-up tuning candidate on Hopper (unless XVERSE_CUTLASS=0), and bench/cutlass_mixed_lab.py's subject.
//
// CUTLASS's mixed-input mainloop takes the narrow operand through the registers, where it is converted (and scaled)
// before warpgroup MMAs, with a producer warp copying tiles by TMA beside the consumers: what Triton could not do
// for us (docs/quantization.md). It wants that operand first and K-major, so the kernel computes D = W x^T
// (N x M): W [N, K] row-major is A, x [M, K] row-major is B as a column-major K x M matrix, and D column-major is
// y [M, N] row-major.
#pragma once

#include "api.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace xverse_cutlass {

using namespace cute;

// The weight's layout in memory, [N, K] row-major as we store it, or shuffled at load (`Shuffled`): CUTLASS then
// wants the elements that one thread reads for a warpgroup MMA next to each other (one 32-bit shared-memory load
// instead of several narrow ones), and uint4 and int8 in the value order that its bit-trick converters take
// (LayoutAwareConvertImpl in cutlass/detail/collective/mixed_input_utils.hpp: a lop3 and a subtraction per two
// values, where the plain layout converts value by value). `reorder` writes a weight in that layout.
template <class Weight, bool Shuffled>
struct WeightLayout {
  using Packed = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;
  using Values = cute::conditional_t<cute::is_same_v<Weight, cutlass::uint4b_t>, Layout<Shape<_2, _4>, Stride<_4, _1>>,
                 cute::conditional_t<cute::is_same_v<Weight, int8_t>, Layout<Shape<_2, _2>, Stride<_2, _1>>,
                                     Layout<_1>>>;
  using Atom = decltype(cutlass::compute_memory_reordering_atom<cutlass::bfloat16_t, Layout<Shape<_1, _1>>, Values>());
  using Shuffle = decltype(tile_to_shape(Atom{}, Layout<Shape<int, int, int>, Packed>{}));
  // What the mainloop's builder takes: a layout tag, or the shuffled layout itself.
  using Tag = cute::conditional_t<Shuffled, Shuffle, cutlass::layout::RowMajor>;

  static auto of(int n, int k) {
    if constexpr (Shuffled) {
      return tile_to_shape(Atom{}, make_shape(n, k, 1));
    } else {
      return cutlass::make_cute_packed_stride(Packed{}, make_shape(n, k, 1));
    }
  }

  // weight [N, K] (int4: [N, K / 2] bytes) in our row-major layout -> the same values shuffled, as a new tensor.
  static at::Tensor reorder(at::Tensor const& weight, int n, int k) {
    static_assert(Shuffled, "only the shuffled layout needs reordering");
    auto out = at::empty_like(weight);
    auto plain = make_layout(make_shape(n, k, 1), cutlass::make_cute_packed_stride(Packed{}, make_shape(n, k, 1)));
    cutlass::reorder_tensor(reinterpret_cast<Weight const*>(weight.data_ptr()), plain,
                            reinterpret_cast<Weight*>(out.data_ptr()), of(n, k));
    return out;
  }
};

// Weight: uint4b_t with a scale and zero per group of K, applied in the mainloop as it converts the weight
// (`GroupScales`: w = q * scale + zero, q in 0..15, our int4 format; bf16, the MMA's type, laid out [groups, N], N
// contiguous, as CUTLASS reads them), or int8_t or float_e4m3_t converted exactly to bf16 and scaled per output
// channel in the epilogue, in float32 (as our own kernels do; CUTLASS's per-row alpha).
template <class Weight, bool GroupScales, bool Shuffled, class Tile, class Schedule, class EpilogueSchedule,
          class Scheduler = void>
struct MixedGemm {
  using Act = cutlass::bfloat16_t;
  using Scale = cutlass::bfloat16_t;
  using LayoutW = typename WeightLayout<Weight, Shuffled>::Tag;
  using LayoutX = cutlass::layout::ColumnMajor;
  using LayoutY = cutlass::layout::ColumnMajor;
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Weight>::value;
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<Act>::value;
  using Cluster = Shape<_1, _1, _1>;

  // D = acc, or D = alpha[row] * acc with D's rows the weight's output channels; no source C (void)
  using Fusion = cute::conditional_t<
      GroupScales, cutlass::epilogue::fusion::LinearCombination<Act, float, void, float>,
      cutlass::epilogue::fusion::PerRowLinCombPerRowBiasEltAct<cutlass::epilogue::thread::Identity, Act, float, Act,
                                                               void, float>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutY, kAlignX,
      Act, LayoutY, kAlignX, EpilogueSchedule, Fusion>::CollectiveOp;

  using WeightOperand = cute::conditional_t<GroupScales, cute::tuple<Weight, Scale, Scale>, Weight>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      WeightOperand, LayoutW, kAlignW,
      Act, LayoutX, kAlignX,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // x [M, K] bf16, weight [N, K] int8 / fp8 or [N, K / 2] uint8 (two nibbles a byte, k = 2j low) in the layout
  // WeightLayout<Weight, Shuffled> says, y [M, N] bf16. GroupScales: scale and zero [K / group, N] bf16; else
  // scale [N] float32 and no zero.
  static void run(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
                  c10::optional<at::Tensor> const& zero, int64_t group, at::Tensor& y) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.dim() == 2,
                "x must be a contiguous bf16 CUDA matrix");
    TORCH_CHECK(y.is_contiguous() && y.scalar_type() == at::kBFloat16 && y.size(0) == x.size(0),
                "y must be a contiguous bf16 [M, N] matrix");
    TORCH_CHECK(weight.is_contiguous() && weight.device() == x.device(),
                "the weight must be contiguous, on x's device");
    c10::cuda::CUDAGuard device(x.device());
    int const m = x.size(0), k = x.size(1), n = y.size(1);
    auto stride_w = WeightLayout<Weight, Shuffled>::of(n, k);
    auto stride_x = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(m, k, 1));
    auto stride_y = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(n, m, 1));
    auto const* w = reinterpret_cast<Weight const*>(weight.data_ptr());
    auto const* xs = reinterpret_cast<Act const*>(x.data_ptr());
    auto* out = reinterpret_cast<Act*>(y.data_ptr());
    typename Mainloop::Arguments mainloop{w, stride_w, xs, stride_x};
    typename Epilogue::Arguments epilogue{{}, nullptr, stride_y, out, stride_y};
    if constexpr (GroupScales) {
      mainloop.ptr_S = reinterpret_cast<Scale const*>(scale.data_ptr());
      mainloop.dS = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{},
                                                     make_shape(n, static_cast<int>(k / group), 1));
      mainloop.group_size = static_cast<int>(group);
      mainloop.ptr_Z = reinterpret_cast<Scale const*>(zero.value().data_ptr());
    } else {
      TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n, "the channel scale is float32 [N]");
      epilogue.thread.alpha_ptr = scale.data_ptr<float>();
    }
    typename Gemm::Arguments arguments{cutlass::gemm::GemmUniversalMode::kGemm, {n, m, k, 1}, mainloop, epilogue};
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

// The tiles, (weight rows, tokens, K), by config id (cutlass_mixed.CONFIGS). Each (format, layout, config) is
// instantiated in a translation unit of its own, which cutlass_mixed.py writes, so that they compile in parallel.
template <int Config>
struct TileConfig;
template <>
struct TileConfig<0> {
  using Tile = Shape<_128, _128, _64>;
  using Schedule = Cooperative;
  using Epilogue = CooperativeEpilogue;
  using Scheduler = void;
};
template <>
struct TileConfig<1> : TileConfig<0> {
  using Tile = Shape<_128, _256, _64>;
};
template <>
struct TileConfig<2> {
  using Tile = Shape<_64, _128, _64>;
  using Schedule = Pingpong;
  using Epilogue = PingpongEpilogue;
  using Scheduler = void;
};
template <>
struct TileConfig<3> : TileConfig<0> {
  using Tile = Shape<_128, _64, _64>;
};
// Stream-K: at 64 tokens an N of 4,096 makes 32 output tiles for 132 SMs; K is shared out among the CTAs.
template <>
struct TileConfig<4> : TileConfig<3> {
  using Scheduler = cutlass::gemm::StreamKScheduler;
};

// A GemmFn (api.h): the GEMM of one weight format, layout and tile.
template <class Weight, bool GroupScales, bool Shuffled, int Config>
void run_config(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& scale,
                c10::optional<at::Tensor> const& zero, int64_t group, at::Tensor& y) {
  using C = TileConfig<Config>;
  MixedGemm<Weight, GroupScales, Shuffled, typename C::Tile, typename C::Schedule, typename C::Epilogue,
            typename C::Scheduler>::run(x, weight, scale, zero, group, y);
}

}  // namespace xverse_cutlass
