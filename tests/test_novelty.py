from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tests.conftest import run_stage
from tlbuild.errors import UsageError
from tlbuild.novelty.score import NoveltyModel, conformal_threshold, ledoit_wolf
from tlbuild.recipe import NoveltyConfig, load_recipe


def test_ledoit_wolf_matches_scikit_learn() -> None:
    from sklearn.covariance import LedoitWolf

    x = np.random.default_rng(0).standard_normal((40, 12)) @ np.diag(np.arange(1, 13))
    mean, cov = ledoit_wolf(x)
    want = LedoitWolf().fit(x)
    np.testing.assert_allclose(mean, want.location_, rtol=1e-10)
    np.testing.assert_allclose(cov, want.covariance_, rtol=1e-8)


def test_conformal_threshold_flags_at_most_the_target_share() -> None:
    scores = np.arange(1, 201, dtype=float)  # 200 validation images
    t, flagged = conformal_threshold(scores, 0.05)
    # Above the ceil(201 * 0.95) = 191st score, halfway to the next: no image sits on it.
    assert t == 191.5 and flagged == pytest.approx(0.045)
    # Too few images for the target: above the largest score, nothing flagged on validation.
    t, flagged = conformal_threshold(scores[:50], 0.01)
    assert t == 50.5 and flagged == 0.0


