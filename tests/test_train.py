from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from tests.conftest import run_stage, small_recipe, tiny_recipe, write_recipe
from tlbuild.recipe import TrainConfig, load_recipe
from tlbuild.train.metrics import classification_metrics
from tlbuild.train.optim import lr_factor


def test_metrics_escape_and_false_reject_rates() -> None:
    classes = ["crack", "ok", "scratch"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 1, 1, 0, 1])
    m = classification_metrics(y_true, y_pred, classes, ok_class="ok")
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion_matrix"]["rows_true_cols_pred"] == [[2, 1, 1], [1, 4, 0], [0, 1, 0]]
    assert m["escapes"] == 2 and m["escape_rate"] == pytest.approx(2 / 5)  # defects called ok
    assert m["false_rejects"] == 1 and m["false_reject_rate"] == pytest.approx(1 / 5)
    assert m["per_class"]["ok"]["precision"] == pytest.approx(4 / 6)
    assert m["per_class"]["crack"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["scratch"]["f1"] == 0.0


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "constant"])
def test_schedules_warm_up_then_decay(kind: str) -> None:
    f = [lr_factor(s, 100, 10, kind) for s in range(100)]
    assert f[0] < 0.2 and max(f) == pytest.approx(1.0, abs=0.02)
    if kind != "constant":
        assert f[-1] < 0.05 and f[50] > f[90]


def test_train_writes_model_history_metrics_and_plots(tiny_build: Path) -> None:
    for name in (
        "model.pt",
        "history.csv",
        "metrics.json",
        "training_curves.png",
        "confusion_val.png",
        "splits.json",
        "checkpoints/last.pt",
    ):
        assert (tiny_build / name).is_file(), name
    rows = list(csv.DictReader((tiny_build / "history.csv").open()))
    assert [r["stage"] for r in rows] == ["head", "finetune"]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_acc", "lr_head", "lr_body", "seconds"}
    assert float(rows[0]["lr_body"]) == 0.0 and float(rows[1]["lr_body"]) > 0.0
    m = json.loads((tiny_build / "metrics.json").read_text())
    assert 0.0 <= m["val"]["accuracy"] <= 1.0 and m["val"]["images"] == 8
    assert {"escape_rate", "false_reject_rate"} <= set(m["val"])
    assert set(m["val"]["per_class"]) == {"crack", "ok", "scratch", "spot"}


