"""Compiles the quantized-matmul and 8-bit-cache kernels for sm_90 (Hopper) without a GPU, with the ptxas that
Triton's wheel brings, and prints one JSON line per kernel: its name, registers and bytes spilled, how many integer
dot-product instructions (dp4a), Hopper tensor-core dots (wgmma), TMA copies and grid-dependency waits its PTX
has, and its machine instructions (nvdisasm): how many, how many int-to-float conversions (I2F) among them, and
how many global loads (and reads of any kind: cp.async and TMA copies too) come before the grid-dependency wait.

    python tests/hopper_compile.py quant|kv|gemv|dp4a
    python tests/hopper_compile.py consumer   # one of each kernel for Ada and Ampere (sm_89, sm_86) instead

Run as its own process: where TRITON_INTERPRET is set (the CPU tests), kernels can only be interpreted.
Pointers and strides are marked 16-divisible, as Triton's launcher marks them at run time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
NVDISASM = PTXAS.with_name("nvdisasm")


def compile_for(fn, signature: dict[str, str], constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                capability: int = 90, **options) -> dict:
    """The kernel compiled for compute capability `capability` (90: Hopper, sm_90a), and what its code holds."""
    index = fn.arg_names.index
    attrs = {(index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
             if kind.startswith("*") or name.startswith("stride") or name in ("N", "K", "k_per_split")}
    source = ASTSource(fn=fn, signature={**signature, **{name: "constexpr" for name in constexprs}},
                       constexprs={(index(name),): value for name, value in constexprs.items()}, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, **options})
    gpu_name = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([str(PTXAS), "-v", "--gpu-name", gpu_name, ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    registers = re.search(r"Used (\d+) registers", report)
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(NVDISASM), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    # Global loads issued before the grid-dependency wait (ACQBULK in SASS): what a kernel reads while the one
    # before it still runs (kernels.pdl).
    before_wait = sass.split("ACQBULK")[0] if "ACQBULK" in sass else ""
    return {"spilled_bytes": int(spills[1]) + int(spills[2]), "registers": int(registers[1]),
            "loads_before_wait": len(re.findall(r"\bLDG\.", before_wait)),
            # any read of global memory there: plain loads, cp.async copies (LDGSTS) and TMA copies (UTMALDG)
            "reads_before_wait": len(re.findall(r"\b(?:LDG|LDGSTS|UTMALDG)\b", before_wait)),
            "dp4a": ptx.count("dp4a."), "pdl_waits": ptx.count("griddepcontrol.wait"),
            "pdl_launches": ptx.count("griddepcontrol.launch_dependents"),
            "atomics": len(re.findall(r"\b(?:atom|red)\.", ptx)),
            "wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
            "int_to_float": len(re.findall(r"\bI2F\b", sass)),
            "instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, flags=re.MULTILINE))}


def quantized_matmul_kernels() -> Iterator[tuple]:
    """Every gemv and gemm configuration the tuner may choose (bf16 activations), and the dequantize kernel."""
    from xverse_serve.kernels import quant_matmul
    from xverse_serve.model.quantization import INT4_GROUP, QuantizedLinear, candidates

    for scheme in ("int8", "int4"):
        layer = QuantizedLinear(4096, 4096, scheme)
        weight = "*i8" if scheme == "int8" else "*u8"
        scales = "*fp32" if scheme == "int8" else "*fp16"
        seen = set()
        for kernel in (k for m in (1, 16, 64, 512) for k in candidates(layer, m) if k.backend in ("gemv", "gemm")):
            options = {name: value for name, value in kernel.options if name != "split_k"}
            if (kernel.backend, tuple(options.items())) in seen:
                continue
            seen.add((kernel.backend, tuple(options.items())))
            launch = {"num_warps": options.pop("num_warps"), "num_stages": options.pop("num_stages", 3)}
            name = f"{scheme} {kernel}"
            if kernel.backend == "gemm":
                yield name, quant_matmul._gemm_kernel, {
                    "x_ptr": "*bf16", "w_ptr": weight, "scale_ptr": scales, "offset_ptr": scales, "out_ptr": "*bf16",
                    "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "stride_xm": "i32", "stride_wn": "i32",
                    "stride_sn": "i32", "stride_om": "i32", "stride_osplit": "i32"}, {
                    "BITS": layer.bits, "GROUP": layer.group_size, "BLOCK_M": options["block_m"],
                    "BLOCK_N": options["block_n"], "BLOCK_K": options["block_k"], "IEEE": False}, launch
            elif scheme == "int8":
                yield name, quant_matmul._int8_gemv_kernel, {
                    "x_ptr": "*bf16", "w_ptr": weight, "scale_ptr": scales, "out_ptr": "*bf16", "M": "i32",
                    "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"}, {
                    "BLOCK_N": options["block_n"], "BLOCK_K": options["block_k"]}, launch
            else:
                yield name, quant_matmul._int4_gemv_kernel, {
                    "x_ptr": "*bf16", "w_ptr": weight, "scale_ptr": scales, "offset_ptr": scales, "out_ptr": "*bf16",
                    "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32",
                    "stride_om": "i32"}, {
                    "GROUP": INT4_GROUP, "BLOCK_N": options["block_n"], "GROUPS": options["groups_per_iter"]}, launch
        yield f"{scheme} dequantize", quant_matmul._dequantize_kernel, {
            "w_ptr": weight, "scale_ptr": scales, "offset_ptr": scales, "out_ptr": "*bf16", "N": "i32", "K": "i32",
            "stride_wn": "i32", "stride_sn": "i32", "stride_on": "i32"}, {
            "BITS": layer.bits, "GROUP": INT4_GROUP, "BLOCK_N": 16, "BLOCK_K": 256}, {}
    yield from split_gemm_kernels()
    yield from skinny_kernels()
    yield from imma_gemm_kernels()
    yield from mixed_gemm_kernels()
    from xverse_serve.kernels import fused_ops

    for k in (4096, 11008):  # XVERSE's two widths of a projection's input
        yield f"fp8 activations(K={k})", fused_ops._quantize_rows_fp8_kernel, {
            "x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "K": "i32", "stride_x": "i32",
            "stride_q": "i32"}, {"BLOCK": triton.next_power_of_2(k), "PDL": True}, {
            "num_warps": fused_ops._norm_num_warps(triton.next_power_of_2(k))}
    # the norm and SiLU·up handing an fp8 projection its activations quantized (model.xverse.takes_fp8)
    for residual in (True, False):
        yield f"fp8 norm(residual={int(residual)})", fused_ops._rms_norm_kernel, {
            "x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*fp8e4nv",
            "residual_out_ptr": "*bf16", "scale_ptr": "*fp32", "hidden": "i32", "eps": "fp32", "stride_x": "i32",
            "stride_r": "i32", "stride_o": "i32", "stride_ro": "i32"}, {
            "BLOCK": 4096, "HAS_RESIDUAL": residual, "FP8_OUT": True, "PDL": True}, {
            "num_warps": fused_ops._norm_num_warps(4096)}
    yield "bf16 silu_and_mul", fused_ops._silu_and_mul_kernel, {
        "x_ptr": "*bf16", "out_ptr": "*bf16", "inter": "i32", "stride_x": "i32", "stride_o": "i32"}, {
        "BLOCK": fused_ops.SILU_BLOCK, "PDL": True}, {"num_warps": 4}
    yield "fp8 silu_and_mul", fused_ops._silu_and_mul_fp8_kernel, {
        "x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "inter": "i32", "stride_x": "i32",
        "stride_q": "i32"}, {"BLOCK": triton.next_power_of_2(11008), "PDL": True}, {
        "num_warps": fused_ops._norm_num_warps(triton.next_power_of_2(11008))}


def split_gemm_kernels() -> Iterator[tuple]:
    """kernels.split_gemm's kernels for int8, fp8 and int4 weights: the configurations the tuner and the bench
    run, at 16 and 64 rows, with and without the split."""
    from xverse_serve.kernels import split_gemm

    for weight in ("*i8", "*fp8e4nv"):
        for block_n, block_k, num_warps, num_stages in split_gemm.SWEEP_CONFIGS:
            for block_m, split in ((16, 1), (16, 4), (64, 4)):
                yield (f"{weight[1:]} split(block_m={block_m}, block_n={block_n}, block_k={block_k}, split={split})",
                       split_gemm._split_kernel, {
                           "x_ptr": "*bf16", "w_ptr": weight, "y_ptr": "*bf16", "scale_ptr": "*fp32",
                           "partial_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "stride_xm": "i32",
                           "stride_wn": "i32", "stride_ym": "i32"}, {
                           "K": 4096, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split,
                           "PER_SPLIT": 4096 // block_k // split, "EVEN_K": True, "MAX_M": split_gemm.MAX_ROWS,
                           "TWO_PART": False, "PDL": True}, {
                           "num_warps": num_warps, "num_stages": num_stages})
    for block_n, block_k, num_warps, num_stages, tma in split_gemm.SCALED_ROWS_CONFIGS:
        for block_m, split in ((16, 1), (64, 4)):
            operands = ({"x": f"tensordesc<fp8e4nv[{block_m}, {block_k}]>",
                         "w": f"tensordesc<fp8e4nv[{block_n}, {block_k}]>"} if tma else
                        {"x": "*fp8e4nv", "w": "*fp8e4nv"})
            yield (f"fp8e4nv scaled_rows(block_m={block_m}, block_n={block_n}, block_k={block_k}, split={split}, "
                   f"tma={tma})", split_gemm._scaled_rows_kernel, {
                       **operands, "x_scale_ptr": "*fp32", "y_ptr": "*bf16", "scale_ptr": "*fp32",
                       "partial_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "stride_xm": "i32",
                       "stride_wn": "i32", "stride_ym": "i32"}, {
                       "K": 4096, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split,
                       "PER_SPLIT": 4096 // block_k // split, "EVEN_K": True, "MAX_M": split_gemm.MAX_ROWS,
                       "TMA": bool(tma), "STAGES": num_stages, "PDL": True}, {
                       "num_warps": num_warps, "num_stages": num_stages})
    for block_n, num_warps, num_stages in split_gemm.INT4_TUNED_CONFIGS:
        for block_m, split in ((16, 1), (16, 4), (64, 4)):
            yield (f"u4 split(block_m={block_m}, block_n={block_n}, split={split})", split_gemm._split_int4_kernel, {
                "x_ptr": "*bf16", "w_ptr": "*u8", "y_ptr": "*bf16", "scale_ptr": "*fp16", "offset_ptr": "*fp16",
                "partial_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "stride_xm": "i32",
                "stride_wn": "i32", "stride_sn": "i32", "stride_ym": "i32"}, {
                "K": 4096, "GROUP": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT": split,
                "PER_SPLIT": 32 // split, "EVEN": True, "MAX_M": split_gemm.MAX_ROWS, "TWO_PART": False,
                "PDL": True}, {
                "num_warps": num_warps, "num_stages": num_stages})


def skinny_kernels() -> Iterator[tuple]:
    """kernels.gemv's skinny GEMM (2-64 rows) on bf16, int8 and fp8 weights, in its default and tuned tiles."""
    from xverse_serve.kernels import gemv

    for weight in ("*bf16", "*i8", "*fp8e4nv"):
        for block_n, block_k, num_warps, num_stages in sorted({gemv.DEFAULT_SKINNY_CONFIG,
                                                                *gemv.SKINNY_CONFIGS.values()}):
            for block_m in (16, 64 if weight != "*bf16" else 32):
                yield (f"{weight[1:]} skinny(block_m={block_m}, block_n={block_n}, block_k={block_k})",
                       gemv._skinny_kernel, {
                           "x_ptr": "*bf16", "w_ptr": weight, "y_ptr": "*bf16", "scale_ptr": "*fp32", "M": "i32",
                           "N": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}, {
                           "K": 4096, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "EVEN_K": True,
                           "SCALED": weight != "*bf16", "VIA_BITS": gemv.INT8_VIA_BITS, "PDL": True}, {
                           "num_warps": num_warps, "num_stages": num_stages})


