"""kernels.cutlass_mixed: CUTLASS's mixed-input GEMM as a start-up tuning candidate (Hopper, nvcc, the headers).
On the CPU: the translation units it writes, the operands it takes and their PyTorch twin against the reference
product, when it is offered, and the one line that says why not; on an H100 or H200 with nvcc and the nvidia-cutlass
wheel (and XVERSE_CUTLASS=1, since the build takes minutes): every GEMM against the reference."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from xverse_serve.kernels import cutlass_mixed
from xverse_serve.model.quantization import (
    BACKENDS,
    MatmulKernel,
    QuantizedLinear,
    candidates,
    reference_matmul,
    relative_error,
    tolerance,
    unpack_int4,
)


def layer_of(scheme: str, k: int, n: int, seed: int) -> QuantizedLinear:
    layer = QuantizedLinear(k, n, scheme)
    layer.load_rows(0, torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return layer


def test_each_unit_adds_one_gemm_under_its_own_key() -> None:
    # One translation unit per (format, layout, tile): each instantiates mixed_gemm.cuh's run_config with the format's
    # CUTLASS type and adds it to the registry under the key that matmul asks for.
    gemms = [(scheme, shuffled, config) for scheme in cutlass_mixed.SCHEMES for shuffled in cutlass_mixed.LAYOUTS
             for config in cutlass_mixed.CONFIGS]
    keys = {cutlass_mixed.key(*gemm) for gemm in gemms}
    assert len(keys) == len(gemms) == 30
    text = cutlass_mixed.unit_source("int4", False, 4)
    assert f'#include "{cutlass_mixed.SOURCES / "mixed_gemm.cuh"}"' in text
    assert ('xverse_cutlass::add_gemm("int4 plain 4", &xverse_cutlass::run_config<cutlass::uint4b_t, true, false, '
            '4>)') in text
    assert "run_config<cutlass::float_e4m3_t, false, true, 2>" in cutlass_mixed.unit_source("fp8", True, 2)
    assert "run_config<int8_t, false, false, 0>" in cutlass_mixed.unit_source("int8", False, 0)
    header = (cutlass_mixed.SOURCES / "mixed_gemm.cuh").read_text()
    # every config id the Python side names has its tile in the header, and no other
    assert {int(c) for c in re.findall(r"struct TileConfig<(\d+)>", header)} == set(cutlass_mixed.CONFIGS)
    for name in ("binding.cpp", "reorder.cu", "api.h"):
        assert (cutlass_mixed.SOURCES / name).is_file()


@pytest.mark.parametrize("k", [4096, 11008])
def test_the_int4_operands_multiply_as_the_reference_within_the_tuners_bound(k: int) -> None:
    # int4's scale and offset go to bf16 [groups, N] (CUTLASS converts in the MMA's type): the twin of the mainloop's
    # conversion (q * scale + zero, rounded once to bf16) stays within the tuner's bound of the exact product. The
    # rounding of scale and zero to bf16 costs about 0.6% (our own kernels, the weight rounded to bf16: 0.17%).
    layer = layer_of("int4", k, 256, seed=k)
    weight, scale, zero = cutlass_mixed.operands("int4", layer.weight, layer.weight_scale, layer.weight_offset)
    assert weight is layer.weight
    groups = k // layer.group_size
    assert scale.shape == zero.shape == (groups, 256) and scale.dtype == zero.dtype == torch.bfloat16
    assert scale.is_contiguous() and zero.is_contiguous()
    assert torch.equal(scale, layer.weight_scale.t().to(torch.bfloat16))
    assert torch.equal(zero, layer.weight_offset.t().to(torch.bfloat16))
    w = cutlass_mixed.dequantized_like_kernel("int4", unpack_int4(layer.weight), scale, zero)
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    error = relative_error(x.float() @ w.T, reference_matmul(x, layer))
    assert 1e-3 < error < 0.7 * tolerance(torch.bfloat16)  # the bf16 rounding shows, with room under the bound


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_int8_and_fp8_operands_are_the_stored_weight_and_float32_scale(scheme: str) -> None:
    layer = layer_of(scheme, 512, 128, seed=3)
    weight, scale, zero = cutlass_mixed.operands(scheme, layer.weight, layer.weight_scale, layer.weight_offset)
    assert weight is layer.weight and zero is None
    assert scale.dtype == torch.float32 and scale.shape == (128,) and torch.equal(scale, layer.weight_scale)
    # converted exactly, scaled after the sums: the twin is the reference's weight
    w = cutlass_mixed.dequantized_like_kernel(scheme, layer.weight, scale, zero)
    assert torch.equal(w, layer.dequantized(torch.float32))


def test_offered_only_where_the_card_runs_it_and_the_reason_said_once(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # XVERSE_CUTLASS=auto (the default) on a machine that cannot run sm_90a code: no candidates, and one info line
    # naming the reason; 1: the same reason as a warning; 0: nothing tried or logged; anything else refused. The
    # missing wheel and compiler each get a line saying what to install. The backend is known to the tuner's
    # XVERSE_DISABLED_KERNELS.
    layer = layer_of("int8", 512, 128, seed=4)
    assert "cutlass" in BACKENDS and str(MatmulKernel("cutlass", (("config", 2),))) == "cutlass(config=2)"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this card runs the CUTLASS GEMMs (test_the_cutlass_gemms_multiply_as_the_reference)")
    reason = "the CUTLASS GEMMs are built for compute capability 9.0 (Hopper: H100, H200)"
    for setting, level in (("auto", logging.INFO), (None, logging.INFO), ("1", logging.WARNING), ("0", None)):
        if setting is None:
            monkeypatch.delenv("XVERSE_CUTLASS", raising=False)
        else:
            monkeypatch.setenv("XVERSE_CUTLASS", setting)
        cutlass_mixed.served_module.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=cutlass_mixed.__name__):
            assert cutlass_mixed.served_module("int4", 0) is None
            assert cutlass_mixed.served_module("int4", 0) is None  # decided once
        logged = [(record.levelno, record.getMessage()) for record in caplog.records]
        shown = setting or "auto"
        assert logged == ([] if level is None else
                          [(level, f"the int4 CUTLASS GEMMs are left out (XVERSE_CUTLASS={shown}): {reason}")])
        assert "cutlass" not in {kernel.backend for kernel in candidates(layer, 512)}
    monkeypatch.setenv("XVERSE_CUTLASS", "yes")
    with pytest.raises(ValueError, match="XVERSE_CUTLASS takes auto, 1 or 0, got 'yes'"):
        cutlass_mixed.mode()
    monkeypatch.delenv("XVERSE_CUTLASS")
    cutlass_mixed.served_module.cache_clear()

    monkeypatch.setattr(cutlass_mixed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cutlass_mixed.Unavailable, match=r"pip install --no-deps nvidia-cutlass==4\.2\.0\.0"):
        cutlass_mixed.include_dirs()
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(cutlass_mixed.Unavailable, match=r"needs CUDA's compiler \(nvcc\)"):
        cutlass_mixed.build("unused", [], cutlass_mixed.build_dir())
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(cutlass_mixed.Unavailable, match="needs ninja: pip install ninja"):
        cutlass_mixed.build("unused", [], cutlass_mixed.build_dir())


def test_a_build_stopped_midway_does_not_hold_up_the_next_one(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # torch's cpp_extension waits while its lock file exists, and a build killed midway leaves that file behind.
    # build holds a lock of its own that the OS drops with the process: a torch lock found under it is removed; a
    # build under way in another process (here: another open file) is waited for.
    import fcntl
    import threading

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cutlass_mixed, "include_dirs", lambda: [])
    for name, value in (("TORCH_CUDA_ARCH_LIST", "9.0a"), ("MAX_JOBS", "1")):  # build sets them where unset
        monkeypatch.setenv(name, value)
    loads: list[bool] = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loads.append(
        Path(kwargs["build_directory"], "lock").exists()) or "module")
    (tmp_path / "lock").write_text("")  # a killed build's
    assert cutlass_mixed.build("xverse_cutlass_int8", [], tmp_path) == "module" and loads == [False]
    with open(tmp_path / "build.flock", "w") as other_build:
        fcntl.flock(other_build, fcntl.LOCK_EX)
        waiting = threading.Thread(target=cutlass_mixed.build, args=("xverse_cutlass_int8", [], tmp_path))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and len(loads) == 1  # waits for the other build
    waiting.join(10)
    assert not waiting.is_alive() and loads == [False, False]


def test_a_failed_build_is_remembered_until_the_sources_change(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # A build that fails (a compiler error) is warned about once and written down in its folder, so that the next
    # start skips it with an info line saying how to try again, instead of spending minutes failing again; once
    # what it depends on changes, it is tried again, and a build that works clears the record.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("XVERSE_CUTLASS", raising=False)
    monkeypatch.setattr(cutlass_mixed, "check_device", lambda device: None)
    monkeypatch.setattr(cutlass_mixed, "include_dirs", lambda: [])
    attempts: list[str] = []
    outcome: list = [RuntimeError("Error building extension 'xverse_cutlass_int8'\nninja: build stopped")]

    def build(name: str, gemms: list, folder: Path):
        attempts.append(name)
        assert folder == cutlass_mixed.build_dir() / "int8" and len(gemms) == len(cutlass_mixed.CONFIGS)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    monkeypatch.setattr(cutlass_mixed, "build", build)

    def start() -> object:
        cutlass_mixed.served_module.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=cutlass_mixed.__name__):
            return cutlass_mixed.served_module("int8", 0)

    assert start() is None and len(attempts) == 1
    assert ("the int8 CUTLASS GEMMs are left out: building them failed: Error building extension "
            "'xverse_cutlass_int8'") in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert start() is None and len(attempts) == 1  # not tried again
    folder = cutlass_mixed.build_dir() / "int8"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "the int8 CUTLASS GEMMs are left out (XVERSE_CUTLASS=auto): building them failed before "
                       f"(Error building extension 'xverse_cutlass_int8'); delete {folder} to try again")]
    monkeypatch.setattr(cutlass_mixed, "build_digest", lambda: "changed")
    outcome[0] = "module"
    assert start() == "module" and len(attempts) == 2
    assert not (folder / "FAILED").exists()
    cutlass_mixed.served_module.cache_clear()


def test_a_layer_keeps_the_operands_only_while_its_plan_takes_cutlass() -> None:
    layer = layer_of("int4", 256, 64, seed=5)
    layer.plan = ((64, MatmulKernel("rowgemv")), (4096, MatmulKernel("cutlass", (("config", 0),))))
    layer.keep_cutlass_operands()
    made = layer._cutlass_operands
    assert made is not None and layer.cutlass_operands() is made  # made once, before any request
    layer.plan = ((4096, MatmulKernel("mixed")),)
    layer.keep_cutlass_operands()
    assert layer._cutlass_operands is None


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not HOPPER, reason="the CUTLASS GEMMs run on compute capability 9.0 only")
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_the_cutlass_gemms_multiply_as_the_reference(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every tile of the plain layout (served) and the shuffled one (the lab's), at row counts past whole tiles and an
    # N past whole 128-row tiles, against the float32 product of the dequantized weight; and captured in a CUDA
    # graph, as decode steps run them.
    import os

    if os.environ.get("XVERSE_CUTLASS") != "1":
        pytest.skip("building all the CUTLASS GEMMs takes minutes: set XVERSE_CUTLASS=1 to run this test")
    pytest.importorskip("cutlass_library", reason="pip install --no-deps nvidia-cutlass==4.2.0.0")
    gemms = [(scheme, shuffled, config) for shuffled in cutlass_mixed.LAYOUTS for config in cutlass_mixed.CONFIGS]
    module = cutlass_mixed.build(f"xverse_cutlass_test_{scheme}", gemms, cutlass_mixed.build_dir() / f"test_{scheme}")
    layer = layer_of(scheme, 1024, 712, seed=6).cuda()
    plain = cutlass_mixed.operands(scheme, layer.weight, layer.weight_scale, layer.weight_offset)
    shuffled = (module.reorder(scheme, layer.weight, layer.in_features), *plain[1:])
    for m in (16, 17, 37, 200, 333):
        x = torch.randn(m, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(m)).to(torch.bfloat16)
        reference = reference_matmul(x, layer)
        for _, is_shuffled, config in gemms:
            def run(is_shuffled: bool = is_shuffled, config: int = config) -> torch.Tensor:
                return cutlass_mixed.matmul(module, scheme, shuffled if is_shuffled else plain, layer.group_size, x,
                                            config, is_shuffled)

            assert relative_error(run(), reference) < tolerance(torch.bfloat16), (m, is_shuffled, config)
            if m == 37:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = run()
                graph.replay()
                assert relative_error(y, reference) < tolerance(torch.bfloat16), ("graph", is_shuffled, config)
