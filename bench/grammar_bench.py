"""Grammar engines for structured outputs, compared on one machine's CPU: xgrammar and llguidance.

For a JSON schema of ~20 fields, each engine over a tokenizer of XVERSE-7B's vocabulary size: the one-time setup of
its tokenizer index, the time to compile the schema (and to compile it again, to see what a cache saves), and the
time to compute each next-token mask while a valid answer is walked token by token (the work the server does on
the CPU while the GPU runs a step). The answer walked is drawn at random among the allowed tokens, seeded, so both
engines walk the same kind of answer.

    python bench/grammar_bench.py --out bench/results/grammar_cpu.json
    python bench/grammar_bench.py --tokenizer models/xverse/XVERSE-7B-Chat/tokenizer.json

Needs `pip install xgrammar llguidance` (not the server's requirements). Without --tokenizer it trains one like
XVERSE's (BPE with byte fallback and Metaspace, 100,534 tokens) on 60 MB of Python's standard library sources, in
about a minute: token strings of code and English, where a grammar's masks are not trivial.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"}, "active": {"type": "boolean"},
        "score": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "city": {"type": "string"}, "country": {"type": "string", "enum": ["CN", "US", "FR", "DE"]},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "phone": {"type": "string"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]}, "level": {"type": "integer"},
        "verified": {"type": "boolean"}, "balance": {"type": "number"}, "notes": {"type": "string"},
        "company": {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
                    "required": ["name", "size"], "additionalProperties": False},
        "created": {"type": "string"}, "language": {"type": "string"}, "timezone": {"type": "string"},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["name", "age", "email", "active", "score", "tags", "city", "country", "zip", "phone", "role",
                 "level", "verified", "balance", "notes", "company", "created", "language", "timezone", "priority"],
    "additionalProperties": False,
}


def hf_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>")


def train_tokenizer(path: Path) -> Path:
    """A BPE of XVERSE's vocabulary size and layout (4 specials, 256 byte tokens, then merges), trained on Python's
    standard library sources."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus, size = path.with_suffix(".corpus.txt"), 0
    with corpus.open("w") as out:
        for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(text)
            size += len(text)
            if size > 60_000_000:
                break
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokenizer.train([str(corpus)], trainers.BpeTrainer(vocab_size=100534, special_tokens=specials,
                                                       show_progress=False, max_token_length=16))
    tokenizer.save(str(path))
    corpus.unlink()
    return path


def walk(fill, bitmask: torch.Tensor, vocab: int, accept, finished, steps: int, seed: int) -> list[float]:
    """Per step: the seconds fill() takes to compute the next-token mask into `bitmask`; then one allowed token,
    chosen at random, is accepted. An answer that ends before `steps` starts again (the grammar's matcher is
    renewed by `finished`, which returns whether to stop)."""
    rng = random.Random(seed)
    times = []
    while len(times) < steps and not finished():
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        allowed = torch.nonzero(unpack(bitmask.flatten().view(torch.uint8))[:vocab]).flatten().tolist()
        accept(rng.choice(allowed))
    return times


def bench_xgrammar(tokenizer, schema: str, steps: int, seed: int) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info, cache_enabled=True)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(schema)
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile_json_schema(schema)
    again = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = walk(lambda: matcher.fill_next_token_bitmask(bitmask), bitmask, info.vocab_size, matcher.accept_token,
                 matcher.is_terminated, steps, seed)
    return {"setup_s": setup, "compile_s": first, "compile_again_s": again, "mask_ms": summary(times)}


def bench_llguidance(tokenizer, schema: str, steps: int, seed: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(lltok, grammar)
    first = time.perf_counter() - start
    start = time.perf_counter()
    llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))
    again = time.perf_counter() - start
    bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    times = walk(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0), bitmask, lltok.vocab_size,
                 matcher.consume_token, matcher.is_stopped, steps, seed)
    return {"setup_s": setup, "compile_s": first, "compile_again_s": again, "mask_ms": summary(times)}


def unpack(bits: torch.Tensor) -> torch.Tensor:
    """A little-endian bit mask (bytes) as one bool per token."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((bits[:, None] >> shifts) & 1).flatten().bool()


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"steps": len(times), "mean": statistics.fmean(times) * 1e3, "p50": ordered[len(ordered) // 2] * 1e3,
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, "max": ordered[-1] * 1e3}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json (default: train one)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import importlib.metadata

    versions = {name: importlib.metadata.version(name) for name in ("xgrammar", "llguidance")}
    path = args.tokenizer or train_tokenizer(Path("/tmp/grammar_bench_tokenizer.json"))
    tokenizer = hf_tokenizer(path)
    schema = json.dumps(SCHEMA)
    results = {"cpu": cpu_name(), "tokenizer": str(args.tokenizer or "trained on the stdlib"),
               "vocab_size": len(tokenizer),
               "fields": len(SCHEMA["properties"]), "torch_threads": torch.get_num_threads(), "versions": versions}
    for name, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        results[name] = bench(tokenizer, schema, args.steps, args.seed)
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