def mixed_gemm_kernels() -> Iterator[tuple]:
    """kernels.mixed_gemm in every configuration, for int8, fp8 and int4 weights: the cp.async kernel and the TMA
    one."""
    from xverse_serve.kernels import mixed_gemm

    for label, weight, scales, bits in (("i8", "*i8", "*fp32", 8), ("fp8e4nv", "*fp8e4nv", "*fp32", 8),
                                        ("u4", "*u8", "*fp16", 4)):
        for block_m, block_n, block_k, num_warps, num_stages in mixed_gemm.CONFIGS:
            yield f"{label} mixed(block_m={block_m}, block_n={block_n}, block_k={block_k})", mixed_gemm._kernel, {
                "x_ptr": "*bf16", "w_ptr": weight, "scale_ptr": scales, "offset_ptr": scales, "y_ptr": "*bf16",
                "partial_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                "k_per_split": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_ym": "i32",
                "stride_ysplit": "i32"}, {
                "BITS": bits, "GROUP": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                "GROUP_N": 8, "TICKETS": block_m <= 64, "SPLIT": 4 if block_m <= 64 else 1, "MAX_M": 64,
                "PDL": True}, {
                "num_warps": num_warps, "num_stages": num_stages}
        for block_m, block_n, block_k, num_warps, num_stages in mixed_gemm.TMA_CONFIGS:
            w_block = f"{block_n}, {block_k // 2 if bits == 4 else block_k}"
            name = f"{label} mixed_tma(block_m={block_m}, block_n={block_n}, block_k={block_k})"
            yield name, mixed_gemm._tma_kernel, {
                "x_desc": f"tensordesc<bf16[{block_m}, {block_k}]>", "w_desc": f"tensordesc<{weight[1:]}[{w_block}]>",
                "scale_ptr": scales, "offset_ptr": scales, "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                "stride_sn": "i32", "stride_ym": "i32"}, {
                "BITS": bits, "GROUP": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                "STAGES": num_stages}, {"num_warps": num_warps, "num_stages": num_stages}


