from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_recipe
from tlbuild.cli import app
from tlbuild.errors import RecipeError
from tlbuild.recipe import load_recipe


def test_minimal_recipe_fills_defaults_and_resolves_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    r = load_recipe(write_recipe(tmp_path / "recipes" / "demo.toml", '[data]\nroot = "../imgs"\n'))
    assert r.name == "demo"  # from the file name
    assert r.data.root == (tmp_path / "imgs").resolve()
    assert r.model.backbone == "tf_efficientnet_lite0" and r.model.weights == "imagenet"
    # One phase, every layer, one rate: docs/recipe.md "Why these defaults".
    (phase,) = r.train.phases
    assert phase.name == "finetune" and phase.unfreeze == "all" and phase.body_lr_mult == 1.0
    assert r.train.schedule == "onecycle" and r.train.label_smoothing == 0.0


def test_every_mistake_is_reported_with_key_value_and_expectation(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    text = """
[data]
root = "imgs"
balanse = "loss"
[model]
dropout = 1.5
[train]
batch_size = "big"
optimizer = "adam"
[[train.phases]]
name = "head"
epochs = 0
"""
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path / "r.toml", text))
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "data.balanse: unknown key" in msg
    assert "model.dropout" in msg and "1.5" in msg and "less than 1" in msg
    assert "train.batch_size" in msg and '"big"' in msg
    assert "train.optimizer" in msg and "'adamw'" in msg
    assert "train.phases.0.epochs" in msg


def test_missing_paths_and_layouts_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="`root` folder does not exist"):
        load_recipe(write_recipe(tmp_path / "a.toml", '[data]\nroot = "missing"\n'))
    (tmp_path / "t").mkdir()
    with pytest.raises(RecipeError, match="`train` and `val` go together"):
        load_recipe(write_recipe(tmp_path / "b.toml", '[data]\ntrain = "t"\n'))
    with pytest.raises(RecipeError, match="weights file does not exist"):
        load_recipe(
            write_recipe(tmp_path / "c.toml", '[data]\nroot = "t"\n[model]\nweights = "w.pth"\n')
        )
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write_recipe(tmp_path / "d.toml", "[data\nroot = 1"))


def test_ok_class_must_be_a_class_folder(tmp_path: Path) -> None:
    for c in ("good", "bad"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
    with pytest.raises(RecipeError, match="ok_class = 'ok' is not a class folder"):
        load_recipe(write_recipe(tmp_path / "r.toml", '[data]\nroot = "imgs"\nok_class = "ok"\n'))


def test_check_command_prints_resolved_recipe_and_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    good = write_recipe(tmp_path / "good.toml", '[data]\nroot = "imgs"\n')
    bad = write_recipe(tmp_path / "bad.toml", '[data]\nroot = "imgs"\n[trian]\n')
    runner = CliRunner()
    res = runner.invoke(app, ["check", str(good)])
    assert res.exit_code == 0, res.output
    assert (
        str((tmp_path / "imgs").resolve()) in res.output and '"label_smoothing": 0.0' in res.output
    )
    res = runner.invoke(app, ["check", str(bad)])
    assert res.exit_code == 2
    assert "trian: unknown key" in res.output
    assert "Traceback" not in res.output


def test_keys_accepting_several_forms_get_one_message_each(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    text = '[data]\nroot = "imgs"\nworkers = "many"\n[model]\npreprocess = { input_size = [224] }\n'
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path / "r.toml", text))
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "data.workers: expected int or literal['auto'] (given: \"many\")" in msg
    assert (
        "model.preprocess.input_size: expected int or tuple[int, int] or literal['auto'] "
        "(given: [224])" in msg
    )


def test_phase_lr_is_a_rate_or_auto(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    phase = '[data]\nroot = "imgs"\n[[train.phases]]\nname = "s"\nepochs = 1\nlr = {}\n'
    assert (
        load_recipe(write_recipe(tmp_path / "a.toml", phase.format('"auto"'))).train.phases[0].lr
        == "auto"
    )
    for bad, why in (('"fast"', "literal['auto']"), ("0", "between 0 and 10")):
        with pytest.raises(RecipeError) as e:
            load_recipe(write_recipe(tmp_path / "b.toml", phase.format(bad)))
        assert "train.phases.0.lr" in str(e.value) and why in str(e.value)


PHASES = """
[[train.{key}]]
name = "head"
epochs = 2
[[train.{key}]]
name = "all"
epochs = 0
unfreeze = "all"
"""


def test_train_stages_is_still_read_as_phases_with_a_notice(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    head = '[data]\nroot = "imgs"\n'
    fixed = PHASES.format(key="phases").replace("epochs = 0", "epochs = 1")
    new = load_recipe(write_recipe(tmp_path / "new.toml", head + fixed))
    old_path = write_recipe(tmp_path / "old.toml", head + fixed.replace("phases", "stages"))
    with pytest.warns(
        FutureWarning, match=r"\[\[train.stages\]\] is now \[\[train.phases\]\]"
    ) as w:
        old = load_recipe(old_path)
    # One notice, pointing at the recipe's first [[train.stages]] line.
    assert len(w) == 1 and w[0].filename == str(old_path) and w[0].lineno == 4
    assert old.train == new.train and [p.name for p in old.train.phases] == ["head", "all"]
    # Checkpoint fingerprints and cv fold keys hash the settings as they were before the rename.
    assert new.train.stable_json()["stages"][1]["name"] == "all"
    assert "phases" not in new.train.stable_json()
    # A mistake under the old key is reported under the key the recipe uses.
    with pytest.raises(RecipeError, match=r"train\.stages\.1\.epochs"):
        load_recipe(write_recipe(tmp_path / "bad.toml", head + PHASES.format(key="stages")))


def test_the_command_line_says_the_old_key_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    fixed = PHASES.format(key="stages").replace("epochs = 0", "epochs = 1")
    recipe = write_recipe(tmp_path / "old.toml", '[data]\nroot = "imgs"\n' + fixed)
    done = subprocess.run(
        [sys.executable, "-m", "tlbuild", "status", str(recipe)], capture_output=True, text=True
    )
    notices = [s for s in done.stderr.splitlines() if "train.stages" in s]
    assert notices == [
        f"{recipe}:4: notice: [[train.stages]] is now [[train.phases]] (a stage is a step of "
        "the build); the old name still works"
    ], done.stderr


def test_train_stages_and_train_phases_together_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    text = '[data]\nroot = "imgs"\n' + PHASES.format(key="phases") + PHASES.format(key="stages")
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path / "r.toml", text))
    assert "[[train.phases]] and [[train.stages]]" in str(e.value)


def test_name_defaults_to_a_safe_form_of_the_file_name(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    r = load_recipe(write_recipe(tmp_path / "prüfung 1.toml", '[data]\nroot = "imgs"\n'))
    assert r.name == "pr-fung-1"
