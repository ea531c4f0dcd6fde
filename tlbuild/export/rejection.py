"""Why a precision variant was rejected, what was tried, and only what was not: the sentence the
quantize stage records in the manifest and prints."""

from __future__ import annotations

from typing import Any

from tlbuild.export.int8_search import METHODS
from tlbuild.manifest import Variant
from tlbuild.recipe import QuantizeConfig


def _tried(r: Variant, cfg: QuantizeConfig) -> tuple[set[str], int, int]:
    """Calibration methods tried, the most extra layers kept in float, and trials run."""
    trials: list[dict[str, Any]] = (r.search or {}).get("trials", [])
    if not trials:
        return {cfg.calibration_method}, 0, 0
    methods = {t["method"] for t in trials}
    return methods, max(len(t["extra_float"]) for t in trials), len(trials)


def _untried(
    r: Variant, cfg: QuantizeConfig, tried: tuple[set[str], int, int], train_images: int
) -> list[str]:
    if r.precision != "int8":  # FP16 has no settings to try
        return []
    methods, _, trials = tried
    out = [f'calibration_method = "{m}"' for m in METHODS if m not in methods]
    if cfg.search_budget == 0:
        out.append("an INT8 search (quantize.search_budget > 0)")
    elif trials >= cfg.search_budget:
        out.append(f"a larger quantize.search_budget ({trials} trials ran)")
    if cfg.calibration_images < train_images:
        out.append(f"more calibration_images ({cfg.calibration_images} of {train_images})")
    return out


def changed_percent(r: Variant) -> float:
    """Share of the validation answers `r` changed against FP32, in percent (0 if unknown)."""
    return 100.0 * (r.answers_changed or 0) / r.images if r.images else 0.0


def misses_gate(r: Variant, cfg: QuantizeConfig) -> bool:
    """Over quantize.max_drop, or over quantize.max_changed where that is set."""
    over_changed = cfg.max_changed is not None and changed_percent(r) > cfg.max_changed
    return r.drop_points > cfg.max_drop or over_changed


def _measured(r: Variant, cfg: QuantizeConfig) -> str:
    """What was measured, and which limit (or both) it is over."""
    n = r.images or 0
    said = f"{r.drop_points:.2f} points below FP32 on {n} validation images"
    if r.answers_changed is not None and r.drop_upper_points is not None:
        said += (
            f" ({r.answers_changed} answers changed, {changed_percent(r):.2f}%; at most "
            f"{r.drop_upper_points:.2f} points lost at 95% confidence)"
        )
    over = []
    if r.drop_points > cfg.max_drop:
        over.append(f"quantize.max_drop = {cfg.max_drop:g}")
    if cfg.max_changed is not None and changed_percent(r) > cfg.max_changed:
        over.append(f"quantize.max_changed = {cfg.max_changed:g}%")
    return said + (f", over {' and '.join(over)}." if over else ".")


def rejection_reason(r: Variant, cfg: QuantizeConfig, train_images: int) -> str:
    """One paragraph: the measured loss with its uncertainty, what was tried, what was not."""
    n = r.images or 0
    said = _measured(r, cfg)
    record = _tried(r, cfg)
    methods, most_float, trials = record
    if r.precision == "int8":
        tried = f" Tried: {', '.join(sorted(methods))} calibration"
        if most_float:
            tried += f", up to {most_float} more layer(s) kept in float"
        said += tried + (f" ({trials} trials)." if trials else ".")
    untried = _untried(r, cfg, record, train_images)
    # The finer limit decides how coarse one image is; a limit of 0 is no count of images.
    finest = min(cfg.max_drop, cfg.max_changed or cfg.max_drop)
    if n and 100.0 / n > finest / 2:
        # Where one image is a large share of the gate, the verdict turns on a few images.
        untried.append(f"more validation images (one of {n} is {100.0 / n:.2f} points)")
    left = f" Not tried: {'; '.join(untried)}." if untried else ""
    return said + left + f" Or leave {r.variant} out of quantize.variants."