def imma_gemm_kernels() -> Iterator[tuple]:
    """The two-part activation kernels in every configuration the tuner times: kernels.imma_gemm's, and
    kernels.split_gemm's with two_part at 16 and 64 rows."""
    from xverse_serve.kernels import imma_gemm

    for k in (4096, 11008):
        yield f"split rows(K={k})", imma_gemm._split_rows_kernel, {
            "x_ptr": "*bf16", "hi_ptr": "*i8", "lo_ptr": "*i8", "s_ptr": "*fp32", "sum_ptr": "*fp32",
            "stride_xm": "i32"}, {"K": k, "GROUP": 128, "BLOCK": imma_gemm.SPLIT_BLOCK, "INT4": True, "PDL": True}, {}
    for block_m, block_n, block_k, num_warps, num_stages in imma_gemm.ROWS_CONFIGS:
        yield f"i8 imma_rows(block_m={block_m}, block_n={block_n}, block_k={block_k})", imma_gemm._rows_kernel, {
            "hi_ptr": "*i8", "lo_ptr": "*i8", "s_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "y_ptr": "*bf16",
            "M": "i32", "N": "i32", "stride_wn": "i32", "stride_ym": "i32"}, {
            "K": 4096, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "PDL": True}, {
            "num_warps": num_warps, "num_stages": num_stages}
    yield "cublas_int8 combine", imma_gemm._combine_kernel, {
        "acc_ptr": "*i32", "s_ptr": "*fp32", "ws_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "N": "i32",
        "stride_ym": "i32"}, {"BLOCK": imma_gemm.COMBINE_BLOCK, "PDL": True}, {"num_warps": 4}
    for block_m, block_n, num_warps, num_stages in imma_gemm.ROWS_INT4_CONFIGS:
        yield f"u4 imma_rows(block_m={block_m}, block_n={block_n})", imma_gemm._rows_int4_kernel, {
            "hi_ptr": "*i8", "lo_ptr": "*i8", "s_ptr": "*fp32", "sum_ptr": "*fp32", "w_ptr": "*u8",
            "scale_ptr": "*fp16", "offset_ptr": "*fp16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
            "stride_wn": "i32", "stride_sn": "i32", "stride_ym": "i32"}, {
            "K": 4096, "GROUP": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_M": 8, "PDL": True}, {
            "num_warps": num_warps, "num_stages": num_stages}
    from xverse_serve.kernels import split_gemm

    for block_m in (16, 64):  # split_gemm's kernels with two-part activations
        for block_n, block_k, num_warps, num_stages in split_gemm.TWO_PART_CONFIGS:
            for weight in ("*i8", "*fp8e4nv"):
                yield (f"{weight[1:]} two-part split(block_m={block_m}, block_n={block_n}, block_k={block_k})",
                       split_gemm._split_kernel, {
                           "x_ptr": "*bf16", "w_ptr": weight, "y_ptr": "*bf16", "scale_ptr": "*fp32",
                           "partial_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "stride_xm": "i32",
                           "stride_wn": "i32", "stride_ym": "i32"}, {
                           "K": 4096, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": 4,
                           "PER_SPLIT": 4096 // block_k // 4, "EVEN_K": True, "MAX_M": 64, "TWO_PART": True,
                           "PDL": True}, {
                           "num_warps": num_warps, "num_stages": num_stages})
        for block_n, num_warps, num_stages in split_gemm.TWO_PART_INT4_CONFIGS:
            yield f"u4 two-part split(block_m={block_m}, block_n={block_n})", split_gemm._split_int4_kernel, {
                "x_ptr": "*bf16", "w_ptr": "*u8", "y_ptr": "*bf16", "scale_ptr": "*fp16", "offset_ptr": "*fp16",
                "partial_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "stride_xm": "i32",
                "stride_wn": "i32", "stride_sn": "i32", "stride_ym": "i32"}, {
                "K": 4096, "GROUP": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT": 4, "PER_SPLIT": 8,
                "EVEN": True, "MAX_M": 64, "TWO_PART": True, "PDL": True}, {"num_warps": num_warps,
                                                                          "num_stages": num_stages}


