from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from tests.conftest import run_stage
from tlbuild.errors import BuildError
from tlbuild.export.quantize import trt_qdq_problems
from tlbuild.fileio import sha256_file
from tlbuild.recipe import QuantizeConfig, load_recipe
from tlbuild.runtime.sessions import ort_session


def test_variants_are_written_gated_and_in_the_manifest(tiny_build: Path) -> None:
    man = json.loads((tiny_build / "manifest.json").read_text())
    assert set(man["variants"]) == {"fp16", "int8_trt", "int8_cpu"}
    for name, v in man["variants"].items():
        assert v["status"] == "accepted", name
        assert man["artifacts"][v["file"]]["sha256"] == sha256_file(tiny_build / v["file"])
        assert v["drop_points"] == pytest.approx((v["fp32_accuracy"] - v["accuracy"]) * 100)
    assert "simulated" in man["variants"]["int8_trt"]["evaluated_with"]
    cal = man["calibration"]
    assert cal["images"] == 24 and cal["method"] == "percentile"
    assert len(cal["file_list_sha256"]) == 64


def test_fp16_variant_keeps_float32_io(tiny_build: Path) -> None:
    m = onnx.load(str(tiny_build / "model.fp16.onnx"))
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    dtypes = {i.data_type for i in m.graph.initializer if len(i.dims) == 4}
    assert dtypes == {TensorProto.FLOAT16}


def test_trt_variant_has_the_form_tensorrt_accepts(tiny_build: Path) -> None:
    path = tiny_build / "model.int8.trt.onnx"
    assert trt_qdq_problems(path) == []
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] in {i.name for i in graph.initializer}  # first conv kept in float


def _mutated(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    m = onnx.load(str(src))
    edit(m)
    onnx.save(m, str(dst))
    return dst


def test_trt_check_catches_each_broken_condition(tiny_build: Path, tmp_path: Path) -> None:
    src = tiny_build / "model.int8.trt.onnx"

    def nonzero_zero_point(m: onnx.ModelProto) -> None:
        zp = next(i for i in m.graph.initializer if i.name.endswith("zero_point") and not i.dims)
        zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))

    def uint8_activations(m: onnx.ModelProto) -> None:
        zp = next(i for i in m.graph.initializer if i.name.endswith("zero_point") and not i.dims)
        zp.CopyFrom(numpy_helper.from_array(np.array(0, np.uint8), zp.name))

    def per_tensor_weights(m: onnx.ModelProto) -> None:
        scale = next(i for i in m.graph.initializer if i.name.endswith("scale") and i.dims)
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale)[:1], scale.name))

    def int32_bias(m: onnx.ModelProto) -> None:
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
        m.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.int32), "b_q"))
        dq.input[0] = "b_q"

    cases = {
        nonzero_zero_point: "non-zero zero point",
        uint8_activations: "not int8",
        per_tensor_weights: "not per-channel on axis 0",
        int32_bias: "int32 bias",
    }
    for edit, expected in cases.items():
        bad = _mutated(src, tmp_path / f"{edit.__name__}.onnx", edit)
        problems = trt_qdq_problems(bad)
        assert any(expected in p for p in problems), (edit.__name__, problems)
    assert trt_qdq_problems(tiny_build / "model.onnx")  # not quantized at all


