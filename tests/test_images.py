from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlbuild.data.images import ImageReadError, load_rgb


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "png"),
        ("LA", "png"),
        ("P", "png"),
        ("RGBA", "png"),
        ("CMYK", "jpeg"),
        ("I;16", "png"),
        ("I", "tiff"),
        ("1", "png"),
        ("RGB", "webp"),
    ],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    img = Image.new("RGB", (20, 10), (200, 100, 50))
    src = img.convert(mode) if mode not in ("I;16", "I") else Image.new(mode, (20, 10), 30000)
    out = load_rgb(_save(src, tmp_path / f"x.{fmt}"))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_16_bit_greyscale_keeps_its_range(tmp_path: Path) -> None:
    # convert("RGB") on I;16 would clip everything above 255 to white.
    arr = np.linspace(0, 65535, 64 * 8, dtype=np.uint16).reshape(8, 64)
    out = np.asarray(load_rgb(_save(Image.fromarray(arr), tmp_path / "g16.png")))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert 100 < out[..., 0].mean() < 155


def test_transparent_pixels_composite_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = np.asarray(load_rgb(_save(img, tmp_path / "t.png")))
    assert (out == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_rgb(_save(img, tmp_path / "o.jpg", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_bad_files_raise_with_a_reason(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(buf, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = {
        empty: "empty file",
        text: "not an image",
        truncated: "cannot decode",
        tmp_path / "gone.jpg": "file not found",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageReadError) as e:
            load_rgb(path)
        assert e.value.path == path and reason in e.value.reason


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tlbuild.data.images.MAX_PIXELS", 100)
    with pytest.raises(ImageReadError, match="too large"):
        load_rgb(_save(Image.new("RGB", (20, 20)), tmp_path / "big.png"))
