"""heatmaps.json and the report.md section drawn from it; no PyTorch, so the report stays light."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbuild.fileio import read_json_or_empty

HEATMAPS_JSON = "heatmaps.json"
HEATMAP_PNGS = "heatmaps_*.png"


def shown_line(c: dict[str, Any]) -> str:
    """'2 of 5 misclassified shown, 4 correct' for one class entry of heatmaps.json."""
    if not c["misclassified"]:
        return f"none misclassified; {c['correct_shown']} correct shown"
    return (
        f"{c['misclassified_shown']} of {c['misclassified']} misclassified shown, "
        f"{c['correct_shown']} correct"
    )


def heatmap_lines(out: Path) -> list[str]:
    """The report's heat-map section; [] when the explain stage did not run (turned off)."""
    data = read_json_or_empty(out / HEATMAPS_JSON)
    if not data:
        return []
    lines = ["## Heat maps (Grad-CAM)", ""]
    if "skipped" in data:
        return lines + [f"Skipped: {data['skipped']}", ""]
    cap = data["settings"]
    lines += [
        "Where the model looked: Grad-CAM of the predicted class on the last feature map, red "
        "for the most evidence, over the image as the model saw it (after preprocessing). Per "
        f"class, at most {cap['max_images']} validation images: up to "
        f"{cap['correct_per_class']} correct ones for comparison, misclassified ones (most "
        "confident mistakes first) in the rest (`[explain]`).",
        "",
        "| class | validation images | misclassified | shown |",
        "| --- | ---: | ---: | --- |",
    ]
    classes = data["classes"]
    for c in classes:
        name = c["class"].replace("|", "\\|")
        lines.append(f"| {name} | {c['images']} | {c['misclassified']} | {shown_line(c)} |")
    lines.append("")
    if data.get("unreadable"):
        lines += [f"{len(data['unreadable'])} validation image(s) could not be read.", ""]
    for c in classes:
        if c["png"]:
            lines += [f"### {c['class']}", "", f"![heat maps: {c['class']}]({c['png']})", ""]
    return lines
