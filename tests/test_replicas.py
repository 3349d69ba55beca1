"""Replicas behind nginx (deploy/): requests spread over the replicas, a dead replica's requests retried on
another; and deploy/start_replicas.py, which starts one server per device and keeps them running.

nginx runs as this user with deploy/nginx.conf itself, rendered into a temporary folder: only the replicas'
addresses, the port it listens on and the folder of its logs and temporary files are changed."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO, RunningServer, free_port, require_system_tool, start_server, stop_server

DEPLOY = REPO / "deploy"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()),
                                      None)
SERVER_LINE = re.compile(r"^([ \t]*)server 127\.0\.0\.1:\d+ (.*);$", re.MULTILINE)
LOG_LINE = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d+) .* upstream="(?P<upstream>[^"]*)" '
                      r'upstream_status="(?P<upstream_status>[^"]*)"')
COMPLETION = {"prompt": "Hello", "max_tokens": 16, "temperature": 0}


def render_nginx_conf(upstreams: list[str], port: int, folder: Path) -> str:
    """deploy/nginx.conf with these replicas, listening on loopback `port`, writing only under `folder`."""
    conf = (DEPLOY / "nginx.conf").read_text()
    server_lines = list(SERVER_LINE.finditer(conf))
    indent, parameters = server_lines[0].groups()
    servers = "\n".join(f"{indent}server {upstream} {parameters};" for upstream in upstreams)
    conf = conf[:server_lines[0].start()] + servers + conf[server_lines[-1].end():]
    assert conf.count("listen 6006;") == 1
    conf = conf.replace("listen 6006;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/var/log/nginx/", f"{folder}/")
    temp_paths = "".join(f"\n    {kind}_temp_path {folder}/{kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return conf.replace("http {", "http {" + temp_paths, 1)


def start_nginx(conf: str, folder: Path, port: int) -> subprocess.Popen:
    (folder / "nginx.conf").write_text(conf)
    directives = f"daemon off; pid {folder}/nginx.pid;"
    if os.geteuid() == 0:  # else nginx's workers would run as nobody, who cannot enter pytest's private folders
        directives += f" user {getpass.getuser()};"
    process = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", directives],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {process.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("nginx did not start listening in 10 s")


def access_log(folder: Path, total: int) -> list[dict[str, str]]:
    """The access log, parsed, once it holds `total` lines (nginx writes a line just after the response)."""
    path = folder / "xverse-access.log"
    deadline = time.monotonic() + 5
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= total or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == total, lines
    entries = [LOG_LINE.search(line) for line in lines]
    assert all(entries), lines
    return [entry.groupdict() for entry in entries]


def address(server: RunningServer) -> str:
    return server.url.removeprefix("http://")


@pytest.fixture
def nginx_installed() -> None:
    require_system_tool(NGINX is not None, "nginx", "nginx")


@pytest.fixture
def two_replicas(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[RunningServer]]:
    with ThreadPoolExecutor(2) as pool:
        replicas = list(pool.map(lambda i: start_server(tiny_model_dir, tmp_path / f"replica{i}.log"), range(2)))
    yield replicas
    for replica in replicas:
        if replica.process.poll() is None:
            stop_server(replica)
        else:
            replica.process.wait()


def test_nginx_spreads_requests_over_both_replicas_and_retries_a_dead_ones_requests_on_the_other(
        nginx_installed, two_replicas, tmp_path):
    folder = tmp_path / "nginx"
    folder.mkdir()
    port = free_port()
    nginx = start_nginx(render_nginx_conf([address(r) for r in two_replicas], port, folder), folder, port)
    url = f"http://127.0.0.1:{port}"
    try:
        # Spread: 20 requests at once, and both replicas served some.
        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(lambda _: requests.post(url + "/v1/completions", json=COMPLETION, timeout=30),
                                      range(20)))
        assert [r.status_code for r in responses] == [200] * 20
        assert all(r.json()["choices"] for r in responses)
        served = [entry["upstream"] for entry in access_log(folder, 20)]
        counts = {address(r): served.count(address(r)) for r in two_replicas}
        assert sum(counts.values()) == 20 and all(counts.values()), served

        # Streaming passes through: server-sent events, ending in [DONE].
        with requests.post(url + "/v1/chat/completions", stream=True, timeout=30,
                           json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16,
                                 "temperature": 0, "stream": True}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line for line in stream.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
        access_log(folder, 21)

        # Retry: one replica killed outright; every request still answered, by the other.
        dead, alive = two_replicas
        dead.process.send_signal(signal.SIGKILL)
        dead.process.wait()
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: requests.post(url + "/v1/completions", json=COMPLETION, timeout=30),
                                      range(12)))
        assert [r.status_code for r in responses] == [200] * 12
        seed_answer = requests.post(url, json={"prompt": "Hello", "max_new_tokens": 8}, timeout=30)
        assert seed_answer.status_code == 200 and seed_answer.json()["status"] == 200
        entries = access_log(folder, 34)[21:]
        assert all(entry["upstream"].split(", ")[-1] == address(alive) for entry in entries), entries
        retried = [entry for entry in entries if entry["upstream"] == f"{address(dead)}, {address(alive)}"]
        assert retried, entries  # nginx tried the dead replica, failed to connect, and sent the request on
        assert all(entry["upstream_status"] == "502, 200" for entry in retried), retried
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)


class ShuttingDownReplica(BaseHTTPRequestHandler):
    """Answers every request as a replica does while it drains: 503, Retry-After, and it closes."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": {"message": "the server is shutting down", "type": "service_unavailable",
                                     "param": None, "code": None}, "status": 503}).encode()
        self.send_response(503)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Retry-After", "1"), ("Connection", "close")):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_nginx_sends_a_post_refused_with_503_to_another_replica(nginx_installed, server, tmp_path):
    """A replica that is shutting down (or whose queue is full) answers 503: the POST goes to another one."""
    draining = ThreadingHTTPServer(("127.0.0.1", 0), ShuttingDownReplica)
    threading.Thread(target=draining.serve_forever, daemon=True).start()
    draining_address = f"127.0.0.1:{draining.server_address[1]}"
    folder = tmp_path / "nginx"
    folder.mkdir()
    port = free_port()
    nginx = start_nginx(render_nginx_conf([draining_address, address(server)], port, folder), folder, port)
    try:
        for _ in range(6):
            response = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=COMPLETION, timeout=30)
            assert response.status_code == 200, response.text
        entries = access_log(folder, 6)
        assert all(entry["upstream"].split(", ")[-1] == address(server) for entry in entries), entries
        retried = [entry for entry in entries if entry["upstream"] == f"{draining_address}, {address(server)}"]
        assert retried and all(entry["upstream_status"] == "503, 200" for entry in retried), entries
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        draining.shutdown()


