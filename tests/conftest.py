"""Shared fixtures: tiny checkpoints in XVERSE's layout, and a real `python api.py` server over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors: set before any import of triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tiny_checkpoint import write_checkpoint  # noqa: E402

from xverse_serve.model.checkpoint import ModelConfig, load_config  # noqa: E402
from xverse_serve.model.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def require_system_tool(present: bool, what: str, packages: str) -> None:
    """Tests that drive a Debian program (chromium, nginx) skip on a machine without it, and fail where
    XVERSE_REQUIRE_SYSTEM_TOOLS=1 says it must be there (.ci/run installs them and sets it)."""
    if present:
        return
    message = f"{what} is not installed: apt-get install {packages}"
    if os.environ.get("XVERSE_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny XVERSE checkpoint: config, generation config, tokenizer.json, two bf16 .bin shards."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "XVERSE-tiny")


@pytest.fixture(scope="session")
def config(tiny_model_dir: Path) -> ModelConfig:
    return load_config(tiny_model_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path, config: ModelConfig) -> Tokenizer:
    """The tiny checkpoint's tokenizer, as the server loads it."""
    return Tokenizer(tiny_model_dir / "tokenizer.json", config)


def record_pdl_launches(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A list that gets, for each kernel launched through kernels.pdl.launch from now on, whether it took PDL."""
    from xverse_serve.kernels import pdl

    launched: list[bool] = []
    launch = pdl.launch

    def recording(t: torch.Tensor) -> dict:
        options = launch(t)
        launched.append(options["PDL"])
        return options

    monkeypatch.setattr(pdl, "launch", recording)
    return launched


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(model_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None,
                 timeout: float = 120) -> RunningServer:
    port = free_port()
    command = [sys.executable, str(REPO / "api.py"), "--model-path", str(model_dir), "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), *extra]
    log_file = log_path.open("w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if requests.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not become healthy in {timeout} s:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`python api.py` on the tiny checkpoint, on a free loopback port, shared by the HTTP tests."""
    running = start_server(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log")
    yield running
    stop_server(running)
