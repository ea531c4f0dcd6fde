"""The report's novelty section, from the manifest's `novelty` entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbuild.novelty.plot import MOST_NOVEL_PNG, NOVELTY_PNG


def novelty_lines(out: Path, manifest: dict[str, Any]) -> list[str]:
    """The section; [] when the build has no novelty score."""
    n = manifest.get("novelty")
    if not n:
        return []
    v, p = n["val"], n["probe"]
    lines = [
        "## Novelty: images the model was not built for",
        "",
        f"An image whose novelty score is over **{n['threshold']:.4g}** is flagged for review "
        "and never passed as a good part (`tlbuild classify`, columns `novelty` and `novel`). "
        f"The threshold was chosen on the validation split's {v['images']} images for a target "
        f"of {n['target']:.1%} of images like them flagged (split conformal); "
        f"{v['flagged']:.1%} of validation is over it. The score was fitted on "
        f"{n['fit_images']} training images: {n['method']}.",
        "",
        f"Camera-fault probe ({p['images_per_fault']} validation images per fault, made as a "
        f"failing station would show them): **{p['faults_flagged']:.0%} flagged**.",
        "",
        "| fault | flagged |",
        "| --- | ---: |",
        *(f"| {k.replace('_', ' ')} | {x:.0%} |" for k, x in p["flagged"].items()),
        "",
    ]
    if (out / NOVELTY_PNG).is_file():
        lines += [f"![novelty score on validation and the camera-fault probe]({NOVELTY_PNG})", ""]
    if n.get("artifacts"):
        lines += ["| artifact | flags as FP32 | validation flagged | faults flagged |"]
        lines += ["| --- | ---: | ---: | ---: |"]
        for name, a in n["artifacts"].items():
            mark = "" if a["met"] else " (under min_agreement)"
            lines.append(
                f"| `{name}` | {a['agreement']:.1%}{mark} | {a['val_flagged']:.1%} | "
                f"{a['faults_flagged']:.0%} |"
            )
        lines.append("")
    if (out / MOST_NOVEL_PNG).is_file():
        lines += [
            "The validation images the score finds most unlike training (score above each):",
            "",
            f"![most novel validation images]({MOST_NOVEL_PNG})",
            "",
        ]
    return lines
