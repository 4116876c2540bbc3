"""Names that moved keep working for one release, with a DeprecationWarning naming the new
home; the package's import graph has no circle and its format side needs no PyTorch."""

import ast
import pathlib

import pytest

import deepzip

MOVED = [
    ("deepzip.dzip", "save", "deepzip.dzip_torch", "save"),
    ("deepzip.dzip", "load_state", "deepzip.dzip_torch", "load_state"),
    ("deepzip.dzip", "inspect", "deepzip.dzip_torch", "info"),
    ("deepzip.dzip_torch", "inspect", "deepzip.dzip_torch", "info"),
    ("deepzip.models", "load_model", "deepzip.loading", "load_model"),
    ("deepzip.models", "ModelSpec", "deepzip.checkpoint", "ModelSpec"),
    ("deepzip.pipeline", "open_model", "deepzip.loading", "load_model"),
    ("deepzip.pipeline", "compress", "deepzip.api", "compress"),
    ("deepzip.pipeline", "verify", "deepzip.stages", "verify"),
    ("deepzip.pipeline", "run_folder", "deepzip.runfolder", "run_folder"),
    ("deepzip.quantize", "init_centroids", "deepzip.kmeans", "init_centroids"),
    ("deepzip.quantize", "train_centroids", "deepzip.qat", "train_centroids"),
    ("deepzip.report", "write_run_report", "deepzip.render", "write_run_report"),
]


@pytest.mark.parametrize(("old", "name", "new", "new_name"), MOVED)
def test_a_moved_name_still_works_and_says_where_it_went(old, name, new, new_name):
    import importlib

    with pytest.warns(DeprecationWarning, match=f"moved to {new}.{new_name}"):
        obj = getattr(importlib.import_module(old), name)
    assert obj is getattr(importlib.import_module(new), new_name)


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError):
        deepzip.models.no_such_thing  # noqa: B018


SRC = pathlib.Path(deepzip.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    """The package modules a module imports, anywhere in it (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepzip."):
            out.add(node.module.split(".")[1])
    return out - {"__init__"}


def test_the_import_graph_has_no_circle():
    graph = {p.stem: _imports(p) for p in SRC.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join([*path, m]))
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


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
    assert _imports(SRC / f"{module}.py") <= {"atomic", "codecs", "deprecated", "errors",
                                                "huffman"}


def test_every_public_name_and_module_of_the_lazy_table_resolves():
    """The package imports on first use: a name or module the table lists that no longer
    exists (deepzip.render did) is an AttributeError a user meets, caught here."""
    import importlib

    for name in deepzip.__all__:
        assert getattr(deepzip, name) is not None, name
    for module in deepzip._MODULES:
        assert getattr(deepzip, module) is importlib.import_module(f"deepzip.{module}")
    src = pathlib.Path(deepzip.__file__).parent
    listed = set(deepzip._MODULES) | {"__init__", "__main__", "version", "deprecated",
                                      "entrypoints"}
    assert {p.stem for p in src.glob("*.py")} <= listed  # every module reachable
