"""Export a trained classifier to one self-contained ONNX file with a dynamic batch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from tlbuild.data.preprocess import Preprocessing
from tlbuild.errors import BuildError
from tlbuild.export.feature_graph import FEATURES_NAME
from tlbuild.export.features import WithFeatures, feature_layout, supports_features
from tlbuild.fileio import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module, spec: Preprocessing, path: Path, opset: int
) -> list[dict[str, Any]]:
    """Write `path`: FP32, NCHW input 'input', outputs 'logits' and (where timm gives the
    backbone's feature maps) 'features', batch dimension 'batch'. Returns the features'
    layout (export/features.py), empty without them.

    Uses the dynamo exporter with the weights inside the file (external_data=False), so the
    single .onnx is what ships. The example batch is 2: a batch of 1 lets the exporter
    specialise the batch dimension away.
    """
    model = model.eval().to("cpu")
    h, w = spec.input_size
    example = torch.randn(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=65536)
    layout = feature_layout(model, example) if supports_features(model) else []
    exported = WithFeatures(model) if layout else model
    outputs = [OUTPUT_NAME, FEATURES_NAME] if layout else [OUTPUT_NAME]
    with atomic_path(path) as tmp:
        try:
            # The exporter is chatty (progress prints and warnings); keep the CLI output clean.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                logging.getLogger("torch.onnx").setLevel(logging.ERROR)
                torch.onnx.export(
                    exported,
                    (example,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=outputs,
                    dynamo=True,
                    external_data=False,
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    optimize=True,
                )
        except Exception as e:
            raise BuildError(f"ONNX export failed for {type(model).__name__}: {e}") from e
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise BuildError(f"exported ONNX model does not pass onnx.checker: {e}") from e
        _name_batch_dim(tmp)
    return layout


def _name_batch_dim(path: Path) -> None:
    # Whatever symbol the exporter picked, consumers (TensorRT profiles, docs) see "batch".
    m = onnx.load(str(path))
    for vi in list(m.graph.input) + list(m.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        d0.ClearField("dim_value")
        d0.dim_param = "batch"
    onnx.save(m, str(path))


def onnx_io(path: Path) -> dict[str, Any]:
    """Opset, and names, shapes (symbolic dims as strings) and dtypes of inputs and outputs."""
    m = onnx.load(str(path), load_external_data=False)

    def describe(vi: onnx.ValueInfoProto) -> dict[str, object]:
        tt = vi.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tt.shape.dim]
        return {
            "name": vi.name,
            "shape": shape,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
        }

    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "inputs": [describe(v) for v in m.graph.input],
        "outputs": [describe(v) for v in m.graph.output],
    }
