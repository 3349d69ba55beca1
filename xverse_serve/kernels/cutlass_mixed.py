"""y = x @ W^T for int8, int4 and fp8 weights with bf16 activations on Hopper, through CUTLASS's mixed-input GEMM
(cutlass/mixed_gemm.cuh): a producer warp copies the weight and token tiles by TMA while two consumer warpgroups
convert the weights in registers and run the warpgroup MMAs, the structure that Triton 3.6 does not give a kernel
that dequantizes in registers (docs/quantization.md), for prefill-sized batches.

Not in requirements.txt: it needs CUDA's compiler (nvcc) and ninja, and CUTLASS's headers from the `nvidia-cutlass`
wheel (`pip install --no-deps nvidia-cutlass==4.2.0.0`: its dependencies serve CUTLASS's Python interface, which
this does not use); torch's cpp_extension compiles it on first use (one translation unit per format, layout and
tile, a minute or two of a core each, side by side) and keeps the library for later starts. The start-up tuning
offers it where the card is compute capability 9.0 (its kernels are built for sm_90a: wgmma, setmaxnreg, which run
on no other) and nvcc and the headers are there, unless XVERSE_CUTLASS=0 (`mode`). On an H100 the tuner chose it for
int8's and int4's projections from 17-65 rows up, and the first token of 512 went from 1.33x to 1.09x bf16's (int8)
and from 1.39x to 1.12x (int4); 64 requests from 1.02x to 1.07x (int8) and from 0.95x to 1.05x (int4)
(bench/results/quant_h100_cutlass.json, quant_h100_cutlass_int8_fp8.json).

Operands: int8's and fp8's weights as stored ([N, K], converted exactly to bf16 in the mainloop) with their float32
channel scales applied in the epilogue; int4's packed weight as stored ([N, K / 2], k = 2j in byte j's low nibble,
CUTLASS's uint4b_t order) with its group's scale and zero applied as the mainloop converts (w = q * scale + zero),
in bf16 laid out [groups, N], which `operands` makes from our float16 [N, groups] once per layer (6% of int4's
weight bytes). The shuffled layout (cutlass_mixed_lab) is left to the lab: serving it would keep two copies of
the weight, since the other kernels read the plain one.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().with_name("cutlass")
SCHEMES = ("int8", "int4", "fp8")
# config id -> (weight rows x tokens x K) tile and schedule, as mixed_gemm.cuh's TileConfig lists them
CONFIGS = {0: "128x128x64 cooperative", 1: "128x256x64 cooperative", 2: "64x128x64 pingpong",
           3: "128x64x64 cooperative", 4: "128x64x64 cooperative stream-K"}
# The weight as we store it ([N, K] row-major), or shuffled once at load (mixed_gemm.cuh, WeightLayout)
LAYOUTS = {False: "plain", True: "shuffled"}
# scheme -> (CUTLASS weight type, whether its scales are per group, applied in the mainloop)
WEIGHT_TYPES = {"int8": ("int8_t", False), "fp8": ("cutlass::float_e4m3_t", False), "int4": ("cutlass::uint4b_t", True)}
# torch's extensions build with CUDA's half and bfloat16 operators and conversions turned off; CUTLASS uses them.
CUDA_TYPES = [f"-U__CUDA_NO_{name}__" for name in ("HALF_OPERATORS", "HALF_CONVERSIONS", "HALF2_OPERATORS",
                                                   "BFLOAT16_OPERATORS", "BFLOAT16_CONVERSIONS", "BFLOAT162_OPERATORS")]
# Rows from which the tuner times these kernels: below it most of their 64-token (or wider) tiles would be
# padding. On an H100 the tuner chose them from 17 rows (bench/results/quant_h100_cutlass.json).
MIN_ROWS = 16


class Unavailable(RuntimeError):
    """Why the CUTLASS GEMMs cannot be built or run here, in a line that says what to install or change."""


def key(scheme: str, shuffled: bool, config: int) -> str:
    """The registry key of one GEMM (api.h): format, layout, config id."""
    return f"{scheme} {LAYOUTS[shuffled]} {config}"


def unit_source(scheme: str, shuffled: bool, config: int) -> str:
    """A translation unit that instantiates one GEMM and adds it to the registry as the library loads."""
    weight, group_scales = WEIGHT_TYPES[scheme]
    function = (f"xverse_cutlass::run_config<{weight}, {str(group_scales).lower()}, {str(shuffled).lower()}, "
                f"{config}>")
    return (f'#include "{SOURCES / "mixed_gemm.cuh"}"\n\n'
            f'static bool const added = xverse_cutlass::add_gemm("{key(scheme, shuffled, config)}", &{function});\n')


def include_dirs() -> list[str]:
    """CUTLASS's headers (the nvidia-cutlass wheel's) and, where a pip package of CUDA's holds it, curand_kernel.h:
    CUTLASS's utilities include it (the weight shuffle comes from cutlass/util/mixed_dtype_utils.hpp), and a CUDA
    toolkit from pip keeps it beside, not in, nvcc's own include folder."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("CUTLASS's headers come with the nvidia-cutlass wheel: "
                          "pip install --no-deps nvidia-cutlass==4.2.0.0")
    source = Path(next(iter(spec.submodule_search_locations))) / "source"
    dirs = [str(SOURCES), str(source / "include"), str(source / "tools" / "util" / "include")]
    nvidia = importlib.util.find_spec("nvidia")
    for root in (nvidia.submodule_search_locations or []) if nvidia else []:
        for header in sorted(Path(root).glob("*/include/curand_kernel.h")):
            return [*dirs, str(header.parent)]
    return dirs


