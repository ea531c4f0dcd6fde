"""What one training run is given besides the model: data, recipe sections, checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Splits
from tlbuild.recipe import DataConfig, TrainConfig


@dataclass(frozen=True)
class TrainSettings:
    """Train on `splits.train` and stop early on `splits.val`, as `train` and `data` say;
    checkpoint every epoch at `checkpoint`, continuing it when `resume`.

    `model_key` identifies the model settings (backbone, weights, dropout) so that a resume
    refuses a checkpoint written for other ones.
    """

    splits: Splits
    preprocessing: Preprocessing
    train: TrainConfig
    data: DataConfig
    checkpoint: Path
    resume: bool = False
    model_key: str = ""
