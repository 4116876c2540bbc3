"""Hostile inputs for every reader, on fixed seeds (bench/fuzz.py runs 10,000+ each):
no exception but the reader's own error, and no allocation beyond a bound proportional to
what the input legitimately declares. See tests/hostile.py for the generators."""

from pathlib import Path

import pytest
import yaml
from hostile import dzip_bases, fuzz_cifar, fuzz_dzip, fuzz_mnist, fuzz_recipes, fuzz_specs


def _clean(outcome, what):
    assert outcome.inputs > 0
    assert not outcome.unexpected, outcome.line(what) + "\n" + "\n".join(outcome.unexpected[:10])
    assert not outcome.over_bound, outcome.line(what) + "\n" + "\n".join(outcome.over_bound[:10])


def test_dzip_header_mutations(tmp_path):
    out = fuzz_dzip(dzip_bases(tmp_path), 300, seed=1, tmp=tmp_path)
    _clean(out, "dzip")
    assert out.refused > out.inputs // 2  # the mutations reach the checks


def test_cifar_batches_built_from_allowed_pieces(tmp_path):
    _clean(fuzz_cifar(400, seed=2, tmp=tmp_path), "cifar")


def test_mnist_idx_files(tmp_path):
    _clean(fuzz_mnist(300, seed=3, tmp=tmp_path), "mnist")


@pytest.fixture(scope="module")
def recipe_bases():
    folder = Path(__file__).resolve().parents[1] / "src" / "deepzip" / "recipes"
    return [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))]


@pytest.mark.slow
def test_recipe_mutations(tmp_path, recipe_bases):
    out = fuzz_recipes(recipe_bases, 400, seed=4, tmp=tmp_path)
    _clean(out, "recipes")
    assert out.accepted > 0 and out.refused > 0


def test_recorded_specs_import_nothing(tmp_path):
    """Recorded arch and task values naming code (this:s, pdb:set_trace, tempfile:mkdtemp,
    ...) in checkpoints and .dzip files: refused or ignored, never imported or called."""
    out = fuzz_specs(300, seed=5, tmp=tmp_path)
    _clean(out, "specs")
    assert out.refused > out.inputs // 2


@pytest.mark.slow
def test_every_command_that_writes_against_every_kind_of_output(tmp_path, data_root):
    from hostile import fuzz_outputs, output_commands

    inputs = tmp_path / "in"
    inputs.mkdir()
    out = fuzz_outputs(output_commands(inputs, data_root), tmp_path)
    _clean(out, "outputs")
    assert out.refused and out.accepted
