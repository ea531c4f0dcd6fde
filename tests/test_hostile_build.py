"""Hostile files and unlucky timing on the build side: names from manifests stay in their folder,
one build per export folder, a full disk is one message, a variant ships only after its gate."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tlbuild.classify.storage import fetch_model
from tlbuild.errors import UsageError
from tlbuild.manifest import read_manifest


def _tamper(manifest_path: Path, name: str, data: bytes) -> None:
    """List `name` in a manifest with the sha256 and size of `data`, as an attacker who can
    write the whole folder would."""
    m = json.loads(manifest_path.read_text())
    m["artifacts"][name] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "stage": "export",
    }
    manifest_path.write_text(json.dumps(m))


def _copy_with_manifest(tiny_build: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the build to damage, and its manifest as JSON (write it back with _save)."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_build, folder)
    return folder, json.loads((folder / "manifest.json").read_text())


def _save(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", ["../../../../{tmp}/x.onnx", "{tmp}/x.onnx", "sub/x.onnx", ".."])
def test_a_remote_manifest_cannot_name_a_file_outside_the_cache(
    tiny_build: Path, tmp_path: Path, bad: str
) -> None:
    import fsspec

    target = tmp_path / "planted"
    target.mkdir()
    name = bad.format(tmp=str(target).lstrip("/") if bad.startswith("..") else str(target))
    fs = fsspec.filesystem("memory")
    prefix = f"/evil-{abs(hash(bad))}/model"
    for p in tiny_build.iterdir():
        if p.is_file():
            fs.pipe_file(f"{prefix}/{p.name}", p.read_bytes())
    payload = b"planted by a tampered manifest"
    local = tmp_path / "manifest.json"
    local.write_bytes((tiny_build / "manifest.json").read_bytes())
    _tamper(local, name, payload)
    fs.pipe_file(f"{prefix}/manifest.json", local.read_bytes())
    fs.pipe_file(f"{prefix}/{name}", payload)
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match="not a plain file name"):
        fetch_model(f"memory:/{prefix}", cache)
    assert not (target / "x.onnx").exists()
    assert not any(cache.rglob("x.onnx"))


def test_a_remote_file_larger_than_its_manifest_says_is_not_downloaded(
    tiny_build: Path, tmp_path: Path
) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in tiny_build.iterdir():
        if p.is_file():
            fs.pipe_file(f"/big/model/{p.name}", p.read_bytes())
    fs.pipe_file("/big/model/model.onnx", b"\0" * 10_000_000)
    with pytest.raises(UsageError, match="not the size its manifest gives"):
        fetch_model("memory://big/model", tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("model.onnx"))


@pytest.mark.parametrize(
    "where",
    ["artifacts", "variants", "onnx", "engines", "device_batch"],
)
def test_a_local_manifest_naming_a_path_outside_its_folder_is_refused(
    tiny_build: Path, tmp_path: Path, where: str
) -> None:
    folder, m = _copy_with_manifest(tiny_build, tmp_path)
    if where == "artifacts":
        m["artifacts"]["/etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    elif where == "variants":
        next(iter(m["variants"].values()))["file"] = "../model.onnx"
    elif where == "onnx":
        m["onnx"]["file"] = "/tmp/model.onnx"
    elif where == "engines":
        m["engines"] = {"status": "built", "engines": {"fp16": {"path": "../x.engine"}}}
    else:
        m["device_batch"]["file"] = "../../device_batch.npz"
    _save(folder, m)
    with pytest.raises(UsageError, match="not a plain file name"):
        read_manifest(folder)


# -- a variant ships only after its gate ---------------------------------------------------------


def test_no_variant_has_a_shippable_name_before_its_gate(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from tests.conftest import run_stage
    from tlbuild.recipe import QuantizeConfig, load_recipe
    from tlbuild.stages import quantize

    out = tmp_path / "q"
    shutil.copytree(tiny_build, out)
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    q = QuantizeConfig(variants=("fp16", "int8_cpu"), search_budget=0)
    recipe = recipe.model_copy(update={"output_dir": tmp_path, "name": "q", "quantize": q})
    seen: list[list[str]] = []

    def killed_in_the_gate(*args, **kw):  # noqa: ANN002, ANN003
        seen.append(sorted(p.name for p in out.glob("model.*.onnx")))
        raise KeyboardInterrupt  # what SIGINT/SIGTERM raise while the gate runs

    monkeypatch.setattr(quantize, "evaluate_variants", killed_in_the_gate)
    with pytest.raises(KeyboardInterrupt):
        run_stage("quantize", recipe, Console(quiet=True))
    assert seen == [[]]  # the candidates existed only in the scratch folder
    assert not list(out.glob("model.*.onnx")) and not (out / ".scratch").exists()


# -- one build per export folder -----------------------------------------------------------------


def _tlbuild(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tlbuild", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_a_second_build_of_a_folder_is_refused_naming_the_first(
    tiny_build: Path, tmp_path: Path
) -> None:
    from tlbuild.folder_lock import folder_lock

    recipe = tiny_build.parent.parent / "tiny.toml"
    mine = tiny_build / f".model.{os.getpid()}-inflight.tmp.onnx"  # a live writer's file
    aside = tiny_build / ".aside" / "bench" / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TLBUILD_FOLDER_LOCK"}
    with folder_lock(tiny_build):
        mine.write_bytes(b"half written")
        aside.parent.mkdir(parents=True)
        aside.write_text("{}")
        try:
            done = _tlbuild("run", str(recipe), env=env)
            assert done.returncode == 2, done.stderr
            assert f"pid {os.getpid()}" in done.stderr and "being written by" in done.stderr
            assert "Traceback" not in done.stderr
            # The refused run touched nothing of the running one.
            assert mine.read_bytes() == b"half written" and aside.is_file()
        finally:
            mine.unlink(missing_ok=True)
            shutil.rmtree(tiny_build / ".aside", ignore_errors=True)
    # Released when the holder ends: the next command gets it.
    with folder_lock(tiny_build):
        pass


def test_a_killed_writers_temporary_files_are_removed_and_a_live_ones_kept(
    tmp_path: Path,
) -> None:
    from tlbuild.runner import _writing

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    gone = tmp_path / f".model.fp16.{int(dead.stdout)}-abc123.tmp.onnx"
    kept = tmp_path / f".results.{os.getpid()}-def456.tmp.parquet"
    users = tmp_path / ".notes.tmp.txt"  # not a name tlbuild writes: never removed
    spill = tmp_path / "checkpoints" / f".tlbuild-cache.{int(dead.stdout)}-x1.tmp.u8"
    spill.parent.mkdir()
    for p in (gone, kept, users, spill):
        p.write_bytes(b"x")
    (tmp_path / ".aside" / "bench").mkdir(parents=True)
    with _writing(tmp_path):
        assert not gone.exists() and kept.exists() and users.exists() and not spill.exists()
        assert not (tmp_path / ".aside").exists()


def test_a_process_started_by_the_holder_works_under_its_lock(tmp_path: Path) -> None:
    from tlbuild.folder_lock import folder_lock

    code = (
        "from tlbuild.folder_lock import folder_lock; import sys\n"
        f"with folder_lock(__import__('pathlib').Path({str(tmp_path)!r})): print('in')"
    )
    with folder_lock(tmp_path):
        # torchrun's training processes inherit the environment of `run --nproc-per-node`.
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert child.stdout.strip() == "in", child.stderr
        stranger_env = {k: v for k, v in os.environ.items() if k != "TLBUILD_FOLDER_LOCK"}
        stranger = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=stranger_env
        )
        assert "being written by another tlbuild" in stranger.stderr


# -- a full disk is one message ------------------------------------------------------------------


def test_a_checkpoint_on_a_full_disk_is_one_error_naming_the_file(small_disk) -> None:  # noqa: ANN001
    import torch

    from tlbuild.errors import DiskFullError
    from tlbuild.fileio import atomic_path

    disk = small_disk(512)
    # torch.save drops the errno ("unexpected pos ..."); the message must still say why.
    full = f"no space left on the device holding {disk}/model.pt"
    with pytest.raises(DiskFullError, match=full), atomic_path(disk / "model.pt") as tmp:
        torch.save({"w": torch.zeros(1_000_000)}, tmp)
    assert not list(disk.iterdir())  # no half file, under any name


def test_a_build_that_fills_its_disk_is_one_message_and_keeps_what_it_had(
    tiny_build: Path,
    small_disk,  # noqa: ANN001
) -> None:
    src = tiny_build.parent.parent
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    # The copy (less model_image.onnx, which the export removes first anyway), and 2 MiB: not
    # room for a second model.onnx.
    image = (tiny_build / "model_image.onnx").stat().st_size
    disk = small_disk((used - image) // 1024 + 2048)
    shutil.copy(src / "tiny.toml", disk / "tiny.toml")
    skip = shutil.ignore_patterns("model_image.onnx")
    shutil.copytree(tiny_build, disk / "out" / "tiny", ignore=skip)
    before = (disk / "out" / "tiny" / "model.onnx").read_bytes()
    done = _tlbuild("run", str(disk / "tiny.toml"), "--force", "export")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "no space left on the device holding" in done.stderr
    assert "finished files are kept" in done.stderr
    assert (disk / "out" / "tiny" / "model.onnx").read_bytes() == before
    assert not list((disk / "out" / "tiny").glob(".*.tmp*"))


# -- values read back from files tlbuild wrote earlier, damaged or tampered since ----------------


_DECISION = {
    "threshold": 0.5,
    "rule": "p(ok)<0.5",
    "ok_class": "ok",
    "target": {"max_escape_rate": 0.005},
    "confidence": 0.95,
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"decision": {**_DECISION, "threshold": float("nan")}}, "not a probability"),
        ({"decision": {**_DECISION, "threshold": 5.0}}, "not a probability"),
        (
            {"decision": {**_DECISION, "target": {"max_escape_rate": 0.1, "x": 1}}},
            "target must be one of",
        ),
        ({"decision": {**_DECISION, "ok_class": "nope"}}, "not one of the classes"),
        ({"preprocessing": {"input_size": [100000, 100000]}}, "preprocessing"),
        ({"preprocessing": {"crop_pct": 0}}, "crop_pct"),
        ({"preprocessing": {"interpolation": "magic"}}, "unknown interpolation"),
        ({"device_batch": {"images": 8}}, "not a plain file name"),
    ],
)
def test_damaged_manifest_values_are_one_message(
    tiny_build: Path, tmp_path: Path, change: dict, message: str
) -> None:
    folder, m = _copy_with_manifest(tiny_build, tmp_path)
    for key, value in change.items():
        m[key] = {**m[key], **value} if key == "preprocessing" else value
    _save(folder, m)
    with pytest.raises(UsageError, match=message):
        read_manifest(folder)
    if key == "decision":  # the value classify would apply to every image
        done = _tlbuild("bench", str(folder))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


def test_a_device_batch_claiming_a_huge_array_is_refused_before_loading(
    tiny_build: Path, tmp_path: Path
) -> None:
    import io
    import zipfile

    import numpy as np

    from tlbuild.export.engines import device_batch

    folder = tmp_path / "copy"
    shutil.copytree(tiny_build, folder)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 3, 4096, 4096)}
    )
    with zipfile.ZipFile(folder / "device_batch.npz", "w") as zf:
        for key in ("images", "labels", "fp32_logits"):
            zf.writestr(f"{key}.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:])
    data = (folder / "device_batch.npz").read_bytes()
    _tamper(folder / "manifest.json", "device_batch.npz", data)  # a matching sha256, as planted
    with pytest.raises(UsageError, match="not the validation batch its manifest describes"):
        device_batch(folder, read_manifest(folder))


@pytest.mark.parametrize(
    "val", [[["a.png", 7]], [["a.png"]], [[1, 0]], "x", [["a.png", True]]], ids=str
)
def test_a_damaged_splits_file_is_one_message(tmp_path: Path, val: object) -> None:
    from tlbuild.data.splits_file import read_split

    (tmp_path / "splits.json").write_text(json.dumps({"classes": ["a", "b"], "val": val}))
    with pytest.raises(UsageError, match="splits.json"):
        read_split(tmp_path, "val", ["a", "b"])


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"format": "tlbuild.state/3", "stages": []},
        {"format": "tlbuild.state/3", "stages": {"train": "x"}},
        {
            "format": "tlbuild.state/3",
            "stages": {
                "train": {
                    "finished": "t",
                    "inputs": {},
                    "outputs": {"files": {"../../../etc/passwd": "0"}},
                }
            },
        },
    ],
    ids=["list", "stages-list", "record-string", "outside-name"],
)
def test_a_damaged_build_state_is_no_record(tmp_path: Path, state: object) -> None:
    from tlbuild.incremental import StageRecords

    (tmp_path / "build_state.json").write_text(json.dumps(state))
    assert StageRecords(tmp_path).stages == {}


def test_an_aside_folder_that_is_a_link_is_never_followed(tmp_path: Path) -> None:
    from tlbuild.runner import _writing

    outside = tmp_path / "outside"
    (outside / "bench").mkdir(parents=True)
    (outside / "bench" / "keep.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".aside").symlink_to(outside)
    with _writing(out):
        assert not (out / ".aside").exists()
    assert (outside / "bench" / "keep.json").is_file()


# -- recipe and `tlbuild check` ------------------------------------------------------------------


def test_check_fails_for_what_run_would_fail_on(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the export folder goes")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'output_dir = "taken"\n[data]\nroot = "{tiny_data}"\n[model]\nbackbone = "resnet_nope"\n'
    )
    done = _tlbuild("check", str(recipe))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'resnet_nope' is not a timm model" in done.stderr
    assert "taken is a file" in done.stderr
    folder = _tlbuild("check", str(tmp_path))
    assert folder.returncode == 2 and "is a folder; name the recipe's .toml file" in folder.stderr
    assert "r.toml" in folder.stderr


def test_a_model_of_another_width_than_its_classes_is_refused_at_open(
    tiny_build: Path, tmp_path: Path
) -> None:
    from tlbuild.runtime.load import load_predictor

    folder, m = _copy_with_manifest(tiny_build, tmp_path)
    m["classes"] = [*m["classes"], "extra"]
    _save(folder, m)
    with pytest.raises(UsageError, match=r"outputs 4 scores but its manifest names 5 classes"):
        load_predictor(folder, "model.onnx", "cpu")


def test_a_damaged_model_file_is_one_message(tmp_path: Path) -> None:
    import torch

    from tlbuild.models.checkpoint import load_trained

    torch.save({"format": "tlbuild.model/1", "backbone": "resnet18"}, tmp_path / "model.pt")
    with pytest.raises(UsageError, match="a damaged tlbuild model file"):
        load_trained(tmp_path / "model.pt")


def test_a_lock_file_planted_as_a_link_is_never_written_through(tmp_path: Path) -> None:
    from tlbuild.folder_lock import folder_lock

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tlbuild.lock").symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"), folder_lock(out):
        pass
    assert target.read_text() == "keep me"
