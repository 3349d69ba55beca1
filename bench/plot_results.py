"""Draws the throughput figure of one card from bench/results: offline throughput beside transformers' generate
(engine_CARD.json), and HTTP serving beside `transformers serve` (serve_ours_CARD*.json, serve_transformers_CARD.json).
Needs matplotlib (`pip install matplotlib`), not the server.

    python bench/plot_results.py --card h100 --out images/throughput_h100.png
    python bench/plot_results.py --card h200 --out images/throughput_h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="h100")
    parser.add_argument("--out", type=Path, default=None, help="default: images/throughput_CARD.png")
    args = parser.parse_args()
    out = args.out or RESULTS.parent.parent / "images" / f"throughput_{args.card}.png"
    engine = json.loads((RESULTS / f"engine_{args.card}.json").read_text())
    ours_http = json.loads((RESULTS / f"serve_ours_{args.card}.json").read_text())["levels"]
    theirs_http = json.loads((RESULTS / f"serve_transformers_{args.card}.json").read_text())["levels"]

    figure, (offline, online) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, ours in engine.get("by_kv_cache_dtype", {"bfloat16": engine}).items():
        counts = sorted(ours["throughput"], key=int)
        offline.plot([int(n) for n in counts], [ours["throughput"][n]["tok_s"] for n in counts], "o-",
                     label=f"xverse-serve, {short(name)} KV cache")
    hf = {n: v for n, v in engine["hf_generate"].items() if isinstance(v, dict)}
    offline.plot([int(n) for n in sorted(hf, key=int)], [hf[n]["tok_s"] for n in sorted(hf, key=int)], "s--",
                 label="transformers generate")
    offline.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="output tokens/s",
                title="Offline: 512-token prompts, 256 new tokens")
    offline.legend()
    runs = [(ours_http, "xverse-serve, bf16 KV cache", "o-")]
    for kv in ("int8", "fp8"):
        path = RESULTS / f"serve_ours_{args.card}_kv_{kv}.json"
        if path.exists():
            runs.append((json.loads(path.read_text())["levels"], f"xverse-serve, {kv} KV cache", "o-"))
    for levels, label, style in [*runs, (theirs_http, "transformers serve", "s--")]:
        online.plot([lv["concurrency"] for lv in levels], [lv["output_tok_s"] for lv in levels], style, label=label)
    online.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="output tokens/s",
               title="HTTP: 516-token prompts, 128 new tokens")
    online.legend()
    figure.suptitle(f"XVERSE-7B shape, random bf16 weights, {engine['device']}")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(out)


def short(kv_dtype: str) -> str:
    return {"bfloat16": "bf16", "float8_e4m3fn": "fp8"}.get(kv_dtype, kv_dtype)


if __name__ == "__main__":
    main()
