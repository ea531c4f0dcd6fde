"""The one training path from a recipe and a split: seed, build the backbone with its new head,
fine-tune. The train stage and `tlbuild cv` (each fold) both train through it, so a change to
how a model is trained is made once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tlbuild.data.scan import Splits
from tlbuild.data.sizes import SizeSummary, summarize_sizes
from tlbuild.models.factory import NewClassifier, make_model
from tlbuild.recipe import Recipe
from tlbuild.train.events import TrainEvents
from tlbuild.train.settings import TrainSettings
from tlbuild.train.trainer import Trainer, TrainResult


def train_from_recipe(
    recipe: Recipe,
    splits: Splits,
    ckpt: Path,
    events: TrainEvents,
    resume: bool = False,
    on_built: Callable[[NewClassifier, SizeSummary | None], None] | None = None,
) -> tuple[NewClassifier, TrainResult]:
    """Fine-tune the recipe's backbone on `splits.train`, early stopping on `splits.val`, with
    checkpoints at `ckpt`, reporting to `events`; `on_built` sees the new model (and the
    images' sizes) before it trains."""
    # Seed before building: the new head's initial weights are part of reproducibility.
    torch.manual_seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)
    images = summarize_sizes([s.path for s in splits.train])
    built = make_model(recipe.model, len(splits.classes), images)
    if on_built is not None:
        on_built(built, images)
    settings = TrainSettings(
        splits=splits,
        preprocessing=built.preprocessing,
        train=recipe.train,
        data=recipe.data,
        checkpoint=ckpt,
        resume=resume,
        model_key=recipe.model.model_dump_json(),
    )
    result = Trainer(model=built.model, settings=settings, events=events).fit()
    return built, result
