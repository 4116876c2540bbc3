"""Recipes: every shipped one loads and validates; unknown keys, wrong types, aliases,
deep nesting and oversized files are one error each; the asdict form round-trips."""

import dataclasses

import pytest

from deepzip.errors import DeepzipError
from deepzip.recipe import Recipe, load_recipe, recipe_path, shipped_recipes


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_loads_and_round_trips(name):
    recipe = load_recipe(recipe_path(name))
    assert recipe.name == name
    again = Recipe.from_dict(dataclasses.asdict(recipe))
    assert dataclasses.asdict(again) == dataclasses.asdict(recipe)


def test_shipped_names_cover_the_folder():
    assert {"default", "small", "smoke", "lenet300", "lenet5", "seed"} <= set(shipped_recipes())
    with pytest.raises(DeepzipError, match="shipped recipes: default"):
        recipe_path("no-such-recipe")


@pytest.mark.parametrize("text,match", [
    ("colour: blue\n", "unknown key"),
    ("seed: fast\n", "expected int"),
    ("prune: {schedule: sometimes}\n", "prune.schedule"),
    ("quantize: {bits: 12}\n", "bits"),
    ("a: &x [1]\nb: *x\n", "anchors"),
    ("prune: " + "[" * 40 + "]" * 40 + "\n", "nests"),
    ("name: [unclosed\n", "not valid YAML"),
    ("eval_every: 1.5\n", "expected int"),
])
def test_bad_recipes_are_one_error_naming_the_key(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(DeepzipError, match=match):
        load_recipe(path)


def test_a_huge_recipe_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(DeepzipError, match="larger than any recipe"):
        load_recipe(path)


def test_entry_points_are_listed_and_need_consent():
    recipe = Recipe(task="pkg.data:make_task", arch="resnet20")
    assert recipe.entry_points() == {"task": "pkg.data:make_task"}
    with pytest.raises(DeepzipError, match="--allow-code"):
        recipe.check_code(False)
    recipe.check_code(True)
    recipe.check_code(False, given={"task"})  # named on the command line: the user's own