def eight_bit_cache_kernels() -> Iterator[tuple]:
    """The decode-attention kernel reading, and the RoPE kernel writing, an int8 or fp8 cache."""
    from xverse_serve.kernels import fused_ops, paged_attention

    for cache, qmax in (("i8", 127.0), ("fp8e4nv", 448.0)):
        for lanes in (False, True):
            yield f"decode attention, {cache} cache, lanes={lanes}", paged_attention._partition_kernel, {
                "q_ptr": "*bf16", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}", "block_tables_ptr": "*i32",
                "context_lens_ptr": "*i32", "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_max_ptr": "*fp32",
                "part_sum_ptr": "*fp32", "arrivals_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
                "qk_scale": "fp32",
                "num_heads": "i32", "num_parts": "i32", "stride_qs": "i32", "stride_qh": "i32", "stride_kb": "i32",
                "stride_kt": "i32", "stride_kh": "i32", "stride_vb": "i32", "stride_vt": "i32", "stride_vh": "i32",
                "stride_bts": "i32", "stride_btb": "i32", "stride_os": "i32", "stride_oh": "i32", "stride_sb": "i32",
                "stride_st": "i32"}, {
                "BLOCK_SIZE": 16, "HEAD_DIM": 128, "HEADS": 1, "PARTITION": 512, "BLOCK_N": 32 if lanes else 128,
                "LANES": lanes, "PRELOAD": not lanes, "SINGLE": False, "SCALED": True, "REDUCE_CHUNK": 16,
                "PDL": True}, {}
        yield f"rope + cache write, {cache} cache", fused_ops._rope_kv_kernel, {
            "qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "positions_ptr": "*i64", "slots_ptr": "*i64",
            "q_out_ptr": "*bf16", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}", "k_scale_ptr": "*fp32",
            "v_scale_ptr": "*fp32", "num_heads": "i32", "block_size": "i32", "stride_qkv": "i32", "stride_cos": "i32",
            "stride_sin": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kt": "i32",
            "stride_kh": "i32", "stride_vb": "i32", "stride_vt": "i32", "stride_vh": "i32", "stride_sb": "i32",
            "stride_st": "i32"}, {
            "HALF": 64, "BLOCK_HALF": 64, "HEADS": 1, "QMAX": qmax, "INT8": cache == "i8", "MIN_AMAX": 1e-8,
            "PDL": True}, {
            "num_warps": 1, "enable_fp_fusion": False}