def test_qdq_simulation_follows_the_onnx_definition_exactly(tmp_path: Path) -> None:
    """The gate's TensorRT simulation == NumPy Q/DQ (round half to even, saturate) + float math."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 5, 5)) * 2).astype(np.float32)
    x[0, 0, 0, :3] = [0.25, 0.75, -0.25]  # exact .5 ties at scale 0.5 -> banker's rounding
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    sx = np.float32(0.5)
    sw = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / sw[:, None, None, None]), -127, 127).astype(np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
            helper.make_node("Conv", ["xd", "wd"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])],
        [
            numpy_helper.from_array(np.array(sx), "sx"),
            numpy_helper.from_array(np.array(0, np.int8), "zx"),
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(sw, "sw"),
            numpy_helper.from_array(np.zeros(4, np.int8), "zw"),
        ],
    )
    path = tmp_path / "qdq.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        str(path),
    )
    got = ort_session(path, simulate_qdq=True).run(None, {"x": x})[0]
    xq = np.clip(np.rint(x / sx), -128, 127)  # np.rint rounds half to even, like ONNX
    ref = np.einsum("nchw,oc->nohw", xq * sx, (wq * sw[:, None, None, None])[:, :, 0, 0])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def _gate_recipe(tiny_build: Path, tmp_path: Path, on_fail: str):  # noqa: ANN202
    out = tmp_path / "gate"
    shutil.copytree(tiny_build, out)
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    q = QuantizeConfig(variants=("int8_trt",), max_drop=1.0, on_fail=on_fail)
    return recipe.model_copy(update={"output_dir": tmp_path, "name": "gate", "quantize": q}), out


def _worse_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlbuild.stages import quantize

    real = quantize.evaluate_variants

    def evaluate(*args, **kw):  # noqa: ANN002, ANN003
        results = real(*args, **kw)
        r = results["int8_trt"]
        r.accuracy, r.drop_points = r.fp32_accuracy - 0.05, 5.0
        return results

    monkeypatch.setattr(quantize, "evaluate_variants", evaluate)


def test_gate_fails_the_build_naming_the_variant(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, out = _gate_recipe(tiny_build, tmp_path, "error")
    _worse_int8(monkeypatch)
    with pytest.raises(
        BuildError, match=r'int8_trt is rejected and quantize.on_fail = "error": 5.00 points below'
    ):
        run_stage("quantize", recipe, Console(quiet=True))
    assert not (out / "model.int8.trt.onnx").exists()  # nothing failed looks shippable
    assert (out / "model.int8.trt.rejected.onnx").is_file()


def test_gate_can_reject_and_continue(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, out = _gate_recipe(tiny_build, tmp_path, "reject")
    _worse_int8(monkeypatch)
    run_stage("quantize", recipe, Console(quiet=True))
    assert not (out / "model.int8.trt.onnx").exists()
    assert (out / "model.int8.trt.rejected.onnx").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert man["variants"]["int8_trt"]["status"] == "rejected"
    assert "model.int8.trt.rejected.onnx" in man["artifacts"]


def test_a_mutated_int8_variant_is_rejected_with_what_was_tried_and_the_build_goes_on(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    from onnx import numpy_helper

    from tlbuild.data.preprocess import Preprocessing, load_batch
    from tlbuild.gates import evaluate_gates
    from tlbuild.recipe import GatesConfig
    from tlbuild.runtime import open_onnx
    from tlbuild.stages import quantize

    recipe, out = _gate_recipe(tiny_build, tmp_path, "reject")
    q = recipe.quantize.model_copy(update={"variants": ("int8_cpu",), "search_budget": 0})
    recipe = recipe.model_copy(update={"quantize": q, "gates": GatesConfig(max_int8_drop=1.0)})
    # The tiny model is near chance; label each validation image with FP32's own answer, so
    # FP32 is right on all of them and every answer the variant changes is a real loss.
    splits = json.loads((out / "splits.json").read_text())
    spec = Preprocessing.from_dict(json.loads((out / "manifest.json").read_text())["preprocessing"])
    x = load_batch([Path(p) for p, _ in splits["val"]], spec)
    answers = open_onnx(out / "model.onnx").logits_in_batches(x, 32).argmax(1)
    splits["val"] = [[p, int(a)] for (p, _), a in zip(splits["val"], answers, strict=True)]
    (out / "splits.json").write_text(json.dumps(splits))
    real = quantize.make_int8

    def mutated(job):  # noqa: ANN001, ANN202 - the real variant, one class's score raised
        real(job)
        model = onnx.load(str(job.dst))
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        bias = next(i for i in model.graph.initializer if i.name == gemm.input[2])
        b = numpy_helper.to_array(bias).copy()
        b[int(np.bincount(answers).argmin())] += 50.0
        bias.CopyFrom(numpy_helper.from_array(b, bias.name))
        onnx.save(model, str(job.dst))

    monkeypatch.setattr(quantize, "make_int8", mutated)
    run_stage("quantize", recipe, Console(quiet=True))  # the default on_fail: no error
    assert not (out / "model.int8.cpu.onnx").exists()
    v = json.loads((out / "manifest.json").read_text())["variants"]["int8_cpu"]
    assert v["status"] == "rejected" and v["answers_changed"] > 0
    assert v["drop_upper_points"] >= v["drop_points"] > 1.0
    # What was tried is said, and only what was not is suggested.
    assert "Tried: percentile calibration." in v["reason"]
    assert 'calibration_method = "minmax"' in v["reason"] and "search_budget > 0" in v["reason"]
    assert 'calibration_method = "percentile"' not in v["reason"]
    # The report says so, and a gate on INT8 in the recipe fails on the measured drop.
    run_stage("report", recipe, Console(quiet=True))
    assert "int8_cpu` rejected: " in (out / "report.md").read_text()
    (gate,) = evaluate_gates(recipe.gates, out)
    assert gate.status == "failed" and "not shipped" in gate.note


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_calibration_method_works_on_any_number_of_images(
    tiny_build: Path, tmp_path: Path, method: str
) -> None:
    # 19 images: before, the last batch was smaller and the histogram methods crashed.
    out = tmp_path / "cal"
    shutil.copytree(tiny_build, out)
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    q = QuantizeConfig(
        variants=("int8_trt", "int8_cpu"),
        calibration_method=method,
        calibration_images=19,
        max_drop=100.0,
    )
    recipe = recipe.model_copy(update={"output_dir": tmp_path, "name": "cal", "quantize": q})
    results = run_stage("quantize", recipe, Console(quiet=True))
    assert {r.status for r in results.values()} == {"accepted"}
    man = json.loads((out / "manifest.json").read_text())
    assert man["calibration"]["method"] == method
    assert man["calibration"]["images"] % 16 != 0  # batches of 16 would not be equal
    assert not trt_qdq_problems(out / "model.int8.trt.onnx")
    import onnx
    from onnx import numpy_helper

    # What stays in float in the TensorRT flavour is FP16, scales included (opset 19).
    m = onnx.load(str(out / "model.int8.trt.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    assert inits[dq.input[1]].dtype == np.float16
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 19
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_calibration_batches_are_equal() -> None:
    from tlbuild.export.quantize import _calibration_batch as calibration_batch

    for n in (1, 7, 16, 19, 24, 300, 301):
        b = calibration_batch(n)
        assert n % b == 0 and 1 <= b <= 16
    assert calibration_batch(300) == 15 and calibration_batch(19) == 1


def test_a_library_failure_in_quantize_is_one_message(tmp_path: Path) -> None:
    from tlbuild.artifacts import VARIANTS
    from tlbuild.export.calibration import Calibration
    from tlbuild.export.quantize import Int8Job, Int8Settings, make_int8

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BuildError, match="could not|model.onnx"):
        make_int8(
            Int8Job(
                bad,
                tmp_path / "q.onnx",
                Calibration(bad, np.zeros((2, 3, 8, 8), np.float32), tmp_path),
                VARIANTS["int8_cpu"],
                Int8Settings("entropy"),
            )
        )


def test_int8_search_tries_methods_then_sensitive_layers_within_its_budget(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.artifacts import VARIANTS
    from tlbuild.data.preprocess import Preprocessing, load_batch
    from tlbuild.export.calibration import Calibration
    from tlbuild.export.int8_search import (
        SearchGoal,
        SearchImages,
        layer_sensitivity,
        search_int8,
    )
    from tlbuild.export.quantize import Int8Job, Int8Settings

    man = json.loads((tiny_build / "manifest.json").read_text())
    spec = Preprocessing.from_dict(man["preprocessing"])
    split = json.loads((tiny_build / "splits.json").read_text())
    x = load_batch([Path(p) for p, _ in split["train"]], spec)
    y = np.array([label for _, label in split["train"]])
    dst = tmp_path / "model.int8.cpu.onnx"

    def calibration(images: np.ndarray) -> Calibration:
        folder = tmp_path / f"calibration-{len(images)}"
        folder.mkdir(exist_ok=True)
        return Calibration(tiny_build / "model.onnx", images, folder)

    # An unreachable target: the search spends its whole budget and keeps the best trial.
    settings = Int8Settings("minmax", ("first_conv", "classifier"), True, 99.9)
    found = search_int8(
        Int8Job(
            tiny_build / "model.onnx", dst, calibration(x[:19]), VARIANTS["int8_cpu"], settings
        ),
        SearchImages(x[19:], y[19:], "test images"),
        SearchGoal(-1.0, 5, floor=False),
    )
    assert [t.method for t in found.trials[:3]] == ["minmax", "entropy", "percentile"]
    assert len(found.trials) == 5 and not found.within_target
    assert [len(t.extra_float) for t in found.trials[3:]] == [1, 2]
    # The TensorRT flavour, whose float parts are FP16, reaches its layer step too: its FP16
    # form has Cast nodes (here one ranked worst, as a cast classifier output can be) that
    # keep_float could not name in the FP32 model.
    from tlbuild.export import int8_search

    measured = int8_search.layer_sensitivity
    monkeypatch.setattr(
        int8_search,
        "layer_sensitivity",
        lambda path, images, on: (
            [("logits_DequantizeLinear_cast_to_logits", 1.0)] + measured(path, images, on)
        ),
    )
    trt = search_int8(
        Int8Job(
            tiny_build / "model.onnx",
            tmp_path / "model.int8.trt.onnx",
            calibration(x[:19]),
            VARIANTS["int8_trt"],
            settings,
        ),
        SearchImages(x[19:], y[19:], "test images"),
        SearchGoal(-1.0, 4, floor=False),
    )
    assert [len(t.extra_float) for t in trt.trials] == [0, 0, 0, 1]
    assert (found.drop_points, found.disagreement_points) == min(t.key() for t in found.trials)
    assert dst.is_file()
    ranked = layer_sensitivity(dst, x[:4])
    assert ranked and all(a[1] <= b[1] for a, b in zip(ranked, ranked[1:], strict=False))

    def search(variant: str, target: float):  # noqa: ANN202
        job = Int8Job(
            tiny_build / "model.onnx",
            dst,
            calibration(x[:16]),
            VARIANTS[variant],
            Int8Settings("minmax"),
        )
        return search_int8(job, SearchImages(x[16:], y[16:], "test images"), SearchGoal(target, 5))

    # A reachable target stops at the first trial.
    easy = search("int8_trt", 100.0)
    assert len(easy.trials) == 1 and easy.within_target and easy.extra_float == []
    # A target finer than one search image is met at one image's worth.
    one = search("int8_cpu", 0.0)
    assert one.tolerance_points == pytest.approx(100 / len(x[16:]), abs=1e-3)


def test_one_search_image_lost_is_within_a_floor_of_one_image(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.artifacts import VARIANTS
    from tlbuild.data.preprocess import Preprocessing, load_batch
    from tlbuild.export import int8_search
    from tlbuild.export.calibration import Calibration
    from tlbuild.export.int8_search import SearchGoal, SearchImages, search_int8
    from tlbuild.export.quantize import Int8Job, Int8Settings

    man = json.loads((tiny_build / "manifest.json").read_text())
    split = json.loads((tiny_build / "splits.json").read_text())
    x = load_batch(
        [Path(p) for p, _ in split["train"][:6]], Preprocessing.from_dict(man["preprocessing"])
    )
    labels = np.zeros(6, dtype=int)
    # Every trial gets the first of 6 images wrong that FP32 gets right: 16.6667 points, one
    # image's worth, which the floor of 100 / 6 points must accept at the first trial.
    wrong = np.tile([10.0, 0.0], (6, 1))
    wrong[0] = [0.0, 10.0]
    monkeypatch.setattr(int8_search, "_logits", lambda path, images, simulate, on: wrong)
    job = Int8Job(
        tiny_build / "model.onnx",
        tmp_path / "int8.onnx",
        Calibration(tiny_build / "model.onnx", x, tmp_path),
        VARIANTS["int8_cpu"],
        Int8Settings("minmax"),
    )
    found = search_int8(job, SearchImages(x, labels, "six", labels), SearchGoal(1.0, 4))
    assert len(found.trials) == 1 and found.within_target
    assert found.drop_points == found.tolerance_points == pytest.approx(100 / 6, abs=1e-4)


def _qdq_weight_graph(
    tmp_path: Path, op: str, w_shape: tuple[int, ...], axis: int, **attrs: int
) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    channels = w_shape[axis]
    inits = [
        numpy_helper.from_array(np.ones(w_shape, np.int8), "wq"),
        numpy_helper.from_array(np.full(channels, 0.1, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "zw"),
        numpy_helper.from_array(np.array(0.1, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.int8), "zx"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=axis),
        helper.make_node(op, ["xd", "wd"], ["y"], name="op", **attrs),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    path = tmp_path / f"{op}_{axis}.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        str(path),
    )
    return path


@pytest.mark.parametrize(
    ("op", "shape", "attrs", "good_axis"),
    [
        ("Conv", (8, 4, 3, 3), {}, 0),
        ("ConvTranspose", (4, 8, 3, 3), {}, 1),
        ("Gemm", (16, 8), {"transB": 0}, 1),
        ("Gemm", (8, 16), {"transB": 1}, 0),
    ],
)
def test_per_channel_weight_axis_follows_the_op(
    tmp_path: Path, op: str, shape: tuple[int, ...], attrs: dict[str, int], good_axis: int
) -> None:
    assert trt_qdq_problems(_qdq_weight_graph(tmp_path, op, shape, good_axis, **attrs)) == []
    bad = trt_qdq_problems(_qdq_weight_graph(tmp_path, op, shape, 1 - good_axis, **attrs))
    assert len(bad) == 1 and f"not per-channel on axis {good_axis}" in bad[0]


def test_trt_float_fp32_and_no_search_run_end_to_end(tiny_build: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "f32"
    shutil.copytree(tiny_build, out)
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    q = QuantizeConfig(variants=("int8_trt",), trt_float="fp32", search_budget=0, max_drop=100.0)
    recipe = recipe.model_copy(update={"output_dir": tmp_path, "name": "f32", "quantize": q})
    results = run_stage("quantize", recipe, Console(quiet=True))
    assert results["int8_trt"].status == "accepted" and results["int8_trt"].search is None
    m = onnx.load(str(out / "model.int8.trt.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    assert inits[dq.input[1]].dtype == np.float32
    assert not trt_qdq_problems(out / "model.int8.trt.onnx")


def test_the_search_decides_on_the_images_training_held_out(
    tiny_build: Path, tmp_path: Path
) -> None:
    out = tmp_path / "held"
    shutil.copytree(tiny_build, out)
    splits = json.loads((out / "splits.json").read_text())
    # As the train stage records data.holdout: images moved from train to holdout.
    splits["holdout"], splits["train"] = (
        splits["train"][::3],
        [e for i, e in enumerate(splits["train"]) if i % 3],
    )
    (out / "splits.json").write_text(json.dumps(splits))
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    q = QuantizeConfig(variants=("int8_cpu",), search_budget=1, max_drop=100.0)
    recipe = recipe.model_copy(update={"output_dir": tmp_path, "name": "held", "quantize": q})
    search = run_stage("quantize", recipe)["int8_cpu"].search
    assert search["images"] == len(splits["holdout"]) == 8
    assert "held out of training" in search["images_source"]


def test_max_changed_gates_answers_changed_at_any_accuracy_and_steers_the_search(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.export import int8_search
    from tlbuild.stages import quantize

    out = tmp_path / "changed"
    shutil.copytree(tiny_build, out)
    real = quantize.make_int8

    def mutated(job):  # noqa: ANN001, ANN202 - the real variant, class 0's score raised
        real(job)
        model = onnx.load(str(job.dst))
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        bias = next(i for i in model.graph.initializer if i.name == gemm.input[2])
        b = numpy_helper.to_array(bias).copy()
        b[0] += 50.0
        bias.CopyFrom(numpy_helper.from_array(b, bias.name))
        onnx.save(model, str(job.dst))

    monkeypatch.setattr(quantize, "make_int8", mutated)
    monkeypatch.setattr(int8_search, "make_int8", mutated)
    base = load_recipe(tiny_build.parent.parent / "tiny.toml")

    def build(**settings: object) -> dict:
        # max_drop = 100: the accuracy gate never rejects, so any rejection is max_changed's.
        q = QuantizeConfig(variants=("int8_cpu",), max_drop=100.0, **settings)
        recipe = base.model_copy(update={"output_dir": tmp_path, "name": "changed", "quantize": q})
        run_stage("quantize", recipe, Console(quiet=True))
        return json.loads((out / "manifest.json").read_text())["variants"]["int8_cpu"]

    # Every image is now called class 0: the answers FP32 gave another class all changed.
    v = build(max_changed=0.0, search_budget=3)
    assert v["status"] == "rejected" and v["answers_changed"] > 0
    assert "over quantize.max_changed = 0%" in v["reason"]
    assert "quantize.max_drop" not in v["reason"]
    assert not (out / "model.int8.cpu.onnx").exists()
    # The search judged each trial by answers changed too, so it spent its budget.
    assert len(v["search"]["trials"]) == 3 and not v["search"]["within_target"]
    assert v["search"]["changed_tolerance_points"] > 0  # floored at one search image
    # Unset (the default), answers changed are reported but not gated.
    v = build(search_budget=3)
    assert v["status"] == "accepted" and v["answers_changed"] > 0
    assert len(v["search"]["trials"]) == 1
    assert (out / "model.int8.cpu.onnx").is_file()


def test_max_changed_is_read_from_a_recipe_and_range_checked(tmp_path: Path) -> None:
    from tlbuild.errors import RecipeError

    path = tmp_path / "r.toml"
    (tmp_path / "d").mkdir()
    path.write_text('[data]\nroot = "d"\n[quantize]\nmax_changed = 2\n')
    assert load_recipe(path).quantize.max_changed == 2.0
    path.write_text(path.read_text().replace("max_changed = 2", "max_changed = -1"))
    with pytest.raises(RecipeError, match="quantize.max_changed"):
        load_recipe(path)


def test_a_model_truncated_on_a_full_disk_is_named_as_a_full_disk(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ONNX Runtime's writers can leave a truncated model on a full disk and fail only on
    # reading it back; with the disk nearly full, that is said as a full disk, not a method.
    import onnxruntime.quantization

    from tlbuild.artifacts import VARIANTS
    from tlbuild.errors import DiskFullError
    from tlbuild.export import quantize
    from tlbuild.export.calibration import Calibration
    from tlbuild.export.quantize import Int8Job, Int8Settings, make_int8

    def corrupt(*args: object, **kwargs: object) -> None:
        raise ValueError("Error parsing message: Wire format was corrupt")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", corrupt)
    images = np.zeros((4, 3, 64, 64), np.float32)
    job = Int8Job(
        tiny_build / "model.onnx",
        tmp_path / "model.int8.cpu.onnx",
        Calibration(tiny_build / "model.onnx", images, tmp_path),
        VARIANTS["int8_cpu"],
        Int8Settings("minmax", (), True, 99.9),
    )
    with pytest.raises(BuildError, match="Try another quantize.calibration_method"):
        make_int8(job)  # room on the disk: the library's failure, as before
    free = shutil.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(quantize.shutil, "disk_usage", lambda path: free)
    with pytest.raises(DiskFullError, match="no space left on the device holding"):
        make_int8(job)
