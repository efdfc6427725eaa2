"""The shape of engine/: a few entry points at its top level, no import circles, no function over 80
lines; conf/config.yaml generated from the schema; removed keys named; kernel choices as config keys."""

import ast
import dataclasses
from pathlib import Path

import pytest

from engine.config.compose import compose_config, render_yaml
from engine.config.load import build_config, config_of_checkpoint
from engine.config.sections import TrainConfig
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "engine"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ENGINE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every engine.* name an import statement of the module reaches, functions' own imports included."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.update([name] + [f"{name}.{a.name}" for a in node.names])
    return {n for n in found if n == "engine" or n.startswith("engine.")}


def import_graph() -> dict[str, set[str]]:
    """module -> the engine modules importing it runs: each imported module and the packages above it
    (Python runs a package's __init__ first), except the importer's own packages, which are already
    being imported when it runs."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        edges = set()
        for name in _imported(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target not in own and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_engine_has_no_import_circles():
    graph = import_graph()
    assert graph["engine.training.trainer"] >= {"engine.training.step", "engine.parallel.fsdp", "engine.parallel"}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_a_package():
    graph = {"a": {"b.c"}, "b": {"b.d"}, "b.c": set(), "b.d": {"a"}}
    graph["a"] |= {"b"}  # importing b.c runs b's __init__ first
    assert cycles(graph) == [["a", "b", "b.d"]]


def test_engine_top_level_holds_only_entry_points():
    assert sorted(p.name for p in ENGINE.glob("*.py")) == [
        "__init__.py",
        "chat.py",
        "errors.py",
        "evaluate.py",
        "report.py",
        "train.py",
    ]
    assert (ENGINE / "__init__.py").read_text().strip() == ""


def test_no_function_in_engine_is_longer_than_80_lines():
    long = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert long == []


def test_config_yaml_is_generated_from_the_schema():
    assert (REPO / "conf" / "config.yaml").read_text() == render_yaml(), (
        "conf/config.yaml differs from the schema: python -m engine.config.compose > conf/config.yaml"
    )


@pytest.mark.parametrize("key", ["parallel.tp", "parallel.pp", "optim.shard_state"])
def test_a_removed_key_is_one_line_naming_its_replacement(key):
    with pytest.raises(ConfigError, match=rf"^{key} is no longer a config key: .+"):
        compose_config([f"{key}=1"])
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"^{key} is no longer a config key"):
        build_config({section: {name: 2}})


def test_a_checkpoint_config_with_removed_keys_at_their_only_value_still_loads():
    values = dataclasses.asdict(TrainConfig())
    values["parallel"].update(tp=1, pp=1)
    values["optim"]["shard_state"] = False
    del values["kernels"]  # written before the kernel keys existed
    assert config_of_checkpoint(values) == TrainConfig()
    values["parallel"]["tp"] = 2
    with pytest.raises(ConfigError, match="parallel.tp"):
        config_of_checkpoint(values)


def test_kernel_keys_configure_the_kernels_and_are_recorded():
    from engine.training.runtime import configure_kernels
    from gptoss_kernels import gemm_configs

    cfg = compose_config(["kernels.autotune=true", "kernels.tma=true", "kernels.cache_dir="])
    assert dataclasses.asdict(cfg)["kernels"] == {
        "autotune": True,
        "persistent": False,
        "tma": True,
        "cache_dir": "",
    }  # what a checkpoint's meta.json records
    before = dict(gemm_configs._state)
    try:
        configure_kernels(cfg.kernels)
        assert (gemm_configs._state["autotune"], gemm_configs._state["tma"]) == (True, True)
        assert gemm_configs.cache_path() is None  # an empty folder: memory only
        configure_kernels(TrainConfig().kernels)
        assert not gemm_configs._state["autotune"] and gemm_configs.cache_path() is not None
    finally:
        gemm_configs._state.update(before)
