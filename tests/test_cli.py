"""The command line `python api.py`: flags, environment, start-up errors."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import REPO, start_server, stop_server

import model_download
from xverse_serve.settings import DEFAULT_MODEL_PATH, Settings, env_name, flags_table, parse_settings

DOWNLOAD_HINT = "python model_download.py"


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def help_text() -> str:
    result = run(str(REPO / "api.py"), "--help")
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # argparse wraps lines


# --- python api.py --help and settings ---------------------------------------------------------------------

def test_help_documents_every_flag_and_its_environment_variable(help_text):
    for field in dataclasses.fields(Settings):
        assert "--" + field.name.replace("_", "-") in help_text, field.name
        assert env_name(field.name) in help_text, field.name


def test_help_shows_the_seeds_defaults(help_text):
    assert "6006" in help_text
    assert str(DEFAULT_MODEL_PATH) in help_text


def test_defaults_are_the_seeds_port_and_the_folder_model_download_fills():
    settings = parse_settings([], environ={})
    assert settings.port == 6006
    assert settings.host == "0.0.0.0"
    assert settings.model_path == Path("models") / model_download.MODEL_ID


def test_environment_variables_set_flags():
    environ = {"XVERSE_PORT": "7007", "XVERSE_MODEL_PATH": "/data/xverse", "XVERSE_MAX_MODEL_LEN": "4096",
               "XVERSE_GPU_MEMORY_UTILIZATION": "0.5", "XVERSE_SERVED_MODEL_NAME": "xverse"}
    settings = parse_settings([], environ=environ)
    assert settings.port == 7007
    assert settings.model_path == Path("/data/xverse")
    assert settings.max_model_len == 4096
    assert settings.gpu_memory_utilization == 0.5
    assert settings.served_model_name == "xverse"


def test_command_line_flags_override_environment_variables():
    settings = parse_settings(["--port", "8008"], environ={"XVERSE_PORT": "7007"})
    assert settings.port == 8008


@pytest.mark.parametrize("argv, environ, named", [
    ([], {"XVERSE_PORT": "http"}, "--port"),
    (["--port", "0"], {}, "--port"),
    (["--max-model-len", "-5"], {}, "--max-model-len"),
    (["--gpu-memory-utilization", "1.5"], {}, "--gpu-memory-utilization"),
    (["--dtype", "int3"], {}, "--dtype"),
    (["--device", "tpu"], {}, "--device"),
])
def test_bad_values_exit_with_a_usage_error_naming_the_flag(argv, environ, named, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, environ=environ)
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_the_readme_flags_table_is_the_one_the_settings_generate():
    """README.md holds `python -m xverse_serve.settings`'s table between its markers, so neither can drift."""
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- flags: python -m xverse_serve.settings -->\n", "\n<!-- /flags -->"
    assert start in readme and end in readme, "README.md lacks the flags table's markers"
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == flags_table()
    printed = run("-m", "xverse_serve.settings")
    assert printed.returncode == 0 and printed.stdout == flags_table() + "\n"


def test_every_setting_carries_its_help_and_bounds_once():
    """The table and --help come from the fields: every flag is in both, with its choices, and a bound in the
    field is enforced by the parser."""
    for field in dataclasses.fields(Settings):
        assert field.metadata["help"], field.name
        assert f"`--{field.name.replace('_', '-')}`" in flags_table(), field.name
        for choice in field.metadata["choices"] or ():
            assert f"`{choice}`" in flags_table(), (field.name, choice)


@pytest.mark.parametrize("argv, message", [
    (["--shutdown-grace", "-1"], "--shutdown-grace must be 0 or more, got -1.0"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be positive, got 0.0"),
    (["--gpu-memory-utilization", "1.01"], "--gpu-memory-utilization must be at most 1, got 1.01"),
    (["--device", "cuda:x"], "--device must match auto|cpu|cuda(:\\d+)?, got 'cuda:x'"),
    (["--max-prefill-with-decodes", "0"], "--max-prefill-with-decodes must be positive, got 0"),
    (["--block-size", "24"], "--block-size must be a power of two (1, 2, 4, 8, 16, ...), got 24"),
    (["--block-size", "0"], "--block-size must be a power of two (1, 2, 4, 8, 16, ...), got 0"),
])
def test_bounds_are_checked_with_a_message_that_says_what_to_fix(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ={})
    assert message in capsys.readouterr().err


def test_secrets_are_never_shown_by_help(tmp_path):
    result = run(str(REPO / "api.py"), "--help", env={"XVERSE_API_KEY": "s3cret-key"})
    assert result.returncode == 0 and "s3cret-key" not in result.stdout


def test_the_engine_and_server_configs_carry_the_flags():
    settings = parse_settings(["--max-num-seqs", "7", "--no-prefix-caching", "--enforce-eager", "--api-key", "a, b",
                               "--cors-origin", "http://x"], environ={})
    engine, server = settings.engine_config(), settings.server_config()
    assert engine.scheduler.max_num_seqs == 7 and not engine.scheduler.prefix_caching and not engine.cuda_graphs
    assert engine.scheduler.max_batched_tokens == Settings().max_batched_tokens
    assert server.api_keys == ("a", "b") and server.cors_origins == ("http://x",)


def test_environment_variables_reach_the_running_server(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path / "server.log",
                          env={"XVERSE_SERVED_MODEL_NAME": "tiny-xverse", "XVERSE_MAX_MODEL_LEN": "128"})
    try:
        [model] = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert model["id"] == "tiny-xverse"
        assert model["max_model_len"] == 128
    finally:
        stop_server(server)


# --- python api.py without a usable model folder -----------------------------------------------------------------

def assert_refused_naming(result: subprocess.CompletedProcess, folder: Path) -> None:
    assert result.returncode != 0
    assert str(folder) in result.stderr, result.stderr
    assert DOWNLOAD_HINT in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_missing_model_folder_is_named_with_the_download_command(tmp_path):
    folder = tmp_path / "models" / "xverse" / "XVERSE-7B-Chat"
    result = run(str(REPO / "api.py"), "--model-path", str(folder), "--device", "cpu", timeout=60)
    assert_refused_naming(result, folder)


def test_the_default_model_folder_missing_is_named_with_the_download_command(tmp_path):
    """Run from an empty folder, `python api.py` looks for models/xverse/XVERSE-7B-Chat there."""
    result = run(str(REPO / "api.py"), "--device", "cpu", cwd=tmp_path, timeout=60)
    assert_refused_naming(result, DEFAULT_MODEL_PATH)


def test_a_folder_missing_its_tokenizer_is_named_with_the_download_command(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "XVERSE-7B-Chat")
    (folder / "tokenizer.json").unlink()
    result = run(str(REPO / "api.py"), "--model-path", str(folder), "--device", "cpu", timeout=60)
    assert_refused_naming(result, folder)
    assert "tokenizer.json" in result.stderr


def test_a_folder_missing_a_weight_shard_is_named_with_the_download_command(tiny_model_dir, tmp_path):
    """An interrupted download: config.json and the index are there, a shard the index names is not."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "XVERSE-7B-Chat")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    result = run(str(REPO / "api.py"), "--model-path", str(folder), "--device", "cpu", timeout=60)
    assert_refused_naming(result, folder)
    assert "pytorch_model-00002-of-00002.bin" in result.stderr
