r"""HTTP load benchmark for OpenAI-compatible chat servers: xverse-serve (`python api.py`) or `transformers serve`.

C concurrent clients stream POST /v1/chat/completions (stream=true, temperature 0, a fixed max_tokens,
a user message of P random words of the synthetic vocabulary of random_checkpoint.py's tokenizer, one token
each) and the run reports TTFT, inter-token latency (between content chunks), end-to-end latency and output
tokens/s.

Against a running server:
    python bench/serve_bench.py --url http://127.0.0.1:6006 --model XVERSE-7B-Chat --concurrency 1 16 64
Starting the server itself (and stopping it at the end), on the folders random_checkpoint.py writes:
    python bench/random_checkpoint.py /tmp/xv --llama-copy /tmp/xv-llama
    python bench/serve_bench.py --launch ours --model-path /tmp/xv --out bench/results/serve_ours_h100.json
    python bench/serve_bench.py --launch transformers --model-path /tmp/xv-llama \
        --out bench/results/serve_transformers_h100.json

Each format against bf16 under the same load, one server after another on the same port (the first is the
reference of the ratios the run prints and writes):
    python bench/serve_bench.py --launch ours --model-path /tmp/xv --concurrency 1 64 \
        --server-args "" "--quantize int8" "--quantize int4" "--quantize fp8" --out serve_formats.json

Neither server has `ignore_eos`, so answers may end before max_tokens: the output tokens counted are
usage.completion_tokens where the server sends it, else the number of content chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from common import NUM_WORDS, REPO_ROOT, WORD_PREFIX, percentile, write_results

from xverse_serve.settings import Settings

OUR_MODEL_NAME = Settings().served_model_name


@dataclass(frozen=True)
class LoadSpec:
    """What every request of a run looks like."""

    url: str
    model: str | None
    prompt_words: int
    max_tokens: int
    temperature: float
    extra_body: dict
    request_timeout: float
    # Fields each group of clients adds to its requests: client i is in group i % len(client_groups).
    client_groups: tuple[dict, ...] = ({},)


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    start: float = 0.0  # perf_counter seconds
    ttft: float | None = None  # to the first non-empty content chunk
    latency: float = 0.0
    chunk_gaps: list[float] = field(default_factory=list)  # between consecutive content chunks
    content_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from usage, where the server sends it
    finish_reason: str | None = None
    group: int = 0  # the client group of the request (LoadSpec.client_groups)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.content_chunks


def random_prompt(rng: random.Random, words: int) -> str:
    # Distinct random words per request: no two prompts share a prefix worth caching.
    return " ".join(f"{WORD_PREFIX}{rng.randrange(NUM_WORDS)}" for _ in range(words))


def request_body(spec: LoadSpec, prompt: str, group: int = 0) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **spec.extra_body,
        **spec.client_groups[group],
    }
    if spec.model is not None:
        body["model"] = spec.model
    return body


def sse_payload(line: str) -> str | None:
    """The data of one server-sent-events line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[len("data:"):].strip()


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an event stream, split at line feeds only, as the SSE format has them: httpx's aiter_lines
    also splits at U+2028, U+0085 and the like, which a model's text may hold raw inside an event's JSON."""
    pending = ""
    async for text in response.aiter_text():
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending


async def stream_request(client: httpx.AsyncClient, spec: LoadSpec, prompt: str, group: int = 0) -> RequestResult:
    result = RequestResult(ok=False, start=time.perf_counter(), group=group)
    last_chunk: float | None = None
    body = request_body(spec, prompt, group)
    try:
        async with client.stream("POST", f"{spec.url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return result
            async for line in sse_lines(resp):
                data = sse_payload(line)
                if data is None:
                    continue
                if data == "[DONE]":  # ours ends with it; transformers serve just closes the stream
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
                    result.completion_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last_chunk is None:
                            result.ttft = now - result.start
                        else:
                            result.chunk_gaps.append(now - last_chunk)
                        last_chunk = now
                        result.content_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.latency = time.perf_counter() - result.start
    if result.finish_reason is None:
        result.error = "the stream ended without a finish_reason"
        return result
    result.ok = True
    return result


async def client_loop(client: httpx.AsyncClient, spec: LoadSpec, prompts: asyncio.Queue[str],
                      results: list[RequestResult], group: int = 0) -> None:
    """One client: sends the queue's prompts one after another until the queue is empty."""
    while True:
        try:
            prompt = prompts.get_nowait()
        except asyncio.QueueEmpty:
            return
        results.append(await stream_request(client, spec, prompt, group))