def test_the_score_is_far_for_shifted_images_and_survives_a_save(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layout = [{"name": "wide", "width": 300}, {"name": "narrow", "width": 8}]
    train = rng.standard_normal((120, 308))
    model = NoveltyModel.fit(train, layout)
    assert model.blocks[0].projection is not None  # wider than the images can estimate
    assert model.blocks[1].projection is None
    val = rng.standard_normal((100, 308))
    model.standardise_on(val)
    z = model.block_z(val)
    assert z.mean(0) == pytest.approx([0.0, 0.0], abs=1e-9)
    assert z.std(0) == pytest.approx([1.0, 1.0])
    model.threshold, _ = conformal_threshold(model.scores(val), 0.01)
    shifted = rng.standard_normal((50, 308))
    shifted[:, 300:] += 4.0  # only the narrow block moves: the largest block decides
    assert model.flags(shifted).mean() > 0.9 and model.flags(val).mean() <= 0.01
    model.save(tmp_path / "n.npz")
    back = NoveltyModel.load(tmp_path / "n.npz")
    np.testing.assert_allclose(back.scores(shifted), model.scores(shifted), rtol=1e-4)
    assert back.threshold == pytest.approx(model.threshold)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(UsageError, match=r"cannot read .*bad.npz"):
        NoveltyModel.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("bad", [0.0, 0.5, -0.1, "on"])
def test_novelty_target_is_a_share_or_off(bad: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        NoveltyConfig(target=bad)
    assert NoveltyConfig(target="off").target == "off"


def _frames(folder: Path, val: list[Path]) -> None:
    """Validation images as they are, and the same images dark and as flat grey frames."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(val):
        img = Image.open(p).convert("RGB")
        for kind, made in (
            ("val", img),
            ("dark", Image.fromarray((np.asarray(img) * 0.05).astype(np.uint8))),
            ("grey", Image.new("RGB", img.size, (128, 128, 128))),
        ):
            made.save(folder / f"{kind}_{i}.png")


def test_the_build_fits_the_score_and_classify_flags_what_it_was_not_built_for(
    tiny_build: Path, tmp_path: Path
) -> None:
    import pandas as pd
    from typer.testing import CliRunner

    from tlbuild.cli import app

    man = json.loads((tiny_build / "manifest.json").read_text())
    n = man["novelty"]
    assert n["file"] == "novelty.npz" and "novelty.npz" in man["artifacts"]
    assert n["val"]["flagged"] <= 0.02 and set(n["probe"]["flagged"]) >= {"dark", "out_of_focus"}
    # Every shipped variant was compared with FP32 on validation and the probe.
    assert set(n["artifacts"]) == {"model.fp16.onnx", "model.int8.trt.onnx", "model.int8.cpu.onnx"}
    report = (tiny_build / "report.md").read_text()
    assert "## Novelty" in report and "novelty.png" in report
    assert (tiny_build / "novelty.png").is_file() and (
        tiny_build / "novelty_most_novel.png"
    ).is_file()
    # Agreement is reported, and gated only where the recipe asks (next test).
    assert all(0.0 <= a["agreement"] <= 1.0 and a["met"] for a in n["artifacts"].values())
    gates = json.loads((tiny_build / "gates.json").read_text())["gates"]
    assert not any(g["gate"].startswith("novelty.") for g in gates)

    val = [Path(p) for p, _ in json.loads((tiny_build / "splits.json").read_text())["val"][:8]]
    _frames(tmp_path / "images", val)
    out = tmp_path / "res.parquet"
    cli = CliRunner()

    def classify(results: Path, *extra: str):  # noqa: ANN202 - typer's Result
        args = [str(tmp_path / "images"), "--model", str(tiny_build), "--out", str(results)]
        return cli.invoke(app, ["classify", *args, *extra])

    res = classify(out, "--artifact", "model.onnx")
    assert res.exit_code == 0, res.output
    assert "Novelty threshold" in res.output and "Flagged for review" in res.output
    df = pd.read_parquet(out).set_index("path")
    kind = df.index.map(lambda p: Path(p).name.split("_")[0])
    # A dead light and a flat frame are flagged; what validation looks like mostly is not.
    assert df[kind == "dark"].novel.all() and df[kind == "grey"].novel.all()
    assert df[kind == "val"].novel.mean() <= 0.25
    flagged = df[df.novel]
    # A flagged image is never a good part, and its decision says why.
    assert flagged.defective.all() and flagged.decided_by.str.startswith("novelty>").all()
    assert df.novelty.notna().all()

    # Resuming with another threshold is refused; --novelty off writes no score.
    other = classify(out, "--artifact", "model.onnx", "--novelty", "1e9")
    assert other.exit_code == 2 and "novelty_threshold" in other.output
    off = tmp_path / "off.parquet"
    res = classify(off, "--novelty", "off")
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(off)
    assert df.novelty.isna().all() and df.novel.isna().all()
    assert not df.decided_by.str.startswith("novelty").any()
    bad = classify(tmp_path / "x.parquet", "--novelty", "high")
    assert bad.exit_code == 2 and "--novelty 'high'" in bad.output


def test_novelty_off_skips_the_stage_and_a_threshold_and_gates_follow_the_recipe(
    tiny_build: Path, tmp_path: Path
) -> None:
    from tlbuild.gates import evaluate_gates
    from tlbuild.runner import find_stage

    out = tmp_path / "nov"
    shutil.copytree(tiny_build, out)
    base = load_recipe(tiny_build.parent.parent / "tiny.toml")
    recipe = base.model_copy(
        update={"output_dir": tmp_path, "name": "nov", "novelty": NoveltyConfig(target="off")}
    )
    assert find_stage("novelty").disabled(recipe) == 'novelty.target = "off"'
    # A looser target flags more of validation; the probe gate is measured and can fail.
    cfg = NoveltyConfig(target=0.45, min_faults_flagged=1.0, min_agreement=0.5)
    recipe = recipe.model_copy(update={"novelty": cfg})
    entry = run_stage("novelty", recipe, Console(quiet=True))
    assert entry["target"] == 0.45 and entry["val"]["flagged"] > 0.0
    man = json.loads((out / "manifest.json").read_text())
    assert man["novelty"]["threshold"] == entry["threshold"]
    assert man["artifacts"]["novelty.npz"]["stage"] == "novelty"
    gates = {g.gate: g for g in evaluate_gates(recipe.gates, out)}
    probe = gates["novelty.min_faults_flagged[model.onnx]"]
    assert probe.threshold == 1.0 and probe.measured == entry["probe"]["faults_flagged"]
    agreement = [g for k, g in gates.items() if k.startswith("novelty.min_agreement[")]
    assert len(agreement) == 3 and all(g.threshold == 0.5 for g in agreement)
    assert all(g.status == ("passed" if g.measured >= 0.5 else "failed") for g in agreement)


def test_classify_warns_of_drift_on_a_half_faulty_folder_and_keeps_each_runs_figures(
    tiny_build: Path, tmp_path: Path
) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from tlbuild.cli import app

    val = [Path(p) for p, _ in json.loads((tiny_build / "splits.json").read_text())["val"]]
    same, half = tmp_path / "same", tmp_path / "half"
    same.mkdir(), half.mkdir()
    for i in range(120):  # validation's images again: no drift
        img = Image.open(val[i % len(val)]).convert("RGB")
        img.save(same / f"{i:03d}.png")
        if i % 2:  # every other one from a station whose light failed
            img = Image.fromarray((np.asarray(img) * 0.05).astype(np.uint8))
        img.save(half / f"{i:03d}.png")
    cli = CliRunner()
    args = ["--model", str(tiny_build), "--artifact", "model.onnx"]
    res = cli.invoke(app, ["classify", str(same), *args, "--out", str(tmp_path / "same.parquet")])
    assert res.exit_code == 0, res.output
    assert "Drift against validation" in res.output and "drift:" not in res.output
    out = tmp_path / "half.parquet"
    res = cli.invoke(app, ["classify", str(half), *args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "drift: novelty drifted from validation's" in said
    assert "drift: brightness drifted from validation's" in said
    (run,) = json.loads((tmp_path / "half.parquet.runs.json").read_text())
    d = run["drift"]
    assert run["rows"] == 120 and d["judged"] and d["brightness"]["psi"] > 0.25
    assert d["brightness"]["median"] < d["brightness"]["reference_median"]
    import pandas as pd

    df = pd.read_parquet(out)
    dark = df.path.map(lambda p: int(Path(p).stem) % 2 == 1)
    assert df[dark].brightness.max() < df[~dark].brightness.min()
    # A second run on the same results adds its own record.
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        Image.open(val[i]).convert("RGB").save(more / f"m{i}.png")
    res = cli.invoke(app, ["classify", str(more), *args, "--out", str(out)])
    assert res.exit_code == 0 and "too few images to judge" in " ".join(res.output.split())
    runs = json.loads((tmp_path / "half.parquet.runs.json").read_text())
    assert [r["rows"] for r in runs] == [120, 3] and not runs[1]["drift"]["judged"]


def test_select_picks_flagged_images_first_spread_out_for_a_labeller(
    tiny_build: Path, tmp_path: Path
) -> None:
    import csv

    import pandas as pd
    from PIL import Image
    from typer.testing import CliRunner

    from tlbuild.classify.select import spread_out
    from tlbuild.cli import app

    # The spread: after the top pick, the farthest point, not the next copy of the same one.
    v = np.array([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0], [0.02, 0.0]])
    assert spread_out([0, 1, 3, 2], [0, 0, 0, 0], v, 2) == [0, 2]
    assert spread_out([0, 1, 2, 3], [0, 0, 1, 1], v, 3) == [0, 1, 2]  # a tier is used up first

    val = [Path(p) for p, _ in json.loads((tiny_build / "splits.json").read_text())["val"]]
    images = tmp_path / "in"
    images.mkdir()
    for i, p in enumerate(val):
        img = Image.open(p).convert("RGB")
        img.save(images / f"v{i}.png")
        Image.new("RGB", img.size, (10 * i, 0, 0)).save(images / f"flat{i}.png")
    cli = CliRunner()
    out = tmp_path / "res.parquet"
    res = cli.invoke(app, ["classify", str(images), "--model", str(tiny_build), "--out", str(out)])
    assert res.exit_code == 0, res.output
    flagged = int(pd.read_parquet(out).novel.sum())
    assert flagged >= len(val)  # the flat frames at least
    n = flagged + 2
    pick = tmp_path / "pick"
    res = cli.invoke(app, ["select", str(out), "--model", str(tiny_build), "--n", str(n),
                           "--out", str(pick)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((pick / "selection.csv").open()))
    assert len(rows) == n and [r["rank"] for r in rows] == [str(i) for i in range(1, n + 1)]
    assert all(r["reason"].startswith("novel") for r in rows[:flagged])
    assert not any(r["reason"].startswith("novel") for r in rows[flagged:])
    for r in rows:  # a labeller opens the links
        link = pick / r["file"]
        assert link.is_symlink() and link.resolve() == Path(r["path"]).resolve()
    again = cli.invoke(app, ["select", str(out), "--model", str(tiny_build), "--out", str(pick)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_a_broken_feature_is_flagged_and_a_spreadless_validation_split_is_floored() -> None:
    rng = np.random.default_rng(1)
    layout = [{"name": "a", "width": 6}]
    model = NoveltyModel.fit(rng.standard_normal((80, 6)), layout)
    same = np.repeat(rng.standard_normal((1, 6)), 5, axis=0)  # validation without spread
    model.standardise_on(same)
    assert all(b.spread == 0.1 for b in model.blocks)  # floored: a factor 1.1 in distance
    model.threshold = 3.0
    like_training = rng.standard_normal((200, 6))
    assert np.isfinite(model.scores(like_training)).all()
    broken = like_training[:3].copy()
    broken[0, 0], broken[1, 0] = np.inf, np.nan  # an FP16 overflow, a NaN
    flags = model.flags(broken)
    assert flags[0] and flags[1]  # never passed because NaN > threshold is False
    assert np.isinf(model.scores(broken)[:2]).all()


def test_select_starts_each_tier_at_its_top_priority() -> None:
    from tlbuild.classify.select import spread_out

    v = np.array([[0.0, 0.0], [0.0, 0.1], [9.0, 9.0]])
    # After the novel image (tier 0), the nearest to the decision (index 1) comes first,
    # though index 2 is farther from it.
    assert spread_out([0, 1, 2], [0, 1, 1], v, 2) == [0, 1]
