"""What the benchmark scripts share: XVERSE-7B's shape and a model of it with random weights, prompts, the card's
copy bandwidth, our engine built as the server builds it, timing, and writing a result file.

Each script imports this module before the package: it puts the checkout on sys.path, so that `python bench/X.py`
runs without xverse_serve being installed.
"""

from __future__ import annotations

import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import torch
import triton
from triton.testing import do_bench

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from xverse_serve.engine.config import CacheConfig  # noqa: E402
from xverse_serve.engine.engine import Engine  # noqa: E402
from xverse_serve.engine.loader import (  # noqa: E402
    assemble_engine,
    freeze_startup_objects,
    resolve_kv_cache_dtype,
)
from xverse_serve.engine.memory_plan import StepPeaks, kv_cache_tokens_for_card, measure_step_peaks  # noqa: E402
from xverse_serve.engine.messages import SamplingParams  # noqa: E402
from xverse_serve.model.checkpoint import GenerationDefaults, ModelConfig  # noqa: E402
from xverse_serve.model.quantization import (  # noqa: E402
    QuantizedLinear,
    candidates,
    reference_matmul,
    relative_error,
)
from xverse_serve.model.tuner import L2_FLUSH_BYTES, time_call, tune  # noqa: E402
from xverse_serve.model.xverse import XverseForCausalLM, load_targets, quantize_projections  # noqa: E402
from xverse_serve.settings import Settings  # noqa: E402

INIT_STD = 0.02  # random weights: normal with this deviation, norms 1

