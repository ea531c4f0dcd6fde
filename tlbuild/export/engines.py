"""TensorRT engines for an export folder: compile each accepted ONNX variant, gate it against
FP32 and record it in the manifest.

Works from an export folder alone (ONNX files + manifest), so `tlbuild build --on-device DIR`
runs on the target machine with no training data. Where TensorRT or a GPU is missing the
engines are recorded as skipped with the reason; nothing else fails.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from tlbuild.artifacts import DEVICE_BATCH, MODEL_ONNX, ONNX_ARTIFACTS, TIMING_CACHE
from tlbuild.data.preprocess import Preprocessing, load_batch
from tlbuild.data.scan import Sample
from tlbuild.errors import BuildError, DiskFullError, UsageError
from tlbuild.export.compare import batches_of, compare_artifacts
from tlbuild.manifest import (
    Manifest,
    read_manifest,
    recipe_here,
    recorded_settings,
    write_section,
)
from tlbuild.recipe import EnginesConfig
from tlbuild.runtime.backends import TensorRTPredictor, open_onnx
from tlbuild.runtime.providers import CPU, Placement
from tlbuild.runtime.recorded import RecordedPredictor
from tlbuild.runtime.tensorrt import TensorRTEngine, tensorrt_status


def _engine_check(
    engine: TensorRTEngine,
    fp32: Path,
    images: np.ndarray,
    labels: np.ndarray,
    home: np.ndarray | None,
    on: Placement,
) -> dict[str, Any]:
    """The engine against FP32 on the same batches (those its profile takes): the logits the
    export shipped (on a device), else ONNX Runtime's here (`on`)."""
    reference = (
        open_onnx(fp32, on=on) if home is None else RecordedPredictor(images, home, DEVICE_BATCH)
    )
    candidate = TensorRTPredictor.from_engine(engine)
    batches = batches_of(images, engine.max_batch)
    c = compare_artifacts(reference, {"engine": candidate}, batches, labels)["engine"]
    c.pop("mean_abs_logit_diff")
    return c


