"""What a client outside tlbuild gets: the conformance kit, `tlbuild verify-client` naming the
step a client gets wrong, and `tlbuild classify` running the image-input twins."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from tlbuild.cli import app
from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, load_input

runner = CliRunner()


def _kit(folder: Path) -> dict:
    return json.loads((folder / "conformance" / "kit.json").read_text())


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_kit_holds_every_step_of_every_image(tiny_build: Path) -> None:
    kit, root = _kit(tiny_build), tiny_build / "conformance"
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    spec = Preprocessing.from_dict(manifest["preprocessing"])
    names = [Path(r["file"]).name for r in kit["images"]]
    assert len(names) == 8 + 4 and any("exif_rotated" in n for n in names)
    assert {"model.onnx", "model_image.onnx", "model_image.int8.cpu.onnx"} <= set(kit["artifacts"])
    assert manifest["conformance"]["images"] == 12
    for r in kit["images"]:
        decoded = np.asarray(Image.open(root / r["decoded"]["file"]))
        assert np.array_equal(decoded, np.asarray(load_rgb(root / r["file"])))
        tensor = np.load(root / r["input"]["file"])
        want = load_input(root / r["file"], spec, exact=True).array[None]
        assert np.array_equal(tensor, want)
        # The recorded logits are what each artifact gives on the recorded inputs.
        image = _session(tiny_build / "model_image.onnx")
        got = image.run(None, {"image": decoded[None]})[0][0]
        assert np.allclose(got, r["expected"]["model_image.onnx"]["logits"], atol=1e-4)
        fp32 = _session(tiny_build / "model.onnx")
        got = fp32.run(None, {fp32.get_inputs()[0].name: tensor})[0][0]
        assert np.allclose(got, r["expected"]["model.onnx"]["logits"], atol=1e-4)
        assert r["expected"]["model.onnx"]["label"] in kit["classes"]
    by_name = {Path(r["file"]).name: r for r in kit["images"]}
    rotated = next(r for n, r in by_name.items() if "exif_rotated" in n)
    with Image.open(root / rotated["file"]) as raw:  # stored on its side, upright once decoded
        assert raw.size[::-1] == tuple(rotated["decoded"]["shape"][:2])
    alpha = next(r for n, r in by_name.items() if "alpha" in n)
    assert "alpha dropped, not composited on white" in alpha["mistakes"]
    larger = next(r for n, r in by_name.items() if "larger" in n)
    assert larger["decoded"]["shape"][0] > larger["resized"]["shape"][0]


def _client(tiny_build: Path, out: Path, mistake: str = "", dumps: bool = True) -> Path:
    """A client apart from tlbuild's decode: the kit's files read with Pillow's plain calls and
    its own EXIF, alpha and 16-bit handling; its decoded pixels into model_image.onnx."""
    from PIL import ImageOps

    kit, root = _kit(tiny_build), tiny_build / "conformance"
    s = _session(tiny_build / "model_image.onnx")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in kit["images"]:
        with Image.open(root / r["file"]) as img:
            if mistake != "exif":
                img = ImageOps.exif_transpose(img)
            if img.mode == "I;16":
                v = np.asarray(img, np.float64)
                g = np.clip(np.floor(v / 257 + 0.5), 0, 255).astype(np.uint8)
                rgb = np.dstack([g, g, g])
            elif img.mode == "RGBA" and mistake != "alpha":
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                rgb = np.asarray(Image.alpha_composite(white, img).convert("RGB"))
            else:
                rgb = np.asarray(img.convert("RGB"))
        if mistake == "bgr":
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        name = Path(r["file"]).stem + ".png"
        Image.fromarray(rgb).save(out / name)
        logits = s.run(None, {"image": rgb[None]})[0][0]
        rows.append({"image": r["file"], "artifact": "model_image.onnx",
                     "logits": " ".join(f"{v:.7g}" for v in logits),
                     "decoded": name if dumps else ""})  # fmt: skip
    with (out / "RESULTS.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["image", "artifact", "logits", "decoded"])
        w.writeheader()
        w.writerows(rows)
    return out / "RESULTS.csv"


def test_verify_client_passes_a_client_that_conforms(tiny_build: Path, tmp_path: Path) -> None:
    results = _client(tiny_build, tmp_path / "ok")
    r = runner.invoke(app, ["verify-client", str(results), "--kit", str(tiny_build)])
    assert r.exit_code == 0, r.output
    assert "12 of 12 rows conform (steps compared: decode, model)" in r.output
    assert "not in the results" not in r.output


@pytest.mark.parametrize(
    ("mistake", "file", "said"),
    [
        ("bgr", "01_", "BGR order"),
        ("exif", "exif_rotated", "EXIF orientation was not applied"),
        ("alpha", "alpha", "grey levels off"),
    ],
)
def test_verify_client_names_the_step_and_the_mistake(
    tiny_build: Path, tmp_path: Path, mistake: str, file: str, said: str
) -> None:
    results = _client(tiny_build, tmp_path / mistake, mistake)
    r = runner.invoke(
        app, ["verify-client", str(results), "--kit", str(tiny_build / "conformance")]
    )
    assert r.exit_code == 1
    line = next(x for x in r.output.splitlines() if file in x and "differs" in x)
    assert "decode step" in line and said in line, r.output


def test_verify_client_without_dumps_judges_the_answers(tiny_build: Path, tmp_path: Path) -> None:
    results = _client(tiny_build, tmp_path / "plain", dumps=False)
    text = results.read_text().splitlines()
    # One row's scores pushed to another class: the model step differs, and says how.
    kit = _kit(tiny_build)
    want = kit["images"][0]["expected"]["model_image.onnx"]
    other = (kit["classes"].index(want["label"]) + 1) % len(kit["classes"])
    logits = [0.0] * len(kit["classes"])
    logits[other] = 9.0
    head, first, rest = text[0], text[1].split(","), text[2:]
    first[2] = '"' + " ".join(map(str, logits)) + '"'
    results.write_text("\n".join([head, ",".join(first[:2] + [first[2]] + first[3:]), *rest]))
    r = runner.invoke(app, ["verify-client", str(results), "--kit", str(tiny_build)])
    assert r.exit_code == 1
    assert "model step" in r.output and f"where tlbuild answers {want['label']}" in r.output
    assert "11 of 12 rows conform (steps compared: model)" in r.output


def test_verify_client_says_what_a_malformed_file_lacks(tiny_build: Path, tmp_path: Path) -> None:
    bad = tmp_path / "r.csv"
    bad.write_text("file,score\na.jpg,0.5\n")
    r = runner.invoke(app, ["verify-client", str(bad), "--kit", str(tiny_build)])
    assert r.exit_code == 2 and "needs columns image, artifact and logits" in r.output
    r = runner.invoke(app, ["verify-client", str(bad), "--kit", str(tmp_path)])
    assert r.exit_code == 2 and "no conformance kit" in r.output
    wrong = tmp_path / "w.csv"
    wrong.write_text('image,artifact,logits\nimages/nope.jpg,model.onnx,"1 2 3 4"\n')
    r = runner.invoke(app, ["verify-client", str(wrong), "--kit", str(tiny_build)])
    assert r.exit_code == 1 and "'images/nope.jpg' is not an image of the kit" in r.output


def test_classify_runs_an_image_model_on_images_of_any_size(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(tiny_data, inputs)
    for i, size in enumerate([(90, 70), (64, 64), (203, 151)]):  # several sizes in one batch
        Image.open(next(tiny_data.rglob("*.jpg"))).resize(size).save(inputs / f"odd_{i}.png")
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    outs = {}
    for artifact in ("model_image.onnx", "model.onnx"):
        out = tmp_path / f"{artifact}.parquet"
        args = ["classify", str(inputs), "--model", str(tiny_build), "--artifact", artifact,
                "--provider", "cpu", "--exact-decode", "--out", str(out)]  # fmt: skip
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        outs[artifact] = pd.read_parquet(out).set_index("path").sort_index()
    a, b = outs["model_image.onnx"], outs["model.onnx"]
    assert len(a) == len(b) == 32 + 3 + 1 and a.artifact.iloc[0] == "model_image.onnx"
    ok = a.error.isna()
    assert (~ok).sum() == 1 and "broken.jpg" in a[~ok].index[0]
    assert (a.label[ok] == b.label[ok]).mean() >= 34 / 35
    assert (a.score[ok] - b.score[ok]).abs().max() < 0.05
    assert a.novelty[ok].notna().all()  # the twin keeps the features output


def _rows(results: Path) -> list[dict[str, str]]:
    with results.open(newline="") as f:
        return list(csv.DictReader(f))


def _write(results: Path, rows: list[dict[str, str]], bom: bool = False) -> None:
    with results.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _verify(results: Path, kit: Path) -> tuple[int, str]:
    r = runner.invoke(app, ["verify-client", str(results), "--kit", str(kit)])
    return r.exit_code, r.output


def test_verify_client_holds_scores_decisions_and_missing_rows(
    tiny_build: Path, tmp_path: Path
) -> None:
    results = _client(tiny_build, tmp_path / "c", dumps=False)
    rows = _rows(results)
    kit = _kit(tiny_build)
    # A byte-order mark (C#'s UTF-8 writer) is read as such, not as part of a column's name.
    _write(results, rows, bom=True)
    assert _verify(results, tiny_build)[0] == 0
    # NaN scores never pass, whatever class argmax would pick.
    nan = [dict(rows[0], logits=" ".join(["nan"] * len(kit["classes"]))), *rows[1:]]
    _write(results, nan)
    code, out = _verify(results, tiny_build)
    assert code == 1 and "not all finite" in out
    # A stated decision other than tlbuild's is a difference even where the label agrees.
    want = kit["images"][0]["expected"]["model_image.onnx"]
    flipped = [dict(r, defective="") for r in rows]
    flipped[0]["defective"] = str(not want["defective"])
    _write(results, flipped)
    code, out = _verify(results, tiny_build)
    assert code == 1 and f"its defective column says {not want['defective']}" in out
    # A client that leaves out a file it could not read has not passed on it.
    _write(results, rows[:-1])
    code, out = _verify(results, tiny_build)
    assert code == 1 and "no row for 1 image(s) of the kit" in out
    # A dump that is not there is a difference, never a pass with nothing compared.
    _write(results, [dict(r, decoded="nowhere.png") for r in rows])
    code, out = _verify(results, tiny_build)
    assert code == 1 and "0 of 12 rows conform" in out and "is not there" in out
    # A Windows client's paths (Path.Combine) are the same paths.
    _write(results, [dict(r, image=r["image"].replace("/", "\\")) for r in rows])
    assert _verify(results, tiny_build)[0] == 0


def test_verify_client_judges_each_step_on_the_client_s_own_pixels(
    tiny_build: Path, tmp_path: Path
) -> None:
    kit, root = _kit(tiny_build), tiny_build / "conformance"
    record = next(r for r in kit["images"] if "larger" in r["file"])  # the resize shrinks it
    decoded = np.asarray(Image.open(root / record["decoded"]["file"])).astype(np.int16)
    brighter = np.clip(decoded + 1, 0, 255).astype(np.uint8)  # within the JPEG tolerance
    from tlbuild.data.preprocess import normalize, resize_for_model

    spec = Preprocessing.from_dict(kit["preprocessing"])
    resized = np.asarray(resize_for_model(Image.fromarray(brighter), spec))
    tensor = normalize(Image.fromarray(resized), spec)[None]
    Image.fromarray(brighter).save(tmp_path / "d.png")
    Image.fromarray(resized).save(tmp_path / "r.png")
    np.save(tmp_path / "x.npy", tensor)
    np.save(tmp_path / "f.npy", resized.astype(np.float32))
    logits = _session(tiny_build / "model.onnx").run(None, {"input": tensor})[0][0]
    row = {"image": record["file"], "artifact": "model.onnx",
           "logits": " ".join(map(str, logits)), "decoded": "d.png", "resized": "r.png",
           "input": "x.npy"}  # fmt: skip
    results = tmp_path / "RESULTS.csv"
    rows = [row] + [
        {
            "image": r["file"],
            "artifact": "model.onnx",
            "logits": " ".join(map(str, r["expected"]["model.onnx"]["logits"])),
            "decoded": "",
            "resized": "",
            "input": "",
        }  # fmt: skip
        for r in kit["images"]
        if r is not record
    ]
    _write(results, rows)
    code, out = _verify(results, tiny_build)
    assert code == 0, out
    assert "steps compared: decode, model, normalise, resize" in out
    rows[0]["resized"] = "f.npy"  # float pixels where 8-bit ones belong: said, no traceback
    _write(results, rows)
    code, out = _verify(results, tiny_build)
    assert code == 1 and "resize step" in out and "holds float32 values" in out


def test_the_kit_names_the_exif_mistake_on_a_square_image(tiny_build: Path) -> None:
    kit = _kit(tiny_build)
    rotated = next(r for r in kit["images"] if "exif_rotated" in r["file"])
    assert rotated["decoded"]["shape"][0] == rotated["decoded"]["shape"][1]  # square: 64x64
    assert "EXIF orientation not applied" in rotated["mistakes"]
    assert "alpha dropped, not composited on white" not in rotated["mistakes"]
    assert kit["rule"]["ok_class"] == "ok"


def test_decoded_batches_merge_in_order_for_both_kinds() -> None:
    from tlbuild.classify.rows import Decoded

    a = Decoded(["a", "b"], [np.zeros((4, 5, 3), np.uint8)], [1], [None, 5], [None, 4],
                [1, 2], ["bad", None])  # fmt: skip
    b = Decoded(["c"], [np.ones((2, 2, 3), np.uint8)], [0], [2], [2], [3], [None])
    m = Decoded.merge([a, b])
    assert m.paths == ["a", "b", "c"] and m.ok == [1, 2] and len(m.batch) == 2
    assert m.error == ["bad", None, None] and m.batch[1].shape == (2, 2, 3)
    x = Decoded(["a"], np.zeros((1, 3, 4, 4), np.float32), [0], [4], [4], [1], [None])
    y = Decoded(["b"], np.ones((1, 3, 4, 4), np.float32), [0], [4], [4], [1], [None])
    merged = Decoded.merge([x, y])
    assert isinstance(merged.batch, np.ndarray) and merged.batch.shape == (2, 3, 4, 4)


def test_a_center_crop_recipe_gets_twins_that_crop_as_classify_does(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from conftest import run_stage

    from tlbuild.recipe import load_recipe

    out = tmp_path / "tiny"
    shutil.copytree(tiny_build, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["preprocessing"].update(resize="center_crop", crop_pct=0.875)
    (out / "manifest.json").write_text(json.dumps(manifest))
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    recipe = recipe.model_copy(update={"output_dir": tmp_path})
    records = run_stage("image_models", recipe)
    assert records["model_image.onnx"]["check"]["top1_agreement"] == 1.0
    assert "centre crop" in records["model_image.onnx"]["resize"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, size in enumerate([(90, 70), (70, 120), (203, 151)]):  # crops that differ in shape
        for j, p in enumerate(sorted(tiny_data.rglob("*.jpg"))[:4]):
            Image.open(p).resize(size).save(inputs / f"{i}_{j}.png")
    outs = {}
    for artifact in ("model_image.onnx", "model.onnx"):
        res = tmp_path / f"{artifact}.parquet"
        args = ["classify", str(inputs), "--model", str(out), "--artifact", artifact,
                "--provider", "cpu", "--novelty", "off", "--out", str(res)]  # fmt: skip
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        outs[artifact] = pd.read_parquet(res).set_index("path").sort_index()
    a, b = outs["model_image.onnx"], outs["model.onnx"]
    assert (a.label == b.label).all() and (a.score - b.score).abs().max() < 0.02


def test_results_of_the_old_draft_decode_say_how_to_continue(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.parquet"
    args = ["classify", str(tiny_data), "--model", str(tiny_build), "--out", str(out)]
    assert runner.invoke(app, [*args, "--no-exact-decode"]).exit_code == 0
    r = runner.invoke(app, args, env={"COLUMNS": "500"})  # the default: the full decode
    assert r.exit_code == 2 and "add --no-exact-decode" in r.output
    assert runner.invoke(app, [*args, "--no-exact-decode"]).exit_code == 0


def test_verify_client_refuses_a_pipe_or_folder_as_results(
    tiny_build: Path, tmp_path: Path
) -> None:
    import os

    pipe = tmp_path / "results.csv"
    os.mkfifo(pipe)
    code, out = _verify(pipe, tiny_build)  # returns at once: a pipe is never opened
    assert code == 2 and "not a regular file" in out
    code, out = _verify(tmp_path, tiny_build)
    assert code == 2 and "name the CSV file itself" in out


@pytest.mark.parametrize("off", ["image_models", "kit_images", "both"])
def test_each_clients_option_turns_off_its_own_part(
    tiny_build: Path, tmp_path: Path, off: str
) -> None:
    from tlbuild import runner as build
    from tlbuild.recipe import ClientsConfig, load_recipe

    out = tmp_path / "tiny"
    shutil.copytree(tiny_build, out)
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    settings = {"image_models": {"image_models": False}, "kit_images": {"kit_images": 0}}
    settings["both"] = {**settings["image_models"], **settings["kit_images"]}
    cfg = ClientsConfig(**settings[off])
    recipe = recipe.model_copy(update={"output_dir": tmp_path, "clients": cfg})
    build.run(recipe, Console(quiet=True))
    manifest = json.loads((out / "manifest.json").read_text())
    if off == "both":  # both stages off: their files, folders and manifest sections gone
        assert not list(out.glob("model_image*")) and not (out / "conformance").exists()
        assert "image_models" not in manifest
        assert not any("image" in a for a in manifest["artifacts"])
    elif off == "image_models":  # the kit stays, for the tensor models alone
        assert not list(out.glob("model_image*")) and "image_models" not in manifest
        kit = _kit(out)
        assert "model.onnx" in kit["artifacts"]
        assert not any(a.startswith("model_image") for a in kit["artifacts"])
    else:  # the twins stay, the kit goes
        assert (out / "model_image.onnx").is_file() and "model_image.onnx" in manifest["artifacts"]
        assert not (out / "conformance").exists() and "conformance" not in manifest