# config.json of xverse/XVERSE-7B-Chat (design.md): every benchmark runs this shape, with random weights.
XVERSE_7B_CONFIG = {
    "architectures": ["XverseForCausalLM"],
    "model_type": "xverse",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 8192,
    "max_tokenizer_truncation": 6144,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": INIT_STD,
    "tie_word_embeddings": False,
    "vocab_size": 100534,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
XVERSE_7B = ModelConfig.from_dict(XVERSE_7B_CONFIG)
WEIGHT_BYTES = 7_299_846_144 * 2  # the bf16 weights, all read by each decode step of one request (the roofline's)
BLOCK_SIZE = Settings().block_size  # tokens per KV-cache block, as the server has them

# XVERSE-7B's projections as (out_features, in_features), q/k/v and gate/up each fused into one, as the model runs them.
PROJECTION_SHAPES = {
    "qkv_proj": (3 * XVERSE_7B.hidden_size, XVERSE_7B.hidden_size),
    "o_proj": (XVERSE_7B.hidden_size, XVERSE_7B.hidden_size),
    "gate_up_proj": (2 * XVERSE_7B.intermediate_size, XVERSE_7B.hidden_size),
    "down_proj": (XVERSE_7B.hidden_size, XVERSE_7B.intermediate_size),
    "lm_head": (XVERSE_7B.vocab_size, XVERSE_7B.hidden_size),
}

# The synthetic vocabulary of random_checkpoint.py's tokenizer: XVERSE's special tokens (ids 0-3), the words of its
# chat format, then the words w0, w1, ... up to XVERSE's vocabulary size. A text of K such words is K tokens.
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"]
CHAT_FORMAT_TOKENS = ["Human", "Assistant", ":"]  # the words of "Human: ...\n\nAssistant: "
WORD_PREFIX = "w"
NUM_WORDS = XVERSE_7B.vocab_size - len(SPECIAL_TOKENS) - len(CHAT_FORMAT_TOKENS)

# Requests that run until the benchmark stops them, greedy or with XVERSE's own sampling (generation_config.json).
GREEDY = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
_XVERSE_DEFAULTS = GenerationDefaults()
XVERSE_SAMPLING = SamplingParams(max_tokens=10_000, temperature=_XVERSE_DEFAULTS.temperature,
                                 top_k=_XVERSE_DEFAULTS.top_k, top_p=_XVERSE_DEFAULTS.top_p,
                                 repetition_penalty=_XVERSE_DEFAULTS.repetition_penalty, ignore_eos=True)


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 quantize: str = "none") -> XverseForCausalLM:
    """The model with random weights, made on the device (no checkpoint to write or read); with `quantize`, its
    projections quantized as load_model quantizes a checkpoint's, a tensor at a time, and their kernels tuned."""
    with torch.device("meta"):
        model = XverseForCausalLM(config).to(dtype)
        if quantize != "none":
            quantize_projections(model, quantize)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, target in load_targets(model).items():  # by checkpoint tensor: q, k and v apart, as loaded
            values = torch.empty(target.shape, dtype=dtype, device=device)
            target.store(values.fill_(1.0) if name.endswith("norm.weight") else
                         values.normal_(0.0, INIT_STD, generator=gen))
    model.init_rope(config.max_position_embeddings)
    model = model.eval().requires_grad_(False)
    if quantize != "none" and device.type == "cuda":
        tune(model, dtype)
    return model


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids: a new seed gives prompts that share no prefix with earlier ones."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (count, length), generator=gen).tolist()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy (median of many)."""
    src = torch.randn(1 << 29, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = do_bench(partial(dst.copy_, src), warmup=25, rep=200, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (ms * 1e-3)


def device_facts() -> dict:
    """The card and the software a kernel benchmark ran on, for its result file."""
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}


@dataclass
class ServedEngine:
    """An engine as the server builds it, with what its memory plan found."""

    engine: Engine
    kv_cache_tokens: int
    peaks: StepPeaks | None  # the memory plan's measured step peaks; None on the CPU (no plan)


def engine_like_server(model: XverseForCausalLM, settings: Settings) -> ServedEngine:
    """Our engine around a model already built, as loader.load_engine builds it around a checkpoint's from the same
    settings: the KV pool (of settings.kv_cache_dtype) sized from the card by the memory plan (on the CPU, four
    contexts), the CUDA graphs captured, the kernels warmed up."""
    config = settings.engine_config()
    scheduler = config.scheduler
    on_cuda = model.device.type == "cuda"
    cuda_graphs = on_cuda and config.cuda_graphs
    max_model_len = model.config.context_window(config.max_model_len)
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, model.device, model.dtype)
    peaks = None
    if on_cuda:
        peaks = measure_step_peaks(model, scheduler.max_num_seqs, scheduler.max_batched_tokens, max_model_len,
                                   config.block_size, kv_dtype, cuda_graphs)
        kv_tokens = kv_cache_tokens_for_card(model, config.gpu_memory_utilization, peaks, cuda_graphs, kv_dtype)
    else:
        kv_tokens = 4 * max_model_len
    if kv_tokens < max_model_len:
        raise RuntimeError(f"the KV cache holds {kv_tokens} tokens, less than one {max_model_len}-token context")
    engine = assemble_engine(model, CacheConfig(kv_tokens // config.block_size, config.block_size, kv_dtype),
                             scheduler, max_model_len, cuda_graphs, config.overlap_steps)
    if on_cuda:
        engine.warm_up()
    freeze_startup_objects()  # as load_engine leaves the server's process; release_engines undoes it
    return ServedEngine(engine, kv_tokens, peaks)


def release_engines() -> None:
    """Frees the engines no longer referenced (their graphs and caches sit in reference cycles), and their memory
    on the card: unfrozen first, since engine_like_server froze everything alive at its start-up."""
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GcPauses:
    """The garbage collector's collections while the `with` block runs, by generation: how many and their seconds
    (the longest too). A full collection of an engine's process before freeze_startup_objects took ~0.1 s."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._observe)

    def summary(self) -> dict:
        return {f"gen{generation}": {"count": len(times), "seconds": sum(times), "longest_s": max(times, default=0.0)}
                for generation, times in self.pauses.items()}


def run_engine(engine: Engine, batch: list[list[int]], max_tokens: int) -> dict:
    """All requests submitted at once, greedy, each to max_tokens; returns the wall time, the times of each request's
    first and last tokens (sorted), the output tokens, and each engine step's wall time (`step_s`, in order) and the
    part of it spent reading the step before back (`wait_s`: waiting for the GPU; near 0 where the host's launches,
    not the GPU, set the pace)."""
    params = msgspec.structs.replace(GREEDY, max_tokens=max_tokens)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    waited = 0.0
    complete = engine._complete

    def timed_complete(step):
        nonlocal waited
        began = time.perf_counter()
        try:
            return complete(step)
        finally:
            waited += time.perf_counter() - began

    engine._complete = timed_complete
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), prompt, params)
    first_token: dict[str, float] = {}
    last_token: dict[str, float] = {}
    produced = 0
    step_s: list[float] = []
    wait_s: list[float] = []
    try:
        while engine.has_work():
            began, waited = time.perf_counter() - start, 0.0
            outputs = engine.step()
            now = time.perf_counter() - start
            step_s.append(now - began)
            wait_s.append(waited)
            for out in outputs:
                produced += len(out.new_token_ids)
                first_token.setdefault(out.request_id, now)
                last_token[out.request_id] = now
    finally:
        del engine._complete  # the class's method again
    return {"seconds": time.perf_counter() - start, "tokens": produced, "ttft": sorted(first_token.values()),
            "last": sorted(last_token.values()), "step_s": step_s, "wait_s": wait_s}


def slowest_steps(step_s: list[float], wait_s: list[float], count: int = 5) -> list[tuple[int, float, float]]:
    """The `count` slowest steps as (index, ms, ms of it waiting for the GPU), slowest first: whether a slow run had
    a few long pauses (a compilation, an allocation, a collection) or every step slower, and whether the GPU or
    the host set the pace."""
    ranked = sorted(range(len(step_s)), key=lambda index: step_s[index], reverse=True)[:count]
    return [(index, step_s[index] * 1e3, wait_s[index] * 1e3) for index in ranked]


# torch.cuda.memory_stats counters that mean the caching allocator went to the driver during a measurement
ALLOCATOR_EVENTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")


def allocator_events(device: torch.device) -> dict[str, int]:
    """ALLOCATOR_EVENTS' counts so far on a CUDA device ({} elsewhere): a retry frees the cached blocks (a
    cudaFree, which synchronises) and allocates again, each cudaMalloc or cudaFree costs up to milliseconds."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {name: int(stats.get(name, 0)) for name in ALLOCATOR_EVENTS}


