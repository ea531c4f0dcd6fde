"""[decision]: a threshold on p(ok) chosen for an escape or false-reject target, with Wilson
intervals, recorded in the manifest, gated, reported, and applied by `tlbuild classify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_recipe
from rich.console import Console
from typer.testing import CliRunner

from tlbuild import runner
from tlbuild.cli import app
from tlbuild.decision.evaluate import choice_entry
from tlbuild.decision.operating_point import (
    Target,
    choose,
    counts_at,
    curve,
    images_for_upper_bound,
    threshold_in,
    wilson,
)
from tlbuild.errors import RecipeError
from tlbuild.gates import evaluate_gates
from tlbuild.manifest import write_section
from tlbuild.recipe import DecisionConfig, GatesConfig, load_recipe
from tlbuild.runtime.base import softmax

# Hand-made validation set: p(ok) per image, and whether it is an ok part.
P_OK = np.array([0.05, 0.10, 0.30, 0.45, 0.60, 0.70, 0.85, 0.90, 0.95, 0.99], np.float32)
IS_OK = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1], bool)  # 5 defective, 5 ok


def _best_by_brute_force(target: Target) -> tuple[int, int]:
    """(false rejects, escapes) of the best threshold on a fine grid, by the target's rule."""
    found = []
    for t in np.linspace(0.0005, 1.0, 2000):
        c = counts_at(P_OK, IS_OK, float(t))
        sensible = c.false_rejects < c.ok and c.escapes < c.defective
        if sensible and target.met(c):
            found.append((c.false_rejects, c.escapes))
    if target.metric == "escape_rate":
        return min(found)
    return min(found, key=lambda fe: (fe[1], fe[0]))


def test_curve_counts_every_threshold_exactly() -> None:
    c = curve(P_OK, IS_OK)
    # Cell j holds the thresholds in (s_{j-1}, s_j]: from "accept all" to "reject all".
    assert c.escapes.tolist() == [5, 4, 3, 2, 2, 1, 0, 0, 0, 0, 0]
    assert c.false_rejects.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 5]
    for j in range(c.cells):
        low, high = c.bounds(j)
        assert counts_at(P_OK, IS_OK, high if j < c.cells - 1 else 1.0) == c.counts(j)
        assert c.counts(j) == counts_at(P_OK, IS_OK, threshold_in(low, high))
    # p(ok) exactly at the threshold is accepted, as classify decides (defective: p < T).
    assert counts_at(P_OK, IS_OK, 0.70).escapes == 1 and counts_at(P_OK, IS_OK, 0.7001).escapes == 0


@pytest.mark.parametrize("limit", [0.0, 0.2, 0.4, 0.5, 0.6])
def test_max_escape_rate_picks_the_fewest_false_rejects_that_meet_it(limit: float) -> None:
    target = Target("escape_rate", limit)
    choice = choose(curve(P_OK, IS_OK), target)
    got = counts_at(P_OK, IS_OK, choice.threshold)
    assert choice.met and got == choice.counts
    assert got.escape_rate <= limit
    assert (got.false_rejects, got.escapes) == _best_by_brute_force(target)


@pytest.mark.parametrize("limit", [0.0, 0.2, 0.4, 0.8])
def test_max_false_reject_rate_picks_the_fewest_escapes_that_meet_it(limit: float) -> None:
    target = Target("false_reject_rate", limit)
    choice = choose(curve(P_OK, IS_OK), target)
    got = counts_at(P_OK, IS_OK, choice.threshold)
    assert choice.met and got == choice.counts
    assert got.false_reject_rate <= limit
    assert (got.false_rejects, got.escapes) == _best_by_brute_force(target)


def test_exact_counts_of_the_escape_choice() -> None:
    # 0 escapes: reject everything up to the defective part at 0.70; the ok part at 0.45 is
    # lost. The threshold sits between 0.70 and 0.85 and reads short.
    choice = choose(curve(P_OK, IS_OK), Target("escape_rate", 0.0))
    assert choice.threshold == 0.8
    assert (choice.counts.escapes, choice.counts.false_rejects) == (0, 1)
    # One escape allowed changes nothing: letting the 0.70 defect through keeps no ok part.
    assert choose(curve(P_OK, IS_OK), Target("escape_rate", 0.2)) == choice
    # Two allowed: the 0.45 ok part is kept, the 0.60 and 0.70 defects get through.
    choice = choose(curve(P_OK, IS_OK), Target("escape_rate", 0.4))
    assert 0.30 < choice.threshold <= 0.45
    assert (choice.counts.escapes, choice.counts.false_rejects) == (2, 0)