def one_row_gemv_kernels() -> Iterator[tuple]:
    """kernels.gemv's one-row GEMV as the one-row path calls it (plain, normed, gated, with the residual add), on
    bf16 and int8 weights."""
    from xverse_serve.kernels import gemv

    signature = {"x_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "stride_wn": "i32", "norm_w_ptr": "*bf16",
                 "squares_ptr": "*fp32", "num_squares": "i32", "eps": "fp32", "residual_ptr": "*bf16",
                 "squares_out_ptr": "*fp32", "scale_ptr": "*fp32"}
    modes = {"plain": {}, "normed": {"NORMED": True, "SQUARES_BLOCK": 1024}, "gated": {"GATED": True},
             "residual": {"ADD_RESIDUAL": True}}
    for weight in ("bf16", "i8"):
        for mode, flags in modes.items():
            block_n, block_k, num_warps, num_stages = (4, 1024, 8, 3) if weight == "bf16" else (4, 2048, 8, 3)
            constexprs = {"K": 4096, "BLOCK_N": block_n, "BLOCK_K": block_k, "EVEN_K": True, "GATED": False,
                          "NORMED": False, "SQUARES_BLOCK": 1, "ADD_RESIDUAL": False, "SCALED": weight == "i8",
                          "VIA_BITS": True, "PDL": True, **flags}
            yield f"{weight} gemv {mode}", gemv._gemv_kernel, {**signature, "w_ptr": f"*{weight}"}, constexprs, {
                "num_warps": num_warps, "num_stages": num_stages}