def start_decoding(engine: Engine, batch: list[list[int]], params: SamplingParams, prefix: str) -> None:
    """Adds the prompts as requests `prefix`0, `prefix`1, ... and steps until every prompt is in the cache, so that
    the next steps are decode steps."""
    for i, prompt in enumerate(batch):
        engine.add_request(f"{prefix}{i}", prompt, params)
    while any(seq.num_computed < len(seq.prompt_ids) for seq in engine.sequences.values()):
        engine.step()


def abort_all(engine: Engine) -> None:
    """Ends every request, so that the next measurement starts from an empty engine."""
    for request_id in list(engine.sequences):
        engine.abort(request_id)


def wall_ms(fn: Callable[[], object], calls: int) -> float:
    """Mean wall time of fn in ms over `calls` calls in a row, from an idle GPU until the GPU has finished."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def cold_time_us(fn: Callable[[], object], flush: torch.Tensor, repeats: int = 30, by_reading: bool = False) -> float:
    """Median time of fn() in µs, after one call not counted, with L2 emptied before each call by overwriting
    `flush` (256 MB or more) or, with by_reading, by summing it (no dirty lines left to write back while fn runs)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    fn()
    for start, end in events:
        if by_reading:
            flush.sum()
        else:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) * 1000 for start, end in events)[repeats // 2]


def projection_bench_start() -> tuple[dict, torch.Tensor, torch.Generator]:
    """What a projection benchmark on the GPU starts from: its results (the card, torch, shapes to fill), the
    buffer whose read empties L2 before each timed call (as tuner.time_call takes it), and a generator
    seeded 0 for its weights and activations."""
    device = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return results, flush, torch.Generator(device=device).manual_seed(0)


def random_projection(name: str, schemes: tuple[str, ...], gen: torch.Generator
                      ) -> tuple[torch.Tensor, dict[str, QuantizedLinear]]:
    """A random bf16 weight of XVERSE-7B's projection `name` on the GPU (normal, deviation 0.02) and the same
    weight quantized to each of `schemes`."""
    n, k = PROJECTION_SHAPES[name]
    dense = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    layers = {}
    for scheme in schemes:
        layers[scheme] = QuantizedLinear(k, n, scheme).cuda()
        layers[scheme].load_rows(0, dense)
    return dense, layers


def time_candidates(layer: QuantizedLinear, x: torch.Tensor, flush: torch.Tensor, graph: bool,
                    skip: tuple[str, ...] = ()) -> dict[str, float]:
    """ms by kernel of the start-up tuner's candidates for x's rows (those of a backend in `skip` left out), each
    timed as the tuner times it (tuner.time_call, 30 calls) if its product is right (relative error under
    1e-2); a candidate the card cannot run is left out."""
    reference = reference_matmul(x, layer)
    timed: dict[str, float] = {}
    for kernel in candidates(layer, x.shape[0]):
        if kernel.backend in skip:
            continue
        try:
            if relative_error(kernel(x, layer), reference) < 1e-2:
                timed[str(kernel)] = time_call(partial(kernel, x, layer), flush, 30, graph)
        except Exception:  # noqa: BLE001 - a candidate this card lacks
            torch.cuda.empty_cache()
    return timed


def graph_us(calls: list[Callable[[], object]], repeats: int = 10) -> float:
    """Per-call µs of `calls` (each a function of no arguments) replayed back to back in one CUDA graph: as in a
    decode step, each call reads weights no earlier call left in L2, and the launch gaps count."""
    for call in calls:
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats / len(calls)


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    """A CUDA graph's replay time in ms, after one replay not counted."""
    graph.replay()
    return wall_ms(graph.replay, repeats)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None when there are no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Log:
    """Lines printed as they come and kept, for the result file's "log"."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)


def write_results(results: dict, path: Path | None) -> None:
    """The result file, as JSON (nothing without a path). Scripts that measure in parts write it after each part,
    so that a run cut short keeps what it measured."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))


def write_checked_report(report: dict, all_ok: bool, started: float, log: Log, path: Path) -> None:
    """A kernel benchmark's last part: whether every correctness check passed, its time and its log, written out."""
    report.update(all_ok=all_ok, elapsed_s=time.perf_counter() - started, log=log.lines)
    write_results(report, path)
    log(f"all checks {'passed' if all_ok else 'FAILED'}; {report['elapsed_s']:.0f} s; wrote {path}")