def device_batch(folder: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The validation images, labels and home FP32 logits the export shipped, checked by sha256."""
    entry = manifest.device_batch
    if not entry:
        raise UsageError(
            f"{folder} carries no validation batch to judge engines on; export it again "
            "with export.device_images > 0 (the default), then copy the folder"
        )
    path = folder / entry["file"]
    manifest.verify(folder, entry["file"])
    h, w = Preprocessing.from_dict(manifest.preprocessing).input_size
    n, k = entry.get("images"), len(manifest.classes)
    # Shapes are checked in the headers before anything is loaded: the array sizes are the
    # file's word, and a few hundred bytes can claim terabytes.
    want = {"images": (n, 3, h, w), "labels": (n,), "fp32_logits": (n, k)}
    try:
        with zipfile.ZipFile(path) as zf:
            for key, shape in want.items():
                with zf.open(f"{key}.npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    found = read_header(f)[0]
                if tuple(found) != shape:
                    raise ValueError(f"{key} has shape {found}, the manifest says {shape}")
        with np.load(path) as z:
            return z["images"].astype(np.float32), z["labels"], z["fp32_logits"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UsageError(
            f"{path} is not the validation batch its manifest describes ({e}); "
            "copy the export folder again"
        ) from None


def _one_engine(
    folder: Path,
    variant: str,
    cfg: EnginesConfig,
    max_drop: float,
    data: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    console: Console,
    on: Placement,
) -> dict[str, Any]:
    from tlbuild.export.tensorrt_compile import BatchProfile, compile_engine

    a = ONNX_ARTIFACTS[variant]
    assert a.engine_label is not None
    info = compile_engine(
        folder / a.file,
        folder,
        a.engine_label,
        BatchProfile(cfg.min_batch, cfg.opt_batch, cfg.max_batch),
        cfg.workspace_mib,
        folder / TIMING_CACHE,
    )
    images, labels, home = data
    engine = TensorRTEngine(info.path)
    check = _engine_check(engine, folder / MODEL_ONNX, images, labels, home, on)
    passed = check["drop_points"] <= max_drop and (
        variant != "fp32" or check["max_abs_logit_diff"] <= cfg.fp32_atol
    )
    console.print(
        f"Engine {info.path.name}: agreement with ONNX FP32 {check['top1_agreement']:.1%}, "
        f"accuracy drop {check['drop_points']:+.2f} points on {check['images']} images"
        + ("" if passed else " [red]rejected[/]")
    )
    if not passed and cfg.on_fail == "error":
        raise BuildError(
            f"TensorRT engine {info.path.name} fails the gate against ONNX Runtime FP32: "
            f'{json.dumps(check)}; set build.on_fail = "reject" to continue without it'
        )
    return {
        **info.to_dict(),
        "path": info.path.name,
        **check,
        "status": "accepted" if passed else "rejected",
    }


def make_engines(
    folder: Path,
    cfg: EnginesConfig,
    max_drop: float,
    console: Console,
    samples: Sequence[Sample] | None,
    on: Placement = CPU,
) -> dict[str, Any]:
    """Compile and gate engines for `cfg.variants` in `folder`; record them in its manifest.

    `samples` are the validation images; None on a device, which uses the batch the export
    shipped (device_batch.npz) and applies the same gates.
    """
    manifest = read_manifest(folder)
    ok, why = tensorrt_status()
    section: dict[str, Any] = {"settings": cfg.model_dump(mode="json"), "max_drop": max_drop}
    if not ok:  # engines already here (shipped to a device) are left as they are
        console.print(f"[yellow]TensorRT engines skipped:[/] {why}")
        section.update(status="skipped", reason=why)
        write_section(folder, "engines", {"engines": section}, [])
        return section
    if samples:
        spec = Preprocessing.from_dict(manifest.preprocessing)
        x, y = load_batch([s.path for s in samples], spec), np.array([s.label for s in samples])
        data = (x, y, None)
    else:  # on a device: the batch the export shipped, same gates as at home
        data = device_batch(folder, manifest)
    if len(data[0]) < cfg.min_batch:
        raise UsageError(
            f"{len(data[0])} validation images cannot fill one batch of build.min_batch = "
            f"{cfg.min_batch}; lower it, or raise export.device_images"
        )
    for old in folder.glob("*.engine"):  # built for the variants being replaced
        old.unlink()
    engines: dict[str, Any] = {}
    for variant in cfg.variants:
        a = ONNX_ARTIFACTS[variant]
        if not (folder / a.file).is_file() or not manifest.accepted(a.file):
            engines[variant] = {"status": "skipped", "reason": f"no accepted {a.file}"}
            continue
        manifest.verify(folder, a.file)  # only the file its gate accepted becomes an engine
        try:
            engines[variant] = _one_engine(folder, variant, cfg, max_drop, data, console, on)
        except (UsageError, DiskFullError):  # the user's to fix, and the same for every variant
            raise
        except Exception as e:  # one variant that will not build does not stop the others
            # TensorRT raises its own types too (a Builder that cannot initialise CUDA is a
            # TypeError): each is this engine's failure, with the message.
            reason = str(e) if isinstance(e, BuildError) else f"{type(e).__name__}: {e}"
            if cfg.on_fail == "error":
                if isinstance(e, BuildError):
                    raise
                raise BuildError(f"TensorRT engine for {a.file} failed: {reason}") from e
            console.print(f"[red]Engine for {a.file} failed:[/] {escape(reason)}")
            engines[variant] = {"status": "failed", "reason": reason}
    section.update(status="built", engines=engines)
    files = [e["path"] for e in engines.values() if "path" in e] + [TIMING_CACHE]
    write_section(folder, "engines", {"engines": section}, files)
    return section


def settings_for_folder(folder: Path) -> tuple[EnginesConfig, float, str]:
    """[build] and quantize.max_drop for an export folder without a recipe argument.

    The recipe it was built from, as it is now, when that file is here and still writes to this
    folder; else the settings this stage or quantize recorded at home; else the defaults.
    """
    manifest = read_manifest(folder)
    recipe = recipe_here(folder, manifest)
    if recipe is not None:
        return recipe.build, recipe.quantize.max_drop, f"from {recipe.source}"
    engines, calib = manifest.engines, manifest.calibration
    if engines is not None and engines.settings:
        cfg = recorded_settings(EnginesConfig, engines.settings, folder, "engines.settings")
        drop = engines.max_drop if engines.max_drop is not None else 1.0
        return cfg, drop, "as recorded in manifest.json"
    # Folders exported before each stage recorded its own settings carry the whole recipe.
    old = manifest.recipe
    q = calib.settings if calib else old.get("quantize", {})
    drop = q.get("max_drop", 1.0) if isinstance(q, dict) else 1.0
    if not isinstance(drop, int | float):
        raise UsageError(f"{folder / 'manifest.json'}: max_drop {drop!r} is not a number")
    if "build" in old:
        cfg = recorded_settings(EnginesConfig, old["build"], folder, "recipe.build")
        return cfg, float(drop), "as recorded in manifest.json"
    return EnginesConfig(), float(drop), "defaults (manifest.json records no [build] settings)"
