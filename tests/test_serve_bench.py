"""bench/serve_bench.py launching our server once per set of flags (bf16, then a quantized format), each under the
same load: every server's levels, and each later one's ratios against the first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port


def test_several_servers_run_one_after_another_under_one_load_with_ratios_to_the_first(tiny_model_dir: Path,
                                                                                      tmp_path: Path) -> None:
    out = tmp_path / "formats.json"
    flags = ["--device cpu", "--device cpu --quantize int8"]
    result = subprocess.run(
        [sys.executable, "bench/serve_bench.py", "--launch", "ours", "--model-path", str(tiny_model_dir),
         "--port", str(free_port()), "--concurrency", "1", "2", "--requests-per-client", "2", "--prompt-tokens", "16",
         "--max-tokens", "8", "--warmup", "1", "--server-args", *flags, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    servers = report["servers"]
    assert [s["server_args"] for s in servers] == flags
    assert all(s["server_command"].endswith(f) for s, f in zip(servers, flags, strict=True))
    assert all(level["errors"] == 0 and level["requests"] == 2 * level["concurrency"]
               for s in servers for level in s["levels"])
    assert [s["startup_s"] > 0 for s in servers] == [True, True]
    # each server's output beside --out
    assert (tmp_path / "formats.server0.log").is_file() and (tmp_path / "formats.server1.log").is_file()
    [ratios] = report["ratios"]
    assert ratios["server_args"] == flags[1]
    for level, quantized, reference in zip(ratios["levels"], servers[1]["levels"], servers[0]["levels"], strict=True):
        assert level["concurrency"] == quantized["concurrency"] == reference["concurrency"]
        for name in ("output_tok_s", "ttft_ms_p50", "itl_ms_p50", "e2e_ms_p50"):
            assert level[name] == pytest.approx(quantized[name] / reference[name], abs=1e-3)
    assert "| against --device cpu |" in result.stdout and "| --device cpu --quantize int8 | 2 |" in result.stdout