def dp4a_gemv_kernels() -> Iterator[tuple]:
    """kernels.dp4a_gemv as the tuner and the one-row path run it, on XVERSE-7B's two K (its dp4a instructions
    are only assembled here: the interpreter computes them from the bytes): the activation quantizer (with the norm
    before qkv_proj and gate_up_proj, K = 4096), and the int8 and int4 GEMVs, plain, gated (gate_up_proj) and with
    the residual add (o_proj, down_proj); for int4 also with one-part activations in blocks of 32 ("act32"); and
    the gated and residual forms with K in four slices (" split4": split_k, summed by atomics)."""
    from xverse_serve.kernels import dp4a_gemv

    for k in (4096, 11008):
        block = 1 << (k - 1).bit_length()
        for int4 in (False, True):
            for normed in (False, True) if k == 4096 else (False,):
                for act_block in (0, 32) if int4 else (0,):
                    name = f"quantize_row K={k}{' int4' if int4 else ''}{' act32' if act_block else ''}"
                    yield f"{name}{' normed' if normed else ''}", dp4a_gemv._quantize_kernel, {
                        "x_ptr": "*bf16", "words_ptr": "*i32", "scale_ptr": "*fp32", "sums_ptr": "*fp32",
                        "norm_w_ptr": "*bf16", "eps": "fp32", "stride_xm": "i32"}, {
                        "K": k, "BLOCK": block, "INT4": int4, "GROUP": 128, "NORMED": normed, "ACT_BLOCK": act_block,
                        "PDL": True}, {
                        "num_warps": 4 if block <= 4096 else 8, "num_stages": 1}
        epilogue = {"y_ptr": "*bf16", "residual_ptr": "*bf16", "squares_ptr": "*fp32", "partial_ptr": "*fp32",
                    "count_ptr": "*i32"}
        scratch = {"stride_partial_m": "i32", "stride_count_m": "i32"}
        forms = [(form, 1, 0) for form in (("", " gated", " residual") if k == 4096 else ("", " residual"))]
        forms += [(form, 4, 0) for form in ((" gated", " residual") if k == 4096 else (" residual",))]
        forms += [(" gated", 1, 32)] if k == 4096 else [(" residual", 4, 32)]  # int4's 32 groups a step
        for form, split_k, block_g in forms:
            flags = {"GATED": form == " gated", "ADD_RESIDUAL": form == " residual", "EMULATE": False, "PDL": True}
            form += (" split4" if split_k > 1 else "") + (f" g{block_g}" if block_g else "")
            block_n, block_kw, num_warps = dp4a_gemv.INT8_CONFIG
            if not block_g:  # (int8 has no groups)
                kw_split, slices = dp4a_gemv.split_shape(k, False, None, split_k)
                yield f"int8 dp4a K={k}{form}", dp4a_gemv._int8_kernel, {
                    "words_ptr": "*i32", "x_scale_ptr": "*fp32", "w_ptr": "*i32", "w_scale_ptr": "*fp32", **epilogue,
                    "N": "i32", "stride_wn": "i32", "stride_words_m": "i32", "stride_xs_m": "i32", "stride_ym": "i32",
                    **scratch}, {
                    "KW": k // 4, "KW_SPLIT": kw_split, "SPLIT_K": slices, "BLOCK_N": block_n, "BLOCK_KW": block_kw,
                    **flags}, {
                    "num_warps": num_warps, "num_stages": 1}
            block_n, default_g, num_warps = dp4a_gemv.INT4_CONFIG
            block_g = block_g or default_g
            groups_split, slices = dp4a_gemv.split_shape(k, True, (block_n, block_g, num_warps), split_k)
            for act_block in (0, 32) if split_k == 1 and block_g == default_g else (32,):
                yield f"int4 dp4a{' act32' if act_block else ''} K={k}{form}", dp4a_gemv._int4_kernel, {
                    "words_ptr": "*i32", "x_scale_ptr": "*fp32", "sums_ptr": "*fp32", "w_ptr": "*i32",
                    "scale_ptr": "*fp16", "offset_ptr": "*fp16", **epilogue, "N": "i32", "stride_wn": "i32",
                    "stride_sn": "i32", "stride_words_m": "i32", "stride_xs_m": "i32", "stride_sums_m": "i32",
                    "stride_ym": "i32", **scratch}, {
                    "GROUPS": k // 128, "GROUPS_SPLIT": groups_split, "SPLIT_K": slices, "BLOCK_N": block_n,
                    "BLOCK_G": block_g, "GROUP_WORDS": dp4a_gemv.INT4_GROUP_WORDS, "ACT_BLOCK": act_block,
                    **flags}, {
                    "num_warps": num_warps, "num_stages": 1}


