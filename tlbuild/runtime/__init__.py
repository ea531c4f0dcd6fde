"""One Predictor interface over every artifact of an exported folder."""

from tlbuild.runtime.backends import OnnxPredictor, TensorRTPredictor, open_onnx
from tlbuild.runtime.base import Predictor
from tlbuild.runtime.load import load_predictor
from tlbuild.runtime.recorded import RecordedPredictor
from tlbuild.runtime.torch_model import TorchPredictor

__all__ = [
    "OnnxPredictor",
    "Predictor",
    "RecordedPredictor",
    "TensorRTPredictor",
    "TorchPredictor",
    "load_predictor",
    "open_onnx",
]
