"""The engine in a process of its own (--engine-process, the default): the same answers as the engine in a
thread, its load visible to the server, aborts reaching it, start-up errors and its death reported."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest
import requests
from conftest import start_server, stop_server

from xverse_serve.engine.client import EngineClient
from xverse_serve.engine.config import EngineConfig
from xverse_serve.engine.loader import load_engine
from xverse_serve.engine.messages import (AbortRequest, AddRequest, Command, Died, EngineStats, Failed, Ready, Report,
                                          SamplingParams, Shutdown, StepOutput, StepReport)
from xverse_serve.engine.process_transport import ProcessTransport
from xverse_serve.engine.thread_transport import ThreadTransport
from xverse_serve.model.checkpoint import CheckpointError
from xverse_serve.settings import Settings

PROMPTS = {"a": [5, 9, 14, 3 + 40], "b": list(range(20, 57)), "c": [7] * 3, "d": list(range(60, 160, 3))}


def config_for(model_dir: Path, **changes) -> EngineConfig:
    return dataclasses.replace(Settings(model_path=model_dir, device="cpu", max_model_len=256, kv_cache_tokens=4096),
                               **changes).engine_config()


def in_child(model_dir: Path, **changes) -> EngineClient:
    return EngineClient(ProcessTransport(config_for(model_dir, **changes)))


async def collect(engine: EngineClient, request_id: str, prompt: list[int], params: SamplingParams) -> list[StepOutput]:
    return [output async for output in engine.generate(request_id, prompt, params)]


def run(engine: EngineClient, scenario) -> object:
    async def main() -> object:
        engine.start()
        try:
            return await asyncio.wait_for(scenario(engine), timeout=120)
        finally:
            engine.stop()
    return asyncio.run(main())


async def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_loaded_engine_is_left_out_of_the_garbage_collectors_scans(tiny_model_dir: Path) -> None:
    # Its start-up objects frozen (loader.freeze_startup_objects): a full collection over a served model's process
    # would pause a step for ~0.1 s.
    import gc

    gc.unfreeze()
    try:
        engine = load_engine(config_for(tiny_model_dir))
        assert gc.get_freeze_count() > 0
        scanned = {id(o) for o in gc.get_objects()}
        assert id(engine) not in scanned and id(engine.runner.model) not in scanned
    finally:
        gc.unfreeze()  # the other tests' engines are collected as before


def test_the_started_app_is_left_out_of_the_garbage_collectors_scans(tiny_model_dir: Path) -> None:
    # The HTTP process freezes what its start-up built too (server.app's lifespan), so that a full collection does
    # not pause every stream.
    import gc

    from xverse_serve.launch import build_engine
    from xverse_serve.server.app import create_app

    ctx = build_engine(Settings(model_path=tiny_model_dir, device="cpu", max_model_len=256, kv_cache_tokens=4096))
    app = create_app(ctx)

    async def started() -> tuple[int, bool]:
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count(), id(app) in {id(o) for o in gc.get_objects()}

    gc.unfreeze()
    try:
        frozen, app_scanned = asyncio.run(started())
        assert frozen > 0 and not app_scanned
    finally:
        gc.unfreeze()


def test_the_engine_process_gives_the_answers_of_the_engine_thread(tiny_model_dir: Path) -> None:
    config = config_for(tiny_model_dir)
    params = {rid: SamplingParams(max_tokens=12 + i, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True,
                                  repetition_penalty=1.1)
              for i, rid in enumerate(PROMPTS)}

    async def scenario(engine: EngineClient) -> dict[str, list[int]]:
        runs = await asyncio.gather(*(collect(engine, rid, prompt, params[rid]) for rid, prompt in PROMPTS.items()))
        return {rid: [t for output in outputs for t in output.new_token_ids] for rid, outputs in zip(PROMPTS, runs)}

    thread_answers = run(EngineClient(ThreadTransport(load_engine(config))), scenario)
    process_answers = run(EngineClient(ProcessTransport(config)), scenario)
    assert process_answers == thread_answers
    assert [len(tokens) for tokens in process_answers.values()] == [12, 13, 14, 15]


def test_its_load_is_visible_and_leaving_early_aborts_the_request(tiny_model_dir: Path) -> None:
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def scenario(engine: EngineClient) -> tuple:
        idle = engine.stats()
        seen = 0
        async for output in engine.generate("long", PROMPTS["d"], long):
            seen += len(output.new_token_ids)
            if seen >= 3:
                busy = engine.stats()
                break
        await until(lambda: engine.stats().running == 0)  # the abort reached the child
        return idle, busy, engine.stats()

    idle, busy, after = run(in_child(tiny_model_dir), scenario)
    assert idle.running == idle.waiting == idle.kv_blocks_used == 0 and idle.kv_blocks_total == 4096 // 16
    assert busy.running == 1 and busy.kv_blocks_used > 0
    assert after.running == after.waiting == after.kv_blocks_used == 0


def test_a_request_the_engine_refuses_fails_alone(tiny_model_dir: Path) -> None:
    async def scenario(engine: EngineClient) -> tuple[list[StepOutput], list[StepOutput]]:
        too_long = await collect(engine, "x", list(range(5, 305)), SamplingParams(max_tokens=4))
        fine = await collect(engine, "y", PROMPTS["a"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        return too_long, fine

    too_long, fine = run(in_child(tiny_model_dir), scenario)
    assert [output.error for output in too_long] == ["the prompt has 300 tokens; the context holds 256"]
    assert sum(len(output.new_token_ids) for output in fine) == 4 and fine[-1].finish_reason == "length"


def test_a_start_up_error_in_the_child_is_raised_with_its_message(tiny_model_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="the KV cache holds 128 tokens, less than one 256-token context"):
        in_child(tiny_model_dir, kv_cache_tokens=128)


def test_when_the_child_dies_every_request_fails_and_the_server_hears_of_it(tiny_model_dir: Path) -> None:
    deaths = []

    async def scenario(engine: EngineClient) -> list[StepOutput]:
        engine.on_death = lambda: deaths.append(True)
        outputs = []
        async for output in engine.generate("long", PROMPTS["b"], SamplingParams(max_tokens=400, ignore_eos=True)):
            outputs.append(output)
            if len(outputs) == 2:
                os.kill(engine.transport.pid, signal.SIGKILL)
        await until(lambda: bool(deaths))
        return outputs

    engine = in_child(tiny_model_dir)
    outputs = run(engine, scenario)
    assert outputs[-1].error is not None and "the engine process exited" in outputs[-1].error
    assert not engine.alive


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def test_the_server_exits_1_when_its_engine_process_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_dir, tmp_path / "server.log")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert requests.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        (child,) = [pid for pid in child_pids(server.process.pid) if "spawn_main" in
                    Path(f"/proc/{pid}/cmdline").read_text()]
        os.kill(child, signal.SIGKILL)
        assert server.process.wait(timeout=30) == 1
        assert "the engine process exited" in server.log()
    finally:
        stop_server(server)


def test_sigterm_stops_the_engine_process_with_the_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_dir, tmp_path / "server.log")
    children = child_pids(server.process.pid)
    assert children
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in children):
        assert time.monotonic() < deadline, "the engine process outlived the server"
        time.sleep(0.05)


def test_every_message_crosses_the_pipe_as_it_was_sent() -> None:
    """The process transport's msgpack codec gives back the same typed messages (tuples stay tuples, so a decoded
    SamplingParams equals, and hashes like, the one sent)."""
    params = SamplingParams(max_tokens=7, temperature=0.3, top_p=0.9, top_k=5, repetition_penalty=1.2, seed=11,
                            stop=("\n\n", "Human:"), stop_token_ids=(3,))
    stats = EngineStats(running=2, waiting=1, kv_blocks_used=9, kv_blocks_total=64, prefix_queried_tokens=40,
                        prefix_hit_tokens=16, preemptions=0)
    commands = [AddRequest("a", [5, 6, 7], params), AbortRequest("a"), Shutdown()]
    reports = [Ready(stats, False), Failed("no weights"), Died("RuntimeError: boom"),
               StepReport([StepOutput("a", [9], None), StepOutput("b", [], None, "too long", 500)], stats, 3)]
    encode = msgspec.msgpack.Encoder().encode
    for message, kind in [*((c, Command) for c in commands), *((r, Report) for r in reports)]:
        decoded = msgspec.msgpack.Decoder(kind).decode(encode(message))
        assert decoded == message and type(decoded) is type(message)
    assert hash(msgspec.msgpack.Decoder(Command).decode(encode(commands[0])).params) == hash(params)


def test_a_command_that_cannot_be_encoded_fails_its_request_and_the_transport_goes_on(tiny_model_dir: Path) -> None:
    """msgpack holds 64-bit integers: a larger one fails the request that sent it, in its own call, and the
    sender thread (whose death would leave every later request waiting) keeps serving."""

    async def scenario(engine: EngineClient) -> list[StepOutput]:
        with pytest.raises(OverflowError):
            await collect(engine, "huge", PROMPTS["a"], SamplingParams(max_tokens=2, top_k=10**30))
        return await collect(engine, "fine", PROMPTS["a"], SamplingParams(max_tokens=3, temperature=0.0,
                                                                          ignore_eos=True))

    fine = run(in_child(tiny_model_dir), scenario)
    assert sum(len(output.new_token_ids) for output in fine) == 3
