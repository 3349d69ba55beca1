"""Serve XVERSE-7B-Chat on port 6006: `python api.py` (see `python api.py --help`)."""

from __future__ import annotations

import logging
import sys

from xverse_serve.launch import build_context
from xverse_serve.model.checkpoint import CheckpointError
from xverse_serve.server.app import create_app
from xverse_serve.server.lifecycle import serve
from xverse_serve.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ctx = build_context(settings)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # 0 after a shutdown; 1 if the engine died, so that a supervisor restarts the server.
    return serve(create_app(ctx), settings.host, settings.port, settings.log_level)


if __name__ == "__main__":
    sys.exit(main())
