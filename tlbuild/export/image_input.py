"""A model that takes the camera's image: uint8 RGB at its own size in, the shipped model's
outputs out, with tlbuild's preprocessing (resize or resize-and-centre-crop, scale, normalise)
inside the graph, so a client in any language only decodes the file.

The resize follows Pillow's `Image.resize`, the reference every check uses: ONNX `Resize`
(opset 18) with `antialias` (the filter widened by the scale when shrinking, as Pillow does),
cubic with a = -0.5 (Pillow's BICUBIC) or linear (BILINEAR), half-pixel centres, and, like
Pillow's 8-bit path, the width first, rounded half up and clipped to 0..255, then the height,
the same. Pillow keeps only the taps inside the image and renormalises (`exclude_outside`).
Measured (benchmarks/image_model_pixels.py): 98.3% of pixels identical to Pillow's on 60
photograph crops (180-640 px) resized to 160 px, 99.9% with the centre crop, none more than 5
levels off; 99.99% on 640x480 frames and on 32 px textures enlarged to 128, none more than 1.
One pass without the intermediate rounding matched 84%, and gave answers 8x further off.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tlbuild.data.preprocess import Preprocessing

IMAGE_INPUT = "image"
# ONNX Resize's modes for the filters it shares with Pillow. Lanczos has none; nearest was
# measured to pick other source pixels than Pillow's NEAREST at some sizes (480x640 to 64x80:
# 6.5% of pixels), so it gets no model_image.onnx rather than one that disagrees.
_MODES = {
    "bicubic": {"mode": "cubic", "cubic_coeff_a": -0.5},
    "bilinear": {"mode": "linear"},
}
_PREFIX = "tlbuild_image_"  # names of the added nodes and tensors: never a model's own


class _Graph:
    """Nodes and constants of the preprocessing, named apart from the model's."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{_PREFIX}{hint}_{self._n}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: object) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def to_uint8_levels(self, x: str) -> str:
        """Round half up and clip to 0..255, as Pillow's fixed-point resize does. ONNX Round
        rounds half to even: on an exact 4x upscale (32 to 128 px, where the weights are
        dyadic and sums land on .5) that left 0.08% of pixels a level off, and 2 of 700
        answers changed; half up matched every pixel."""
        lo = self.const(np.array(0.0, np.float32), "zero")
        hi = self.const(np.array(255.0, np.float32), "max")
        half = self.const(np.array(0.5, np.float32), "half")
        up = self.op("Floor", [self.op("Add", [x, half], "plus_half")], "round_half_up")
        return self.op("Clip", [up, lo, hi], "clip")


def supported(spec: Preprocessing) -> str | None:
    """Why `spec` cannot be built into a graph, or None when it can."""
    if spec.interpolation not in _MODES:
        return (
            f"the graph's resize matches Pillow's bicubic and bilinear, not {spec.interpolation}; "
            "use one of those in [model] preprocess for a model_image.onnx"
        )
    return None


def _resize(g: _Graph, x: str, dims: str, new_h: str, new_w: str, spec: Preprocessing) -> str:
    """`x` (N, 3, H, W float) to (new_h, new_w): width first, then height, each pass rounded to
    8-bit levels as Pillow's is. `dims` holds (N, 3) and the heights are int64 (1,) tensors."""
    attrs = {
        **_MODES[spec.interpolation],
        "antialias": 1,
        "coordinate_transformation_mode": "half_pixel",
        "exclude_outside": 1,
    }
    height = g.op("Slice", [g.op("Shape", [x], "shape"), *_range(g, 2, 3)], "height")
    wide = g.op("Concat", [dims, height, new_w], "sizes_w", axis=0)
    x = g.to_uint8_levels(g.op("Resize", [x, "", "", wide], "resize_w", **attrs))
    both = g.op("Concat", [dims, new_h, new_w], "sizes_hw", axis=0)
    return g.to_uint8_levels(g.op("Resize", [x, "", "", both], "resize_h", **attrs))


def _range(g: _Graph, start: int, end: int) -> list[str]:
    return [
        g.const(np.array([start], np.int64), "start"),
        g.const(np.array([end], np.int64), "end"),
    ]


