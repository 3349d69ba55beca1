"""`python model_download.py`: where it writes, which hub it asks, how it checks what it got. No network: the
hub clients are replaced by fakes that copy a tiny checkpoint, or pointed at a closed local port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, free_port
from huggingface_hub.hf_api import RepoSibling
from modelscope.hub.api import HubApi
from safetensors.torch import save_file
from tqdm import tqdm

import model_download
from xverse_serve.settings import DEFAULT_MODEL_PATH

SHARD = "pytorch_model-00002-of-00002.bin"


def offline_env(folder: Path) -> dict[str, str]:
    """Both hubs pointed at a closed local port, so no test can ever start a real 14 GB download."""
    closed = f"http://127.0.0.1:{free_port()}"
    return {"MODELSCOPE_ENDPOINT": closed, "MODELSCOPE_CACHE": str(folder / "modelscope"),
            "HF_ENDPOINT": closed, "HF_HOME": str(folder / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_download(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "model_download.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


@pytest.fixture(scope="module", autouse=True)
def offline_modelscope_download(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """`python model_download.py` with ModelScope out of reach. modelscope retries for several seconds before
    it gives up, so this starts with the module's first test and is checked by its last."""
    folder = tmp_path_factory.mktemp("offline")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "model_download.py"), "--cache-dir", str(folder / "models")], cwd=folder,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **offline_env(folder)},
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def file_sizes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


class FakeHub:
    """Stands in for one hub's client: its snapshot download copies `source` into the folder it is given,
    keeping files already there as the real clients do, and can damage a file on the way (`truncated`); its
    listing reports the source's true sizes, or fails (`listing_fails`)."""

    def __init__(self, source: Path):
        self.source = source
        self.downloads: list[dict] = []
        self.listings: list[dict] = []
        self.truncated: str | None = None
        self.listing_fails = False

    def snapshot_download(self, repo_id: str, revision: str | None = None, local_dir: str | None = None,
                          **kwargs) -> str:
        self.downloads.append({"repo_id": repo_id, "revision": revision, "local_dir": local_dir, **kwargs})
        target = Path(local_dir)
        target.mkdir(parents=True, exist_ok=True)
        for path in self.source.iterdir():
            if not (target / path.name).exists():
                shutil.copy(path, target / path.name)
        if self.truncated:
            truncate(target / self.truncated)
        return str(target)

    def sizes(self, repo_id: str, revision: str | None) -> dict[str, int]:
        self.listings.append({"repo_id": repo_id, "revision": revision})
        if self.listing_fails:
            raise ConnectionError("listing unavailable")
        return file_sizes(self.source)


