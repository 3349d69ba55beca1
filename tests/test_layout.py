"""The package's layout is its architecture: imports run one way (server -> engine -> model -> kernels, with
settings and launch above them all), no module imports itself back through others, and the HTTP process never
loads the model or the kernels when the engine runs in its own process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "xverse_serve"
# Each layer may import its own modules and those of the layers after it, never those before it.
LAYERS = ("top", "server", "engine", "model", "kernels")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports, at any depth of its code (function-level imports too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import module` imports the module; `from module import name` the module itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, known) for path in paths}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "top"


def test_the_import_graph_is_read_from_the_code() -> None:
    graph = import_graph()
    assert "xverse_serve.engine.messages" in graph["xverse_serve.engine.client"]
    assert "xverse_serve.kernels.fused_ops" in graph["xverse_serve.model.xverse"]  # an import inside a function
    assert "xverse_serve.server.seed_api" in graph["xverse_serve.server.app"]  # `from . import seed_api`


def test_imports_run_one_way_from_server_to_kernels() -> None:
    upward = [f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
              if LAYERS.index(layer(target)) < LAYERS.index(layer(module))]
    assert not upward, upward


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_back_through_others() -> None:
    assert find_cycle(import_graph()) is None


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_http_side_loads_neither_the_model_nor_the_kernels() -> None:
    """What `python api.py` imports before it starts the engine process: the server, the engine's client and
    transports, the tokenizer and checkpoint reader; not the decoder, the runner or any kernel."""
    script = ("import sys, api, xverse_serve.launch, xverse_serve.server.app; "
              "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('xverse_serve'))))")
    loaded = set(subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())
    assert "xverse_serve.engine.process_transport" in loaded and "xverse_serve.server.openai_api" in loaded
    heavy = {name for name in loaded if name.startswith(("xverse_serve.kernels", "xverse_serve.model.xverse",
                                                         "xverse_serve.model.attention", "xverse_serve.engine.engine",
                                                         "xverse_serve.engine.runner", "xverse_serve.engine.loader"))}
    assert not heavy, heavy
