"""The package's layers as contracts (import-linter style), read from the source: a module
imports only from its own layer or those below it, never in a circle; the run and the
front doors reach the compression operations only through the stages (configs and
constants excepted); the format side needs no PyTorch. The README's "Layers" section
explains the order."""

import ast
import pathlib

import pytest

import deepzip

SRC = pathlib.Path(deepzip.__file__).parent

# bottom to top; a module may import its own layer and any below
LAYERS = [
    ("foundation", {"errors", "deprecated", "version", "entrypoints", "atomic", "checks"}),
    ("format", {"_huffman", "huffman", "codecs", "kmeans", "dzip"}),  # _huffman: C
    ("tensors", {"targets", "budget", "decide", "report", "onnx_pack", "normalization"}),
    ("models and data", {"models", "data", "task", "checkpoint", "dzip_torch"}),
    ("training", {"train"}),
    ("operations", {"obs", "prune", "quantize", "qat", "export", "loading"}),
    ("configuration", {"recipe", "runfolder"}),
    ("stages", {"stages"}),
    ("policies", {"context", "sparsity", "sharing"}),
    ("run", {"pipeline", "render"}),
    ("front doors", {"api", "cli", "__main__"}),
]
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
# what the run and the front doors reach only through deepzip.stages or the policies
OPERATIONS = {"obs", "prune", "quantize", "qat", "kmeans", "targets", "huffman", "codecs", "dzip"}
THROUGH_STAGES = {"pipeline", "api", "cli", "render"}


def _imports(path: pathlib.Path) -> dict[str, set[str]]:
    """The package modules a module imports, anywhere in it (lazy and TYPE_CHECKING
    imports included), each with the names it takes (``*`` for the module itself)."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.setdefault(node.module.split(".")[0], set()).update(
                    a.name for a in node.names)
            else:
                for a in node.names:
                    out.setdefault(a.name, set()).add("*")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepzip."):
            out.setdefault(node.module.split(".")[1], set()).update(a.name for a in node.names)
    out.pop("__init__", None)
    return out


GRAPH = {p.stem: _imports(p) for p in SRC.glob("*.py") if p.stem != "__init__"}
GRAPH |= {p.stem: {} for p in SRC.glob("*.c")}  # compiled modules import no Python


def upward(graph: dict[str, dict[str, set[str]]]) -> dict[str, list[str]]:
    """Per module, what it imports from a layer above its own."""
    found = {mod: sorted(m for m in deps if LAYER[m] > LAYER[mod]) for mod, deps in graph.items()}
    return {k: v for k, v in found.items() if v}


def skipped(graph: dict[str, dict[str, set[str]]]) -> dict[str, list[str]]:
    """Per module that must go through the stages, the operations' functions (or whole
    modules) it reaches for directly: configs and constants are allowed."""
    found = {mod: sorted(f"{m}.{n}" for m, names in graph[mod].items() if m in OPERATIONS
                         for n in names if n == "*" or not (n.isupper() or n.endswith("Config")))
             for mod in THROUGH_STAGES if mod in graph}
    return {k: v for k, v in found.items() if v}


def circle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One import circle, as the path around it, or None."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        if state.get(m) == 1:
            return [*path[path.index(m):], m]
        if state.get(m) == 2 or m not in graph:
            return None
        state[m] = 1
        for n in sorted(graph[m]):
            if (found := visit(n, [*path, m])) is not None:
                return found
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if (c := visit(m, [])) is not None), None)


def test_every_module_has_a_layer():
    assert set(GRAPH) == set(LAYER), "place a new module in LAYERS (and the README)"


def test_no_module_imports_a_higher_layer():
    assert upward(GRAPH) == {}


def test_the_run_and_the_front_doors_go_through_the_stages():
    """pipeline, api, cli and render call deepzip.stages (or the policies), not the
    pruning, sharing and coding operations under them; they may name those modules'
    config dataclasses and constants (a recipe's or a flag's settings)."""
    assert skipped(GRAPH) == {}


def test_the_import_graph_has_no_circle():
    assert circle(GRAPH) is None


def test_a_breach_of_each_contract_is_caught():
    """The checks fail on the breaches they are for: an upward import, an operation
    reached past the stages, a circle (a test that cannot fail proves nothing)."""
    graph = {**GRAPH, "prune": {**GRAPH["prune"], "stages": {"share"}},
             "cli": {**GRAPH["cli"], "quantize": {"quantize_", "QuantizeConfig", "INITS"}}}
    assert upward(graph) == {"prune": ["stages"]}
    assert skipped(graph) == {"cli": ["quantize.quantize_"]}
    assert circle(graph) == ["prune", "stages", "prune"]


@pytest.mark.parametrize("module", ["dzip", "codecs", "huffman", "kmeans"])
def test_the_numpy_side_imports_no_torch(module):
    """The format and k-means stay usable without PyTorch (the test of read_arrays with
    torch blocked runs the decoder itself)."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert "torch" not in names
    assert set(GRAPH[module]) <= {"_huffman", "atomic", "codecs", "deprecated", "errors",
                                  "huffman"}


def test_no_function_is_over_80_lines():
    """A function a reader can hold in view: the longest ones were split into helpers
    that say what each part is for."""
    long = [f"{p.stem}.{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in sorted(SRC.glob("*.py")) for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_the_pipeline_module_stays_small():
    """The run's policies live in units of their own (context, sparsity, sharing); the
    pipeline only composes them."""
    assert len((SRC / "pipeline.py").read_text().splitlines()) < 300
