"""cv's outputs: cv_oof.parquet (every image, its fold and out-of-fold scores), cv.json, and
cv_report.md with the spread across folds and the likely label errors as thumbnails."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tlbuild.cv.label_issues import self_confidence
from tlbuild.cv.run import CVResult
from tlbuild.fileio import atomic_path, open_regular, write_json, write_parquet, write_text

OOF_PARQUET = "cv_oof.parquet"
CV_JSON = "cv.json"
CV_REPORT = "cv_report.md"
THUMBS = "label_issues"
# Thumbnails in the report: the top of the list is what a person can review in one sitting.
MAX_SHOWN = 48
THUMB_PX = 160


def _frame(r: CVResult):  # noqa: ANN202 - pandas imported lazily
    import pandas as pd

    labels = np.array([s.label for s in r.samples])
    rank = np.full(len(labels), -1)
    rank[r.issues] = np.arange(1, len(r.issues) + 1)
    pred = r.probs.argmax(1)
    data = {
        "path": [str(s.path) for s in r.samples],
        "split": r.split_of,
        "fold": r.folds.astype("int32"),
        "given_label": [r.classes[i] for i in labels],
        "predicted": [r.classes[i] for i in pred],
        "self_confidence": self_confidence(labels, r.probs).astype("float32"),
        "label_issue": rank > 0,
        "issue_rank": pd.array([v if v > 0 else None for v in rank], dtype="Int32"),
    }
    for j, c in enumerate(r.classes):
        data[f"p_{c}"] = r.probs[:, j].astype("float32")
    return pd.DataFrame(data)


def _thumbnail(src: Path, dst: Path) -> None:
    from PIL import Image, ImageOps

    with open_regular(src) as f, Image.open(f) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((THUMB_PX, THUMB_PX))
        with atomic_path(dst) as tmp:
            img.save(tmp, format="JPEG", quality=85)


def _plot(r: CVResult, path: Path) -> None:
    """Per-fold accuracy and macro F1 (and escape rate): the spread at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("accuracy", "macro_f1", "escape_rate") if k in r.summary]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(keys), 3.2))
    for x, key in enumerate(keys):
        values = [fr.metrics[key] for fr in r.fold_results]
        ax.scatter([x] * len(values), values, color="tab:blue", zorder=3)
        ax.hlines(r.summary[key]["mean"], x - 0.25, x + 0.25, color="black")
    ax.set_xticks(range(len(keys)), [k.replace("_", " ") for k in keys])
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_title(f"{len(r.fold_results)} folds (dots) and their mean")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _pct(v: float) -> str:
    return f"{v:.1%}"


def write_cv_outputs(r: CVResult) -> Path:
    """Write cv_oof.parquet, cv.json, the plot, thumbnails and cv_report.md; return the report."""
    df = _frame(r)
    write_parquet(r.out / OOF_PARQUET, df)
    write_json(
        r.out / CV_JSON,
        {
            "summary": r.summary,
            "folds": [
                {"fold": fr.index, "seconds": fr.seconds, "reused": fr.reused, **fr.metrics}
                for fr in r.fold_results
            ],
        },
    )
    _plot(r, r.out / "cv_folds.png")
    thumbs = r.out / THUMBS
    thumbs.mkdir(exist_ok=True)
    for old in thumbs.glob("*.jpg"):
        old.unlink()
    lines = _fold_lines(r) + _issue_lines(r, thumbs)
    report = r.out / CV_REPORT
    write_text(report, "\n".join(lines) + "\n")
    return report


def _fold_lines(r: CVResult) -> list[str]:
    """The report's head: the metrics over folds, then one row per fold."""
    lines = [
        "# Cross-validation",
        "",
        f"{len(r.fold_results)} stratified folds over {len(r.samples)} images (train, val and "
        "test splits together); each image scored by the fold model that never saw it, early "
        "stopping decided on a slice of the training folds.",
        "",
        "| metric | mean | spread (std) | min | max |",
        "|---|---|---|---|---|",
    ]
    for key in ("accuracy", "macro_f1", "escape_rate", "false_reject_rate"):
        s = r.summary.get(key)
        if s:
            lines.append(
                f"| {key.replace('_', ' ')} | {_pct(s['mean'])} | {_pct(s['std'])} | "
                f"{_pct(s['min'])} | {_pct(s['max'])} |"
            )
    lines += ["", "![per-fold metrics](cv_folds.png)", "", "| fold | images | accuracy | "
              "macro F1 | seconds | |", "|---|---|---|---|---|---|"]  # fmt: skip
    for fr in r.fold_results:
        lines.append(
            f"| {fr.index + 1} | {fr.metrics['images']} | {_pct(fr.metrics['accuracy'])} | "
            f"{_pct(fr.metrics['macro_f1'])} | {fr.seconds:.0f} | "
            f"{'reused' if fr.reused else ''} |"
        )
    return lines


def _issue_lines(r: CVResult, thumbs: Path) -> list[str]:
    """The likely label errors, each with a thumbnail written into `thumbs`."""
    lines = [
        "",
        f"## Likely label errors: {len(r.issues)}",
        "",
        "Confident learning on the out-of-fold probabilities: images the models confidently put "
        "in another class than their folder, lowest p(given label) first. Check each; move it to "
        f"the right class folder or delete it. All images with their scores: `{OOF_PARQUET}`.",
        "",
    ]
    if len(r.issues):
        lines += ["| # | image | given | predicted | p(given) | p(predicted) | path |"]
        lines += ["|---|---|---|---|---|---|---|"]
    for n, i in enumerate(r.issues[:MAX_SHOWN], start=1):
        s = r.samples[i]
        name = f"{n:03d}.jpg"
        try:
            _thumbnail(s.path, thumbs / name)
            cell = f"![{n}]({THUMBS}/{name})"
        except OSError:
            cell = "(unreadable)"
        pred = int(r.probs[i].argmax())
        rel = os.path.relpath(s.path, r.out)
        lines.append(
            f"| {n} | {cell} | {r.classes[s.label]} | {r.classes[pred]} | "
            f"{r.probs[i, s.label]:.3f} | {r.probs[i, pred]:.3f} | `{rel}` |"
        )
    if len(r.issues) > MAX_SHOWN:
        lines += ["", f"{len(r.issues) - MAX_SHOWN} more in `{OOF_PARQUET}` (issue_rank)."]
    return lines
