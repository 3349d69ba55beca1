"""Download XVERSE-7B-Chat: `python model_download.py` prints the folder it filled (the one api.py reads).

From ModelScope (the default) or the Hugging Face hub (`--source hf`), with the hub library's own progress
bars. Afterwards every file the server needs is checked: against the sizes the hub lists, and against its own
format (JSON parses; a safetensors shard is as long as its header says; a torch `.bin` shard's zip directory,
stored at its very end, is readable). A file that fails is named, with the sizes, and removed, so that running
the command again fetches it anew.
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from xverse_serve.model.checkpoint import BIN_INDEX, SAFETENSORS_INDEX

MODEL_ID = "xverse/XVERSE-7B-Chat"  # the same id on ModelScope and on the Hugging Face hub
DEFAULT_REVISIONS = {"modelscope": "master", "hf": "main"}
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LFS_POINTER_START = b"version https://git-lfs"
MAX_SAFETENSORS_HEADER = 100 * 2**20


# --- the hubs ------------------------------------------------------------------------------------------------

def modelscope_download(model_id: str, revision: str, folder: Path) -> None:
    from modelscope import snapshot_download

    # Their retry chatter would bury the one line we print; their progress bars are tqdm, not logging, and stay.
    for name in ("modelscope", "modelscope_hub"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # local_dir: straight into the folder api.py reads, not modelscope's own cache layout.
    snapshot_download(model_id, revision=revision, local_dir=str(folder))


def modelscope_file_sizes(model_id: str, revision: str) -> dict[str, int]:
    from modelscope.hub.api import HubApi

    listing = HubApi().get_model_files(model_id, revision=revision, recursive=True)
    # A size of 0 stands for "unknown" as well as for an empty file: only positive sizes are checked.
    return {entry["Path"]: int(entry["Size"]) for entry in listing if entry.get("Size")}


def hf_download(model_id: str, revision: str, folder: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(model_id, revision=revision, local_dir=str(folder))


def hf_file_sizes(model_id: str, revision: str) -> dict[str, int]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(model_id, revision=revision, files_metadata=True)
    return {sibling.rfilename: sibling.size for sibling in info.siblings or [] if sibling.size}


DOWNLOADERS: dict[str, Callable[[str, str, Path], None]] = {"modelscope": modelscope_download, "hf": hf_download}
FILE_SIZE_LISTINGS: dict[str, Callable[[str, str], dict[str, int]]] = {
    "modelscope": modelscope_file_sizes, "hf": hf_file_sizes,
}


# --- checking a folder ---------------------------------------------------------------------------------------

def read_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def format_problem(path: Path) -> str | None:
    """Why the file cannot be what its name says, judged from its own bytes; None when it looks whole."""
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    with path.open("rb") as file:
        start = file.read(len(LFS_POINTER_START))
    if start == LFS_POINTER_START:
        return "is a Git LFS pointer, not the file itself"
    if path.suffix == ".json":
        try:
            read_json(path)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"is not valid JSON ({exc}; {size:,} bytes): truncated?"
    elif path.suffix == ".safetensors":
        return safetensors_problem(path, size)
    elif path.suffix == ".bin":
        return torch_bin_problem(path, size)
    return None


def safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes, whose extent the
    header gives: the file's exact size follows from its first bytes."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return f"is {size:,} bytes, too short for a safetensors header"
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(MAX_SAFETENSORS_HEADER, size - 8):
            return f"is {size:,} bytes, shorter than its safetensors header claims ({header_length:,} bytes): truncated"
        try:
            header = json.loads(file.read(header_length))
            data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                           default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return f"has an unreadable safetensors header ({type(exc).__name__})"
    expected = 8 + header_length + data_end
    if size != expected:
        return f"is {size:,} bytes, its safetensors header describes {expected:,}: truncated or corrupt"
    return None


def torch_bin_problem(path: Path, size: int) -> str | None:
    """torch.save writes a zip archive whose directory sits at the end of the file: a truncated file has
    none. Files from before PyTorch 1.6 are bare pickles, which cannot be checked without loading them."""
    with path.open("rb") as file:
        magic = file.read(2)
    if magic == b"\x80\x02":  # legacy pickle format
        return None
    if magic != b"PK":
        return "is neither a torch zip archive nor a pickle"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"is {size:,} bytes and its zip directory cannot be read ({exc}): truncated"
    if any(entry.header_offset + entry.compress_size > size for entry in entries):
        return f"is {size:,} bytes, shorter than its zip directory says: truncated"
    return None


def needed_files(folder: Path, listed: dict[str, int]) -> tuple[list[str], dict[str, str]]:
    """The files api.py reads, as far as the folder and the hub's listing tell; and those known missing."""
    names = ["config.json", "tokenizer.json"]
    if (folder / "generation_config.json").exists() or "generation_config.json" in listed:
        names.append("generation_config.json")
    missing: dict[str, str] = {}
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if not index.is_file():
            if index_name in listed:
                missing[index_name] = "is missing"
                return names, missing
            continue
        names.append(index_name)
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return names, missing  # the index itself is reported by the format check
        return names + shards, missing
    singles = [name for name in SINGLE_WEIGHT_FILES if (folder / name).exists() or name in listed]
    if not singles:
        missing[BIN_INDEX] = f"is missing (nor is there {SAFETENSORS_INDEX} or a single weight file)"
    return names + singles[:1], missing


