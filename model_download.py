"""Download XVERSE-7B-Chat from ModelScope: `python model_download.py` prints the folder it filled."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from xverse_serve.checkpoint import CheckpointError, weight_files

MODEL_ID = "xverse/XVERSE-7B-Chat"


def is_complete(model_dir: Path) -> bool:
    """config, tokenizer and every weight shard the index names are there."""
    if not all((model_dir / name).is_file() for name in ("config.json", "tokenizer.json")):
        return False
    try:
        weight_files(model_dir)
    except CheckpointError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Download {MODEL_ID} with modelscope's snapshot_download.")
    parser.add_argument("--cache-dir", default="models", help="folder the model is stored under")
    parser.add_argument("--revision", default="master", help="model revision (branch, tag or commit)")
    parser.add_argument("--model-id", default=MODEL_ID, help="ModelScope model id")
    args = parser.parse_args(argv)

    model_dir = Path(args.cache_dir) / args.model_id
    if is_complete(model_dir):
        print(model_dir)
        return 0

    from modelscope import snapshot_download

    for name in ("modelscope", "modelscope_hub"):  # their retry chatter would bury the one line we print
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        # local_dir: straight into the folder api.py reads, not modelscope's own cache layout beneath cache_dir.
        model_dir = snapshot_download(args.model_id, revision=args.revision, local_dir=str(model_dir))
    except Exception as exc:  # modelscope raises many kinds (network, HTTP, file); all end the same way
        print(f"error: could not download {args.model_id} ({args.revision}) into {args.cache_dir}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
