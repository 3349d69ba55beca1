"""On a CUDA machine: the GPU path (Triton decode attention, CUDA graphs, memory plan) gives the CPU
reference's greedy tokens on the tiny checkpoint, batched or alone. Skipped where there is no GPU (CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import record_pdl_launches

from xverse_serve.engine.messages import SamplingParams
from xverse_serve.launch import build_engine
from xverse_serve.settings import parse_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5 + i for i in range(n)] for n in (3, 17, 40, 64, 100)]


def greedy_tokens(model_dir: Path, device: str, *flags: str, together: bool = True,
                  pieces_used: list[int] | None = None) -> list[list[int]]:
    """pieces_used: gets the number of steps that ran through the piecewise graphs."""
    ctx = build_engine(parse_settings(["--model-path", str(model_dir), "--device", device, "--dtype", "float32",
                                       "--max-num-seqs", "8", "--max-batched-tokens", "64", *flags]))
    engine = ctx.engine.transport.engine
    if pieces_used is not None:
        pieces = engine.runner.pieces
        forward = pieces.forward
        pieces.forward = lambda *args: pieces_used.append(1) or forward(*args)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, repetition_penalty=1.1)
    results: dict[str, list[int]] = {}

    def drain() -> None:
        while engine.has_work():
            for output in engine.step():
                results.setdefault(output.request_id, []).extend(output.new_token_ids)

    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
        if not together:
            drain()
    drain()
    if pieces_used is not None:
        del engine.runner.pieces.forward  # the wrapper's cycle would keep the engine's memory past this call
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks
    return [results[str(i)] for i in range(len(PROMPTS))]


def test_gpu_greedy_tokens_equal_the_cpu_reference(tiny_model_dir: Path) -> None:
    reference = greedy_tokens(tiny_model_dir, "cpu", together=False)
    pieces_used: list[int] = []
    # batched, chunked prefill, CUDA graphs: whole ones for decode steps, piecewise for steps with prompts
    assert greedy_tokens(tiny_model_dir, "cuda", pieces_used=pieces_used) == reference
    assert len(pieces_used) >= 4
    assert greedy_tokens(tiny_model_dir, "cuda", together=False) == reference
    assert greedy_tokens(tiny_model_dir, "cuda", "--enforce-eager") == reference


# ---------------------------------------------------------------- --quantize and --kv-cache-dtype on the GPU


@pytest.fixture(scope="module")
def tiny_int4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose projections take whole int4 groups of 128 (hidden 128, intermediate 256)."""
    from tiny_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt4") / "XVERSE-tiny-128", hidden_size=128,
                            intermediate_size=256)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_gpu_quantized_greedy_tokens_equal_the_cpu_reference(tiny_model_dir: Path, tiny_int4_dir: Path,
                                                             scheme: str) -> None:
    """The same quantized weights (quantization is deterministic), multiplied by the tuned Triton kernels on
    the GPU and by torch's int8 op / the dequantized matmul on the CPU, in float32."""
    model_dir = tiny_int4_dir if scheme == "int4" else tiny_model_dir
    reference = greedy_tokens(model_dir, "cpu", "--quantize", scheme, together=False)
    assert greedy_tokens(model_dir, "cuda", "--quantize", scheme) == reference  # CUDA graphs over quantized layers
    assert greedy_tokens(model_dir, "cuda", "--quantize", scheme, "--enforce-eager", together=False) == reference


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_gpu_8bit_kv_cache_greedy_tokens_equal_the_cpu_reference(tiny_model_dir: Path, kv_cache_dtype: str) -> None:
    if kv_cache_dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    reference = greedy_tokens(tiny_model_dir, "cpu", "--kv-cache-dtype", kv_cache_dtype, together=False)
    assert greedy_tokens(tiny_model_dir, "cuda", "--kv-cache-dtype", kv_cache_dtype) == reference
    assert greedy_tokens(tiny_model_dir, "cuda", "--kv-cache-dtype", kv_cache_dtype, "--enforce-eager") == reference


