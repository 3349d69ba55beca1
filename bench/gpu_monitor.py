"""The card's SM clock, power and temperature while a measurement runs, sampled by `nvidia-smi -lms`.

Why: the same code's FP8 figures moved by up to 27% between H100 machines while bf16's moved by 3%; FP8 tensor-core
GEMMs draw more power than bf16 ones, so a card held at its power limit (or a lower one) slows them first. With
the clocks beside each figure, a result file shows whether its card ran at full clock.

    with GpuMonitor(0) as monitor:
        ...  # the measurement
    facts = monitor.summary()  # {} where nvidia-smi is missing or failed
"""

from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active"
INTERVAL_MS = 200


def parse_sample(line: str) -> dict[str, float] | None:
    """One line of nvidia-smi's csv (noheader, nounits) in QUERY's order; None for a line it cannot read."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != 6:
        return None
    try:
        sm, sm_max, power, limit, temperature = (float(value) for value in fields[:5])
        reasons = int(fields[5], 16)
    except ValueError:
        return None
    return {"sm": sm, "sm_max": sm_max, "power": power, "limit": limit, "temperature": temperature,
            "reasons": reasons}


# nvidia-smi's clocks_throttle_reasons bits that mean the card slowed itself (idle and application clocks aside).
THROTTLE_REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                    0x80: "hw_power_brake"}


def summarize(samples: list[dict[str, float]]) -> dict:
    """Median and minimum SM clock, median and peak power, peak temperature, and the throttle reasons seen."""
    if not samples:
        return {}
    clocks = [s["sm"] for s in samples]
    power = [s["power"] for s in samples]
    seen = 0
    for sample in samples:
        seen |= int(sample["reasons"])
    return {"sm_clock_MHz_median": statistics.median(clocks), "sm_clock_MHz_min": min(clocks),
            "sm_clock_MHz_max_rated": samples[-1]["sm_max"], "power_W_median": statistics.median(power),
            "power_W_peak": max(power), "power_limit_W": samples[-1]["limit"],
            "temperature_C_peak": max(s["temperature"] for s in samples),
            "throttled_by": sorted(name for bit, name in THROTTLE_REASONS.items() if seen & bit),
            "samples": len(samples)}


class GpuMonitor:
    """Samples one card (nvidia-smi's index) every INTERVAL_MS while the `with` block runs."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> GpuMonitor:
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"-lms={INTERVAL_MS}",
                 f"--id={self.index}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.output, _ = self.process.communicate(timeout=10)

    def summary(self) -> dict:
        samples = [s for s in map(parse_sample, self.output.splitlines()) if s is not None]
        return summarize(samples)
