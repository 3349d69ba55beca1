"""bench/gpu_monitor.py: nvidia-smi's samples read and summarized (clocks, power, the reasons a card slowed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from gpu_monitor import GpuMonitor, parse_sample, summarize  # noqa: E402


def test_a_sample_line_is_read_in_query_order() -> None:
    sample = parse_sample("1755, 1980, 512.31, 700.00, 61, 0x0000000000000004")
    assert sample == {"sm": 1755.0, "sm_max": 1980.0, "power": 512.31, "limit": 700.0, "temperature": 61.0,
                      "reasons": 4}


def test_lines_it_cannot_read_are_skipped() -> None:
    assert parse_sample("[N/A], 1980, 100, 700, 40, 0x0") is None
    assert parse_sample("1980, 1980") is None


def test_summary_gives_the_median_and_least_clock_and_every_throttle_reason_seen() -> None:
    lines = ["1980, 1980, 300, 700, 50, 0x0", "1755, 1980, 690, 700, 60, 0x4", "1410, 1980, 699, 700, 70, 0x20"]
    summary = summarize([parse_sample(line) for line in lines])
    assert summary["sm_clock_MHz_median"] == 1755.0 and summary["sm_clock_MHz_min"] == 1410.0
    assert summary["power_W_median"] == 690.0 and summary["power_W_peak"] == 699.0
    assert summary["temperature_C_peak"] == 70.0 and summary["samples"] == 3
    assert summary["throttled_by"] == ["sw_power_cap", "sw_thermal"]
    assert summarize([]) == {}


def test_without_nvidia_smi_the_monitor_gives_nothing(monkeypatch) -> None:
    monkeypatch.setattr("gpu_monitor.shutil.which", lambda name: None)
    with GpuMonitor(0) as monitor:
        pass
    assert monitor.summary() == {}