def find_problems(folder: Path, listed_sizes: dict[str, int] | None = None) -> dict[str, str]:
    """File name -> what is wrong with it; empty when the folder holds everything api.py reads, whole.
    listed_sizes, the hub's file sizes, adds an exact size check for each file it names."""
    listed = listed_sizes or {}
    names, problems = needed_files(folder, listed)
    for name in names:
        path = folder / name
        if not path.is_file():
            problems[name] = "is missing"
        elif name in listed and path.stat().st_size != listed[name]:
            problems[name] = f"is {path.stat().st_size:,} bytes, the hub lists {listed[name]:,}: incomplete download"
        elif reason := format_problem(path):
            problems[name] = reason
    return problems


def is_complete(folder: Path) -> bool:
    """Everything api.py reads is there and whole, as far as the files themselves tell (no network)."""
    return not find_problems(folder)


def remove_broken(folder: Path, problems: dict[str, str]) -> None:
    """Hub clients may take a file already in place for done; a broken one must go to be fetched again."""
    for name in problems:
        (folder / name).unlink(missing_ok=True)


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# --- the command ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Download {MODEL_ID} into CACHE_DIR/MODEL_ID (where api.py looks), check it, print the folder.")
    parser.add_argument("--source", choices=sorted(DOWNLOADERS), default="modelscope",
                        help="hub to download from: ModelScope or Hugging Face (default: modelscope)")
    parser.add_argument("--cache-dir", default="models", help="folder the model is stored under (default: models)")
    parser.add_argument("--revision", help="branch, tag or commit (default: master on modelscope, main on hf)")
    parser.add_argument("--model-id", default=MODEL_ID, help=f"model id on the hub (default: {MODEL_ID})")
    args = parser.parse_args(argv)
    revision = args.revision or DEFAULT_REVISIONS[args.source]
    folder = Path(args.cache_dir) / args.model_id

    problems = find_problems(folder)
    if not problems:
        print(folder)
        return 0
    remove_broken(folder, problems)

    try:
        DOWNLOADERS[args.source](args.model_id, revision, folder)
    except Exception as exc:  # the hub clients raise many kinds (network, HTTP, file); all end the same way
        print(f"error: could not download {args.model_id} ({revision}) from {args.source} into {folder}: "
              f"{one_line(exc)}", file=sys.stderr)
        return 1

    try:
        listed_sizes = FILE_SIZE_LISTINGS[args.source](args.model_id, revision)
    except Exception as exc:  # the download worked, so this is rare: the format checks still run
        print(f"warning: {args.source} did not list file sizes ({one_line(exc)}); checking the files' formats only",
              file=sys.stderr)
        listed_sizes = None

    problems = find_problems(folder, listed_sizes)
    if problems:
        for name, reason in problems.items():
            print(f"error: {folder / name} {reason}", file=sys.stderr)
        remove_broken(folder, problems)
        print("error: the download is incomplete; the files above were removed: run the same command again to "
              "fetch them", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
