"""Recipes: every shipped one loads and validates; unknown keys, wrong types, aliases,
deep nesting and oversized files are one error each; the asdict form round-trips."""

import dataclasses
from pathlib import Path

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
    assert {"default", "agp90", "small", "smoke", "lenet300", "lenet5", "seed"
            } <= set(shipped_recipes())
    with pytest.raises(DeepzipError, match="shipped recipes: .*default"):
        recipe_path("no-such-recipe")


def test_the_default_holds_one_point_on_held_out_data_with_a_margin():
    """What `deepzip run` promises with no recipe named: the point is a budget checked on
    held-out data (the test images the shipped models never trained on), with a margin,
    and the sparsity is chosen with the sharing budget against it, not fixed."""
    recipe = load_recipe(recipe_path(None))
    assert recipe.name == "default" and recipe.max_loss == 1.0 and recipe.margin_se >= 1
    assert recipe.validation > 0 and recipe.validation_from == "test"
    assert recipe.prune.keep_steps and recipe.quantize.entropy_weight


@pytest.mark.parametrize("text,match", [
    ("name: x\nprune: {schedule: iterative, steps: [{method: percentile, amount: 0.5}]}\n"
     "bogus: 1\n", "unknown key"),
    ("prune: {schedule: iterative, steps: [{method: percentile, amount: 1.5}]}", r"\[0, 1\)"),
    ("prune: {schedule: iterative, steps: [{method: magic, amount: 0.5}]}", "method"),
    ("prune: {schedule: iterative, steps: [{method: percentile, amount: 0.5, epoch: 3}]}",
     "unknown key"),
    ("prune: {schedule: iterative, steps: []}", "needs prune.steps"),
    ("prune: {schedule: iterative, stop_over_budget: true, steps: [{amount: 0.5}]}",
     "stop_over_budget needs"),
    ("max_loss: 1\nprune: {schedule: agp, stop_over_budget: true, agp: {final: 0.5}}\n"
     "quantize: {entropy_weight: 10}", "stop_over_budget needs"),
    ("prune: {schedule: iterative, loss_share: 0, steps: [{amount: 0.5}]}", "loss_share"),
    ("prune: {schedule: iterative, stop_over_budget: 3, steps: [{amount: 0.5}]}",
     "stop_over_budget"),
    ("prune: {schedule: agp}", "needs a prune.agp"),
    ("prune: {schedule: none}\nquantize: {bits: 12}", "bits"),
    ("prune: {schedule: none}\nquantize: {bits: five}", "expected int"),
    ("prune: {schedule: none, train: {learning_rate: 0.1}}", "unknown training"),
    ("prune: {schedule: none}\nencode: {raw_dtype: float64}", "encode.raw_dtype must be one of"),
    ("prune: {schedule: none}\nencode: {codebook_dtype: int9}",
     "encode.codebook_dtype must be one of"),
    ("prune: {schedule: agp, agp: {final: 0.5, kernel_exponent: -2}}", "kernel_exponent"),
    ("prune: {schedule: none}\nquantize: {qat_epochs: -1}", "qat_epochs must be >= 0"),
    ("prune: {schedule: none}\nquantize: {sensitivity: hessian}",
     "sensitivity must be fisher or null"),
    ("prune: {schedule: none}\nquantize: {target_bits: 2}", "target_bits must be in"),
    ("prune: {schedule: none}\nquantize: {recluster_every: 0}", "recluster_every must be"),
    ("prune: {schedule: none}\nquantize: {qat_train: {lr: fast}}", "lr: expected float"),
    ("prune: [unclosed", "not valid YAML"),
    # the audit's cases: each refused before any work, with one line naming it
    ("prune: {schedule: none, train: {lr: fast}}", "lr: expected float"),
    ("prune: {schedule: none, train: {batch_size: big}}", "batch_size: expected int"),
    ("prune: {schedule: none, train: {milestones: 5}}", "milestones"),
    ("prune: {schedule: none, train: {warmup_epochs: .nan}}", "warmup_epochs"),
    ("prune: {schedule: none, train: {batch_size: 1.5}}", "batch_size: expected int"),
    ("seed: " + "9" * 5000, "cannot be read"),
    ("seed: 1267650600228229401496703205376", "out of range"),
    ("prune: {schedule: agp, agp: {sensitivity_max_drop: .nan}}", "finite"),
    ("a: &a [x, x]\nb: [*a, *a]", "anchors or aliases"),
    ("prune: " + "[" * 5000 + "]" * 5000, "deeper than"),
    ("eval_every: 1.5\n", "expected int"),
    ("colour: blue\n", "unknown key"),
])
def test_bad_recipes_fail_before_work(tmp_path, text, match):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(DeepzipError, match=match):
        load_recipe(p)


def test_binary_and_huge_recipes(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(DeepzipError, match="not UTF-8"):
        load_recipe(p)
    p.write_bytes(b"# " + b"x" * (2 << 20))
    with pytest.raises(DeepzipError, match="larger than any|over"):
        load_recipe(p)


def test_shipped_recipes_are_valid():
    files = sorted(Path("src/deepzip/recipes").glob("*.yaml"))
    assert {"seed", "default", "smoke"} <= {f.stem for f in files}
    for f in files:
        assert load_recipe(f).name == f.stem
    seed = load_recipe("recipes/seed.yaml")
    assert [s.amount for s in seed.prune.steps] == [0.5, 0.6, 0.64]
    assert seed.quantize.bits == 5


def test_entry_points_are_listed_and_need_consent():
    recipe = Recipe(task="pkg.data:make_task", arch="resnet20")
    assert recipe.entry_points() == {"task": "pkg.data:make_task"}
    with pytest.raises(DeepzipError, match="--allow-code"):
        recipe.check_code(False)
    recipe.check_code(True)
    recipe.check_code(False, given={"task"})  # named on the command line: the user's own


def test_every_recipe_key_has_a_meaning_and_the_readme_shows_them_all():
    """The README's recipe reference is generated from the dataclasses (python -m
    deepzip.recipe): a key added, renamed or given another default without the README
    following fails here."""
    import pathlib

    from deepzip import recipe

    text = recipe.reference()
    keys = {line.split("`")[1] for line in text.splitlines()[2:]}
    assert keys == set(recipe.HELP)
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- recipe-reference: begin -->\n")[1].split(
        "\n<!-- recipe-reference: end -->")[0]
    assert block == text