def test_holdout_images_are_kept_out_of_training_and_recorded(
    tiny_data: Path, tmp_path: Path
) -> None:
    from tests.conftest import TINY_TRAIN
    from tlbuild.data.splits_file import read_split

    rest = TINY_TRAIN.format(head=1, ft=1)
    recipe = load_recipe(small_recipe(tmp_path, tiny_data, "held", rest, data_extra="holdout = 8"))
    out = run_stage("train", recipe, Console(quiet=True))
    assert out.splits.counts()["holdout"] == {c: 2 for c in out.splits.classes}
    assert out.splits.counts()["train"] == {c: 4 for c in out.splits.classes}
    held = read_split(recipe.out_dir, "holdout")
    assert {s.path for s in held} == {s.path for s in out.splits.holdout}
    assert not {s.path for s in held} & {s.path for s in read_split(recipe.out_dir, "train")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_training_is_reproducible_and_resume_matches_uninterrupted(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet = Console(quiet=True)
    a = load_recipe(tiny_recipe(tmp_path / "a", tiny_data, head=1, ft=2))
    b = load_recipe(tiny_recipe(tmp_path / "b", tiny_data, head=1, ft=2))
    run_stage("train", a, quiet)
    run_stage("train", b, quiet)
    wa, wb = _weights(a.out_dir / "model.pt"), _weights(b.out_dir / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # Interrupt a third run after its second epoch (mid second phase), then resume it.
    c = load_recipe(tiny_recipe(tmp_path / "c", tiny_data, head=1, ft=2))
    from tlbuild.train import trainer

    real_save = trainer.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kw):  # noqa: ANN002, ANN003
        real_save(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", c, quiet)
    assert not (c.out_dir / "model.pt").exists()
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    run_stage("train", c, quiet, resume=True)
    wc = _weights(c.out_dir / "model.pt")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    hist = (c.out_dir / "history.csv").read_text().splitlines()
    assert len(hist) == 1 + 3


def test_resume_refuses_a_changed_recipe(tiny_build: Path) -> None:
    from tlbuild.errors import UsageError

    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    changed = recipe.model_copy(update={"train": TrainConfig(batch_size=4)})
    with pytest.raises(UsageError, match="another recipe"):
        run_stage("train", changed, Console(quiet=True), resume=True)


def test_checkpoint_loads_with_weights_only(tiny_build: Path) -> None:
    ckpt = tiny_build / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["fingerprint"] and len(saved["history"]) == 2
    assert saved["best"]["state"] is not None and saved["optimizer"] is not None
    assert all(isinstance(v, torch.Tensor) for v in saved["model"].values())
    # The keys from before fine-tuning's steps were called phases: older checkpoints resume.
    assert {"stage", "epoch_in_stage", "stage_best", "stage_done", "stage_lr"} <= set(saved)


def test_resume_from_a_damaged_checkpoint_is_a_usage_error(
    tiny_build: Path, tmp_path: Path
) -> None:
    from tlbuild.errors import UsageError
    from tlbuild.train.checkpoint import read_checkpoint

    good = tiny_build / "checkpoints" / "last.pt"
    fingerprint = torch.load(good, map_location="cpu", weights_only=True)["fingerprint"]
    bad = tmp_path / "last.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(UsageError, match="cannot be read as a training checkpoint"):
        read_checkpoint(bad, fingerprint)
    torch.save({"fingerprint": fingerprint, "model": {}}, bad)  # right recipe, no state
    with pytest.raises(UsageError, match="cannot be read as a training checkpoint"):
        read_checkpoint(bad, fingerprint)


@pytest.mark.parametrize("balance", ["sampler", "loss"])
def test_explicit_layout_with_test_split_and_balancing(
    tiny_data: Path, tmp_path: Path, balance: str
) -> None:
    import shutil

    for split in ("train", "val", "test"):
        shutil.copytree(tiny_data, tmp_path / split)
    for extra in list((tmp_path / "train" / "ok").glob("*.jpg"))[:5]:
        extra.unlink()  # make the training classes unequal
    text = f"""
output_dir = "out"
[data]
train = "train"
val = "val"
test = "test"
balance = "{balance}"
ok_class = "ok"
[model]
preprocess = {{ input_size = 48, resize = "resize" }}
[train]
batch_size = 8
[[train.phases]]
name = "head"
epochs = 1
"""
    recipe = load_recipe(write_recipe(tmp_path / "explicit.toml", text))
    out = run_stage("train", recipe, Console(quiet=True))
    assert out.splits.counts()["train"]["ok"] == 3
    assert out.metrics["test"]["images"] == 32 and "escape_rate" in out.metrics["test"]
    assert (recipe.out_dir / "confusion_test.png").is_file()


def test_default_recipe_fine_tunes_everything_and_reports_what_it_bought(
    tiny_data: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from tlbuild.cli import app

    path = small_recipe(tmp_path, tiny_data, "defaults")
    recipe = load_recipe(path)
    (phase,) = recipe.train.phases
    assert phase.unfreeze == "all" and phase.body_lr_mult == 1.0
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 0, res.output
    assert "Head alone on frozen pretrained features (linear probe)" in res.output
    m = json.loads((recipe.out_dir / "metrics.json").read_text())
    assert m["head_only"]["source"] == "linear probe on the frozen pretrained body"
    assert (
        "fine-tuning the body" in res.output and f"{m['head_only']['accuracy']:.1%}" in res.output
    )
    rows = list(csv.DictReader((recipe.out_dir / "history.csv").open()))
    assert {r["stage"] for r in rows} == {"finetune"} and 1 <= len(rows) <= phase.epochs
    assert float(rows[0]["lr_body"]) == pytest.approx(float(rows[0]["lr_head"]))


def test_head_only_phase_is_reported_as_such(tiny_build: Path) -> None:
    m = json.loads((tiny_build / "metrics.json").read_text())
    assert m["head_only"]["source"] == "stage 'head', body frozen"
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert manifest["training"]["head_only"]["accuracy"] == m["head_only"]["accuracy"]


def test_linear_probe_head_init_is_where_fine_tuning_starts(
    tiny_data: Path, tmp_path: Path
) -> None:
    path = tiny_recipe(tmp_path, tiny_data, head=1, ft=1)
    path.write_text(path.read_text().replace("[train]\n", '[train]\nhead_init = "probe"\n'))
    recipe = load_recipe(path)
    console = Console(record=True, width=200)
    out = run_stage("train", recipe, console)
    assert "fine-tuning starts from it" in console.export_text()
    assert out.result.probe is not None and 0.0 <= out.result.probe["accuracy"] <= 1.0


def test_resume_with_probe_and_auto_lr_matches_uninterrupted(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.train import trainer

    def recipe(name: str):  # noqa: ANN202
        rest = """
[train]
batch_size = 8
lr_find_steps = 10
early_stopping = { patience = 5 }
[[train.phases]]
name = "all"
epochs = 2
lr = "auto"
unfreeze = "all"
"""
        return load_recipe(small_recipe(tmp_path, tiny_data, name, rest))

    quiet = Console(quiet=True)
    a = run_stage("train", recipe("a"), quiet)
    real_save = trainer.save_checkpoint

    def save_then_die(*args, **kw):  # noqa: ANN002, ANN003
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    c = recipe("c")
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", c, quiet)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    resumed = run_stage("train", c, quiet, resume=True)
    assert resumed.result.lr_find[0]["chosen"] == a.result.lr_find[0]["chosen"]
    assert resumed.result.probe is not None and a.result.probe is not None
    assert resumed.result.probe["accuracy"] == a.result.probe["accuracy"]
    wa = _weights(tmp_path / "out" / "a" / "model.pt")
    wc = _weights(c.out_dir / "model.pt")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_rich_events_print_the_training_lines_and_silent_events_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    from tlbuild.recipe import PhaseConfig
    from tlbuild.train.events import RichEvents, SilentEvents

    buf = io.StringIO()
    row = {"epoch": 0, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.75}
    for events in (RichEvents(Console(file=buf, width=200)), SilentEvents()):
        with events.live():  # transient bars: nothing of them stays
            events.on_task_start("head 1/1", 2)
            events.on_task_step("loss 1.000 3.0 img/s")
            events.on_task_step()
            events.on_task_end()
        events.on_phase_start(0, 2, PhaseConfig(name="head", epochs=1), 5124, (3e-3, 3e-4))
        events.on_epoch_end("head", {**row, "seconds": 1.5}, True)
        events.on_early_stop(3)
    # A bar's display leaves at most an empty line on a console that is not a terminal; the
    # phase name in brackets is text, not rich markup.
    assert [line for line in buf.getvalue().splitlines() if line] == [
        "Phase 1/2 'head': 5,124 trainable parameters, head lr 0.003, body lr 0.0003",
        "  epoch  1 [head] train loss 1.0000 acc 0.500 | val loss 0.9000 acc 0.750 | 1.5s best",
        "  early stop: no val-loss improvement for 3 epoch(s)",
    ]
    assert capsys.readouterr() == ("", "")
