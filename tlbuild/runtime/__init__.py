"""One Predictor interface over every artifact of an exported folder."""

from tlbuild.runtime.base import Predictor
from tlbuild.runtime.load import load_predictor

__all__ = ["Predictor", "load_predictor"]