def _geometry(g: _Graph, x: str, spec: Preprocessing) -> str:
    """`x` resized (and centre-cropped) to the input size exactly as resize_for_model does."""
    h, w = spec.input_size
    shape = g.op("Shape", [x], "shape")
    dims = g.op("Slice", [shape, *_range(g, 0, 2)], "n_c")
    if spec.resize == "resize":
        out_h = g.const(np.array([h], np.int64), "h")
        out_w = g.const(np.array([w], np.int64), "w")
        return _resize(g, x, dims, out_h, out_w, spec)
    # timm's eval transform, as resized_size computes it: scale so the image covers
    # (h, w) / crop_pct, round half up, never below the input size; then cut the centre. In
    # float64 as Python computes it: in float32, 720x480 at 299 px and crop_pct 1.0 resized
    # to 448 instead of 449, and a third of the pixels moved.
    size = g.op(
        "Cast", [g.op("Slice", [shape, *_range(g, 2, 4)], "hw")], "hw_f", to=TensorProto.DOUBLE
    )
    target = g.const(np.array([h, w], np.float64) / spec.crop_pct, "target")
    ratio = g.op("ReduceMax", [g.op("Div", [target, size], "ratio")], "scale", keepdims=1)
    half = g.const(np.array(0.5, np.float64), "half")
    scaled = g.op("Floor", [g.op("Add", [g.op("Mul", [size, ratio], "mul"), half], "add")], "fl")
    floor_hw = g.const(np.array([h, w], np.float64), "min_hw")
    new = g.op("Cast", [g.op("Max", [scaled, floor_hw], "max")], "new_hw", to=TensorProto.INT64)
    new_h = g.op("Slice", [new, *_range(g, 0, 1)], "new_h")
    new_w = g.op("Slice", [new, *_range(g, 1, 2)], "new_w")
    x = _resize(g, x, dims, new_h, new_w, spec)
    two = g.const(np.array([2, 2], np.int64), "two")
    start = g.op(
        "Div", [g.op("Sub", [new, g.const(np.array([h, w], np.int64), "hw")], "sub"), two], "start"
    )
    stop = g.op("Add", [start, g.const(np.array([h, w], np.int64), "hw2")], "stop")
    axes = g.const(np.array([2, 3], np.int64), "axes")
    return g.op("Slice", [x, start, stop, axes], "crop")


def resize_model(spec: Preprocessing) -> onnx.ModelProto:
    """The graph's resize (and crop) alone: uint8 NHWC in, its 8-bit levels out as float NCHW;
    what the tests and benchmarks/image_model_pixels.py hold against Pillow."""
    g = _Graph()
    x = g.op("Transpose", [g.op("Cast", [IMAGE_INPUT], "float", to=TensorProto.FLOAT)],
             "nchw", perm=[0, 3, 1, 2])  # fmt: skip
    y = _geometry(g, x, spec)
    graph = helper.make_graph(
        g.nodes,
        "resize",
        [helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8, [1, "h", "w", 3])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        g.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def image_input_model(model: onnx.ModelProto, spec: Preprocessing) -> onnx.ModelProto:
    """`model` (float NCHW input, preprocessed) behind a uint8 NHWC RGB input of any size.

    The normalisation is tlbuild's own fused form, x * (scale / std) - mean / std, in float32,
    so from the resized pixels on the tensor is the one `tlbuild classify` feeds."""
    why = supported(spec)
    if why:
        raise ValueError(why)
    names = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    names |= {o for n in model.graph.node for o in n.output}
    taken = sorted(n for n in names if n == IMAGE_INPUT or n.startswith(_PREFIX))
    if taken:
        raise ValueError(f"the model already has tensors named {', '.join(taken[:3])}")
    g = _Graph()
    pixels = g.op("Cast", [IMAGE_INPUT], "float", to=TensorProto.FLOAT)
    x = g.op("Transpose", [pixels], "nchw", perm=[0, 3, 1, 2])
    x = _geometry(g, x, spec)
    std = np.asarray(spec.std, np.float32)
    a = (np.float32(spec.pixel_scale) / std).reshape(1, 3, 1, 1)
    b = (-np.asarray(spec.mean, np.float32) / std).reshape(1, 3, 1, 1)
    scaled = g.op("Mul", [x, g.const(a, "scale")], "scaled")
    old = model.graph.input[0]
    g.nodes.append(
        helper.make_node(
            "Add", [scaled, g.const(b, "shift")], [old.name], name=g.name("normalised")
        )
    )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.input[0]
    graph.input.insert(
        0,
        helper.make_tensor_value_info(
            IMAGE_INPUT, TensorProto.UINT8, ["batch", "height", "width", 3]
        ),
    )
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(g.nodes + nodes)
    graph.initializer.extend(g.inits)
    # Resize with antialias is opset 18; the exporter writes 18 or newer.
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 18:
            opset.version = 18
    onnx.checker.check_model(out)
    return out