def test_gpu_bf16_int8_weights_and_int8_cache_stay_near_the_float32_cpu_model(tiny_int4_dir: Path) -> None:
    """The serving configuration (bf16 activations, int8 or int4 weights, int8 cache) against the CPU float32
    model with the same quantized weights: only bf16 rounding apart."""
    from paged import paged_logits as cpu_paged_logits

    from xverse_serve.model.checkpoint import load_config
    from xverse_serve.model.quantization import QuantizedLinear, relative_error
    from xverse_serve.model.xverse import load_model

    config = load_config(tiny_int4_dir)
    ids = torch.randint(4, config.vocab_size, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [40, 7, 5] + [1] * 8
    for scheme in ("int8", "int4"):
        cpu = load_model(tiny_int4_dir, config, torch.device("cpu"), torch.float32, 256, scheme)
        cuda = load_model(tiny_int4_dir, config, torch.device("cuda"), torch.bfloat16, 256, scheme)
        assert all(m.plan is not None for m in cuda.modules() if isinstance(m, QuantizedLinear))  # tuned
        expected = cpu_paged_logits(cpu, ids, chunks)
        ours = gpu_paged_logits(cuda, ids, chunks, torch.int8)
        assert relative_error(ours, expected) < 5e-2, scheme  # bf16 rounding, as test_model's bf16 check allows


def gpu_paged_logits(model, token_ids: list[int], chunks: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    from paged import paged_logits

    return paged_logits(model, token_ids, chunks, kv_dtype).cpu()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_gpu_every_quantized_matmul_kernel_on_7b_shapes_equals_the_reference(scheme: str) -> None:
    """Each candidate the tuner may pick, at XVERSE-7B's shapes, in bf16, against the float32 reference."""
    from xverse_serve.model.quantization import QuantizedLinear, candidates, reference_matmul, relative_error

    gen = torch.Generator(device="cuda").manual_seed(0)
    for out_features, in_features in ((4096, 4096), (22016, 4096), (4096, 11008)):
        layer = QuantizedLinear(in_features, out_features, scheme).cuda()
        layer.load_rows(0, torch.randn(out_features, in_features, device="cuda", generator=gen) * 0.02)
        for m in (1, 3, 16, 64, 300):
            x = torch.randn(m, in_features, device="cuda", generator=gen).to(torch.bfloat16)
            reference = reference_matmul(x, layer)
            for kernel in candidates(layer, m):
                if kernel.backend == "torch" and not hasattr(torch, "_weight_int8pack_mm"):
                    continue
                try:
                    out = kernel(x, layer)
                except RuntimeError as exc:  # torch's int8 op may lack a CUDA kernel in this build
                    if kernel.backend == "torch":
                        continue
                    raise AssertionError(f"{kernel} failed at M={m}: {exc}") from exc
                assert out.shape == (m, out_features) and out.dtype == torch.bfloat16
                assert relative_error(out, reference) < 1e-2, (str(kernel), m, out_features, in_features)


def openai_extras(model_dir: Path, device: str) -> dict[str, list]:
    """Every request kind the OpenAI extras add, in one batch: log-probs, prompt log-probs (echo, and max_tokens 0),
    presence/frequency penalties and logit_bias, and n = 3 choices sharing one prompt."""
    ctx = build_engine(parse_settings(["--model-path", str(model_dir), "--device", device, "--dtype", "float32",
                                       "--max-num-seqs", "8", "--max-batched-tokens", "64"]))
    engine = ctx.engine.transport.engine
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    requests = {
        "logprobs": (PROMPTS[1], SamplingParams(**greedy, logprobs=3)),
        "echo": (PROMPTS[2], SamplingParams(**greedy, logprobs=1, prompt_logprobs=2)),
        "prompt only": (PROMPTS[4], SamplingParams(max_tokens=0, prompt_logprobs=0)),
        "penalties": (PROMPTS[0], SamplingParams(**greedy, presence_penalty=-2.0, frequency_penalty=-1.0,
                                                 logit_bias=((9, 3.0),))),
    }
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    for choice in range(3):
        engine.add_request(f"n{choice}", PROMPTS[3], SamplingParams(**greedy, seed=choice),
                           shares_prompt_with="n0" if choice else None)
    outputs: dict[str, list] = {}
    while engine.has_work():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks
    return outputs


def test_gpu_log_probs_penalties_and_shared_choices_equal_the_cpu_reference(tiny_model_dir: Path) -> None:
    cpu, gpu = openai_extras(tiny_model_dir, "cpu"), openai_extras(tiny_model_dir, "cuda")
    assert cpu.keys() == gpu.keys()
    for request_id in cpu:
        ours, reference = gpu[request_id], cpu[request_id]
        assert [o.new_token_ids for o in ours] == [o.new_token_ids for o in reference], request_id
        for field in ("logprobs", "prompt_logprobs"):
            got = [lp for o in ours for lp in getattr(o, field) or []]
            want = [lp for o in reference for lp in getattr(o, field) or []]
            assert len(got) == len(want), (request_id, field)
            for a, b in zip(got, want):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
                    assert [i for i, _ in a.top] == [i for i, _ in b.top]
    assert gpu["prompt only"][0].prompt_logprobs[0] is None and len(gpu["prompt only"][0].prompt_logprobs) == 100


# ---------------------------------------------------------------- programmatic dependent launch (Hopper and newer)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs compute capability 9.0")
@pytest.mark.parametrize("scheme", ["none", "int8", "int4", "fp8"])
def test_gpu_programmatic_dependent_launch_changes_no_token(scheme: str, tiny_model_dir: Path, tiny_int4_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.pdl on or off gives the same greedy tokens in bf16, through CUDA graphs and the one-row path: a
    kernel reading its input before the kernel that writes it has finished would show here. The launches do take
    PDL."""
    from xverse_serve.kernels import pdl

    model_dir = tiny_int4_dir if scheme == "int4" else tiny_model_dir
    flags = ("--dtype", "bfloat16", "--quantize", scheme)
    launched = record_pdl_launches(monkeypatch)
    tokens = {}
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        launched.clear()
        tokens[on] = greedy_tokens(model_dir, "cuda", *flags)
        assert set(launched) == {on}
    assert tokens[True] == tokens[False]
