r"""Structured outputs under load: streaming clients of which half ask for a JSON schema, against the same load
unconstrained, on one server; and what a schema the server has not seen costs its first request.

    python bench/random_checkpoint.py /tmp/xv-bpe --bpe-tokenizer
    python bench/structured_bench.py --model-path /tmp/xv-bpe --out bench/results/structured_h200.json

The checkpoint needs the BPE tokenizer: the default WordLevel one has no token for "{". Parts, in order:
1. compile: in this process, on the checkpoint's tokenizer, what the server does with a schema it has not seen
   (build and check the grammar, compile a matcher, compute its first mask), and with one it has (a cached
   matcher's copy and its first mask);
2. probe: over HTTP on an idle server, one-token answers with a new schema each, then with the same schemas
   again (cached), and without a schema: the new ones' extra time is what compiling costs a user;
3. answers: a few schema answers left to finish, parsed (JSON with the schema's keys);
4. loads: `--reps` times, alternating, the load with every client free and the load with every other client
   sending `response_format` (one 20-field schema: cached after its first request). The JSON of 20 fields is
   longer than --max-tokens, so both loads' answers run to the length limit and count the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from common import write_results
from serve_bench import (
    OUR_MODEL_NAME,
    LoadSpec,
    RequestResult,
    ServerProcess,
    launch_command,
    ms,
    run_load,
    server_env,
    summarize,
    warm_up,
)

from xverse_serve.engine.grammar import GrammarCompiler
from xverse_serve.model.checkpoint import load_config
from xverse_serve.server.tool_calls import grammar_error, json_grammar

NUM_FIELDS = 20


def twenty_fields(tag: str) -> dict:
    """A schema of NUM_FIELDS bounded fields (strings, integers, enums, a boolean), its key names marked by `tag`
    so that each tag is a schema the server has not compiled."""
    kinds = [{"type": "string", "maxLength": 24}, {"type": "integer", "minimum": 0, "maximum": 100000},
             {"enum": ["alpha", "beta", "gamma", "delta"]}, {"type": "boolean"}]
    properties = {f"{tag}_field_{i:02d}": kinds[i % len(kinds)] for i in range(NUM_FIELDS)}
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}


def compile_times(model_path: Path, count: int) -> dict:
    """Milliseconds for each of `count` new schemas, and for the same schemas again, from the grammar text to the
    first mask, as the server's request path and engine do it."""
    config = load_config(model_path)
    started = time.perf_counter()
    compiler = GrammarCompiler((model_path / "tokenizer.json").read_text(), config.vocab_size, config.eos_token_id)
    setup_ms = (time.perf_counter() - started) * 1e3
    new, cached = [], []
    for i in range(count):
        schema = twenty_fields(f"c{i}")
        for times in (new, cached):
            started = time.perf_counter()
            grammar = json_grammar(schema)
            assert grammar_error(grammar) is None
            matcher = compiler.matcher(grammar)
            compiler.masks([0], [matcher])
            times.append((time.perf_counter() - started) * 1e3)
    return {"tokenizer_setup_ms": round(setup_ms, 1), "new_schema_ms": [round(t, 2) for t in new],
            "cached_schema_ms": [round(t, 2) for t in cached], "new_schema_ms_median": round(statistics.median(new), 2),
            "new_schema_ms_max": round(max(new), 2), "cached_schema_ms_median": round(statistics.median(cached), 2)}


