"""Serve XVERSE-7B-Chat on port 6006: `python api.py` (see `python api.py --help`)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from xverse_serve.checkpoint import CheckpointError
from xverse_serve.launch import build_engine
from xverse_serve.server import create_app
from xverse_serve.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ctx = build_engine(settings)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(create_app(ctx), host=settings.host, port=settings.port, workers=1, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
