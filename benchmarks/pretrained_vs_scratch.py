"""Does pretraining matter on the demo data? Same recipe, same epochs, ImageNet vs random init.

    python benchmarks/pretrained_vs_scratch.py recipes/defects.toml

Prints the best validation accuracy and loss of each, and their difference. The demo dataset
is meant to be hard enough that the pretrained backbone wins by a clear margin.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tlbuild.pipeline import train_stage
from tlbuild.recipe import ModelConfig, load_recipe


def main(recipe_path: str) -> None:
    recipe = load_recipe(recipe_path)
    console = Console(highlight=False, soft_wrap=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ("imagenet", "none"):
            model = ModelConfig.model_validate({**recipe.model.model_dump(), "weights": weights})
            r = recipe.model_copy(update={"model": model, "output_dir": Path(tmp), "name": weights})
            console.rule(f"weights = {weights}")
            t0 = time.perf_counter()
            out = train_stage(r, console)
            results[weights] = (
                out.metrics["val"]["accuracy"],
                out.metrics["val"]["loss"],
                len(out.result.history),
                time.perf_counter() - t0,
            )
    console.rule("result")
    for w, (acc, loss, epochs, secs) in results.items():
        print(
            f"{w:>9}: val accuracy {acc:.1%}  val loss {loss:.3f}  ({epochs} epochs, {secs:.0f}s)"
        )
    gap = results["imagenet"][0] - results["none"][0]
    print(f"pretrained - scratch: {gap * 100:+.1f} accuracy points")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/defects.toml")