def filled_queue(prompts: list[str]) -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    return queue


async def run_load(spec: LoadSpec, concurrency: int, requests_per_client: int, total_requests: int | None,
                   rng: random.Random) -> tuple[list[RequestResult], float]:
    """Either each of `concurrency` clients sends `requests_per_client` requests back to back, or all
    clients draw `total_requests` from one shared queue. Returns the results and the wall time."""
    if total_requests is not None:
        shared = filled_queue([random_prompt(rng, spec.prompt_words) for _ in range(total_requests)])
        queues = [shared] * concurrency
    else:
        queues = [filled_queue([random_prompt(rng, spec.prompt_words) for _ in range(requests_per_client)])
                  for _ in range(concurrency)]
    results: list[RequestResult] = []
    timeout = httpx.Timeout(30.0, read=spec.request_timeout)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        groups = len(spec.client_groups)
        await asyncio.gather(*(client_loop(client, spec, queue, results, i % groups) for i, queue in enumerate(queues)))
        return results, time.perf_counter() - started


def process_group_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each live process in a process group, keyed "pid name" (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except OSError:
            continue  # exited meanwhile
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()  # fields[0] is the state, the 3rd of stat(5)
        if int(fields[2]) == pgid:
            usage[f"{stat_path.parent.name} {name}"] = (int(fields[11]) + int(fields[12])) / ticks
    return usage


def cpu_share(before: dict[str, float], after: dict[str, float], wall_seconds: float) -> dict[str, float]:
    """Each process's CPU time over a run as a share of one core."""
    return {key: round((after[key] - before.get(key, 0.0)) / wall_seconds, 3) for key in after}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


def summarize(results: list[RequestResult], wall_seconds: float, concurrency: int) -> dict:
    done = [r for r in results if r.ok]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    gaps = [gap for r in done for gap in r.chunk_gaps]
    # Time per output token after the first, per request: robust to servers that group several tokens in a chunk.
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.ttft is not None and r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    errors = [r.error for r in results if not r.ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "wall_s": round(wall_seconds, 3),
        "output_tokens": output_tokens,
        "output_tok_s": round(output_tokens / wall_seconds, 2) if wall_seconds > 0 else None,
        "requests_per_s": round(len(done) / wall_seconds, 3) if wall_seconds > 0 else None,
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "mean_output_tokens": round(output_tokens / len(done), 1) if done else None,
        "finish_reasons": {reason: sum(r.finish_reason == reason for r in done)
                           for reason in sorted({r.finish_reason for r in done})},
        "output_tokens_from_usage": all(r.completion_tokens is not None for r in done),
        "ttft_ms_p50": ms(percentile(ttfts, 50)),
        "ttft_ms_p99": ms(percentile(ttfts, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p99": ms(percentile(gaps, 99)),
        "tpot_ms_p50": ms(percentile(tpots, 50)),
        "e2e_ms_p50": ms(percentile([r.latency for r in done], 50)),
        "e2e_ms_p99": ms(percentile([r.latency for r in done], 99)),
    }


class ServerProcess:
    """A server started in its own process group, its output in a log file; stopped on exit."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.command = command
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, url: str, timeout: float) -> float:
        """Polls GET /health until it answers 200; returns the seconds it took."""
        started = time.perf_counter()
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.perf_counter() - started < timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with code {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{url}/health")).status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass  # not listening yet
                await asyncio.sleep(1.0)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        # SIGINT first: uvicorn shuts down gracefully (lifespan end stops the engine thread). transformers
        # serve leaves its batching thread running after that, so it ends with SIGTERM.
        for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                break
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def launch_command(server: str, model_path: Path, port: int, extra_args: list[str]) -> list[str]:
    if server == "ours":
        return [sys.executable, "api.py", "--model-path", str(model_path), "--host", "127.0.0.1",
                "--port", str(port), *extra_args]
    # The positional model preloads it before the port opens (so /health means loaded) and pins the
    # server to it: each request's `model` must then be that same string.
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_path),
            "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), *extra_args]


def server_env(server: str) -> dict[str, str]:
    env = dict(os.environ)
    if server == "transformers":
        # No network needed or wanted: skip the CLI's PyPI update check and any hub lookup.
        env.update(HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")
    return env


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(label: str, levels: list[dict]) -> str:
    header = (f"| {label} | clients | requests (errors) | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
              "| TPOT p50 ms | E2E p50 ms | mean out tokens |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        rows.append(
            f"| {label} | {level['concurrency']} | {level['requests']} ({level['errors']}) "
            f"| {fmt(level['output_tok_s'])} | {fmt(level['ttft_ms_p50'])} / {fmt(level['ttft_ms_p99'])} "
            f"| {fmt(level['itl_ms_p50'])} / {fmt(level['itl_ms_p99'])} | {fmt(level['tpot_ms_p50'])} "
            f"| {fmt(level['e2e_ms_p50'])} | {fmt(level['mean_output_tokens'])} |")
    return "\n".join(rows)


async def warm_up(spec: LoadSpec, count: int, rng: random.Random) -> None:
    """First requests pay one-off costs (transformers serve starts its batching worker then): not measured."""
    if count <= 0:
        return
    results, _ = await run_load(spec, count, 1, None, rng)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"warm-up request failed: {failed[0]}")


async def benchmark(args: argparse.Namespace, spec: LoadSpec, server_pgid: int | None = None) -> list[dict]:
    """Runs each concurrency level; records how busy the client (and a launched server's processes) kept
    their cores, since a CPU-bound side caps the figures."""
    rng = random.Random(args.seed)
    await warm_up(spec, args.warmup, rng)
    levels = []
    for concurrency in args.concurrency:
        client_cpu = time.process_time()
        server_cpu = process_group_cpu(server_pgid) if server_pgid else {}
        results, wall = await run_load(spec, concurrency, args.requests_per_client, args.num_requests, rng)
        level = summarize(results, wall, concurrency)
        level["client_cpu_share"] = round((time.process_time() - client_cpu) / wall, 3)
        if server_pgid:
            level["server_cpu_share"] = cpu_share(server_cpu, process_group_cpu(server_pgid), wall)
        levels.append(level)
        print(f"{concurrency:>4} clients: {level['requests']} requests, {level['errors']} errors, "
              f"{fmt(level['output_tok_s'])} output tok/s, TTFT p50 {fmt(level['ttft_ms_p50'])} ms, "
              f"ITL p50 {fmt(level['itl_ms_p50'])} ms, E2E p50 {fmt(level['e2e_ms_p50'])} ms; "
              f"CPU (share of a core): client {level['client_cpu_share']}, server {level.get('server_cpu_share')}",
              flush=True)
        for error in level["error_samples"]:
            print(f"      error: {error}", flush=True)
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = parser.add_argument_group("target")
    target.add_argument("--url", default=None, help="base URL of a running server (without /v1)")
    target.add_argument("--model", default=None,
                        help="`model` field of each request; default with --launch: XVERSE-7B-Chat for ours, "
                             "the model path for transformers (which must match it exactly); else omitted")
    target.add_argument("--launch", choices=("ours", "transformers"), default=None,
                        help="start this server, run the load, stop it")
    target.add_argument("--model-path", type=Path, default=None, help="with --launch: the model folder to serve")
    target.add_argument("--port", type=int, default=8123, help="with --launch: port to serve on")
    target.add_argument("--server-args", nargs="+", default=[""],
                        help="with --launch: extra flags for the server, one string; several: one server after "
                             "another, each under the same load, the first the reference of the ratios")
    target.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    target.add_argument("--server-log", type=Path, default=None,
                        help="with --launch: where the server's output goes (default: beside --out)")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="clients, one run each")
    load.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends back to back")
    load.add_argument("--num-requests", type=int, default=None,
                      help="instead: this many requests in all, drawn from one queue by the clients")
    load.add_argument("--prompt-tokens", type=int, default=512,
                      help="random words in the user message, one token each (the chat format adds 4 more)")
    load.add_argument("--max-tokens", type=int, default=128)
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--extra-body", type=json.loads, default={},
                      help='JSON merged into each request, e.g. \'{"repetition_penalty": 1.0}\' (ours only)')
    load.add_argument("--warmup", type=int, default=2, help="requests sent (and not measured) before the first run")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds a stream may stay silent")
    load.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if (args.url is None) == (args.launch is None):
        parser.error("give exactly one of --url and --launch")
    if args.launch and args.model_path is None:
        parser.error("--launch needs --model-path")
    return args


def default_model(args: argparse.Namespace) -> str | None:
    if args.model is not None or args.launch is None:
        return args.model
    return OUR_MODEL_NAME if args.launch == "ours" else str(args.model_path)


async def main_async(args: argparse.Namespace) -> dict:
    url = (args.url or f"http://127.0.0.1:{args.port}").rstrip("/")
    spec = LoadSpec(url=url, model=default_model(args), prompt_words=args.prompt_tokens, max_tokens=args.max_tokens,
                    temperature=args.temperature, extra_body=args.extra_body, request_timeout=args.request_timeout)
    report: dict = {"target": args.launch or url, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "load": {k: v for k, v in asdict(spec).items() if k != "url"},
                    "requests_per_client": args.requests_per_client, "num_requests": args.num_requests}
    if args.launch is None:
        report["levels"] = await benchmark(args, spec)
        return report

    several = len(args.server_args) > 1
    runs = [await launched_run(args, spec, url, extra, server_log_path(args, index if several else None))
            for index, extra in enumerate(args.server_args)]
    if several:
        report["servers"] = runs
        report["ratios"] = ratios(runs)
    else:
        report.update(runs[0])
    return report


def server_log_path(args: argparse.Namespace, index: int | None) -> Path:
    """Where a launched server's output goes: --server-log, else beside --out (one file per server of several)."""
    suffix = ".server.log" if index is None else f".server{index}.log"
    if args.server_log:
        return args.server_log if index is None else args.server_log.with_suffix(suffix)
    return args.out.with_suffix(suffix) if args.out else Path(tempfile.mkdtemp()) / f"server{suffix}"


async def launched_run(args: argparse.Namespace, spec: LoadSpec, url: str, extra_args: str, log_path: Path) -> dict:
    """Starts the server with extra_args, runs the load against it, stops it."""
    command = launch_command(args.launch, args.model_path, args.port, shlex.split(extra_args))
    print(f"starting: {shlex.join(command)}  (log: {log_path})", flush=True)
    server = ServerProcess(command, log_path, server_env(args.launch))
    run: dict = {"server_args": extra_args, "server_command": shlex.join(command)}
    try:
        run["startup_s"] = round(await server.wait_ready(url, args.startup_timeout), 1)
        print(f"ready after {run['startup_s']} s", flush=True)
        run["levels"] = await benchmark(args, spec, server.process.pid)
    finally:
        server.stop()
    return run


RATIO_FIELDS = ("output_tok_s", "ttft_ms_p50", "itl_ms_p50", "e2e_ms_p50")


def ratios(runs: list[dict]) -> list[dict]:
    """Each server after the first against the first, level by level (same concurrency): RATIO_FIELDS' ratios."""
    reference = {level["concurrency"]: level for level in runs[0]["levels"]}

    def ratio(value: float | None, base: float | None) -> float | None:
        return None if value is None or not base else round(value / base, 3)

    return [{"server_args": run["server_args"],
             "levels": [{"concurrency": level["concurrency"],
                         **{name: ratio(level[name], reference[level["concurrency"]][name]) for name in RATIO_FIELDS}}
                        for level in run["levels"]]}
            for run in runs[1:]]


def ratio_table(report: dict) -> str:
    reference = report["servers"][0]["server_args"] or "no extra flags"
    rows = [f"| against {reference} | clients | output tok/s | TTFT p50 | ITL p50 | E2E p50 |",
            "|---|---|---|---|---|---|"]
    for run in report["ratios"]:
        for level in run["levels"]:
            cells = " | ".join(fmt(level[name], 3) for name in RATIO_FIELDS)
            rows.append(f"| {run['server_args']} | {level['concurrency']} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    report = asyncio.run(main_async(args))
    write_results(report, args.out)
    runs = report.get("servers", [report])
    for run in runs:
        print()
        print(markdown_table(run.get("server_args") or args.launch or "server", run["levels"]))
    if "ratios" in report:
        print()
        print(ratio_table(report))
    if any(level["errors"] for run in runs for level in run["levels"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