FAMILIES = {"quant": quantized_matmul_kernels, "kv": eight_bit_cache_kernels, "gemv": one_row_gemv_kernels,
            "dp4a": dp4a_gemv_kernels}
# The consumer cards a 7B model is served from (the README's 24 GB cards): Ada (RTX 4090, L4) and Ampere (RTX 3090,
# A10). Neither has TMA copies or PDL, which the kernels take only on Hopper; Ampere has no e4m3 either.
CONSUMER_CAPABILITIES = (89, 86)


def consumer_card_kernels() -> Iterator[tuple]:
    """One configuration of each kernel family the other families list, as it launches on an Ada or Ampere card:
    PDL off, TMA forms left out, e4m3 ones on Ada only (model.quantization offers them from 8.9). Each item has the
    capability it compiles for as a fifth field."""
    seen = set()
    for family in FAMILIES.values():
        for name, fn, signature, constexprs, launch in family():
            if constexprs.get("TMA") or any("tensordesc" in kind for kind in signature.values()):
                continue
            kind = (fn.__name__, name.split("(")[0].split(" K=")[0])  # tiles, K and the dp4a forms: one of each
            if kind in seen:
                continue
            seen.add(kind)
            uses_fp8 = "fp8" in name or any("fp8" in str(v) for v in (*signature.values(), *constexprs.values()))
            constexprs = {key: (False if key == "PDL" else value) for key, value in constexprs.items()}
            for capability in CONSUMER_CAPABILITIES:
                if capability >= 89 or not uses_fp8:
                    yield f"sm_{capability} {name}", fn, signature, constexprs, {**launch, "capability": capability}


def main() -> None:
    kernels = {**FAMILIES, "consumer": consumer_card_kernels}[sys.argv[1]]
    for name, fn, signature, constexprs, launch in kernels():
        print(json.dumps({"kernel": name, **compile_for(fn, signature, constexprs, **launch)}), flush=True)


if __name__ == "__main__":
    main()