# --- deploy/start_replicas.py -----------------------------------------------------------------------------------

def consecutive_free_ports(count: int) -> int:
    for _ in range(50):
        base = free_port()
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports found")


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


def test_the_launcher_runs_one_server_per_device_restarts_a_dead_one_and_stops_them_all(tiny_model_dir, tmp_path):
    base = consecutive_free_ports(2)
    log_path = tmp_path / "launcher.log"
    with log_path.open("w") as log:
        launcher = subprocess.Popen(
            [sys.executable, str(DEPLOY / "start_replicas.py"), "--devices", "cpu,cpu", "--base-port", str(base),
             "--", "--model-path", str(tiny_model_dir), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    urls = [f"http://127.0.0.1:{base + i}" for i in range(2)]
    try:
        for url in urls:
            wait_healthy(url)
        assert requests.post(urls[1] + "/v1/completions", json=COMPLETION, timeout=30).status_code == 200
        # Both ready, so a replica that dies now is one to restart.
        deadline = time.monotonic() + 10
        while log_path.read_text().count("ready at") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(re.search(rf"\[cpu :{base}\] started \(pid (\d+)\)", log_path.read_text())[1])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "starting it again" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_healthy(urls[0])
        assert log_path.read_text().count(f"[cpu :{base}] started") == 2
    finally:
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=60)
    output = log_path.read_text()
    assert code == 0, output
    for url in urls:
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=1)


def test_the_launcher_stops_when_a_replica_cannot_start(tmp_path):
    """A missing model would fail again on every restart: the launcher says so and exits."""
    base = consecutive_free_ports(1)
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "start_replicas.py"), "--devices", "cpu", "--base-port", str(base),
         "--", "--model-path", str(tmp_path / "no-model")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout
    assert "before it came up" in result.stdout
    assert "python model_download.py" in result.stdout  # the replica's own error, passed on


# --- deploy/kubernetes.yaml ---------------------------------------------------------------------------------------

def test_the_kubernetes_example_probes_health_on_the_served_port():
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if doc]
    [deployment] = [doc for doc in documents if doc["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port = container["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port}, probe
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    assert env.get("XVERSE_PORT", "6006") == str(port)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