@pytest.fixture
def modelscope(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub = FakeHub(tiny_model_dir)

    def get_model_files(api, model_id: str, revision: str | None = None, recursive: bool = True) -> list[dict]:
        return [{"Path": name, "Size": size} for name, size in hub.sizes(model_id, revision).items()]

    def snapshot_download(model_id: str, revision: str | None = None, local_dir: str | None = None, **kwargs):
        tqdm(total=1, desc="Downloading [fake]").close()  # what modelscope's own bars look like to us
        return hub.snapshot_download(model_id, revision=revision, local_dir=local_dir, **kwargs)

    monkeypatch.setattr("modelscope.snapshot_download", snapshot_download)
    monkeypatch.setattr(HubApi, "get_model_files", get_model_files)
    return hub


@pytest.fixture
def huggingface(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub = FakeHub(tiny_model_dir)

    def model_info(api, repo_id: str, *, revision: str | None = None, files_metadata: bool = False, **kwargs):
        sizes = hub.sizes(repo_id, revision)
        return SimpleNamespace(siblings=[RepoSibling(rfilename=name, size=size if files_metadata else None)
                                         for name, size in sizes.items()])

    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    return hub


def folder_in(root: Path) -> Path:
    return root / "models" / model_download.MODEL_ID


# --- where it writes and which hub it asks ------------------------------------------------------------------

def test_the_downloaded_folder_is_the_one_api_py_reads_by_default(modelscope, tmp_path, monkeypatch, capsys):
    """`python model_download.py` then `python api.py`, both from the same folder, with no flags: the
    download must land in models/xverse/XVERSE-7B-Chat, where api.py looks."""
    monkeypatch.chdir(tmp_path)
    assert model_download.main([]) == 0
    assert [call["repo_id"] for call in modelscope.downloads] == [model_download.MODEL_ID]
    assert model_download.is_complete(tmp_path / DEFAULT_MODEL_PATH)
    assert Path(capsys.readouterr().out.strip()).resolve() == (tmp_path / DEFAULT_MODEL_PATH).resolve()


def test_modelscope_is_asked_for_the_master_revision_into_the_model_folder(modelscope, tmp_path, capsys):
    assert model_download.main(["--cache-dir", str(tmp_path / "models")]) == 0
    [call] = modelscope.downloads
    assert (call["repo_id"], call["revision"], call["local_dir"]) == (
        model_download.MODEL_ID, "master", str(folder_in(tmp_path)))
    assert modelscope.listings == [{"repo_id": model_download.MODEL_ID, "revision": "master"}]
    assert capsys.readouterr().out.strip() == str(folder_in(tmp_path))


def test_source_hf_asks_the_hugging_face_hub_for_main_into_the_model_folder(huggingface, modelscope, tmp_path, capsys):
    assert model_download.main(["--source", "hf", "--cache-dir", str(tmp_path / "models")]) == 0
    [call] = huggingface.downloads
    assert (call["repo_id"], call["revision"], call["local_dir"]) == (
        model_download.MODEL_ID, "main", str(folder_in(tmp_path)))
    assert huggingface.listings == [{"repo_id": model_download.MODEL_ID, "revision": "main"}]
    assert modelscope.downloads == []
    assert capsys.readouterr().out.strip() == str(folder_in(tmp_path))
    assert model_download.is_complete(folder_in(tmp_path))


def test_a_revision_given_reaches_the_hub(huggingface, tmp_path):
    assert model_download.main(["--source", "hf", "--revision", "v1.0", "--cache-dir", str(tmp_path / "models")]) == 0
    assert [call["revision"] for call in huggingface.downloads] == ["v1.0"]


def test_the_hubs_progress_bars_are_shown(modelscope, tmp_path, capsys):
    """modelscope's log is silenced (its retry chatter), its tqdm progress bars are not."""
    assert model_download.main(["--cache-dir", str(tmp_path / "models")]) == 0
    assert "Downloading [fake]" in capsys.readouterr().err


# --- a complete folder is left alone ---------------------------------------------------------------------------

def test_with_the_model_already_there_nothing_is_fetched(modelscope, tiny_model_dir, tmp_path, capsys):
    shutil.copytree(tiny_model_dir, folder_in(tmp_path))
    assert model_download.main(["--cache-dir", str(tmp_path / "models")]) == 0
    assert modelscope.downloads == [] and modelscope.listings == []
    assert capsys.readouterr().out.strip() == str(folder_in(tmp_path))


def test_with_the_model_already_there_it_prints_the_folder_without_network(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, folder_in(tmp_path))
    result = run_download("--cache-dir", str(tmp_path / "models"), cwd=tmp_path, env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(folder)


# --- checking what arrived --------------------------------------------------------------------------------------

def test_a_truncated_shard_is_named_with_its_sizes_and_fetched_again_on_the_next_run(
        modelscope, tiny_model_dir, tmp_path, capsys):
    modelscope.truncated = SHARD
    assert model_download.main(["--cache-dir", str(tmp_path / "models")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    expected = (tiny_model_dir / SHARD).stat().st_size
    [line] = [line for line in err.splitlines() if SHARD in line]
    assert f"{expected // 2:,} bytes" in line and f"{expected:,}" in line, line
    assert "run the same command again" in err
    assert not (folder_in(tmp_path) / SHARD).exists()

    modelscope.truncated = None
    assert model_download.main(["--cache-dir", str(tmp_path / "models")]) == 0
    assert len(modelscope.downloads) == 2
    assert (folder_in(tmp_path) / SHARD).read_bytes() == (tiny_model_dir / SHARD).read_bytes()


def test_a_file_of_another_size_than_the_hub_lists_is_refused(modelscope, tmp_path, capsys):
    """Even where the file's own format looks whole (here tokenizer.json, padded with spaces)."""
    original = modelscope.snapshot_download

    def pad_tokenizer(*args, **kwargs):
        folder = Path(original(*args, **kwargs))
        with (folder / "tokenizer.json").open("a") as file:
            file.write("   ")
        return str(folder)

    modelscope.snapshot_download = pad_tokenizer
    assert model_download.main(["--source", "modelscope", "--cache-dir", str(tmp_path / "models")]) == 1
    assert "tokenizer.json" in capsys.readouterr().err


def test_a_damaged_shard_left_by_an_earlier_run_is_replaced(modelscope, tiny_model_dir, tmp_path):
    """The hub clients keep files already in place; this one is truncated, so it is removed before they run."""
    folder = shutil.copytree(tiny_model_dir, folder_in(tmp_path))
    truncate(folder / SHARD)
    assert model_download.main(["--cache-dir", str(tmp_path / "models")]) == 0
    assert len(modelscope.downloads) == 1
    assert (folder / SHARD).read_bytes() == (tiny_model_dir / SHARD).read_bytes()


def test_without_a_size_listing_the_files_formats_are_still_checked(modelscope, tmp_path, capsys):
    modelscope.listing_fails = True
    modelscope.truncated = SHARD
    assert model_download.main(["--cache-dir", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert "did not list file sizes" in err
    assert any(SHARD in line and "truncated" in line for line in err.splitlines()), err


def test_without_a_size_listing_a_whole_download_succeeds(huggingface, tmp_path, capsys):
    huggingface.listing_fails = True
    assert model_download.main(["--source", "hf", "--cache-dir", str(tmp_path / "models")]) == 0
    assert capsys.readouterr().out.strip() == str(folder_in(tmp_path))


# --- the format checks used when the hub lists no sizes -----------------------------------------------------------

def write_safetensors(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(7, 3, dtype=torch.bfloat16)}, str(path))
    return path


def cut_short(path: Path) -> None:
    truncate(path, keep=0.9)


def lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 2000000000\n")


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage, expected", [
    (cut_short, "truncated"), (lfs_pointer, "LFS pointer"), (empty, "empty"),
])
@pytest.mark.parametrize("name", [SHARD, "config.json", "tokenizer.json", "pytorch_model.bin.index.json"])
def test_damaged_files_are_found_from_their_own_bytes(tiny_model_dir, tmp_path, name, damage, expected):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    damage(folder / name)
    problems = model_download.find_problems(folder)
    assert list(problems) == [name]
    if name == SHARD or damage is not cut_short:
        assert expected in problems[name]
    else:
        assert "JSON" in problems[name]


def test_a_missing_shard_is_found(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / SHARD).unlink()
    assert model_download.find_problems(folder) == {SHARD: "is missing"}


def test_a_whole_safetensors_checkpoint_passes_and_a_truncated_one_does_not(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shard = write_safetensors(folder)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    assert model_download.find_problems(folder) == {}
    cut_short(shard)
    assert "safetensors header describes" in model_download.find_problems(folder)["model.safetensors"]


def test_an_empty_folder_lacks_config_tokenizer_and_weights(tmp_path):
    assert set(model_download.find_problems(tmp_path)) == {"config.json", "tokenizer.json",
                                                          "pytorch_model.bin.index.json"}


# --- no network ------------------------------------------------------------------------------------------------

def assert_one_clear_line(result_code: int, stdout: str, stderr: str) -> None:
    assert result_code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert model_download.MODEL_ID in lines[0]
    assert "Traceback" not in stderr
    assert stdout == ""


def test_hf_without_network_fails_with_one_clear_line(tmp_path):
    result = run_download("--source", "hf", "--cache-dir", str(tmp_path / "models"), cwd=tmp_path,
                          env=offline_env(tmp_path))
    assert_one_clear_line(result.returncode, result.stdout, result.stderr)
    assert "from hf" in result.stderr


def test_modelscope_without_network_fails_with_one_clear_line(offline_modelscope_download):
    stdout, stderr = offline_modelscope_download.communicate(timeout=300)
    assert_one_clear_line(offline_modelscope_download.returncode, stdout, stderr)
    assert "from modelscope" in stderr
