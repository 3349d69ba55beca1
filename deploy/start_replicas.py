"""Start one `python api.py` per GPU, for nginx to balance (deploy/nginx.conf); keep them running.

    python deploy/start_replicas.py                         # every GPU: cuda:0 on port 6100, cuda:1 on 6101, ...
    python deploy/start_replicas.py --devices cuda:0,cuda:2 -- --max-num-seqs 128   # after --: flags for api.py

Replica i (the i-th of --devices) listens on BASE_PORT + i. Each replica's output is printed with its device
and port in front. A replica that stops after it has come up (its /health answered 200) is started again,
after a pause that grows while it keeps failing; one that stops before it ever came up (a missing model, a bad
flag, too little GPU memory) stops them all, since the error would only repeat. SIGTERM or SIGINT is passed
on to every replica, which finish the requests they hold (api.py's --shutdown-grace); then this exits.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

API = Path(__file__).resolve().parent.parent / "api.py"
POLL_S = 0.5
FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
STABLE_S = 60.0  # a replica that ran this long before it stopped is restarted after the first delay again


@dataclass
class Replica:
    device: str
    port: int
    command: list[str]
    health_url: str
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ready: bool = False  # /health answered 200 since the last start
    ever_ready: bool = False
    restart_delay: float = FIRST_RESTART_DELAY_S  # the pause before its next restart
    restart_at: float | None = None
    output: threading.Thread | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.device} :{self.port}"

    def start(self) -> None:
        # A session of its own: a Ctrl-C in the terminal reaches only us, and we pass on one SIGTERM (two
        # signals would stop a replica at once instead of letting it finish its requests).
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", bufsize=1, start_new_session=True)
        self.started_at, self.ready, self.restart_at = time.monotonic(), False, None
        self.output = threading.Thread(target=self.copy_output, args=(self.process,), daemon=True)
        self.output.start()
        say(f"[{self.name}] started (pid {self.process.pid}): {' '.join(self.command)}")

    def copy_output(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            print(f"[{self.name}] {line}", end="", flush=True)

    def answers_health(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


def say(message: str) -> None:
    print(f"start_replicas: {message}", flush=True)


def all_gpus() -> list[str]:
    import torch

    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, api_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] [-- api.py flags]")
    parser.add_argument("--devices", help="comma-separated devices, one replica each (default: every GPU)")
    parser.add_argument("--base-port", type=int, default=6100, help="port of the first replica (default: 6100)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the replicas listen on (default: 127.0.0.1, for an nginx on this machine)")
    return parser.parse_args(own), api_args


def build_replicas(args: argparse.Namespace, api_args: list[str]) -> list[Replica]:
    devices = args.devices.split(",") if args.devices else all_gpus()
    if not devices:
        raise SystemExit("start_replicas: no GPU found; name devices with --devices")
    probe_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    replicas = []
    for index, device in enumerate(devices):
        port = args.base_port + index
        # Ours go last: where api_args name the same flags, argparse keeps the last value.
        command = [sys.executable, str(API), *api_args, "--device", device, "--host", args.host, "--port", str(port)]
        replicas.append(Replica(device, port, command, f"http://{probe_host}:{port}/health"))
    return replicas


def supervise(replicas: list[Replica], stop: threading.Event) -> int:
    """Runs until `stop` is set (0) or a replica fails before it ever came up (its exit code)."""
    for replica in replicas:
        replica.start()
    while not stop.wait(POLL_S):
        now = time.monotonic()
        for replica in replicas:
            code = replica.process.poll()
            if code is None:
                if not replica.ready and replica.answers_health():
                    replica.ready = replica.ever_ready = True
                    say(f"[{replica.name}] ready at {replica.health_url.removesuffix('/health')}")
                continue
            if replica.restart_at is None:
                if not replica.ever_ready:
                    say(f"[{replica.name}] exited with code {code} before it came up: stopping all replicas")
                    return code or 1
                ran = now - replica.started_at
                if ran >= STABLE_S:
                    replica.restart_delay = FIRST_RESTART_DELAY_S
                replica.restart_at = now + replica.restart_delay
                say(f"[{replica.name}] exited with code {code} after {ran:.0f} s: "
                    f"starting it again in {replica.restart_delay:g} s")
                replica.restart_delay = min(2 * replica.restart_delay, MAX_RESTART_DELAY_S)
            elif now >= replica.restart_at:
                replica.start()
    return 0


def stop_all(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.process is not None and replica.process.poll() is None:
            replica.process.terminate()
    for replica in replicas:
        if replica.process is not None:
            replica.process.wait()
            replica.output.join()


def main(argv: list[str] | None = None) -> int:
    args, api_args = parse_args(sys.argv[1:] if argv is None else argv)
    replicas = build_replicas(args, api_args)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():  # a second signal: pass it on, so that the replicas stop at once
            for replica in replicas:
                if replica.process is not None and replica.process.poll() is None:
                    replica.process.send_signal(signum)
            return
        say(f"{signal.Signals(signum).name}: stopping the replicas once their requests are done")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        code = supervise(replicas, stop)
    finally:
        stop_all(replicas)
    return code


if __name__ == "__main__":
    sys.exit(main())