def build(name: str, gemms: list[tuple[str, bool, int]], build_dir: Path, verbose: bool = False):
    """Compiles the extension `name` with the GEMMs `gemms` ((scheme, shuffled, config) each) into build_dir (kept:
    a later call with the same sources only loads it) and returns the module. Raises Unavailable without nvcc or
    CUTLASS's headers or ninja; a compiler error as torch's cpp_extension raises it."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise Unavailable("building the CUTLASS GEMMs needs CUDA's compiler (nvcc): install the CUDA toolkit or set "
                          "CUDA_HOME")
    if not cpp_extension.is_ninja_available():
        raise Unavailable("building the CUTLASS GEMMs needs ninja: pip install ninja")
    includes = include_dirs()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")  # wgmma and setmaxnreg need the sm_90a target
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count() or 1))
    units = build_dir / "units"
    units.mkdir(parents=True, exist_ok=True)
    sources = [str(SOURCES / "binding.cpp"), str(SOURCES / "reorder.cu")]
    for scheme, shuffled, config in gemms:
        unit = units / f"{key(scheme, shuffled, config).replace(' ', '_')}.cu"
        text = unit_source(scheme, shuffled, config)
        if not unit.exists() or unit.read_text() != text:  # an unchanged unit keeps ninja's object
            unit.write_text(text)
        sources.append(str(unit))
    # torch's build lock is a file it deletes when done: a build killed midway (Ctrl-C in the first start) leaves
    # it, and every later start would wait for it forever. Builds here hold a lock the OS drops with its process
    # instead, so that a torch lock found while holding it is a dead build's.
    with open(build_dir / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another server building the same GEMMs: wait for it, then load
        if (stale := build_dir / "lock").exists():
            log.info("removing %s, left by a build that was stopped", stale)
            stale.unlink()
        return cpp_extension.load(name=name, sources=sources, build_directory=str(build_dir), verbose=verbose,
                                  extra_include_paths=includes,
                                  extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-DNDEBUG", *CUDA_TYPES])


MODES = ("auto", "1", "0")


def mode() -> str:
    """XVERSE_CUTLASS: `auto` (the default) offers the GEMMs where the card runs them and nvcc and CUTLASS's headers
    are there, saying why not in an info line; `1` the same, a warning where they cannot be; `0` never."""
    value = os.environ.get("XVERSE_CUTLASS", "auto")
    if value not in MODES:
        raise ValueError(f"XVERSE_CUTLASS takes auto, 1 or 0, got {value!r}")
    return value


def enabled() -> bool:
    return mode() != "0"


def check_device(device: torch.device) -> None:
    """Raises Unavailable unless `device` runs sm_90a code (compute capability 9.0: H100, H200, GH200)."""
    if device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability(device) != (9, 0):
        raise Unavailable("the CUTLASS GEMMs are built for compute capability 9.0 (Hopper: H100, H200)")


def build_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "xverse_serve" / f"cutlass-torch{torch.__version__}-cuda{torch.version.cuda}"


# The first build of a format's five GEMMs took 99 s and 139 s on two 16-core H100 machines; a later start loaded
# them in 0.2 s.
FIRST_BUILD_NOTE = "about two minutes on 16 CPU cores, on the first start only"


def build_digest() -> str:
    """A digest of what a build depends on here, the extension's sources and the CUDA toolkit it finds: a failed
    build is tried again once either changes."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(str(cpp_extension.CUDA_HOME).encode())
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def served_module(scheme: str, device_index: int):
    """The extension with `scheme`'s plain-layout GEMMs, built on first use (logged, with how long it took), or None
    where XVERSE_CUTLASS is 0 or they cannot be built or run here (logged once, with the reason: a warning where
    XVERSE_CUTLASS=1 asked for them, or the build failed). A failed build is remembered in its folder (FAILED), so
    that later starts do not spend minutes failing again, until the sources or the CUDA toolkit change or the folder
    is deleted."""
    setting = mode()
    if setting == "0":
        return None
    started = time.perf_counter()
    folder = build_dir() / scheme
    failed = folder / "FAILED"
    try:
        check_device(torch.device("cuda", device_index))
        include_dirs()  # before announcing a build: raises Unavailable without the headers
        if failed.is_file():
            digest, _, reason = failed.read_text().partition("\n")
            if digest == build_digest():
                raise Unavailable(f"building them failed before ({reason.strip()}); delete {folder} to try again")
        log.info("building or loading the %s CUTLASS GEMMs (%s)", scheme, FIRST_BUILD_NOTE)
        module = build(f"xverse_cutlass_{scheme}", [(scheme, False, config) for config in CONFIGS], folder)
    except Unavailable as exc:
        (log.warning if setting == "1" else log.info)("the %s CUTLASS GEMMs are left out (XVERSE_CUTLASS=%s): %s",
                                                      scheme, setting, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - a failed build: no CUTLASS candidates then; the others serve
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("the %s CUTLASS GEMMs are left out: building them failed: %s", scheme, reason)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{build_digest()}\n{reason}\n")
        except OSError:  # a cache folder we cannot write: the next start tries again
            pass
        return None
    failed.unlink(missing_ok=True)
    log.info("%s CUTLASS GEMMs ready in %.1f s", scheme, time.perf_counter() - started)
    return module


def operands(scheme: str, weight: torch.Tensor, scale: torch.Tensor,
             offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A layer's weight, scale and offset (QuantizedLinear's buffers) as the GEMMs take them: int8 and fp8 with the
    float32 channel scale [N]; int4 with its float16 [N, groups] scale and offset as bf16 [groups, N]."""
    if scheme in ("int8", "fp8"):
        return weight, scale.float().contiguous(), None
    return (weight, scale.t().to(torch.bfloat16).contiguous(), offset.t().to(torch.bfloat16).contiguous())


def dequantized_like_kernel(scheme: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] as the GEMM multiplies by it, from the stored values q (int8 or fp8 [N, K], int4 unpacked to
    [N, K] in 0..15) and `operands`' scale and zero: int4 as q * scale + zero rounded once to bf16 (the mainloop's
    fused multiply-add), int8 and fp8 exactly, their scale applied after the sums in float32. The PyTorch twin of the
    mainloop's conversion, for the tests."""
    if scheme in ("int8", "fp8"):
        return q.to(dtype) * scale[:, None].to(dtype)
    n, groups = q.shape[0], scale.shape[0]
    w = q.float().view(n, groups, -1) * scale.t().float()[..., None] + zero.t().float()[..., None]
    return w.to(torch.bfloat16).view(n, -1).to(dtype)


def matmul(module, scheme: str, ops: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], group: int,
           x: torch.Tensor, config: int, shuffled: bool = False) -> torch.Tensor:
    """y = x @ W^T for bf16 x [M, K] with `operands`' tensors (the weight shuffled where `shuffled`)."""
    weight, scale, zero = ops
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16, device=x.device)
    module.gemm(key(scheme, shuffled, config), x.contiguous(), weight, scale, zero, group, y)
    return y