def test_threshold_sits_mid_gap_in_logits_and_reads_short() -> None:
    assert threshold_in(0.7, 0.9) == 0.8
    near_one = threshold_in(0.9990, 0.99995)
    assert 0.9990 < near_one < 0.99995 and len(f"{near_one:g}") <= 7
    # Halfway in logits, not in probability: far from the crowded top.
    assert threshold_in(0.5, 0.9999) < 0.999
    # Edge cells: (0, s_0] and (s_max, 1].
    assert 0 < threshold_in(0.0, 0.01) <= 0.01
    assert 0.98 < threshold_in(0.98, 1.0) <= 1.0


def test_wilson_matches_published_values() -> None:
    assert wilson(0, 100, 0.95)[1] == pytest.approx(0.0370, abs=1e-4)
    # Newcombe (1998), Statistics in Medicine 17:857, table I (method 3).
    assert wilson(1, 29, 0.95) == pytest.approx((0.0061, 0.1718), abs=1e-4)
    assert wilson(81, 263, 0.95) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 20, 0.95) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(20, 20, 0.95) == pytest.approx((0.8389, 1.0), abs=1e-4)
    assert wilson(0, 100, 0.99)[1] > wilson(0, 100, 0.95)[1] > wilson(0, 100, 0.90)[1]
    # The fewest images whose upper bound reaches 0.5% with no escape at all.
    need = images_for_upper_bound(0.005, 0.95)
    assert need == 765
    assert wilson(0, need, 0.95)[1] <= 0.005 < wilson(0, need - 1, 0.95)[1]


def test_every_class_but_ok_is_defective() -> None:
    classes = ["crack", "ok", "scratch", "spot"]
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3], 5)
    logits = rng.normal(size=(20, 4)).astype(np.float32)
    logits[labels == 1, 1] += 4.0  # ok parts look ok
    escapes = [0, 10, 15]  # one crack, one scratch, one spot look ok too
    logits[escapes, 1] += 6.0
    p_ok = softmax(logits)[:, classes.index("ok")]
    paths = [f"/d/{classes[y]}/{i}.png" for i, y in enumerate(labels)]
    cfg = DecisionConfig(max_false_reject_rate=0.0)
    entry = choice_entry(p_ok, labels == 1, paths, cfg, "ok")
    assert entry["val"]["escapes"]["total"] == 15 and entry["val"]["false_rejects"]["total"] == 5
    assert entry["val"]["false_rejects"]["count"] == 0
    assert entry["val"]["escapes"]["count"] == 3
    assert sorted(entry["escaped"]) == ["crack/0.png", "scratch/10.png", "spot/15.png"]


def test_an_unreachable_escape_target_takes_the_strictest_sensible_point_and_fails(
    tmp_path: Path,
) -> None:
    # The defect at 0.995 outscores every ok part: 0 escapes would reject all of them.
    p = np.array([0.1, 0.2, 0.995, 0.5, 0.8, 0.99], np.float32)
    is_ok = np.array([0, 0, 0, 1, 1, 1], bool)
    entry = choice_entry(p, is_ok, ["a/x"] * 6, DecisionConfig(max_escape_rate=0.0), "ok")
    assert not entry["met"]
    # The fewest escapes that keep ok parts (1), at the fewest false rejects (0).
    assert 0.2 < entry["threshold"] <= 0.5
    assert entry["val"]["escapes"]["count"] == 1 and entry["val"]["false_rejects"]["count"] == 0
    assert "without rejecting every ok part" in entry["why_not_met"]
    assert "1 of 3 defective parts accepted" in entry["why_not_met"]
    # A target that tolerates that escape is met at the same point.
    easier = choice_entry(p, is_ok, ["a/x"] * 6, DecisionConfig(max_escape_rate=0.34), "ok")
    assert easier["met"] and easier["threshold"] == entry["threshold"]
    # The gate fails, naming why; each artifact is judged on its own rate at the threshold.
    none_escape = {"count": 0, "total": 3, "rate": 0.0, "wilson": [0.0, 0.56]}
    entry["artifacts"] = {
        "model.onnx": {**entry["val"], "met": False},
        "model.int8.cpu.onnx": {**entry["val"], "escapes": none_escape, "met": True},
    }
    write_section(tmp_path, "decision", {"decision": entry}, [])
    gates = {g.gate: g for g in evaluate_gates(GatesConfig(), tmp_path)}
    chosen = gates[f"decision.max_escape_rate[model.pt, {entry['rule']}]"]
    assert chosen.failed and "without rejecting every ok part" in chosen.note
    assert gates[f"decision.max_escape_rate[model.onnx, {entry['rule']}]"].failed
    assert not gates[f"decision.max_escape_rate[model.int8.cpu.onnx, {entry['rule']}]"].failed


