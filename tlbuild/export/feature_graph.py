"""The features output's name, layout and place in the graph: what runs without PyTorch
(export/features.py makes them)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

FEATURES_NAME = "features"


def feature_only_nodes(graph: onnx.GraphProto, logits: str = "logits") -> list[str]:
    """Names of the nodes only the features output needs: left in float by INT8, so the
    statistics are taken of the quantized model's activations, not computed in int8."""
    producer = {o: n for n in graph.node for o in n.output}
    needed: set[str] = set()
    todo: list[str] = [logits]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        todo.extend(i for i in node.input if i)
    return [n.name for n in graph.node if n.name not in needed]


def split_blocks(features: np.ndarray, layout: Iterable[dict[str, Any]]) -> list[np.ndarray]:
    """`features` cut into the layout's blocks (views, no copy)."""
    out, start = [], 0
    for block in layout:
        out.append(features[:, start : start + int(block["width"])])
        start += int(block["width"])
    return out
