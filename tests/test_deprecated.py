"""Names that moved keep working for one release, with a DeprecationWarning naming the new
home, and every name and module of the package's lazy table resolves."""

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
    ("deepzip.pipeline", "UNSHARED_DTYPE", "deepzip.sharing", "UNSHARED_DTYPE"),
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


def test_file_info_still_reads_as_a_mapping_with_a_warning(tmp_path):
    """deepzip.info returned a dict before 0.5; indexing the FileInfo still works, warned."""
    from deepzip.models import get

    deepzip.save(get("lenet300"), tmp_path / "m.dzip")
    sizes = deepzip.info(tmp_path / "m.dzip")
    with pytest.warns(DeprecationWarning, match=r"use \.real_ratio"):
        assert sizes["real_ratio"] == sizes.real_ratio


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError):
        deepzip.models.no_such_thing  # noqa: B018


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
