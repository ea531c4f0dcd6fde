"""Does pretraining matter on the demo data? Same recipe, same epochs, ImageNet vs random init.

    python benchmarks/pretrained_vs_scratch.py recipes/defects.toml

Prints the best validation accuracy and loss of each, and their difference. A third run trains
the randomly initialised network with every layer unfrozen for the same number of epochs, so
the comparison does not rest on a frozen random body. The demo dataset is meant to be hard
enough that the pretrained backbone wins by a clear margin.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tlbuild.recipe import ModelConfig, PhaseConfig, TrainConfig, load_recipe
from tlbuild.runner import call_stage


def main(recipe_path: str) -> None:
    recipe = load_recipe(recipe_path)
    console = Console(highlight=False, soft_wrap=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        epochs = sum(p.epochs for p in recipe.train.phases)
        all_layers = PhaseConfig(name="all", epochs=epochs, lr=1e-3, unfreeze="all", body_lr_mult=1)
        train_all = TrainConfig.model_validate(
            {**recipe.train.model_dump(), "phases": [all_layers.model_dump()]}
        )
        runs = {
            "imagenet": ("imagenet", recipe.train),
            "none": ("none", recipe.train),
            "none, all layers": ("none", train_all),
        }
        for label, (weights, train) in runs.items():
            model = ModelConfig.model_validate({**recipe.model.model_dump(), "weights": weights})
            update = {
                "model": model,
                "train": train,
                "output_dir": Path(tmp),
                "name": label.replace(", ", "_").replace(" ", "_"),
            }
            r = recipe.model_copy(update=update)
            console.rule(f"{label}")
            t0 = time.perf_counter()
            out = call_stage("train", r, console)
            results[label] = (
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
    for other in ("none", "none, all layers"):
        gap = results["imagenet"][0] - results[other][0]
        print(f"imagenet - {other}: {gap * 100:+.1f} accuracy points")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/defects.toml")