async def one_answer(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                     schema: dict | None) -> tuple[float, dict]:
    body = {"model": OUR_MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    if schema is not None:
        body["response_format"] = json_schema_format(schema)
    started = time.perf_counter()
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


async def probe(url: str, count: int) -> dict:
    """One-token answers, one at a time: new schemas, the same schemas again, and none."""
    latencies: dict[str, list[float]] = {"new_schema": [], "cached_schema": [], "no_schema": []}
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(count):
            schema = twenty_fields(f"p{i}")
            for key, form in (("new_schema", schema), ("cached_schema", schema), ("no_schema", None)):
                elapsed, _ = await one_answer(client, url, f"w{i} w{i + 1} w{i + 2}", 1, form)
                latencies[key].append(elapsed)
    medians = {key: statistics.median(values) for key, values in latencies.items()}
    return {**{f"{key}_ms": [ms(v) for v in values] for key, values in latencies.items()},
            **{f"{key}_ms_median": ms(value) for key, value in medians.items()},
            "first_request_extra_ms_median": ms(medians["new_schema"] - medians["cached_schema"])}


async def finished_answers(url: str, count: int) -> dict:
    """Schema answers given room to finish: each must parse, with exactly the schema's keys."""
    schema = twenty_fields("load")
    checked = []
    async with httpx.AsyncClient(timeout=300) as client:
        for i in range(count):
            _, answer = await one_answer(client, url, f"w{7 * i} w{7 * i + 3}", 2048, schema)
            choice = answer["choices"][0]
            parsed = json.loads(choice["message"]["content"])
            checked.append({"finish_reason": choice["finish_reason"],
                            "completion_tokens": answer["usage"]["completion_tokens"],
                            "keys_match": set(parsed) == set(schema["properties"])})
    return {"answers": checked, "all_valid": all(a["keys_match"] and a["finish_reason"] == "stop" for a in checked)}


def group_summary(results: list[RequestResult], wall: float, concurrency: int, group: int) -> dict:
    mine = [r for r in results if r.group == group]
    summary = summarize(mine, wall, concurrency)
    return {key: summary[key] for key in ("requests", "errors", "error_samples", "output_tok_s", "mean_output_tokens",
                                          "finish_reasons", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "tpot_ms_p50")}


async def loads(args: argparse.Namespace, url: str) -> dict:
    base = dict(url=url, model=OUR_MODEL_NAME, prompt_words=args.prompt_tokens, max_tokens=args.max_tokens,
                temperature=0.0, extra_body={}, request_timeout=600.0)
    specs = {"free": LoadSpec(**base),
             "half_json": LoadSpec(**base, client_groups=(
                 {"response_format": json_schema_format(twenty_fields("load"))}, {}))}
    rng = random.Random(args.seed)
    await warm_up(specs["half_json"], 2, rng)  # compiles the load's schema: the target is for cached schemas
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for rep in range(args.reps):
        for name in (("free", "half_json") if rep % 2 == 0 else ("half_json", "free")):
            results, wall = await run_load(specs[name], args.concurrency, args.requests_per_client, None, rng)
            run = summarize(results, wall, args.concurrency)
            if name == "half_json":
                run["json_clients"] = group_summary(results, wall, args.concurrency, 0)
                run["free_clients"] = group_summary(results, wall, args.concurrency, 1)
            runs[name].append(run)
            print(f"rep {rep} {name}: {run['output_tok_s']} tok/s, TTFT p50 {run['ttft_ms_p50']} ms, "
                  f"errors {run['errors']} {run['error_samples']}", flush=True)
    return runs


def compare(runs: dict[str, list[dict]]) -> dict:
    def median(name: str, key: str, part: str | None = None) -> float:
        return statistics.median((run[part] if part else run)[key] for run in runs[name])

    free_tps, half_tps = median("free", "output_tok_s"), median("half_json", "output_tok_s")
    free_ttft = median("free", "ttft_ms_p50")
    return {
        "free_output_tok_s_median": free_tps, "half_json_output_tok_s_median": half_tps,
        "throughput_ratio": round(half_tps / free_tps, 3),
        "free_ttft_ms_p50_median": free_ttft,
        "half_json_ttft_ms_p50_median": median("half_json", "ttft_ms_p50"),
        "json_clients_ttft_ms_p50_median": median("half_json", "ttft_ms_p50", "json_clients"),
        "free_clients_ttft_ms_p50_median": median("half_json", "ttft_ms_p50", "free_clients"),
        "ttft_ratio": round(median("half_json", "ttft_ms_p50") / free_ttft, 3),
        "json_clients_ttft_ratio": round(median("half_json", "ttft_ms_p50", "json_clients") / free_ttft, 3),
    }


async def main_async(args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    report: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "fields": NUM_FIELDS,
                    "concurrency": args.concurrency, "requests_per_client": args.requests_per_client,
                    "prompt_words": args.prompt_tokens, "max_tokens": args.max_tokens}
    report["compile"] = compile_times(args.model_path, args.probes)
    print(f"compile: {report['compile']}", flush=True)
    write_results(report, args.out)
    command = launch_command("ours", args.model_path, args.port, [])
    server = ServerProcess(command, args.server_log, server_env("ours"))
    try:
        report["startup_s"] = round(await server.wait_ready(url, 1800), 1)
        report["probe"] = await probe(url, args.probes)
        print(f"probe: {report['probe']}", flush=True)
        report["finished_answers"] = await finished_answers(url, 4)
        print(f"answers: {report['finished_answers']}", flush=True)
        write_results(report, args.out)
        report["runs"] = await loads(args, url)
        report["comparison"] = compare(report["runs"])
        print(f"comparison: {report['comparison']}", flush=True)
    finally:
        server.stop()
    write_results(report, args.out)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-path", type=Path, required=True, help="a random_checkpoint.py --bpe-tokenizer folder")
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/structured_bench.server.log"))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="runs of each load, alternated")
    parser.add_argument("--probes", type=int, default=5, help="new schemas compiled and probed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    report = asyncio.run(main_async(parser.parse_args()))
    if "comparison" not in report:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