def test_require_upper_bound_needs_enough_images() -> None:
    p = np.concatenate([np.full(20, 0.01), np.full(20, 0.99)]).astype(np.float32)
    is_ok = np.repeat([False, True], 20)
    cfg = DecisionConfig(max_escape_rate=0.05, require_upper_bound=True)
    entry = choice_entry(p, is_ok, ["a/x"] * 40, cfg, "ok")
    # 0 of 20 escapes, yet its upper bound is 16%: the split cannot vouch for 5%.
    assert entry["val"]["escapes"]["count"] == 0 and not entry["met"]
    assert "only from 73 images" in entry["why_not_met"]
    p = np.concatenate([np.full(100, 0.01), np.full(20, 0.99)]).astype(np.float32)
    is_ok = np.repeat([False, True], [100, 20])
    assert choice_entry(p, is_ok, ["a/x"] * 120, cfg, "ok")["met"]  # 0 of 100: 3.7%


@pytest.mark.parametrize(
    ("data_extra", "decision", "expected"),
    [
        ("", "max_escape_rate = 0.005", ["decision", "data.ok_class"]),
        (
            'ok_class = "ok"',
            "max_escape_rate = 0.005\nmax_false_reject_rate = 0.02",
            ["decision", "exactly one target"],
        ),
        ('ok_class = "ok"', "confidence = 0.9", ["decision", "exactly one target"]),
        ('ok_class = "ok"', "max_escape_rate = 1.5", ["decision.max_escape_rate", "less than 1"]),
    ],
)
def test_bad_decision_sections_are_recipe_errors(
    tiny_data: Path, tmp_path: Path, data_extra: str, decision: str, expected: list[str]
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "r"\n[data]\nroot = "{tiny_data}"\n{data_extra}\n[decision]\n{decision}\n'
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert all(x in str(e.value) for x in expected), str(e.value)


def test_training_keeps_the_logits_its_metrics_come_from(tiny_build: Path) -> None:
    from tlbuild.train.eval_logits import read_eval_logits

    metrics = json.loads((tiny_build / "metrics.json").read_text())
    classes = metrics["val"]["confusion_matrix"]["labels"]
    val = read_eval_logits(tiny_build, classes)["val"]
    cm = np.zeros((len(classes), len(classes)), int)
    np.add.at(cm, (val.labels, val.logits.argmax(1)), 1)
    assert cm.tolist() == metrics["val"]["confusion_matrix"]["rows_true_cols_pred"]
    # Not shipped: the manifest lists no such artifact, and no decision without [decision].
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert "eval_logits.json" not in manifest["artifacts"] and "decision" not in manifest
    assert "Decision threshold" not in (tiny_build / "report.md").read_text()


DECISION = "[decision]\nmax_escape_rate = 0.2\n"


def _copy_of_build(tiny_build: Path, tiny_data: Path, folder: Path, extra: str) -> Path:
    recipe = tiny_recipe(folder, tiny_data, extra=extra)
    shutil.copytree(tiny_build, folder / "out" / "tiny")
    return recipe


@pytest.fixture(scope="module")
def decided(tiny_build: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny build with [decision] added: it is chosen without retraining or re-exporting."""
    recipe = load_recipe(
        _copy_of_build(tiny_build, tiny_data, tmp_path_factory.mktemp("decided"), DECISION)
    )
    result = runner.run(recipe, Console(quiet=True))
    ran = {s.stage for s in result.stages if s.action == "ran"}
    assert {"decision", "report"} <= ran and not ran & {"train", "export", "quantize"}
    return recipe.out_dir


def test_build_records_the_threshold_gates_and_reports_it(decided: Path, tiny_build: Path) -> None:
    from tlbuild.train.eval_logits import read_eval_logits

    manifest = json.loads((decided / "manifest.json").read_text())
    d = manifest["decision"]
    t = d["threshold"]
    assert d["rule"] == f"p(ok)<{t:g}" and d["target"] == {"max_escape_rate": 0.2}
    assert d["chosen_on"]["precision"] == "fp32" and d["confidence"] == 0.95
    # Recounted independently from the stored validation logits: three defect classes.
    val = read_eval_logits(decided, manifest["classes"])["val"]
    p_ok = softmax(val.logits)[:, manifest["classes"].index("ok")]
    defective = val.labels != manifest["classes"].index("ok")
    escapes = int((defective & (p_ok >= t)).sum())
    assert d["val"]["escapes"]["count"] == escapes and d["val"]["escapes"]["total"] == 6
    assert d["met"] == (escapes / 6 <= 0.2)
    assert set(d["artifacts"]) >= {"model.onnx", "model.int8.cpu.onnx"}
    assert d["classify_cpu"] == "model.int8.cpu.onnx"
    gates = json.loads((decided / "gates.json").read_text())["gates"]
    names = [g["gate"] for g in gates]
    assert f"decision.max_escape_rate[model.pt, {d['rule']}]" in names
    assert f"decision.max_escape_rate[model.int8.cpu.onnx, {d['rule']}]" in names
    report = (decided / "report.md").read_text()
    assert "## Decision threshold" in report and f"**{d['rule']}**" in report
    assert "![escape rate against false-reject rate](decision_curve.png)" in report
    assert (decided / "decision_curve.png").stat().st_size > 10_000
    for t_review in ("| 0.5 |", "| 0.9 |", "| 0.99 |"):
        assert t_review in report


def test_removing_decision_restores_the_manifest_byte_for_byte(
    decided: Path, tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    recipe = _copy_of_build(decided, tiny_data, tmp_path, "")  # the same build, [decision] gone
    result = runner.run(load_recipe(recipe), Console(quiet=True))
    out = result.out
    assert {s.stage: s.action for s in result.stages}["decision"] == "disabled"
    assert not (out / "decision_curve.png").exists()

    def without_time(folder: Path) -> dict:
        m = json.loads((folder / "manifest.json").read_text())
        m.pop("created")
        return m

    assert without_time(out) == without_time(tiny_build)
    assert "Decision threshold" not in (out / "report.md").read_text()


runner_cli = CliRunner()


def test_classify_applies_the_manifest_threshold_and_threshold_overrides_it(
    decided: Path, tiny_data: Path, tmp_path: Path
) -> None:
    t = json.loads((decided / "manifest.json").read_text())["decision"]["threshold"]
    out = tmp_path / "r.parquet"
    args = ["classify", str(tiny_data / "ok"), str(tiny_data / "crack"), "--model", str(decided)]
    args.append("--novelty=off")  # the threshold rule alone decides here
    r = runner_cli.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (
        f"Decision threshold p(ok) < {t:g} from the manifest's [decision] (max_escape_rate 0.2)"
        in " ".join(r.output.split())
    )
    df = pd.read_parquet(out)
    assert set(df["decided_by"]) == {f"p(ok)<{t:g}"}
    assert (df["defective"] == (df["ok_score"] < t)).all()

    r = runner_cli.invoke(app, [*args, "--out", str(tmp_path / "o.parquet"), "--threshold", "0.5"])
    assert r.exit_code == 0, r.output
    assert "Decision threshold p(ok) < 0.5 from --threshold" in r.output
    assert "Defective (p(ok)<0.5):" in r.output  # the summary names the rule that decided
    df = pd.read_parquet(tmp_path / "o.parquet")
    assert set(df["decided_by"]) == {"p(ok)<0.5"}
    assert (df["defective"] == (df["ok_score"] < 0.5)).all()

    # A rebuilt model with another threshold must not resume into the same results.
    path = decided / "manifest.json"
    saved = path.read_text()
    try:
        m = json.loads(saved)
        m["decision"]["threshold"] = 0.123
        path.write_text(json.dumps(m))
        r = runner_cli.invoke(app, [*args, "--out", str(out)])
    finally:
        path.write_text(saved)
    assert r.exit_code == 2
    assert f"threshold: {t!r} there, 0.123 now" in " ".join(r.output.split())


def test_false_reject_target_with_upper_bound_fails_its_gate_with_the_reason(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    # 2 ok validation images: at 90%, even 0 false rejects has an upper bound of 57%.
    extra = (
        "[decision]\nmax_false_reject_rate = 0.5\nconfidence = 0.9\nrequire_upper_bound = true\n"
    )
    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path, extra)
    r = runner_cli.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())
    assert "decision.max_false_reject_rate[model.pt, p(ok)<" in text
    assert "90% Wilson upper bound" in text and "even with none" in text
    d = json.loads((tmp_path / "out" / "tiny" / "manifest.json").read_text())["decision"]
    assert d["target"] == {"max_false_reject_rate": 0.5} and d["confidence"] == 0.9
    assert d["require_upper_bound"] and not d["met"]
